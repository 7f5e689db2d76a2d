"""Where an engine step's time goes: torch.profiler over prefill and decode steps, per budget.

Random weights at a real shape (default Llama-3.1-8B, bf16) with a synthetic split, like bench_engine.py.
For each budget: feed `--batch` prompts of `--context` tokens in chunks of `--chunk` (profiled: the
prefill steps), then `--steps` decode steps of the whole batch (profiled separately, CUDA graphs off
so each kernel shows), and print the operators that take the most device time. With `--arrival-tokens`
it also times steps in which a prompt of that many tokens arrives beside the decoding batch (the prefill
chunk and the decode rows in one eager step, as a served request's arrival makes them).

    python benchmarks/profile_engine.py --context 8192 --batch 4 --budgets 1.0,0.25
"""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile
from transformers import AutoModelForCausalLM, LlamaConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import SHAPES, _Tokenizer, sync  # noqa: E402

from rheads.engine import EngineConfig, LLMEngine, SamplingParams, random_split  # noqa: E402
from rheads.engine.cache import CacheConfig, Footprint  # noqa: E402
from rheads.profiling.profile import head_dim_of  # noqa: E402


def batch_memory(split, head_dim: int, config: EngineConfig, batch: int) -> int:
    """KV bytes for `batch` sequences of max_model_len tokens under `split`, plus the pools' scratch page
    and slot and some slack: the engine's own formula (cache.Footprint)."""
    footprint = Footprint.of(split, head_dim, CacheConfig(page_size=config.page_size, sink=config.sink,
                                                          window=config.window, dtype=config.dtype))
    return (batch + 2) * footprint.bytes_for(config.max_model_len) + (64 << 20)


def replay_seconds(runner, repeat: int) -> float:
    """Device time of one captured decode step replayed back to back (no host work between): what
    the step would take if the host kept up."""
    graph = max(runner.graphs.values(), key=lambda g: g.size).graph
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeat):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000 / repeat


def arrival_step_seconds(engine: LLMEngine, tokens: int, steps: int, vocab: int, device: str) -> float:
    """Mean wall time of `steps` steps, before each of which a new `tokens`-token prompt (one output
    token) arrives: each step prefills it beside the running batch's decode rows."""
    generator = torch.Generator().manual_seed(1)

    def arrive(i: int) -> None:
        ids = torch.randint(0, vocab, (tokens,), generator=generator).tolist()
        engine.add_request(f"arrival-{i}", ids, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))

    arrive(-1)  # a first one outside the timing: its chunk shape's first run
    engine.step()
    sync(device)
    start = time.perf_counter()
    for i in range(steps):
        arrive(i)
        engine.step()
    sync(device)
    return (time.perf_counter() - start) / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.1-8b")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--budgets", default="1.0,0.5,0.25")
    p.add_argument("--context", type=int, default=8192)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--chunk", type=int, default=8192, help="max_num_batched_tokens")
    p.add_argument("--steps", type=int, default=8, help="decode steps profiled")
    p.add_argument("--kv-memory-gib", type=float, help="default: what the whole batch needs at each budget")
    p.add_argument("--top", type=int, default=15, help="operators listed")
    p.add_argument("--arrival-tokens", type=int, default=0, help="time steps with a prompt this long arriving")
    p.add_argument("--decode-only", action="store_true",
                   help="prefill unprofiled (the profiler slows a long prefill several-fold)")
    args = p.parse_args()
    config = LlamaConfig(**SHAPES[args.shape])
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    sort = "cuda_time_total" if args.device.startswith("cuda") else "cpu_time_total"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    for budget in map(float, args.budgets.split(",")):
        split = random_split(config.num_hidden_layers, config.num_key_value_heads, budget, seed=0)
        room = 2 if args.arrival_tokens else 0  # an arrival, and the one before it finishing
        engine_config = EngineConfig(budget=None, max_num_seqs=args.batch + room, max_num_batched_tokens=args.chunk,
                                     max_model_len=args.context + 8 * args.steps + 64, device=args.device,
                                     dtype=dtype, cuda_graphs=False)
        engine_config.kv_cache_memory = (int(args.kv_memory_gib * 2**30) if args.kv_memory_gib else
                                         batch_memory(split, head_dim_of(config), engine_config, args.batch))
        engine = LLMEngine(model, _Tokenizer(), split, engine_config)
        generator = torch.Generator().manual_seed(0)
        for i in range(args.batch):
            ids = torch.randint(0, config.vocab_size, (args.context,), generator=generator).tolist()
            engine.add_request(str(i), ids, SamplingParams(max_tokens=8 * args.steps, temperature=0, ignore_eos=True))
        engine.step()  # warm-up (kernels compile), outside the profile
        sync(args.device)
        start = time.perf_counter()
        with nullcontext() if args.decode_only else profile(activities=activities) as prefill:
            while not engine.all_decoding:
                engine.step()
            sync(args.device)
        prefill_s = time.perf_counter() - start
        if engine.num_running < args.batch:  # the others finished while waiting for room: not the batch asked for
            raise SystemExit(f"only {engine.num_running} of {args.batch} sequences fit in the KV memory at budget "
                             f"{budget:g}: raise --kv-memory-gib or leave it out")
        engine.step()
        sync(args.device)
        start = time.perf_counter()
        with profile(activities=activities) as decode:
            for _ in range(args.steps):
                engine.step()
            sync(args.device)
        decode_s = (time.perf_counter() - start) / args.steps
        kernels = [e for e in decode.events() if e.device_type == DeviceType.CUDA]  # the kernels themselves, once each
        gpu_s = sum(e.time_range.elapsed_us() for e in kernels) / 1e6 / args.steps
        graph_s = replay_s = None
        if args.device.startswith("cuda"):  # the same steps replayed as CUDA graphs, as served, unprofiled
            engine.runner.use_graphs = True
            engine.step()
            sync(args.device)
            start = time.perf_counter()
            for _ in range(args.steps):
                engine.step()
            sync(args.device)
            graph_s = (time.perf_counter() - start) / args.steps
            replay_s = replay_seconds(engine.runner, args.steps)
        if args.arrival_tokens:
            arrival_s = arrival_step_seconds(engine, args.arrival_tokens, args.steps, config.vocab_size, args.device)
        print(f"\n=== budget {budget:g}: prefill (after the first chunk{'' if prefill else ', unprofiled'}) {prefill_s:.2f} s; "
              f"eager decode step {decode_s * 1000:.1f} ms, of which {gpu_s * 1000:.1f} ms of device kernels; "
              f"with CUDA graphs {'-' if graph_s is None else f'{graph_s * 1000:.1f}'} ms, "
              f"of which the graph replay alone {'-' if replay_s is None else f'{replay_s * 1000:.1f}'} ms "
              f"(batch {args.batch}, context {args.context})")
        if args.arrival_tokens:
            print(f"    a step with a {args.arrival_tokens}-token prompt arriving: {arrival_s * 1000:.1f} ms")
        if prefill is not None:
            print("--- prefill")
            print(prefill.key_averages().table(sort_by=sort, row_limit=args.top, max_name_column_width=60))
        print("--- decode")
        print(decode.key_averages().table(sort_by=sort, row_limit=args.top, max_name_column_width=60))
        engine.close()
        del engine
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
