"""Prefill attention alone, per kernel, at Llama-3.1-8B's attention shape, so a change of kernel is chosen
on numbers.

Full heads: one chunk of queries over its whole history (SDPA, lower-right causal mask) per SDPA backend.
Streaming heads (`--band-starts`): one chunk over the sinks + window before it and itself, the SDPA
band (`attention.attend_band`: blocks of queries, boolean masks, the memory-efficient kernel; the CPU
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

from rheads.engine.cudnn_prefill import chunk_attention, cudnn_attend


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
        for name, attend in (("flash", _flash_attend), ("cudnn (the engine)", cudnn_attend)):
            cases[f"split: {name}"] = lambda attend=attend: _split(attend, q, k, v, n)
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
    and its own: the SDPA band (`attention.attend_band`, the CPU path) against the FlexAttention band
    the engine runs on CUDA (`band.py`; block mask built once per chunk, timed apart)."""
    from rheads.engine.attention import attend_band
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
    run_sdpa = lambda: attend_band(q, keys, values, q_pos, k_pos, start, scale, sink, window)  # noqa: E731
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


def _flash_attend(q, k, v, causal: bool, scaling: float):
    """`cudnn_prefill.Attend` through SDPA's flash kernel, KV heads as they are."""
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], 0.0, causal, False,
        scale=scaling)[:2]
    return out[0].transpose(0, 1), lse.reshape(q.shape[1], q.shape[0])


def _split(attend, q, k, v, n: int) -> torch.Tensor:
    """The engine's two-part chunk attention (`cudnn_prefill.chunk_attention`) with `attend` as the kernel:
    q [1, H, n, D] over k, v [1, Hkv, m, D] whose last n keys are the chunk's -> [1, H, n, D]."""
    m = k.shape[2]
    q_, k_, v_ = (t[0].transpose(0, 1) for t in (q, k, v))  # -> [tokens, heads, D]
    out = chunk_attention(q_, k_[m - n:], v_[m - n:], k_[:m - n], v_[:m - n], q.shape[-1] ** -0.5, attend)
    return out.transpose(0, 1)[None]


def _run(backend, q, k, v, mask, gqa: bool = False, causal: bool = False) -> torch.Tensor:
    with sdpa_kernel([backend]):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa)


if __name__ == "__main__":
    raise SystemExit(main())
