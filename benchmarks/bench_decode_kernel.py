"""The paged decode kernel alone: effective bandwidth (KV bytes read / time) per launch setting.

    python benchmarks/bench_decode_kernel.py --context 32768 --batch 8 --json benchmarks/results/decode_kernel.json

Llama-3.1-8B attention shape (8 KV heads x 4 query heads, head dim 128, bf16), pages of 16 tokens in
shuffled order. Compares against SDPA over a contiguous cache of the same bytes (no paging).
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from rheads.engine.decode import paged_decode_triton


def timed(fn, repeat: int = 20) -> float:
    """Median milliseconds of fn over CUDA events, after a warm-up."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-major", action="store_true",
                        help="store pages as [page, head, token, dim] (viewed as [page, token, head, dim])")
    parser.add_argument("--programs-per-sm", default="2", help="split-K programs per SM to try, e.g. 2,4,8")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/decode_kernel.json"))
    args = parser.parse_args()
    batch, kv, group, dim, page = args.batch, args.kv_heads, 4, 128, 16
    pages_per_seq = args.context // page
    pages = batch * pages_per_seq
    if args.head_major:
        k = torch.randn(pages, kv, page, dim, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
        v = torch.randn(pages, kv, page, dim, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    else:
        k = torch.randn(pages, page, kv, dim, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
    q = torch.randn(batch, kv * group, dim, device="cuda", dtype=torch.bfloat16)
    table = torch.randperm(pages, device="cuda").view(batch, pages_per_seq).to(torch.int32)
    lengths = torch.full((batch,), args.context, dtype=torch.int32, device="cuda")
    kv_bytes = 2 * k.numel() * k.element_size()
    rows = []
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    per_sm = [int(x) for x in args.programs_per_sm.split(",")]
    for block, warps, stages, pps in itertools.product((32, 64, 128), (4, 8), (1, 2, 3), per_sm):
        setting = {"block": block, "warps": warps, "stages": stages, "programs_per_sm": pps}
        try:
            ms = timed(lambda: paged_decode_triton(q, k, v, table, lengths, dim ** -0.5, args.context, sms,
                                                   block, warps, stages, pps))
        except Exception as error:  # noqa: BLE001 - a setting that does not compile is reported
            rows.append({**setting, "error": str(error)[:80]})
            continue
        rows.append({**setting, "ms": ms, "tb_per_s": kv_bytes / ms / 1e9})
    contiguous_k = k[table.long()].reshape(batch, -1, kv, dim).transpose(1, 2).contiguous()
    contiguous_v = v[table.long()].reshape(batch, -1, kv, dim).transpose(1, 2).contiguous()
    sdpa_ms = timed(lambda: F.scaled_dot_product_attention(q.view(batch, kv * group, 1, dim), contiguous_k,
                                                            contiguous_v, enable_gqa=True))
    layout = "[page, head, token, dim]" if args.head_major else "[page, token, head, dim]"
    print(f"KV read per call: {kv_bytes / 2**30:.2f} GiB ({batch} x {args.context} tokens, {kv} KV heads), pages {layout}")
    print(f"{'block':>6} {'warps':>6} {'stages':>7} {'per SM':>7} {'ms':>8} {'TB/s':>7}")
    for r in rows:
        print(f"{r['block']:>6} {r['warps']:>6} {r['stages']:>7} {r['programs_per_sm']:>7} " +
              (f"{r['ms']:8.3f} {r['tb_per_s']:7.2f}" if "ms" in r else r["error"]))
    print(f"SDPA over a contiguous cache (no paging): {sdpa_ms:.3f} ms, {kv_bytes / sdpa_ms / 1e9:.2f} TB/s")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"device": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
                                     "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows,
                                     "sdpa_contiguous_ms": sdpa_ms, "kv_bytes": kv_bytes}, indent=1))


if __name__ == "__main__":
    main()
