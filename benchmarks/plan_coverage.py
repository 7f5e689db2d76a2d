"""How much of the full heads' prefill attention takes the cuDNN path planned at start-up, by workload.

No GPU and no model: the engine's own Scheduler steps a saturated wave on a cache of the
Llama-3.1-8B shape (on the meta device), every decode token taken as sampled at once, and each prefill
chunk goes through the engine's own choice (`CudnnPlans.planned_queries`, over the calls
`plan_chunks` records at start-up; a chunk it leaves out runs on flash, ~1.8x slower:
benchmarks/RESULTS.md). The figure is the share of attention work (queries x visible keys) on the
cuDNN path; every number of full heads is planned alike, so one head count stands for all.

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
from rheads.engine.block_manager import BlockManager  # noqa: E402
from rheads.engine.cache import CacheConfig, HeadSplitCache  # noqa: E402
from rheads.engine.messages import RunnerOutput  # noqa: E402
from rheads.engine.scheduler import Scheduler  # noqa: E402
from rheads.engine.sequence import SamplingParams, Sequence  # noqa: E402

HEAD_DIM, LAYERS, KV_HEADS, GROUPS = 128, 32, 8, 4


def _shapes_only(q, k, v, causal, scaling):
    """A kernel stand-in on the meta device: plan_chunks records the calls, nothing is computed."""
    return torch.empty_like(q), q.new_empty(q.shape[1], q.shape[0], dtype=torch.float32)


def wave(lengths: list[int], chunk: int, max_tokens: int, max_num_seqs: int,
         max_len: int | None = None) -> tuple[float, int, int]:
    """Step one wave of prompts of these lengths to the end: (share of the attention work on the cuDNN
    path, prefill chunks, of which on the cuDNN path). `max_len` is the engine's max_model_len, up to
    which it plans (default: the wave's longest request); each wave has a plan record of its own, as a
    new engine has."""
    split = random_split(LAYERS, KV_HEADS, 0.5, seed=0)
    max_len = max_len or max(lengths) + max_tokens
    cache = HeadSplitCache(split, HEAD_DIM, CacheConfig(memory_bytes=200 << 30, max_num_seqs=max_num_seqs,
                                                        dtype=torch.bfloat16, device="meta"))
    scheduler = Scheduler(BlockManager(cache), chunk)
    for i, n in enumerate(lengths):
        scheduler.add(Sequence(str(i), [0] * n, SamplingParams(max_tokens=max_tokens), arrival=i))
    meta = torch.device("meta")
    plans = cudnn_prefill.CudnnPlans()
    plans.plan_chunks(meta, torch.bfloat16, HEAD_DIM, GROUPS, {KV_HEADS}, chunk, max_len, _shapes_only)
    work = cudnn_work = chunks = on_cudnn = 0
    while scheduler.has_unfinished():
        step = scheduler.schedule()
        for c in step.chunks:
            seq, start = c.seq, c.seq.num_cached
            if start < len(seq.prompt_ids):  # a prefill chunk
                area = cudnn_prefill.attention_area(c.num_tokens, start)
                q = torch.empty(c.num_tokens, KV_HEADS * GROUPS, HEAD_DIM, dtype=torch.bfloat16, device=meta)
                hit = plans.planned_queries(q, KV_HEADS, start) is not None
                work, cudnn_work = work + area, cudnn_work + area * hit
                chunks, on_cudnn = chunks + 1, on_cudnn + hit
        sampled = step.sampling  # every one draws token 0; the scheduler finishes them at max_tokens
        scheduler.update(step, RunnerOutput(sampled, [0] * len(sampled), [None] * len(sampled)))
    return cudnn_work / work, chunks, on_cudnn


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
        share, chunks, planned = wave(lengths, args.chunk, args.max_tokens, max(64, args.requests),
                                      max_len=32768 + args.max_tokens)  # one engine serves every wave
        rows[name] = {"planned_work_share": share, "prefill_chunks": chunks, "planned_chunks": planned}
    print(f"{'workload':<32}{'attention work on cuDNN':>24}{'chunks on cuDNN':>18}")
    for name, r in rows.items():
        print(f"{name:<32}{r['planned_work_share']:>23.0%}{r['planned_chunks']:>10} / {r['prefill_chunks']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"settings": vars(args) | {"json": str(args.json)}, "workloads": rows},
                                        indent=1))


if __name__ == "__main__":
    main()
