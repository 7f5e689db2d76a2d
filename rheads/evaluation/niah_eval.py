"""Needle-in-a-haystack evaluation of cache configurations, through the serving engine.

One run loads the model once and, for every cache configuration in turn (full cache; retrieval heads
from the profile at several budgets; the same budgets with random heads over several seeds; every
head on the sink + recent window), builds an `LLMEngine` over that same model object, submits every
prompt of the (length x depth x needle) grid at once (continuous batching, greedy) and scores each
answer by unigram recall against the needle's answer. The engine permutes the model's attention
weights in place for its head split; closing it undoes that before the next one.

Output directory:
    meta.json       what the cells depend on (model, profile, needles, haystack, sink, window, dtype)
    cells.jsonl     one JSON line per (configuration, length, depth, needle); rewritten atomically after
                    every configuration, so a rerun skips the cells already there and a killed run
                    loses at most the configuration in progress
    summary.json    accuracy per configuration and length, random seeds as mean and std, KV bytes
    heatmaps.png    length x depth accuracy, one panel per configuration
    accuracy_vs_memory.png
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from ..engine.heads import HeadSplit, random_split, select_heads
from ..niah import data_path, haystack_files
from ..profiling.profile import Profile, ProfileError, layer_windows
from .grid import (
    Answer, Cell, answer_tokens, cell_key, check_resumable, eval_needles, format_mean_std, grid, grid_prompts,
    haystack_sha, load_cells, mean, save_cells, score, short_sha, std, write_atomic,
)

SELECTIONS = ("full", "retrieval", "random", "window")
MIB = 1 << 20


# --- configurations ------------------------------------------------------------------------------

@dataclass(frozen=True)
class CacheSetting:
    """One cache configuration: which KV heads keep the full history."""

    name: str  # "full", "retrieval-0.5", "random-0.5-s1", "window"
    selection: str  # one of SELECTIONS
    budget: float  # fraction of KV heads with a full cache (what was asked; the split rounds it)
    seed: int | None = None  # random selection only

    @property
    def group(self) -> str:
        """Configurations that differ only by seed share a group (summary rows)."""
        return f"random-{self.budget:g}" if self.selection == "random" else self.name


def cache_settings(budgets: list[float], seeds: list[int]) -> list[CacheSetting]:
    """full; retrieval at each budget; random at each budget x seed; window. Budgets largest first."""
    budgets = sorted(dict.fromkeys(float(b) for b in budgets), reverse=True)
    for budget in budgets:
        if not 0.0 < budget < 1.0:
            raise ValueError(f"budgets must lie strictly between 0 and 1 (full and window are always run), "
                             f"got {budget:g}")
    out = [CacheSetting("full", "full", 1.0)]
    out += [CacheSetting(f"retrieval-{b:g}", "retrieval", b) for b in budgets]
    out += [CacheSetting(f"random-{b:g}-s{s}", "random", b, s) for b in budgets for s in dict.fromkeys(seeds)]
    out.append(CacheSetting("window", "window", 0.0))
    return out


def split_for(setting: CacheSetting, profile: Profile | None, num_layers: int, num_kv_heads: int,
              windows: list[int | None] | None = None) -> HeadSplit:
    """The HeadSplit of a configuration: select_heads for retrieval, random_split for random; `windows`, the
    model's layer windows (a hybrid model's sliding layers are windowed in every configuration)."""
    windows = windows or [None] * num_layers
    if setting.selection == "full":
        return HeadSplit.uniform(num_layers, num_kv_heads, True).with_windows(windows)
    if setting.selection == "window":
        return HeadSplit.uniform(num_layers, num_kv_heads, False).with_windows(windows)
    if setting.selection == "retrieval":
        if profile is None:
            raise ProfileError("retrieval configurations need a profile")
        return select_heads(profile, budget=setting.budget)
    if setting.selection == "random":
        return random_split(num_layers, num_kv_heads, setting.budget, setting.seed, windows)
    raise ValueError(f"unknown selection {setting.selection!r}")


def kv_bytes_per_sequence(split: HeadSplit, head_dim: int, element_size: int, page_size: int,
                          sink: int, window: int, num_tokens: int) -> int:
    """What the engine's cache holds for one sequence of num_tokens tokens (its own formula)."""
    from ..engine.cache import CacheConfig, Footprint

    dtype, stored = {1: (torch.bfloat16, "fp8"), 2: (torch.bfloat16, "auto"), 4: (torch.float32, "auto")}[element_size]
    config = CacheConfig(page_size=page_size, sink=sink, window=window, dtype=dtype, kv_cache_dtype=stored)
    return Footprint.of(split, head_dim, config).bytes_for(num_tokens)


# --- settings of a run -----------------------------------------------------------------------------

@dataclass
class EvalConfig:
    lengths: list[int] = field(default_factory=lambda: [1000, 2000, 4000])
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    task: str = "niah"  # or a harder kind (tasks.py): multikey, multivalue, vartrack
    needles_file: Path | None = None  # default: rheads/data/eval_needles.jsonl
    num_needles: int | None = None  # use the first N needles (default: all)
    haystack_paths: list[Path] | None = None  # default: rheads/data/haystack
    budgets: list[float] = field(default_factory=lambda: [0.5, 0.25, 0.1])
    random_seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    sink: int = 64
    window: int = 256
    page_size: int = 16
    kv_cache_memory: int | None = None  # default: 512 MiB, or enough for one longest sequence at full cache
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 1024
    extra_tokens: int = 32  # max_tokens = answer tokens + this
    recall_threshold: float = 0.5  # a cell is correct when recall > this
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    kv_cache_dtype: str = "auto"  # or fp8: the engine's pools in e4m3

    def needles_path(self) -> Path:
        return Path(self.needles_file) if self.needles_file else data_path("eval_needles.jsonl")


def answer_hidden(answer_span: tuple[int, int], prompt_tokens: int, sink: int, window: int) -> bool:
    """Whether no answer token is in a streaming head's cache when the answer starts, i.e. none lies in the
    first `sink` positions or among the last `window` (the query at prompt_tokens - 1 sees k > that - window).
    Only full-cache heads can read such an answer; the other cells every configuration can read."""
    return not any(p < sink or p >= prompt_tokens - window for p in range(*answer_span))


# --- output directory --------------------------------------------------------------------------------

# what a resumed run must share with the run that made the cells already there
RESUME_KEYS = ("model", "config_fingerprint", "profile_scores", "needles", "haystack_sha", "sink", "window",
               "kv_cache_dtype",
               "dtype", "recall_threshold", "extra_tokens")


# --- running one configuration through the engine ----------------------------------------------------

def generate(engine, prompts: list[list[int]], max_tokens: list[int],
             on_finish: Callable[[int], None] | None = None) -> list[Answer]:
    """Submit every prompt to the engine at once (greedy) and step until all have finished."""
    from ..engine.offline import generate_all
    from ..engine.sequence import SamplingParams

    requests = [(ids, SamplingParams(max_tokens=n, temperature=0.0)) for ids, n in zip(prompts, max_tokens)]
    return [Answer(c.text, c.finish_reason, len(c.token_ids)) for c in generate_all(engine, requests, on_finish)]


def _engine_config(config: EvalConfig, budget: float, memory: int):
    from ..engine.llm import EngineConfig

    return EngineConfig(budget=budget, sink=config.sink, window=config.window, page_size=config.page_size,
                        kv_cache_memory=memory, max_num_seqs=config.max_num_seqs,
                        max_num_batched_tokens=config.max_num_batched_tokens, device=config.device,
                        dtype=config.dtype, kv_cache_dtype=config.kv_cache_dtype)


# --- the run -------------------------------------------------------------------------------------------

@dataclass
class EvalResult:
    summary: dict
    evaluated: int  # cells run now (the rest were already in cells.jsonl)
    table: str


def run_niah_eval(model, tokenizer, model_name: str, profile: Profile | None, config: EvalConfig, out: Path,
                  profile_path: str | None = None, progress: bool = True) -> EvalResult:
    """Evaluate every configuration over the grid on an already loaded model (weights restored after each)."""
    from ..engine.llm import LLMEngine
    from ..profiling.profile import ModelIdentity

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    identity = ModelIdentity.from_config(model.config, model_name)
    if profile is not None:
        profile.check_fits(identity)
    all_needles, needles = eval_needles(config)
    files = haystack_files(config.haystack_paths)
    settings = cache_settings(config.budgets, config.random_seeds)
    if profile is None and any(s.selection == "retrieval" for s in settings):
        raise ProfileError("retrieval configurations need a profile: pass --profile, or --budgets '' for "
                           "full and window only")
    cells_grid = grid(config, len(needles))
    lengths = sorted(dict.fromkeys(config.lengths))
    element_size = 1 if config.kv_cache_dtype == "fp8" else config.dtype.itemsize
    head_dim = identity.head_dim
    layers, kv_heads = identity.num_layers, identity.num_key_value_heads

    meta = _meta(model_name, identity, profile, profile_path, config, all_needles, files)
    overlap = sorted({n.needle for n in needles} & set(meta["profile_needles"]))
    seen_files = sorted({Path(f).name for f in meta["haystack"]} & set(meta["profile_haystack"] or []))
    meta["needles_seen_by_profile"], meta["haystack_seen_by_profile"] = len(overlap), seen_files
    if overlap or seen_files:
        print(f"rheads: warning: the profile was made with {len(overlap)} of these needles and "
              f"{len(seen_files)} of these haystack files; the retrieval configurations are not tested on unseen data",
              file=sys.stderr)
    meta_path = out / "meta.json"
    if meta_path.exists():
        check_resumable(json.loads(meta_path.read_text()), meta, RESUME_KEYS)
    write_atomic(meta_path, json.dumps(meta, indent=1) + "\n")

    # prompts once for the whole run
    prompts, extra = grid_prompts(model.config, tokenizer, needles, cells_grid, config)
    hidden = {cell_key("", c.length, c.depth, c.needle)[1:]:
              all(answer_hidden(span, len(prompts[c].input_ids), config.sink, config.window)
                  for span in prompts[c].answer_spans or (prompts[c].answer_span,))
              for c in cells_grid}
    full_split = HeadSplit.uniform(layers, kv_heads, True).with_windows(layer_windows(model.config))
    need = kv_bytes_per_sequence(full_split, head_dim, element_size, config.page_size, config.sink,
                                 config.window, max(lengths) + extra + config.page_size)
    memory = config.kv_cache_memory or max(512 * MIB, need)

    cells = load_cells(out)
    done = {cell_key(c["config"], c["length"], c["depth"], c["needle"]) for c in cells}
    todo = {s.name: [c for c in cells_grid if cell_key(s.name, c.length, c.depth, c.needle) not in done]
            for s in settings}
    splits = {s.name: split_for(s, profile, layers, kv_heads, layer_windows(model.config)) for s in settings}
    bar = tqdm(total=sum(map(len, todo.values())), desc=f"evaluating {model_name}", unit="cell",
               disable=not progress)
    evaluated = 0
    for setting in settings:
        work = todo[setting.name]
        if not work:
            continue
        split = splits[setting.name]
        bar.set_postfix_str(setting.name)
        with LLMEngine(model, tokenizer, split, _engine_config(config, setting.budget, memory), model_name) as engine:
            answers = [answer_tokens(prompts[c]) for c in work]
            results = generate(engine, [prompts[c].input_ids for c in work],
                               [a + config.extra_tokens for a in answers], on_finish=lambda _: bar.update(1))
        for cell, result in zip(work, results):
            recall, correct = score(needles[cell.needle], result.text, config.recall_threshold)
            cells.append({
                "config": setting.name, "selection": setting.selection, "budget": setting.budget,
                "seed": setting.seed, "full_heads": sum(split.num_full), "length": cell.length,
                "depth": cell.depth, "needle": cell.needle, "prompt_tokens": len(prompts[cell].input_ids),
                "answer_hidden": hidden[cell_key("", cell.length, cell.depth, cell.needle)[1:]],
                "recall": round(recall, 4), "correct": correct, "response": result.text,
                "finish_reason": result.finish_reason, "output_tokens": result.num_output_tokens,
            })
        evaluated += len(work)
        save_cells(out, cells)
    bar.close()

    kv = {s.name: kv_bytes_per_sequence(splits[s.name], head_dim, element_size, config.page_size, config.sink,
                                        config.window, max(lengths)) for s in settings}
    summary = eval_summary(cells, settings, splits, kv, cells_grid, layers * kv_heads, hidden)
    summary["meta"] = meta
    summary["grid"] = {"lengths": lengths, "depths": list(dict.fromkeys(config.depths)),
                       "needles": len(needles), "cells_per_config": len(cells_grid)}
    table = format_summary(summary)
    summary["table"] = table
    write_atomic(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    write_heatmaps(summary, out / "heatmaps.png")
    write_memory_plot(summary, out / "accuracy_vs_memory.png")
    return EvalResult(summary, evaluated, table)


def _meta(model_name, identity, profile, profile_path, config, all_needles, files) -> dict:
    profile_params = profile.method.params if profile is not None else {}
    return {
        "model": model_name,
        "config_fingerprint": identity.config_fingerprint,
        "profile": profile_path,
        "profile_scores": short_sha(json.dumps(profile.kv_head_scores).encode()) if profile is not None else None,
        "profile_method": profile.method.name if profile is not None else None,
        "profile_needles": [n.get("needle") if isinstance(n, dict) else n
                            for n in profile_params.get("needles", [])],
        "profile_haystack": profile_params.get("haystack"),
        "task": config.task,
        "needles_file": str(config.needles_path()) if config.task == "niah" else None,
        "needles": [asdict(n) for n in all_needles],
        "haystack": [str(f) for f in files],
        "haystack_sha": haystack_sha(files),
        "sink": config.sink,
        "window": config.window,
        "page_size": config.page_size,
        "dtype": str(config.dtype).removeprefix("torch."),
        **({"kv_cache_dtype": config.kv_cache_dtype} if config.kv_cache_dtype != "auto" else {}),  # older runs: auto
        "device": config.device,
        "recall_threshold": config.recall_threshold,
        "extra_tokens": config.extra_tokens,
        "max_tokens": f"answer tokens + {config.extra_tokens}",
        "sampling": "greedy (temperature 0), every prompt of a configuration submitted at once",
    }


# --- summary ---------------------------------------------------------------------------------------------

def eval_summary(cells: list[dict], settings: list[CacheSetting], splits: dict[str, HeadSplit],
                 kv_bytes: dict[str, int], cells_grid: list[Cell], total_heads: int,
                 hidden: dict[tuple, bool] | None = None) -> dict:
    """Per configuration: accuracy per length, per (length, depth), overall, mean recall; then per group
    (random seeds merged) mean and std of those accuracies. Only cells of this grid count.

    hidden maps (length, depth, needle) to answer_hidden(); given it, "accuracy_hidden" is the accuracy over
    the cells whose answer only full-cache heads can read (the cells that tell configurations apart)."""
    wanted = {cell_key("", c.length, c.depth, c.needle)[1:] for c in cells_grid}
    lengths = sorted({c.length for c in cells_grid})
    depths = list(dict.fromkeys(c.depth for c in cells_grid))
    full_kv = kv_bytes.get("full") or max(kv_bytes.values(), default=0)
    configs = []
    for s in settings:
        mine = [c for c in cells if c["config"] == s.name
                and cell_key("", c["length"], c["depth"], c["needle"])[1:] in wanted]
        by_length = {str(n): mean([c["correct"] for c in mine if c["length"] == n]) for n in lengths}
        grid_acc = [[mean([c["correct"] for c in mine if c["length"] == n and round(c["depth"], 6) == round(d, 6)])
                     for n in lengths] for d in depths]
        configs.append({
            "name": s.name, "group": s.group, "selection": s.selection, "budget": s.budget, "seed": s.seed,
            "full_heads": sum(splits[s.name].num_full), "total_heads": total_heads,
            "kv_bytes_per_seq": kv_bytes[s.name],
            "kv_fraction_of_full": kv_bytes[s.name] / full_kv if full_kv else None,
            "cells": len(mine), "accuracy": mean([c["correct"] for c in mine]),
            "recall": mean([c["recall"] for c in mine]), "accuracy_by_length": by_length,
            "accuracy_grid": grid_acc,  # [depth][length]
        })
        if hidden is not None:
            inside = [c["correct"] for c in mine if hidden.get(cell_key("", c["length"], c["depth"], c["needle"])[1:])]
            configs[-1]["cells_hidden"] = len(inside)
            configs[-1]["accuracy_hidden"] = mean(inside)
    groups = []
    for name in dict.fromkeys(c["group"] for c in configs):
        members = [c for c in configs if c["group"] == name]
        first = members[0]
        groups.append({
            "name": name, "selection": first["selection"], "budget": first["budget"],
            "seeds": [m["seed"] for m in members if m["seed"] is not None],
            "full_heads": first["full_heads"], "total_heads": total_heads,
            "kv_bytes_per_seq": first["kv_bytes_per_seq"], "kv_fraction_of_full": first["kv_fraction_of_full"],
            "accuracy": mean([m["accuracy"] for m in members]),
            "accuracy_std": std([m["accuracy"] for m in members]),
            "recall": mean([m["recall"] for m in members]),
            "recall_std": std([m["recall"] for m in members]),
            "accuracy_by_length": {n: mean([m["accuracy_by_length"][n] for m in members])
                                   for n in first["accuracy_by_length"]},
            "accuracy_by_length_std": {n: std([m["accuracy_by_length"][n] for m in members])
                                       for n in first["accuracy_by_length"]},
            **({"accuracy_hidden": mean([m["accuracy_hidden"] for m in members]),
                "accuracy_hidden_std": std([m["accuracy_hidden"] for m in members]),
                "cells_hidden": first["cells_hidden"]}
               if "accuracy_hidden" in first else {}),
        })
    return {"lengths": lengths, "depths": depths, "configs": configs, "groups": groups}


def format_summary(summary: dict) -> str:
    """A text table: one row per configuration group, random groups as mean±std over seeds."""
    lengths = summary["lengths"]
    longest = max(lengths) if lengths else 0
    labels = [g["name"] + (f" ({len(g['seeds'])} seeds)" if len(g["seeds"]) > 1 else "") for g in summary["groups"]]
    width = max([18] + [len(label) + 2 for label in labels])
    outside = any("accuracy_hidden" in g for g in summary["groups"])
    head = (f"{'configuration':<{width}}{'full KV heads':>14}{f'KV/seq @{longest}':>22}"
            + "".join(f"{f'acc@{n}':>13}" for n in lengths) + f"{'acc all':>13}"
            + (f"{'acc hidden':>13}" if outside else "") + f"{'recall':>13}")
    lines = [head, "-" * len(head)]
    for g, label in zip(summary["groups"], labels):
        seeds = len(g["seeds"])
        kv = f"{g['kv_bytes_per_seq'] / MIB:.2f} MiB"
        if g["kv_fraction_of_full"] is not None:
            kv += f" ({g['kv_fraction_of_full']:.0%})"
        cols = "".join(
            f"{format_mean_std(g['accuracy_by_length'][str(n)], g['accuracy_by_length_std'][str(n)], seeds):>13}"
            for n in lengths)
        out_col = ""
        if outside:
            value = format_mean_std(g.get("accuracy_hidden", float("nan")), g.get("accuracy_hidden_std"), seeds)
            out_col = f"{value:>13}"
        lines.append(f"{label:<{width}}{g['full_heads']:>7}/{g['total_heads']:<6}{kv:>22}{cols}"
                     f"{format_mean_std(g['accuracy'], g['accuracy_std'], seeds):>13}{out_col}"
                     f"{format_mean_std(g['recall'], g['recall_std'], seeds):>13}")
    if outside:
        counted = next((g["cells_hidden"] for g in summary["groups"] if "cells_hidden" in g), 0)
        lines.append(f"acc hidden: accuracy on the {counted} cells per configuration whose answer lies wholly outside "
                     "the sink + window, so only full-cache heads can read it.")
    return "\n".join(lines)


# --- plots ---------------------------------------------------------------------------------------------

def write_heatmaps(summary: dict, png_path: Path) -> None:
    """Length x depth accuracy, one panel per configuration (matplotlib's object API, Agg)."""
    from matplotlib.figure import Figure

    configs, lengths, depths = summary["configs"], summary["lengths"], summary["depths"]
    cols = min(4, len(configs))
    rows = math.ceil(len(configs) / cols)
    fig = Figure(figsize=(3.2 * cols + 1.2, 2.6 * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    image = None
    for ax, config in zip(axes.flat, configs):
        data = [[x if x == x else float("nan") for x in row] for row in config["accuracy_grid"]]
        image = ax.imshow(data, aspect="auto", cmap="RdYlGn", vmin=0.0, vmax=1.0, interpolation="nearest",
                          origin="upper")
        ax.set_title(f"{config['name']} ({config['full_heads']}/{config['total_heads']} full): "
                     f"{config['accuracy']:.2f}", fontsize=8)
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], fontsize=7)
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=7)
        ax.set_xlabel("context length", fontsize=7)
        ax.set_ylabel("depth", fontsize=7)
        if len(lengths) * len(depths) <= 80:
            for i, row in enumerate(data):
                for j, x in enumerate(row):
                    if x == x:
                        ax.text(j, i, f"{x:.2f}", ha="center", va="center", fontsize=6)
    for ax in list(axes.flat)[len(configs):]:
        ax.set_visible(False)
    if image is not None:
        fig.colorbar(image, ax=list(axes.flat), shrink=0.8, label="accuracy (recall > 0.5)")
    fig.suptitle(f"needle in a haystack: {summary.get('meta', {}).get('model', '')}", fontsize=10)
    Path(png_path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=110)


def write_memory_plot(summary: dict, png_path: Path) -> None:
    """Accuracy against KV bytes per sequence at the longest length: retrieval vs random vs full vs window.

    A second panel shows the accuracy on the cells whose answer only full-cache heads can read, when known."""
    from matplotlib.figure import Figure

    groups = summary["groups"]
    panels = [("accuracy", "all cells")]
    if any("accuracy_hidden" in g and g.get("cells_hidden") for g in groups):
        panels.append(("accuracy_hidden", "answer outside the sink + window"))
    fig = Figure(figsize=(6.0 * len(panels) + 0.4, 4.4), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    styles = {"retrieval": ("tab:blue", "o-"), "random": ("tab:orange", "s--"), "full": ("tab:green", "*"),
              "window": ("tab:red", "X")}
    longest = max(summary["lengths"]) if summary["lengths"] else 0
    for ax, (key, title) in zip(axes, panels):
        for selection, (color, marker) in styles.items():
            mine = sorted((g for g in groups if g["selection"] == selection), key=lambda g: g["kv_bytes_per_seq"])
            if not mine:
                continue
            xs = [g["kv_bytes_per_seq"] / MIB for g in mine]
            ys = [g[key] for g in mine]
            errs = [g[key + "_std"] for g in mine] if selection == "random" else None
            label = selection + (" (mean ± std over seeds)" if selection == "random" else "")
            ax.errorbar(xs, ys, yerr=errs, fmt=marker, color=color, label=label, capsize=3, markersize=8)
            for g, x, y in zip(mine, xs, ys):
                if selection in ("retrieval", "random"):
                    ax.annotate(f"{g['budget']:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xlabel(f"KV cache per sequence at {longest} tokens (MiB)")
        ax.set_ylabel("accuracy")
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
        ax.set_title(title, fontsize=9)
    fig.suptitle(f"accuracy vs KV memory: {summary.get('meta', {}).get('model', '')}", fontsize=10)
    Path(png_path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=110)


# --- from the command line -------------------------------------------------------------------------------

def evaluate_niah(model_spec: str, config: EvalConfig, out: Path, profile: str | Path | None = "auto",
                  trust_remote_code: bool = False) -> EvalResult:
    """Load the model once and evaluate every configuration ("auto": the shipped profile; None: none)."""
    loaded = load_model_and_profile(model_spec, profile, config, trust_remote_code)
    return run_niah_eval(loaded.model, loaded.tokenizer, loaded.name, loaded.profile, config, out,
                         profile_path=loaded.profile_path)


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    name: str  # the model's Hugging Face id (or the path it was given by)
    profile: Profile | None
    profile_path: str | None


def load_model_and_profile(model_spec: str, profile: str | Path | None, config: EvalConfig,
                           trust_remote_code: bool = False) -> LoadedModel:
    """The model in config's dtype and device, and its profile ("auto": the shipped one; None: none).
    The profile is read first, so a missing one fails before the model is loaded."""
    from ..models import load_model, resolve_model
    from ..profiling.profile import find_profile

    source = resolve_model(model_spec)
    profile_path = None
    loaded = None
    if profile is not None:
        profile_path = find_profile(source.name) if profile == "auto" else Path(profile)
        loaded = Profile.load(profile_path)
    model, tokenizer = load_model(source, dtype=config.dtype, device=config.device,
                                  trust_remote_code=trust_remote_code)
    return LoadedModel(model, tokenizer, source.name, loaded, str(profile_path) if profile_path else None)


# --- profile properties ----------------------------------------------------------------------------------

FREQUENCY_BINS = ("0%", "<=10%", "<=25%", "<=50%", "<=75%", "<100%", "100%")


def frequency_bin(f: float) -> str:
    """The histogram bin of an activation frequency in [0, 1]: never, (0, 10%], ..., (75%, 100%), always."""
    if f <= 0:
        return "0%"
    if f >= 1:
        return "100%"
    for edge, label in ((0.1, "<=10%"), (0.25, "<=25%"), (0.5, "<=50%"), (0.75, "<=75%")):
        if f <= edge:
            return label
    return "<100%"


def profile_properties(profile: Profile) -> dict:
    """The paper's sparsity figures and dynamic activation from the kept samples' per-head scores.

    A query head is active in a sample when it copied at least once there (score > 0). Over the kept
    samples: heads active in every one, in some, in none, and how often each head is active.
    """
    from ..profiling.report import sparsity

    m = profile.model
    kept = [s for s in profile.samples if s.kept]
    heads = [f"{layer}-{head}" for layer in range(m.num_layers) for head in range(m.num_attention_heads)]
    counts = {h: sum(s.head_scores.get(h, 0.0) > 0 for s in kept) for h in heads}
    out: dict[str, Any] = {"model": m.name, "samples_total": profile.samples_total,
                           "samples_kept": profile.samples_kept, "records": len(profile.samples),
                           "records_kept": len(kept), "sparsity": sparsity(profile)}
    if not kept:
        out["activation"] = None
        return out
    n = len(kept)
    freq = {h: c / n for h, c in counts.items()}
    histogram = {label: 0 for label in FREQUENCY_BINS}
    for f in freq.values():
        histogram[frequency_bin(f)] += 1
    scores = {f"{layer}-{head}": profile.query_head_scores[layer][head]
              for layer in range(m.num_layers) for head in range(m.num_attention_heads)}
    strong = [h for h in heads if scores[h] > 0.1]
    out["activation"] = {
        "always": sum(c == n for c in counts.values()),
        "sometimes": sum(0 < c < n for c in counts.values()),
        "never": sum(c == 0 for c in counts.values()),
        "total": len(heads),
        "histogram": histogram,
        "strong_heads": len(strong),  # score > 0.1
        "strong_always": sum(counts[h] == n for h in strong),
        "strong_sometimes": sum(0 < counts[h] < n for h in strong),
        "always_heads": [h for h in heads if counts[h] == n],
        "frequency": {h: round(f, 4) for h, f in freq.items() if f > 0},
    }
    return out


def format_properties(props: dict) -> str:
    sp = props["sparsity"]
    records = "" if props["records"] else ", no per-sample records"
    lines = [f"{props['model']}: {props['samples_kept']} kept of {props['samples_total']} samples{records}"]
    for label in ("query", "kv"):
        f = sp[label]
        lines.append(f"  {label + ' heads':<12} {f['total']:>5}   > 0.1: {f['count_gt_0.1']} ({f['share_gt_0.1']:.1%})"
                     f"   > 0.5: {f['count_gt_0.5']} ({f['share_gt_0.5']:.1%})   = 0: {f['count_zero']} "
                     f"({f['share_zero']:.1%})")
    act = props["activation"]
    if act is None:
        why = "imported scores, no per-sample records" if not props["records"] else "no kept samples"
        lines.append(f"  dynamic activation: n/a ({why})")
        return "\n".join(lines)
    n = props["records_kept"]
    lines.append(f"  dynamic activation over {n} kept samples (query head active = copied at least once):")
    lines.append(f"    active in every sample: {act['always']}   in some: {act['sometimes']}   "
                 f"never: {act['never']}   (of {act['total']})")
    lines.append(f"    of the {act['strong_heads']} heads scoring > 0.1: {act['strong_always']} active in every "
                 f"sample, {act['strong_sometimes']} in some")
    hist = act["histogram"]
    lines.append("    activation frequency: " + "  ".join(f"{k}: {v}" for k, v in hist.items()))
    active = {k: v for k, v in hist.items() if k != "0%"}
    widest = max(active.values(), default=0)
    for label, count in active.items():
        bar = "#" * (round(30 * count / widest) if widest else 0)
        lines.append(f"      {label:>6} {count:>5} {bar}")
    if act["always_heads"]:
        shown = act["always_heads"][:12]
        lines.append("    always active: " + ", ".join(shown) + (" ..." if len(act["always_heads"]) > 12 else ""))
    return "\n".join(lines)
