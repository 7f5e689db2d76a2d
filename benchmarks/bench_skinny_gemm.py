"""A decode step's small matrix products (batch <= 64 rows) against cuBLAS: can one program per column
block, over the whole of K, read the weights faster than cuBLAS's split-K tiles?

Each call reads another copy of the weights (more copies than fit in L2), as a decode step's layers do.
Prints, per shape, cuBLAS's time and the fastest Triton settings, in TB/s of weight bytes; saves JSON.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from bench_decode_kernel import graph_timed


@triton.jit
def _skinny_linear_kernel(x_ptr, w_ptr, out_ptr, M, K, stride_x, stride_w, stride_out,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.arange(0, BLOCK_M)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_ptr + rows[:, None] * stride_x + (k0 + ks)[None, :], mask=rows[:, None] < M, other=0.0)
        w = tl.load(w_ptr + cols[:, None] * stride_w + (k0 + ks)[None, :])
        acc = tl.dot(x, tl.trans(w), acc)
    tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=rows[:, None] < M)


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, block_n: int, block_k: int, warps: int, stages: int,
                  out: torch.Tensor) -> torch.Tensor:
    m, k = x.shape
    n = weight.shape[0]
    _skinny_linear_kernel[(n // block_n,)](x, weight, out, m, k, x.stride(0), weight.stride(0), out.stride(0),
                                           BLOCK_M=max(16, triton.next_power_of_2(m)), BLOCK_N=block_n,
                                           BLOCK_K=block_k, num_warps=warps, num_stages=stages)
    return out


SHAPES = {"qkv": (4096, 6144), "o_proj": (4096, 4096), "down": (14336, 4096), "gate_up": (4096, 28672)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="8,48,64")
    parser.add_argument("--shapes", default="qkv,o_proj,down")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/skinny_gemm.json"))
    args = parser.parse_args()
    settings = list(itertools.product((16, 32, 64, 128), (128, 256), (4, 8), (3, 4)))
    results = []
    for name in args.shapes.split(","):
        k, n = SHAPES[name]
        copies = max(2, (400 << 20) // (k * n * 2))
        weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5 for _ in range(copies)]
        for batch in map(int, args.batches.split(",")):
            x = torch.randn(batch, k, device="cuda", dtype=torch.bfloat16)
            out = torch.empty(batch, n, device="cuda", dtype=torch.bfloat16)
            reference = F.linear(x, weights[0])
            cublas = graph_timed([lambda w=w: F.linear(x, w) for w in weights])
            best = None
            for block_n, block_k, warps, stages in settings:
                try:
                    got = skinny_linear(x, weights[0], block_n, block_k, warps, stages, out)
                    if not torch.allclose(got.float(), reference.float(), atol=2e-2, rtol=2e-2):
                        print(f"  {name} {batch} {block_n},{block_k},{warps},{stages}: wrong result")
                        continue
                    ms = graph_timed([lambda w=w, s=(block_n, block_k, warps, stages): skinny_linear(x, w, *s, out)
                                      for w in weights])
                except Exception as error:  # settings that need more shared memory than the SM has
                    print(f"  {name} {batch} {block_n},{block_k},{warps},{stages}: {type(error).__name__}")
                    continue
                if best is None or ms < best[0]:
                    best = (ms, block_n, block_k, warps, stages)
            tbps = lambda ms: k * n * 2 / (ms * 1e-3) / 1e12
            row = {"shape": name, "batch": batch, "k": k, "n": n, "cublas_us": cublas * 1e3,
                   "cublas_tbps": tbps(cublas), "triton_us": best[0] * 1e3, "triton_tbps": tbps(best[0]),
                   "settings": best[1:]}
            results.append(row)
            print(f"{name:8s} batch {batch:3d}: cuBLAS {cublas * 1e3:6.1f} us ({tbps(cublas):.2f} TB/s), "
                  f"triton {best[0] * 1e3:6.1f} us ({tbps(best[0]):.2f} TB/s) with {best[1:]}", flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"device": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
                                     "results": results}, indent=1))


if __name__ == "__main__":
    main()
