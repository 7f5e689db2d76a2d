"""How much of the full heads' prefill attention meets a cuDNN plan built at start-up, by workload.

No GPU and no model: the engine's own Scheduler steps a saturated wave on a cache of the
Llama-3.1-8B shape (on the meta device), every decode token taken as sampled at once, and each prefill
chunk is checked against the calls `cudnn_prefill.plan_chunks` records (a chunk of another shape
runs on flash, ~1.8x slower: benchmarks/RESULTS.md). The figure is the share of attention work
(queries x visible keys) in planned chunks, per budget's head counts alike, so one split is enough.

    python benchmarks/plan_coverage.py --json benchmarks/results/plan_coverage.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from rheads.engine import cudnn_prefill, random_split  # noqa: E402
from rheads.engine.cache import CacheConfig, HeadSplitCache  # noqa: E402
from rheads.engine.scheduler import Scheduler  # noqa: E402
from rheads.engine.sequence import SamplingParams, Sequence, Status  # noqa: E402

HEAD_DIM, LAYERS, KV_HEADS, GROUPS = 128, 32, 8, 4


def planned_calls(chunk: int, max_len: int) -> set[tuple]:
    """The (queries, keys, causal) calls plan_chunks plans, for one head count."""
    starts = sorted({0} | {s for whole in range(chunk, max_len - chunk + 1, chunk) for s in (whole - 1, whole)})
    return {call for start in starts for call in cudnn_prefill._calls(chunk, start)}


def wave(lengths: list[int], chunk: int, max_tokens: int, max_num_seqs: int) -> tuple[float, int, int]:
    """Step one wave of prompts of these lengths to the end: (planned share of the attention work,
    prefill chunks, of which planned)."""
    split = random_split(LAYERS, KV_HEADS, 0.5, seed=0)
    max_len = max(lengths) + max_tokens
    cache = HeadSplitCache(split, HEAD_DIM, CacheConfig(memory_bytes=200 << 30, max_num_seqs=max_num_seqs,
                                                        dtype=torch.bfloat16, device="meta"))
    scheduler = Scheduler(cache, chunk)
    for i, n in enumerate(lengths):
        scheduler.add(Sequence(str(i), [0] * n, SamplingParams(max_tokens=max_tokens), arrival=i))
    plans = planned_calls(chunk, max_len)
    work = planned_work = chunks = planned = 0
    while scheduler.has_unfinished():
        for c in scheduler.schedule():
            seq, start = c.seq, c.seq.num_cached
            if start < len(seq.prompt_ids):  # a prefill chunk
                area = c.num_tokens * (start + (c.num_tokens + 1) / 2)
                hit = all(call in plans for call in cudnn_prefill._calls(c.num_tokens, start))
                work, planned_work = work + area, planned_work + area * hit
                chunks, planned = chunks + 1, planned + hit
            seq.num_cached += c.num_tokens
            if seq.num_cached == seq.num_tokens:
                seq.output_ids.append(0)
                if len(seq.output_ids) == max_tokens:
                    seq.status = Status.FINISHED
                    scheduler.free(seq)
    return planned_work / work, chunks, planned


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--chunk", type=int, default=8192, help="max_num_batched_tokens")
    p.add_argument("--requests", type=int, default=14, help="prompts in the wave (budget 0.5's 32k figure)")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    rng = random.Random(args.seed)
    workloads = {
        "32k prompts, exactly 4 chunks": [32768] * args.requests,
        "uneven 16k-32k prompts": [rng.randint(16384, 32768) for _ in range(args.requests)],
        "uneven 1k-32k prompts": [rng.randint(1024, 32768) for _ in range(args.requests)],
    }
    rows = {}
    for name, lengths in tqdm(workloads.items(), desc="waves"):
        share, chunks, planned = wave(lengths, args.chunk, args.max_tokens, max(64, args.requests))
        rows[name] = {"planned_work_share": share, "prefill_chunks": chunks, "planned_chunks": planned}
    print(f"{'workload':<32}{'attention work planned':>24}{'chunks planned':>18}")
    for name, r in rows.items():
        print(f"{name:<32}{r['planned_work_share']:>23.0%}{r['planned_chunks']:>10} / {r['prefill_chunks']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"settings": vars(args) | {"json": str(args.json)}, "workloads": rows},
                                        indent=1))


if __name__ == "__main__":
    main()
