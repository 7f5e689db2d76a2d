"""First, rule out the path: at 31k tokens on the real model, the engine's log-probabilities against the reference's.

If needle accuracy falls at 32k, either the heads kept (profile, budget) or the engine's long-context path
(chunked prefill over a long history, the streaming heads' band, the decode kernel, graphs) is to blame.
This checks the path alone. For each --budgets value the engine, with `rheads serve`'s sink, window, prefill
chunk, graphs and async decode, decodes a few needle-in-a-haystack prompts greedily with top-k logprobs.
The reference (tests/oracles.py; no engine code) runs the same weights through transformers with plain
softmax attention, each streaming KV head masked to sink + window, by blocks of queries so that 31k tokens
fit, over prompt + generated tokens.

Per prompt: the largest |logprob difference| over each position's reported tokens (chosen + top-k)
against the reference in the engine's dtype; how many greedy tokens are the reference's best; the widest
top-2 margin at a disagreement (inside a near-tie rounding may pick either token; a wide one is a bug).
The verdict holds the engine to the fp32 reference on the same weights: within `--factor` times what the
engine's dtype costs the reference itself there, plus a floor, and every greedy token the fp32 best where
its margin exceeds twice that bound (tests/test_served_oracles.py's rule). It also decodes once more
without logprobs (on CUDA that pipelines decode steps) and reports whether the tokens are the same.

    python benchmarks/long_context_oracle.py --json benchmarks/results/long_context_oracle.json     # GPU
    python benchmarks/long_context_oracle.py --dtype float32 --json ...                               # fp32
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import oracles  # noqa: E402

from rheads.engine import EngineConfig, LLMEngine, SamplingParams  # noqa: E402
from rheads.niah import build_prompt, data_path, load_needles, unigram_recall  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
FLOOR = {torch.float32: 1e-4, torch.bfloat16: 1e-3}  # as tests/test_served_oracles.py


def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="qwen2.5-coder-0.5b-instruct", help="preset, local directory or HF id")
    p.add_argument("--profile", default="auto", help="profile file (auto: the shipped one)")
    p.add_argument("--length", type=int, default=31000, help="prompt tokens")
    p.add_argument("--prompts", type=int, default=3, help="needle prompts, at depths spread over the context")
    p.add_argument("--budgets", default="1.0,0.5", help="comma-separated fractions of KV heads kept full")
    p.add_argument("--max-tokens", type=int, default=48, help="generated tokens (room for the answer)")
    p.add_argument("--logprobs", type=int, default=5, help="top-k logprobs per position")
    p.add_argument("--sink", type=int, default=64)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto", help="auto: bfloat16 on CUDA, else float32")
    p.add_argument("--block", type=int, default=1024, help="the reference's queries per attention block")
    p.add_argument("--kv-cache-gib", type=float, default=None, help="both KV pools (default: 8 on CUDA, 0.25 CPU)")
    p.add_argument("--max-num-batched-tokens", type=int, default=None, help="default as serve: 8192 CUDA, 1024 CPU")
    p.add_argument("--factor", type=float, default=3.0, help="the verdict's multiple of the dtype's own error")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.dtype = DTYPES[args.dtype] if args.dtype != "auto" else torch.bfloat16 if cuda else torch.float32
    args.kv_cache_gib = args.kv_cache_gib or (8.0 if cuda else 0.25)
    args.max_num_batched_tokens = args.max_num_batched_tokens or (8192 if cuda else 1024)
    return args


def needle_prompts(tokenizer, length: int, count: int):
    """`count` prompts of `length` tokens with the evaluation's needles (unseen by the shipped profiles)."""
    needles = load_needles(data_path("eval_needles.jsonl"))
    depths = [(i + 1) / (count + 1) for i in range(count)]
    return [(needles[i % len(needles)], depth, build_prompt(tokenizer, needles[i % len(needles)], length, depth))
            for i, depth in enumerate(depths)]


def reported_errors(rows: torch.Tensor, res: oracles.Result) -> torch.Tensor:
    """Per generated position, the largest |engine - reference| over the tokens the engine reported there."""
    return torch.tensor([max(abs(value - float(row[token])) for token, value in [(lp.token_id, lp.logprob), *lp.top])
                         for row, lp in zip(rows, res.logprobs)])


def row_errors(truth: torch.Tensor, other: torch.Tensor, tokens: list[int], k: int) -> torch.Tensor:
    """Per position, |truth - other| over the truth's top-k tokens and the generated one (oracles.logprob_errors)."""
    errors = []
    for want, got, token in zip(truth, other, tokens):
        idx = torch.cat([torch.topk(want, k).indices, torch.tensor([token])])
        errors.append(float((want[idx] - got[idx]).abs().max()))
    return torch.tensor(errors)


def compare(res: oracles.Result, same: torch.Tensor, truth: torch.Tensor, args) -> dict:
    """The engine's run against the reference in its dtype (`same`) and in fp32 (`truth`), rows per position."""
    margins = [oracles.top2_margin(row) for row in same]
    agree = [token == int(row.argmax()) for token, row in zip(res.token_ids, same)]
    yardstick = row_errors(truth, same, res.token_ids, args.logprobs)  # what the dtype costs the reference itself
    bounds = oracles.precision_bounds(yardstick, args.factor, FLOOR[args.dtype])
    errors = reported_errors(truth, res)
    decided = [oracles.top2_margin(row) > 2 * float(b) for row, b in zip(truth, bounds)]
    wrong = [d and token != int(row.argmax()) for d, token, row in zip(decided, res.token_ids, truth)]
    return {"tokens": len(res.token_ids), "max_diff": float(reported_errors(same, res).max()),
            "greedy_agree": sum(agree), "worst_disagreement_margin": max(
                (m for m, a in zip(margins, agree) if not a), default=None),
            "min_margin": min(margins), "max_diff_fp32": float(errors.max()), "yardstick_max": float(yardstick.max()),
            "worst_error_over_bound": float((errors / bounds).max()), "decided": sum(decided),
            "ok": bool((errors <= bounds).all()) and not any(wrong)}


def check_budget(args, budget: float) -> list[dict]:
    """One engine at this budget serves every prompt (twice: with logprobs, then tokens alone); then each
    prompt's references, once the engine has freed its pools."""
    config = EngineConfig(budget=budget, sink=args.sink, window=args.window, device=args.device, dtype=args.dtype,
                          kv_cache_memory=int(args.kv_cache_gib * (1 << 30)),
                          max_num_batched_tokens=args.max_num_batched_tokens)
    engine = LLMEngine.from_model(args.model, None if args.profile == "none" else args.profile, config)
    prompts = needle_prompts(engine.tokenizer, args.length, args.prompts)
    greedy = dict(max_tokens=args.max_tokens, **oracles.GREEDY)
    with_logprobs = SamplingParams(logprobs=args.logprobs, **greedy)
    results = oracles.run(engine, {0: [(f"p{i}", p.input_ids, with_logprobs) for i, (_, _, p) in enumerate(prompts)]})
    tokens_only = oracles.run(engine, {0: [(f"p{i}", p.input_ids, SamplingParams(**greedy))
                                           for i, (_, _, p) in enumerate(prompts)]})
    model, tokenizer, split, eos_ids = engine.model, engine.tokenizer, engine.split, engine.scheduler.eos_ids
    engine.close()  # the model as loaded again: the reference runs on the same weights
    del engine
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the pools' memory back before the references' activations need it
    rows = []
    for i, (needle, depth, _) in enumerate(prompts):
        res = results[f"p{i}"]
        ids, n = res.prompt_ids + res.token_ids[:-1], len(res.token_ids)  # rows that predict each generated token
        how = dict(split=split, sink=args.sink, window=args.window, block=args.block, last=n)
        same = oracles.reference_logprobs(model, ids, **how)
        truth = same if args.dtype == torch.float32 else oracles.reference_logprobs(model, ids, dtype=torch.float32,
                                                                                     **how)
        end = next((j for j, t in enumerate(res.token_ids) if t in eos_ids), n)  # eos is ignored, to compare more
        answer = tokenizer.decode(res.token_ids[:end], skip_special_tokens=True)
        rows.append({"budget": budget, "prompt": i, "depth": round(depth, 3), "answer": answer,
                     "recall": unigram_recall(needle.real_needle, answer), "fraction_full": split.fraction_full,
                     "pipelined_same": tokens_only[f"p{i}"].token_ids == res.token_ids,
                     **compare(res, same, truth, args)})
    del model
    return rows


HEAD = ("budget", "prompt", "recall", "max|d| same dtype", "greedy agree", "worst dis. margin", "max|d| fp32",
        "dtype's own", "err/bound", "no-logprobs same", "ok")


def table_rows(rows: list[dict]) -> list[str]:
    lines = []
    for r in rows:
        margin = "-" if r["worst_disagreement_margin"] is None else f"{r['worst_disagreement_margin']:.4f}"
        lines.append(" | ".join([f"{r['budget']:.2f}", str(r["prompt"]), f"{r['recall']:.2f}", f"{r['max_diff']:.2e}",
                                 f"{r['greedy_agree']}/{r['tokens']}", margin, f"{r['max_diff_fp32']:.2e}",
                                 f"{r['yardstick_max']:.2e}", f"{r['worst_error_over_bound']:.2f}",
                                 str(r["pipelined_same"]), str(r["ok"])]))
    return lines


def main(argv: list[str] | None = None) -> dict:
    """Each budget in turn; its rows are printed and the JSON rewritten as soon as it is done (a run cut short
    by a time limit keeps what it measured)."""
    args = parse_args(argv)
    report = {"model": args.model, "length": args.length, "device": args.device, "dtype": str(args.dtype),
              "sink": args.sink, "window": args.window, "block": args.block, "max_tokens": args.max_tokens,
              "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None, "rows": []}
    print(" | ".join(HEAD), flush=True)
    for budget in (float(b) for b in args.budgets.split(",")):
        rows = check_budget(args, budget)
        report["rows"] += rows
        print("\n".join(table_rows(rows)), flush=True)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
