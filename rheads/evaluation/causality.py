"""The retrieval-head paper's causality test (Wu et al. 2024): mask heads and see whether needles are still found.

Masking a head makes its attention uniform: it weights every key it may see equally, so its output at
query position q is the mean of V over keys 0..q (the paper masks by zeroing the query, i.e. the
pre-softmax logits, not the head's output). If retrieval heads are what copies the needle out of the
context, masking the top-K of them should collapse needle-in-a-haystack accuracy, while masking K random
non-retrieval heads (score below 0.1) should barely move it.

The model runs through plain `model.generate` (greedy, with its KV cache), with transformers' own SDPA
attention and the masked heads' queries zeroed -- not through the serving engine: the point is the model.
Prompts, needles, haystack, grid and scoring are `rheads eval niah`'s (rheads.evaluation.grid).

Output directory:
    meta.json       what the cells depend on (model, profile scores, needles, haystack, dtype, ...)
    cells.jsonl     one JSON line per (masking, length, depth, needle), saved after every cell; a rerun
                    skips the cells already there
    summary.json    accuracy per masking and per K (random seeds as mean and std), the heads masked
    accuracy_vs_masked_heads.png
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from ..models import eos_token_ids
from ..niah import haystack_files
from ..profiling.profile import ModelIdentity, Profile
from .grid import (
    Answer, Cell, cell_key, check_resumable, eval_needles, format_mean_std, grid, grid_prompts, haystack_sha,
    load_cells, mean, save_cells, score, short_sha, std, write_atomic,
)
from .niah_eval import EvalConfig, EvalResult, load_model_and_profile

ATTENTION_NAME = "rheads_causality"
MASKED_ATTR = "rheads_masked_query_heads"  # on each attention module: LongTensor of its masked query heads
NON_RETRIEVAL_BELOW = 0.1  # the paper's retrieval-head threshold; the random control draws from heads below it
PLOT_NAME = "accuracy_vs_masked_heads.png"

Head = tuple[int, int]  # (layer, query head)


# --- masking -----------------------------------------------------------------------------------------

def masked_sdpa_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, except that the query heads in `module.rheads_masked_query_heads` attend
    uniformly. Returns (attn_output [batch, q_len, heads, head_dim], None) like sdpa_attention_forward.

    A masked head's query is zeroed, so all its logits are 0 and softmax weights equally every key the mask
    lets it see: its output is the causal cumulative mean of V. During generation with a cache, key and
    value hold the whole history and the queries are its last q_len positions; under GQA a query head reads
    its own KV head's values. Every other head is exactly SDPA's."""
    heads = getattr(module, MASKED_ATTR, None)
    if heads is not None and heads.numel():
        query = query.index_fill(1, heads.to(query.device), 0.0)
    q_len, kv_len = query.shape[2], key.shape[2]
    if attention_mask is None and 1 < q_len < kv_len:
        # SDPA's is_causal aligns the triangle top-left; queries that follow cached keys need it bottom-right
        attention_mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len)
        attention_mask = attention_mask[None, None]
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(ATTENTION_NAME, masked_sdpa_attention)
# the masks transformers builds for SDPA (causal, padding, sliding window) suit this function too
AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


@contextmanager
def heads_masked(model, heads: Iterable[Head]) -> Iterator[None]:
    """Run `model` (Llama / Qwen2 / Mistral layout) with these (layer, query head)s attending uniformly and
    every other head through SDPA; on exit the model's own attention implementation is back."""
    layers = model.model.layers
    num_heads = model.config.num_attention_heads
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        if not (0 <= layer < len(layers) and 0 <= head < num_heads):
            raise ValueError(f"head ({layer}, {head}) is outside the model's {len(layers)} layers x {num_heads} heads")
        by_layer.setdefault(layer, []).append(head)
    device = next(model.parameters()).device
    before = model.config._attn_implementation
    try:
        for index, layer in enumerate(layers):
            setattr(layer.self_attn, MASKED_ATTR,
                    torch.tensor(sorted(set(by_layer.get(index, []))), dtype=torch.long, device=device))
        model.config._attn_implementation = ATTENTION_NAME
        yield
    finally:
        model.config._attn_implementation = before
        for layer in layers:
            if hasattr(layer.self_attn, MASKED_ATTR):
                delattr(layer.self_attn, MASKED_ATTR)


# --- which heads -----------------------------------------------------------------------------------------

def _scored_heads(profile: Profile) -> dict[Head, float]:
    return {(layer, head): score for layer, row in enumerate(profile.query_head_scores)
            for head, score in enumerate(row)}


def top_retrieval_heads(profile: Profile, k: int) -> list[Head]:
    """The k query heads with the highest retrieval scores (ties: lower layer, then lower head first)."""
    scores = _scored_heads(profile)
    if k > len(scores):
        raise ValueError(f"cannot mask {k} heads: the model has {len(scores)} query heads")
    return sorted(scores, key=lambda h: (-scores[h], h))[:k]


def random_non_retrieval_heads(profile: Profile, k: int, seed: int, below: float = NON_RETRIEVAL_BELOW) -> list[Head]:
    """k query heads drawn at random among those scoring below `below`: the paper's control.

    One seed's draws are nested (the first k of one seeded shuffle), so a larger K masks a superset of a
    smaller one and each random curve is a single growing set."""
    pool = sorted(h for h, score in _scored_heads(profile).items() if score < below)
    if k > len(pool):
        raise ValueError(f"cannot draw {k} random heads: only {len(pool)} query heads score below {below:g}")
    random.Random(seed).shuffle(pool)
    return sorted(pool[:k])


@dataclass(frozen=True)
class MaskSetting:
    """One masking: none at all, the top-K retrieval heads, or K random non-retrieval heads of one seed."""

    selection: str  # "none", "retrieval" or "random"
    k: int
    seed: int | None = None

    @property
    def name(self) -> str:
        if self.selection == "none":
            return "none"
        return f"retrieval-k{self.k}" if self.selection == "retrieval" else f"random-k{self.k}-s{self.seed}"


def mask_settings(ks: list[int], seeds: list[int]) -> list[MaskSetting]:
    """none (K = 0, the start of both curves); then for each K > 0, smallest first: retrieval, random per seed."""
    if any(k < 0 for k in ks):
        raise ValueError("K must be >= 0")
    out = [MaskSetting("none", 0)]
    for k in sorted(set(ks) - {0}):
        out.append(MaskSetting("retrieval", k))
        out += [MaskSetting("random", k, seed) for seed in dict.fromkeys(seeds)]
    return out


def heads_for(setting: MaskSetting, profile: Profile, below: float = NON_RETRIEVAL_BELOW) -> list[Head]:
    if setting.selection == "none":
        return []
    if setting.selection == "retrieval":
        return top_retrieval_heads(profile, setting.k)
    return random_non_retrieval_heads(profile, setting.k, setting.seed, below)


# --- the run ------------------------------------------------------------------------------------------------

@dataclass
class CausalityConfig(EvalConfig):
    """`rheads eval niah`'s grid, needles, haystack and scoring, plus which K to mask (budgets, sink, window and
    the engine settings of EvalConfig are not used)."""

    ks: list[int] = field(default_factory=lambda: [0, 5, 10, 20, 50, 100])
    non_retrieval_below: float = NON_RETRIEVAL_BELOW


RESUME_KEYS = ("model", "config_fingerprint", "profile_scores", "needles", "haystack_sha", "dtype",
               "recall_threshold", "extra_tokens", "non_retrieval_below")


@torch.inference_mode()
def generate_answer(model, tokenizer, input_ids: list[int], max_new_tokens: int) -> Answer:
    """Greedy `model.generate` with its KV cache (heads masked by the caller's `heads_masked`, if any)."""
    device = next(model.parameters()).device
    ids = torch.tensor([input_ids], device=device)
    eos_ids = eos_token_ids(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos_ids, default=0)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, temperature=None, top_p=None,
                         top_k=None, max_new_tokens=max_new_tokens, use_cache=True, pad_token_id=pad)
    new = out[0, ids.shape[1]:].tolist()
    finish = "stop" if new and new[-1] in eos_ids else "length"
    return Answer(tokenizer.decode(new, skip_special_tokens=True), finish, len(new))


def run_causality(model, tokenizer, model_name: str, profile: Profile, config: CausalityConfig, out: Path,
                  profile_path: str | None = None, progress: bool = True) -> EvalResult:
    """Every masking over the (length x depth x needle) grid on a loaded model; cells already in out are kept."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    identity = ModelIdentity.from_config(model.config, model_name)
    profile.check_fits(identity)
    all_needles, needles = eval_needles(config)
    files = haystack_files(config.haystack_paths)
    settings = mask_settings(config.ks, config.random_seeds)
    heads = {s.name: heads_for(s, profile, config.non_retrieval_below) for s in settings}  # a K too large fails now
    cells_grid = grid(config, len(needles))

    meta = {
        "model": model_name, "config_fingerprint": identity.config_fingerprint, "profile": profile_path,
        "profile_scores": short_sha(json.dumps(profile.query_head_scores).encode()),
        "needles_file": str(config.needles_path()), "needles": [asdict(n) for n in all_needles],
        "haystack": [str(f) for f in files], "haystack_sha": haystack_sha(files),
        "dtype": str(config.dtype).removeprefix("torch."), "device": config.device,
        "recall_threshold": config.recall_threshold, "extra_tokens": config.extra_tokens,
        "non_retrieval_below": config.non_retrieval_below,
        "masking": "uniform attention: the masked query heads' queries are zeroed (transformers SDPA otherwise)",
        "generation": f"model.generate, greedy, use_cache, max_new_tokens = answer tokens + {config.extra_tokens}",
    }
    meta_path = out / "meta.json"
    if meta_path.exists():
        check_resumable(json.loads(meta_path.read_text()), meta, RESUME_KEYS)
    write_atomic(meta_path, json.dumps(meta, indent=1) + "\n")

    prompts, _ = grid_prompts(model.config, tokenizer, needles, cells_grid, config)
    cells = load_cells(out)
    done = {cell_key(c["config"], c["length"], c["depth"], c["needle"]) for c in cells}
    todo = {s.name: [c for c in cells_grid if cell_key(s.name, c.length, c.depth, c.needle) not in done]
            for s in settings}
    evaluated = 0
    with tqdm(total=sum(map(len, todo.values())), desc=f"masking heads of {model_name}", unit="cell",
              disable=not progress) as bar:
        for setting in settings:
            if not todo[setting.name]:
                continue
            bar.set_postfix_str(setting.name)
            with heads_masked(model, heads[setting.name]):
                for cell in todo[setting.name]:
                    prompt = prompts[cell]
                    answer_tokens = prompt.answer_span[1] - prompt.answer_span[0]
                    result = generate_answer(model, tokenizer, prompt.input_ids, answer_tokens + config.extra_tokens)
                    recall, correct = score(needles[cell.needle], result.text, config.recall_threshold)
                    cells.append({
                        "config": setting.name, "selection": setting.selection, "k": setting.k, "seed": setting.seed,
                        "length": cell.length, "depth": cell.depth, "needle": cell.needle,
                        "prompt_tokens": len(prompt.input_ids), "recall": round(recall, 4), "correct": correct,
                        "response": result.text, "finish_reason": result.finish_reason,
                        "output_tokens": result.num_output_tokens,
                    })
                    save_cells(out, cells)  # a killed run loses at most the cell in progress
                    evaluated += 1
                    bar.update(1)

    summary = causality_summary(cells, settings, heads, cells_grid, profile, config.non_retrieval_below)
    summary["meta"] = meta
    summary["grid"] = {"lengths": sorted(dict.fromkeys(config.lengths)), "depths": list(dict.fromkeys(config.depths)),
                       "needles": len(needles), "cells_per_masking": len(cells_grid)}
    table = format_summary(summary)
    summary["table"] = table
    write_atomic(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    write_plot(summary, out / PLOT_NAME)
    return EvalResult(summary, evaluated, table)


def evaluate_causality(model_spec: str, config: CausalityConfig, out: Path, profile: str | Path = "auto",
                       trust_remote_code: bool = False) -> EvalResult:
    """Load the model and its profile ("auto": the shipped one) and run the causality test."""
    loaded = load_model_and_profile(model_spec, profile, config, trust_remote_code)
    return run_causality(loaded.model, loaded.tokenizer, loaded.name, loaded.profile, config, out,
                         profile_path=loaded.profile_path)


# --- summary ------------------------------------------------------------------------------------------------

def causality_summary(cells: list[dict], settings: list[MaskSetting], heads: dict[str, list[Head]],
                      cells_grid: list[Cell], profile: Profile, below: float = NON_RETRIEVAL_BELOW) -> dict:
    """Per masking: accuracy (overall and per length), recall and the masked heads' mean score; then one curve
    per selection over K, with the unmasked run as K = 0 of both and random seeds as mean and std (maskings
    with no cells yet, from an interrupted run, are left out of the curves)."""
    wanted = {cell_key("", c.length, c.depth, c.needle)[1:] for c in cells_grid}
    lengths = sorted({c.length for c in cells_grid})
    scores = _scored_heads(profile)
    maskings = []
    for s in settings:
        mine = [c for c in cells if c["config"] == s.name
                and cell_key("", c["length"], c["depth"], c["needle"])[1:] in wanted]
        maskings.append({
            "name": s.name, "selection": s.selection, "k": s.k, "seed": s.seed,
            "heads": [f"{layer}-{head}" for layer, head in heads[s.name]],
            "mean_head_score": mean([scores[h] for h in heads[s.name]]) if heads[s.name] else 0.0,
            "cells": len(mine), "accuracy": mean([c["correct"] for c in mine]),
            "recall": mean([c["recall"] for c in mine]),
            "accuracy_by_length": {str(n): mean([c["correct"] for c in mine if c["length"] == n]) for n in lengths},
        })
    curves: dict[str, list[dict]] = {}
    ks = sorted({s.k for s in settings})
    for selection in ("retrieval", "random"):
        curves[selection] = []
        for k in ks:
            members = [m for m in maskings if m["cells"] and ((m["selection"] == selection and m["k"] == k)
                                                              or (k == 0 and m["selection"] == "none"))]
            if not members:
                continue
            point = {"k": k, "seeds": [m["seed"] for m in members if m["seed"] is not None]}
            for key in ("accuracy", "recall"):
                point[key] = mean([m[key] for m in members])
                point[key + "_std"] = std([m[key] for m in members])
            point["accuracy_by_length"] = {n: mean([m["accuracy_by_length"][n] for m in members])
                                           for n in map(str, lengths)}
            point["mean_head_score"] = mean([m["mean_head_score"] for m in members])
            curves[selection].append(point)
    return {"lengths": lengths, "ks": ks, "total_heads": len(scores), "non_retrieval_below": below,
            "maskings": maskings, "curves": curves}


def format_summary(summary: dict) -> str:
    """One row per K: retrieval vs random accuracy (overall, per length), recall, and the masked heads' mean score."""
    lengths = summary["lengths"]
    curves = {name: {p["k"]: p for p in summary["curves"][name]} for name in ("retrieval", "random")}
    seeds = max((len(p["seeds"]) for p in curves["random"].values()), default=0)
    cols = ["K masked", "retrieval acc", f"random acc ({seeds} seeds)"]
    cols += [f"{name}@{n}" for n in lengths for name in ("ret", "rnd")]
    cols += ["ret recall", "rnd recall", "ret score", "rnd score"]
    widths = [max(9, len(c) + 2) for c in cols]
    lines = ["".join(f"{c:>{w}}" for c, w in zip(cols, widths))]
    lines.append("-" * len(lines[0]))

    def value(name: str, k: int, key: str, length: int | None = None) -> str:
        point = curves[name].get(k)
        if point is None:
            return "-"
        if length is not None:
            return format_mean_std(point["accuracy_by_length"][str(length)])
        if key == "mean_head_score":
            return f"{point[key]:.3f}"
        return format_mean_std(point[key], point.get(key + "_std"), max(len(point["seeds"]), 1))

    for k in summary["ks"]:
        row = [str(k), value("retrieval", k, "accuracy"), value("random", k, "accuracy")]
        row += [value(name, k, "", n) for n in lengths for name in ("retrieval", "random")]
        row += [value(name, k, "recall") for name in ("retrieval", "random")]
        row += [value(name, k, "mean_head_score") for name in ("retrieval", "random")]
        lines.append("".join(f"{c:>{w}}" for c, w in zip(row, widths)))
    lines.append(f"K of {summary['total_heads']} query heads attend uniformly. ret: the top-K retrieval heads; rnd: K "
                 f"random heads scoring below {summary['non_retrieval_below']:g} (mean±std over seeds in the acc "
                 "and recall columns).\nacc: share of cells with unigram recall > 0.5; score: the masked heads' "
                 "mean retrieval score.")
    return "\n".join(lines)


def write_plot(summary: dict, png_path: Path) -> None:
    """Needle accuracy against K masked heads: top-K retrieval heads vs K random non-retrieval heads (mean ± std)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.subplots()
    retrieval, rnd = summary["curves"]["retrieval"], summary["curves"]["random"]
    if retrieval:
        ax.plot([p["k"] for p in retrieval], [p["accuracy"] for p in retrieval], "o-", color="tab:blue",
                label="top-K retrieval heads")
    if rnd:
        ks = [p["k"] for p in rnd]
        means = [p["accuracy"] for p in rnd]
        stds = [p["accuracy_std"] for p in rnd]
        seeds = max(len(p["seeds"]) for p in rnd)
        ax.plot(ks, means, "s--", color="tab:orange",
                label=f"K random heads scoring < {summary['non_retrieval_below']:g} (mean ± std, {seeds} seeds)")
        low = [max(m - s, 0.0) for m, s in zip(means, stds)]
        high = [min(m + s, 1.0) for m, s in zip(means, stds)]
        ax.fill_between(ks, low, high, color="tab:orange", alpha=0.2, linewidth=0)
    ax.set_xticks(summary["ks"])
    ax.set_xlabel(f"K masked query heads (of {summary['total_heads']})")
    ax.set_ylabel("needle accuracy (recall > 0.5)")
    ax.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    ax.set_title(f"needle accuracy vs K masked heads: {summary.get('meta', {}).get('model', '')}", fontsize=10)
    Path(png_path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=110)
