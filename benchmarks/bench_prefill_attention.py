"""Prefill attention for the full heads alone: one chunk of queries over its whole history, per SDPA backend.

The engine's full-head prefill is SDPA with a lower-right causal mask over the chunk's history (keys
repeated to the query heads). This times that against SDPA's other GPU kernels at Llama-3.1-8B's
attention shape, so a change of backend is chosen on numbers:

    python benchmarks/bench_prefill_attention.py --chunk 8192 --history 8192,32768
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
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, out, indent=1)
    return 0


def _run(backend, q, k, v, mask, gqa: bool = False, causal: bool = False) -> torch.Tensor:
    with sdpa_kernel([backend]):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa)


if __name__ == "__main__":
    raise SystemExit(main())
