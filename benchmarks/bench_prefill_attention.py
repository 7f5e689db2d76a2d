"""Prefill attention alone, per kernel, at Llama-3.1-8B's attention shape, so a change of kernel is chosen
on numbers.

Full heads: one chunk of queries over its whole history (SDPA, lower-right causal mask) per SDPA backend.
Streaming heads (`--band-starts`): one chunk over the sinks + window before it and itself, the SDPA
band (`attention._attend_band`: blocks of queries, boolean masks, the memory-efficient kernel; the CPU
path) against the FlexAttention band the engine runs on CUDA (`band.py`; the block mask's build timed
apart).

    python benchmarks/bench_prefill_attention.py --chunk 8192 --history 8192,32768 --band-starts 0,24576
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right


def timed(fn, repeats: int) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats / 1000


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--chunk", type=int, default=8192)
    p.add_argument("--history", default="8192,32768", help="keys per call (the chunk is their last part)")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--band-starts", default="", help="positions of streaming-head chunks to time (e.g. 0,24576)")
    p.add_argument("--streaming-kv-heads", type=int, default=4, help="streaming KV heads a layer (4: budget 0.5)")
    p.add_argument("--sink", type=int, default=64)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--json")
    args = p.parse_args()
    group, rows = args.heads // args.kv_heads, []
    for m in map(int, args.history.split(",")):
        n = min(args.chunk, m)
        q = torch.randn(1, args.heads, n, 128, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, args.kv_heads, m, 128, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        flops = 4 * args.heads * 128 * (n * m - n * (n - 1) / 2)  # causal: the visible half of the chunk's square
        mask = causal_lower_right(n, m)
        cases = {
            "flash, keys repeated (the engine)": lambda: _run(SDPBackend.FLASH_ATTENTION, q, k.repeat_interleave(group, 1),
                                                               v.repeat_interleave(group, 1), mask),
            "flash, enable_gqa": lambda: _run(SDPBackend.FLASH_ATTENTION, q, k, v, mask, gqa=True),
            "cudnn, keys repeated": lambda: _run(SDPBackend.CUDNN_ATTENTION, q, k.repeat_interleave(group, 1),
                                                 v.repeat_interleave(group, 1), mask),
            "cudnn, enable_gqa": lambda: _run(SDPBackend.CUDNN_ATTENTION, q, k, v, mask, gqa=True),
        }
        for hist, own in (("flash", "flash"), ("cudnn", "cudnn"), ("flash", "cudnn")):
            cases[f"split: history {hist}, own {own}"] = (
                lambda hist=hist, own=own: _split(hist, own, q, k, v, n))
        if n == m:
            cases["cudnn, is_causal"] = lambda: _run(SDPBackend.CUDNN_ATTENTION, q, k.repeat_interleave(group, 1),
                                                     v.repeat_interleave(group, 1), None, causal=True)
        reference = _run(SDPBackend.FLASH_ATTENTION, q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), mask)
        for name, fn in cases.items():
            try:
                error = float((fn() - reference).abs().max())
                seconds = timed(fn, args.repeats)
                rows.append({"queries": n, "keys": m, "case": name, "ms": seconds * 1000,
                             "tflops": flops / seconds / 1e12, "max_abs_diff": error})
            except RuntimeError as failure:
                rows.append({"queries": n, "keys": m, "case": name, "error": str(failure).splitlines()[0][:120]})
            row = rows[-1]
            print(f"{n:>6} x {m:>6}  {name:<36} " + (f"{row['ms']:8.2f} ms {row['tflops']:6.0f} TFLOP/s "
                                                       f"diff {row['max_abs_diff']:.3g}" if "ms" in row else row["error"]))
    for m in map(int, args.history.split(",")):  # cuDNN plans once per shape: what a new shape costs
        n = min(args.chunk, m) - 64
        q = torch.randn(1, args.heads, n, 128, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, args.kv_heads, m - 64, 128, device="cuda", dtype=torch.bfloat16)
        for gqa in (False, True):
            keys = k if gqa else k.repeat_interleave(group, 1)
            torch.cuda.synchronize()
            start = time.perf_counter()
            try:
                _run(SDPBackend.CUDNN_ATTENTION, q, keys, keys, causal_lower_right(n, m - 64), gqa=gqa)
                torch.cuda.synchronize()
                first = (time.perf_counter() - start) * 1000
                again = timed(lambda: _run(SDPBackend.CUDNN_ATTENTION, q, keys, keys, causal_lower_right(n, m - 64), gqa=gqa), 3) * 1000
                rows.append({"queries": n, "keys": m - 64, "case": f"cudnn first call, gqa={gqa}", "first_ms": first, "ms": again})
                print(f"{n:>6} x {m - 64:>6}  cudnn at a new shape (gqa={gqa}): first call {first:.1f} ms, then {again:.2f} ms")
            except RuntimeError as failure:
                print(f"cudnn new shape gqa={gqa}: {str(failure).splitlines()[0][:120]}")
    for start in [int(x) for x in args.band_starts.split(",") if x]:
        rows += streaming_cases(args, start)
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, out, indent=1)
    return 0


def streaming_cases(args, start: int) -> list[dict]:
    """A streaming-head chunk of `args.chunk` queries at positions start.. over the keys held before it
    and its own: the SDPA band (`attention._attend_band`, the CPU path) against the FlexAttention band
    the engine runs on CUDA (`band.py`; block mask built once per chunk, timed apart)."""
    from rheads.engine.attention import _attend_band
    from rheads.engine.band import band_attention, band_block_mask
    from rheads.engine.cache import held_positions

    sink, window, n = args.sink, args.window, args.chunk
    group = args.heads // args.kv_heads
    heads, kv_heads = args.streaming_kv_heads * group, args.streaming_kv_heads
    held = held_positions(start, sink, window, "cuda")
    q_pos = torch.arange(start, start + n, device="cuda")
    q = torch.randn(n, heads, 128, device="cuda", dtype=torch.bfloat16)
    held_k, held_v, k, v = (torch.randn(rows, kv_heads, 128, device="cuda", dtype=torch.bfloat16)
                            for rows in (len(held), len(held), n, n))
    scale = 128 ** -0.5
    build = lambda: band_block_mask(held, start, n, sink, window)  # noqa: E731
    start_s = time.perf_counter()
    mask = build()
    run_flex = lambda: band_attention(q, held_k, held_v, k, v, mask, scale)  # noqa: E731
    keys, values, k_pos = torch.cat([held_k, k]), torch.cat([held_v, v]), torch.cat([held, q_pos])
    run_sdpa = lambda: _attend_band(q, keys, values, q_pos, k_pos, start, scale, sink, window)  # noqa: E731
    error = float((run_flex() - run_sdpa()).abs().max())
    torch.cuda.synchronize()
    first_s = time.perf_counter() - start_s
    cases = {"SDPA band (boolean masks, CPU path)": (run_sdpa, 0.0), "flex band (CUDA path)": (run_flex, error),
             "flex block mask build": (build, 0.0)}
    rows = []
    for name, (fn, diff) in cases.items():
        ms = timed(fn, args.repeats) * 1000
        rows.append({"queries": n, "start": start, "streaming_kv_heads": kv_heads, "case": name, "ms": ms,
                     "max_abs_diff": diff})
        print(f"{n:>6} at {start:>6}, {kv_heads} streaming KV heads  {name:<36} {ms:8.2f} ms  diff {diff:.3g}")
    print(f"  flex's first call in this process (compile + block mask): {first_s:.1f} s")
    rows.append({"queries": n, "start": start, "case": "flex first call (s)", "seconds": first_s})
    return rows


def _with_lse(backend: str, q, k, v, causal: bool):
    """(output, log-sum-exp [B, H, n] in fp32) from SDPA's flash or cuDNN kernel, KV heads as they are."""
    if backend == "cudnn":
        out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False)[:2]
    else:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False)[:2]
    return out, lse.reshape(q.shape[:3])


def _split(history: str, own: str, q, k, v, n: int) -> torch.Tensor:
    """The chunk over the keys before it (no mask) and over itself (square causal), merged by log-sum-exp."""
    m = k.shape[2]
    out, lse = _with_lse(own, q, k[:, :, m - n:], v[:, :, m - n:], True)
    if m == n:
        return out
    before, before_lse = _with_lse(history, q, k[:, :, :m - n], v[:, :, :m - n], False)
    total = torch.logaddexp(lse, before_lse)
    return (out * (lse - total).exp()[..., None] + before * (before_lse - total).exp()[..., None]).to(q.dtype)


def _run(backend, q, k, v, mask, gqa: bool = False, causal: bool = False) -> torch.Tensor:
    with sdpa_kernel([backend]):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa)


if __name__ == "__main__":
    raise SystemExit(main())
