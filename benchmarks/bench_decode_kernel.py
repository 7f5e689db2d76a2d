"""The fused decode kernel alone: effective bandwidth (KV bytes read / time) per launch setting.

    python benchmarks/bench_decode_kernel.py --context 32768 --batch 8 --json benchmarks/results/decode_kernel.json

Llama-3.1-8B attention shape (8 KV heads x 4 query heads, head dim 128, bf16), pages of 16 tokens
(in order, as the engine hands them out, or --shuffle); --num-full 4 times a split layer. With every
head paged it compares against SDPA over a contiguous cache of the same bytes (no paging).
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from rheads.engine.decode import DecodeBatch, head_split_decode_triton


def timed(fn, repeat: int = 20, calls: int = 10) -> float:
    """Median milliseconds of one fn call, as a CUDA graph of `calls` back-to-back calls replays them (as
    the engine serves decode steps): timing single calls would count the Python launch, which takes
    longer than an 8k layer's kernel."""
    return graph_timed([fn] * calls, repeat)


def graph_timed(fns: list, repeat: int = 20) -> float:
    """Median milliseconds per call of a CUDA graph that runs each of `fns` once, in order."""
    for fn in fns:
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / len(fns))
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--num-full", type=int, default=None,
                        help="KV heads with pages (default: all); the rest read a window slot of 320 entries")
    parser.add_argument("--shuffle", action="store_true",
                        help="pages in random order (the engine hands a prompt's pages out in order)")
    parser.add_argument("--programs-per-sm", default="8", help="split-K programs per SM to try, e.g. 2,4,8")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/decode_kernel.json"))
    args = parser.parse_args()
    batch, kv, group, dim, page, ring = args.batch, args.kv_heads, 4, 128, 16, 320
    full_heads = kv if args.num_full is None else args.num_full
    pages_per_seq = args.context // page
    pages = batch * pages_per_seq
    make = lambda *shape: torch.randn(*shape, device="cuda", dtype=torch.bfloat16)  # noqa: E731
    full = (make(pages + 1, page, full_heads, dim), make(pages + 1, page, full_heads, dim)) if full_heads else None
    rings = (make(batch + 1, ring, kv - full_heads, dim), make(batch + 1, ring, kv - full_heads, dim)) \
        if full_heads < kv else None
    order = torch.randperm(pages) if args.shuffle else torch.arange(pages)
    table = order.view(batch, pages_per_seq).to(torch.int32)
    last = torch.full((batch,), args.context - 1)
    decode = DecodeBatch(rows=torch.arange(batch), page_table=table, page_ids=table[:, -1].long(),
                         page_offsets=last % page, lengths=(last + 1).to(torch.int32), slots=torch.arange(batch),
                         ring_offsets=(64 + (last - 64) % 256)[None],
                         ring_lengths=torch.full((1, batch), ring, dtype=torch.int32),
                         max_length=args.context).to("cuda")
    q, out = make(batch, kv * group, dim), make(batch, kv * group, dim)
    k, v = make(batch, kv, dim), make(batch, kv, dim)
    kv_bytes = sum(2 * t[0].numel() * t[0].element_size() for t in (full, rings) if t)
    rows = []
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    per_sm = [int(x) for x in args.programs_per_sm.split(",")]
    for block, warps, stages, pps in itertools.product((32, 64, 128), (4, 8), (1, 2, 3), per_sm):
        setting = {"block": block, "warps": warps, "stages": stages, "programs_per_sm": pps}
        try:
            ms = timed(lambda: head_split_decode_triton(q, k, v, out, decode, full, rings, dim ** -0.5, num_sms=sms,
                                                        block=block, num_warps=warps, num_stages=stages,
                                                        programs_per_sm=pps))
        except Exception as error:  # noqa: BLE001 - a setting that does not compile is reported
            rows.append({**setting, "error": str(error)[:80]})
            continue
        rows.append({**setting, "ms": ms, "tb_per_s": kv_bytes / ms / 1e9})
    sdpa_ms = None
    if full_heads == kv:  # the same bytes in one contiguous tensor per sequence: what paging costs
        contiguous_k = full[0][table.cuda().long()].reshape(batch, -1, kv, dim).transpose(1, 2).contiguous()
        contiguous_v = full[1][table.cuda().long()].reshape(batch, -1, kv, dim).transpose(1, 2).contiguous()
        sdpa_ms = timed(lambda: F.scaled_dot_product_attention(q.view(batch, kv * group, 1, dim), contiguous_k,
                                                                contiguous_v, enable_gqa=True))
    print(f"KV read per call: {kv_bytes / 2**30:.2f} GiB ({batch} x {args.context} tokens, {full_heads} of {kv} "
          f"KV heads paged, pages {'shuffled' if args.shuffle else 'in order'})")
    print(f"{'block':>6} {'warps':>6} {'stages':>7} {'per SM':>7} {'ms':>8} {'TB/s':>7}")
    for r in rows:
        print(f"{r['block']:>6} {r['warps']:>6} {r['stages']:>7} {r['programs_per_sm']:>7} " +
              (f"{r['ms']:8.3f} {r['tb_per_s']:7.2f}" if "ms" in r else r["error"]))
    if sdpa_ms is not None:
        print(f"SDPA over a contiguous cache (no paging): {sdpa_ms:.3f} ms, {kv_bytes / sdpa_ms / 1e9:.2f} TB/s")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"device": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
                                     "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows,
                                     "sdpa_contiguous_ms": sdpa_ms, "kv_bytes": kv_bytes}, indent=1))


if __name__ == "__main__":
    main()
