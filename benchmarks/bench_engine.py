"""Engine benchmark: KV bytes per sequence, concurrent 32k sequences, decode throughput, GPU-vs-CPU check.

Random weights at a real shape (default: Llama-3.1-8B, bf16 on GPU) with a synthetic profile: the
figures depend on shapes, not trained values. Budgets are compared side by side in one run.

    python benchmarks/bench_engine.py --json benchmarks/results/engine_gpu.json          # on a GPU
    python benchmarks/bench_engine.py --shape tiny --device cpu --contexts 512 --batch 2   # smoke run
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, LlamaConfig

from rheads.engine import EngineConfig, LLMEngine, SamplingParams, random_split
from rheads.engine.cache import CacheConfig, HeadSplitCache
from rheads.profiling.profile import head_dim_of

SHAPES = {
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072,
                         rope_theta=500000.0),
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=4, vocab_size=1024, max_position_embeddings=65536),
}


PREFILL_CHUNK = 2048


class _Tokenizer:
    """Enough of a tokenizer for token-id requests: the engine only decodes output text."""

    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True) -> str:
        return ""


def footprint_table(config: LlamaConfig, budgets: list[float], contexts: list[int], memory: int,
                    sink: int, window: int, max_num_seqs: int) -> dict:
    """KV bytes per sequence by context and the most 32k sequences that fit, from the cache's own accounting."""
    head_dim = head_dim_of(config)
    rows, fits = {}, {}
    for budget in budgets:
        split = random_split(config.num_hidden_layers, config.num_key_value_heads, budget, seed=0)
        cache = HeadSplitCache(split, head_dim, CacheConfig(sink=sink, window=window, memory_bytes=memory,
                                                            max_num_seqs=max_num_seqs, dtype=torch.bfloat16, device="meta"))
        rows[budget] = {n: cache.footprint.bytes_for(n) for n in contexts}
        need = cache.pages_for(32768 + 128)
        fits[budget] = min(cache.num_seq_slots, cache.num_pages // need if need else cache.num_seq_slots)
    return {"bytes_per_sequence": rows, "max_concurrent_32k": fits}


def decode_throughput(model, split, context: int, batch: int, steps: int, memory: int, device: str,
                      dtype: torch.dtype, sink: int, window: int) -> dict:
    """Prefill `batch` prompts of `context` tokens, then time `steps` decode steps of the whole batch.

    Sequences that finish prefill early decode while the others prefill, so max_tokens leaves room for
    those tokens and for the timed steps, which start once every sequence is decoding.
    """
    chunk = PREFILL_CHUNK
    max_tokens = steps + batch * (context // chunk + 1) + 1
    engine = LLMEngine(model, _Tokenizer(), split, EngineConfig(
        budget=None, sink=sink, window=window, kv_cache_memory=memory, max_num_seqs=batch,
        max_num_batched_tokens=chunk, max_model_len=context + max_tokens, device=device, dtype=dtype))
    generator = torch.Generator().manual_seed(0)
    for i in range(batch):
        ids = torch.randint(0, model.config.vocab_size, (context,), generator=generator).tolist()
        engine.add_request(str(i), ids, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
    engine.prepare_thread()  # start-up work (cuDNN plans), not part of the prefill
    start = time.perf_counter()
    while not engine.all_decoding:
        engine.step()
    sync(device)
    prefill = time.perf_counter() - start
    start, tokens = time.perf_counter(), 0
    for _ in range(steps):
        tokens += len(engine.step())
    sync(device)
    decode = time.perf_counter() - start
    usage = engine.usage()
    engine.close()
    return {"context": context, "batch": batch, "prefill_s": prefill, "decode_s": decode,
            "decode_tokens": tokens, "tokens_per_s": tokens / decode, "kv_bytes_capacity": usage.bytes_capacity}


def fitting(config: LlamaConfig, split, context: int, memory: int, args: argparse.Namespace) -> int:
    """How many sequences decode_throughput can run for this split in `memory` (the cache's own sizes)."""
    head_dim = head_dim_of(config)
    cache = HeadSplitCache(split, head_dim, CacheConfig(sink=args.sink, window=args.window, memory_bytes=memory,
                                                        max_num_seqs=args.max_num_seqs, dtype=torch.bfloat16,
                                                        device="meta"))
    for batch in range(min(cache.num_seq_slots, args.max_num_seqs), 0, -1):
        tokens = context + args.steps + batch * (context // PREFILL_CHUNK + 1) + 1  # as decode_throughput asks
        if batch * cache.pages_for(tokens) <= cache.num_pages or not cache.has_full_heads:
            return batch
    return 1


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def gpu_matches_cpu(budget: float) -> dict:
    """The same tiny fp32 model, split and prompts on CPU and GPU: greedy tokens and logprobs agree."""
    config = LlamaConfig(**SHAPES["tiny"])
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    split = random_split(config.num_hidden_layers, config.num_key_value_heads, budget, seed=1)
    results = {}
    prompts = [torch.randint(0, config.vocab_size, (n,), generator=torch.Generator().manual_seed(n)).tolist()
               for n in (300, 700)]
    for device in ("cpu", "cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
        model.load_state_dict(base.state_dict())
        engine = LLMEngine(model.to(device), _Tokenizer(), split, EngineConfig(
            budget=None, sink=16, window=64, kv_cache_memory=64 << 20, max_num_batched_tokens=256,
            device=device, dtype=torch.float32))
        for i, ids in enumerate(prompts):
            engine.add_request(str(i), ids, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, logprobs=0))
        out: dict[str, list] = {"0": [], "1": []}
        while engine.has_unfinished():
            for o in engine.step():
                out[o.request_id] += [(lp.token_id, lp.logprob) for lp in o.new_logprobs]
        results[device] = out
    same_tokens = all([t for t, _ in results["cpu"][k]] == [t for t, _ in results["cuda"][k]] for k in out)
    diff = max(abs(a[1] - b[1]) for k in out for a, b in zip(results["cpu"][k], results["cuda"][k]))
    return {"budget": budget, "same_tokens": same_tokens, "max_logprob_diff": diff}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.1-8b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--budgets", default="1.0,0.5,0.25")
    parser.add_argument("--contexts", default="8192,32768", help="decode-throughput contexts")
    parser.add_argument("--batch", type=int, default=8, help="sequences decoded together")
    parser.add_argument("--steps", type=int, default=32, help="decode steps timed")
    parser.add_argument("--kv-memory-gib", type=float, default=48.0)
    parser.add_argument("--sink", type=int, default=64)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--max-num-seqs", type=int, default=64, help="window slots reserved (engine default)")
    parser.add_argument("--saturate", action="store_true",
                        help="decode as many sequences as each budget fits in the KV memory (up to --max-num-seqs) "
                        "instead of --batch: the throughput the memory saving buys")
    parser.add_argument("--skip-decode", action="store_true", help="only the footprint figures (no model)")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/engine.json"))
    args = parser.parse_args()
    budgets = [float(b) for b in args.budgets.split(",")]
    contexts = [int(c) for c in args.contexts.split(",")]
    config = LlamaConfig(**SHAPES[args.shape])
    memory = int(args.kv_memory_gib * 2**30)
    report: dict = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor(),
                    "date": datetime.date.today().isoformat(), "shape": args.shape, "args": vars(args) | {"json": str(args.json)}}
    report["footprint"] = footprint_table(config, budgets, [1024, 4096, 8192, 16384, 32768, 65536], memory,
                                          args.sink, args.window, args.max_num_seqs)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    runs = []
    if not args.skip_decode:
        with torch.device(args.device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
        cells = [(b, c) for c in contexts for b in budgets]
        for budget, context in tqdm(cells, desc="decode throughput"):
            split = random_split(config.num_hidden_layers, config.num_key_value_heads, budget, seed=0)
            batch = fitting(config, split, context, memory, args) if args.saturate else args.batch
            runs.append({"budget": budget, **decode_throughput(model, split, context, batch, args.steps,
                                                               memory, args.device, dtype, args.sink, args.window)})
    report["decode"] = runs
    if args.device.startswith("cuda"):
        report["gpu_vs_cpu"] = [gpu_matches_cpu(b) for b in (1.0, 0.5)]
    print_report(report, budgets)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1, default=str))


def print_report(report: dict, budgets: list[float]) -> None:
    foot = report["footprint"]
    print(f"\nKV bytes per sequence (MiB) on {report['device']}, shape {report['shape']}")
    contexts = list(next(iter(foot["bytes_per_sequence"].values())))
    print("budget  " + "".join(f"{c:>10}" for c in contexts))
    for budget, row in foot["bytes_per_sequence"].items():
        print(f"{budget:<8}" + "".join(f"{row[c] / 2**20:>10.1f}" for c in contexts))
    full = foot["max_concurrent_32k"][1.0] if 1.0 in foot["max_concurrent_32k"] else None
    print("\nmost concurrent 32k sequences in the same KV memory")
    for budget, n in foot["max_concurrent_32k"].items():
        print(f"  budget {budget}: {n}" + (f"  ({n / full:.2f}x budget 1.0)" if full else ""))
    print("\ndecode throughput (output tokens/s, batch decode after prefill)")
    base = {r["context"]: r["tokens_per_s"] for r in report["decode"] if r["budget"] == 1.0}
    for r in report["decode"]:
        ratio = f"  {r['tokens_per_s'] / base[r['context']]:.2f}x budget 1.0" if r["context"] in base else ""
        print(f"  ctx {r['context']:>6} budget {r['budget']:<5} batch {r['batch']}: {r['tokens_per_s']:8.1f} tok/s"
              f"  (prefill {r['prefill_s']:.1f} s){ratio}")
    for check in report.get("gpu_vs_cpu", []):
        print(f"GPU vs CPU at budget {check['budget']}: same tokens {check['same_tokens']}, "
              f"max logprob diff {check['max_logprob_diff']:.2e}")


if __name__ == "__main__":
    main()
