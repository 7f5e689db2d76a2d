"""Structured-output overhead: output tokens/s of the engine with and without a JSON schema, at batch 1 and 32.

Random weights at a real shape (default: Llama-3.1-8B) and the SmolLM2 tokenizer, padded to the shape's
vocabulary (the padding tokens are never allowed by the grammar); the figures depend on shapes and the
grammar's mask work, not on trained values. The schema holds one string of exactly `--chars` characters,
so a constrained request cannot end before the free ones (each decodes up to `--tokens`).

    python benchmarks/bench_structured.py --device cuda --json benchmarks/results/structured_gpu.json
    python benchmarks/bench_structured.py --shape tiny --batches 1 4 --tokens 16   # CPU smoke run
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from pathlib import Path

import llguidance
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from rheads.engine import EngineConfig, LLMEngine, SamplingParams, random_split
from rheads.models import resolve_model
from server.structured import json_schema_grammar

from bench_engine import SHAPES  # benchmarks/, the script's own directory


def schema(chars: int) -> dict:
    return {"type": "object", "properties": {"text": {"type": "string", "minLength": chars, "maxLength": chars}},
            "required": ["text"], "additionalProperties": False}


def run_batch(engine: LLMEngine, batch: int, tokens: int, grammar: str | None, prompt_len: int) -> dict:
    """`batch` requests at once; decode tokens/s over the steps after every prompt is in (prefill excluded)."""
    generator = torch.Generator().manual_seed(0)
    for i in range(batch):
        ids = torch.randint(0, 1000, (prompt_len,), generator=generator).tolist()
        engine.add_request(f"r{i}", ids, SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True,
                                                        grammar=grammar))
    produced, start, counted = 0, None, 0
    while engine.has_unfinished():
        new = sum(len(o.new_token_ids) for o in engine.step())
        produced += new
        if start is not None:
            counted += new
        elif engine.all_decoding:
            start = time.perf_counter()  # every prompt is in: decode steps from here
    seconds = time.perf_counter() - start if start is not None else float("nan")
    return {"batch": batch, "output_tokens": produced, "timed_tokens": counted, "seconds": seconds,
            "tokens_per_s": counted / seconds if seconds > 0 else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=list(SHAPES), default="llama-3.1-8b")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--tokens", type=int, default=128, help="max output tokens a request")
    parser.add_argument("--chars", type=int, default=1000, help="the schema's string length (outlasts --tokens)")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args()

    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m-instruct").path)
    shape = SHAPES[args.shape]  # at least the tokenizer's vocabulary, for the grammar's sake
    config = LlamaConfig(**{**shape, "vocab_size": max(shape["vocab_size"], len(tokenizer))})
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    split = random_split(config.num_hidden_layers, config.num_key_value_heads, args.budget, seed=0)
    engine = LLMEngine(model, tokenizer, split, EngineConfig(
        budget=None, kv_cache_memory=2 << 30 if args.device.startswith("cuda") else 256 << 20,
        max_num_seqs=max(args.batches), max_model_len=args.prompt_len + args.tokens + 8, device=args.device,
        dtype=dtype))
    grammar = json_schema_grammar(schema(args.chars))
    run_batch(engine, 1, 4, grammar, args.prompt_len)  # warm up: kernels, and the grammar's tokenizer
    rows = []
    for batch in args.batches:
        free = run_batch(engine, batch, args.tokens, None, args.prompt_len)
        constrained = run_batch(engine, batch, args.tokens, grammar, args.prompt_len)
        rows.append({"batch": batch, "free": free, "json_schema": constrained,
                     "ratio": (constrained["tokens_per_s"] or 0) / free["tokens_per_s"] if free["tokens_per_s"]
                     else None})
    print(f"{'batch':>5} {'free tok/s':>11} {'schema tok/s':>13} {'ratio':>6}")
    for row in rows:
        print(f"{row['batch']:>5} {row['free']['tokens_per_s']:>11.1f} {row['json_schema']['tokens_per_s']:>13.1f} "
              f"{row['ratio']:>6.3f}")
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(), "host": platform.node(),
              "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor(),
              "args": {k: str(v) for k, v in vars(args).items()}, "llguidance": llguidance.__version__,
              "rows": rows}
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    engine.close()


if __name__ == "__main__":
    main()
