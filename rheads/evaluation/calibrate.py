"""Calibration: the least KV memory whose needle accuracy stays within a tolerance of the full cache's, measured
at the length a server will serve, and written into the profile so that `rheads serve` uses it by default.

A budget chosen on short contexts does not carry to long ones (retrieval at 31k needs heads that a 12k profile
does not rank first), so calibration first makes sure the profile has samples at the served length (profiling
there if not: the same needles, haystack and dtype, resumed into the same file), then runs `rheads eval niah`'s
grid at that length for every window and budget asked, on held-out needles, and keeps the configuration with
the fewest KV bytes per sequence whose accuracy is at most `tolerance` below the full cache's in the same run.
The grid it was measured on goes into the profile beside the choice.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..profiling.profile import Profile
from .niah_eval import EvalConfig, load_model_and_profile, run_niah_eval


@dataclass
class CalibrationConfig:
    max_model_len: int
    tolerance: float = 0.02  # accuracy (a fraction) a configuration may lose against the full cache
    windows: list[int] = field(default_factory=lambda: [256, 1024])
    lengths: list[int] | None = None  # the grid's prompt lengths; None: the served length (`served_length`)
    eval: EvalConfig = field(default_factory=EvalConfig)  # the rest of the grid (its lengths are replaced)
    profile_batch_size: int = 1


def served_length(config: CalibrationConfig) -> int:
    """The longest prompt the grid can use: the served length less room for the answer."""
    return config.max_model_len - config.eval.extra_tokens - 64


def ensure_coverage(model_spec: str, profile_path: Path, length: int, batch_size: int, device: str) -> Profile:
    """The profile, with samples at `length` added (the same needles, haystack and dtype) when its own
    longest is shorter than nine tenths of it."""
    import torch

    from ..profiling.profiler import ProfileConfig, profile_model

    profile = Profile.load(profile_path)
    if (profile.longest_context or 0) >= 0.9 * length:
        return profile
    params = profile.method.params
    if profile.method.name != "retrieval_head_niah" or params.get("haystack") != _default_haystack():
        raise ValueError(f"{profile_path} was not made by `rheads profile` on the shipped haystack: profile "
                         f"{model_spec} up to {length} tokens yourself, then calibrate")
    needles = profile_path.with_suffix(".needles.jsonl")
    needles.write_text("".join(json.dumps(n) + "\n" for n in params["needles"]))
    config = ProfileConfig(lengths=[length], depths=params["depths"], needles_file=needles,
                           kv_aggregate=profile.method.kv_aggregate, max_new_tokens=params.get("max_new_tokens"),
                           recall_threshold=params["recall_threshold"], span=params["span"],
                           score=params.get("score", "copy"), batch_size=batch_size,
                           dtype=getattr(torch, params.get("dtype", "float32")))
    try:
        return profile_model(model_spec, config, profile_path, device=device)
    finally:
        needles.unlink(missing_ok=True)


def _default_haystack() -> list[str]:
    from ..niah import haystack_files

    return [f.name for f in haystack_files(None)]


def choose(rows: list[dict], tolerance: float) -> dict:
    """The row with the fewest KV bytes within `tolerance` of the full cache's accuracy (ties: higher
    accuracy); the full cache itself when none is."""
    full = next(r for r in rows if r["selection"] == "full")
    fits = [r for r in rows if r["accuracy"] >= full["accuracy"] - tolerance - 1e-9]
    return min(fits, key=lambda r: (r["kv_bytes_per_seq"], -r["accuracy"]))


def rows_of(summary: dict, window: int) -> list[dict]:
    """A grid run's configurations as calibration rows."""
    return [{"window": window, "selection": c["selection"], "budget": c["budget"], "accuracy": c["accuracy"],
             "cells": c["cells"], "kv_bytes_per_seq": c["kv_bytes_per_seq"],
             "kv_fraction_of_full": c["kv_fraction_of_full"]} for c in summary["configs"]]


def calibrate(model_spec: str, profile_path: Path, config: CalibrationConfig, out: Path,
              trust_remote_code: bool = False) -> tuple[Profile, dict]:
    """Profile at the served length if needed, evaluate every window x budget, write the choice into the
    profile at `profile_path`; (the profile, the calibration record)."""
    lengths = config.lengths or [served_length(config)]
    ensure_coverage(model_spec, profile_path, max(lengths), config.profile_batch_size, config.eval.device)
    loaded = load_model_and_profile(model_spec, profile_path, config.eval, trust_remote_code)
    rows = []
    for window in config.windows:
        run = replace(config.eval, lengths=lengths, window=window, random_seeds=[])
        result = run_niah_eval(loaded.model, loaded.tokenizer, loaded.name, loaded.profile, run,
                               Path(out) / f"window-{window}", profile_path=str(profile_path))
        print(f"window {window}:\n{result.table}")
        rows += rows_of(result.summary, window)
    grid = {"lengths": lengths, "depths": list(config.eval.depths), "task": config.eval.task,
            "needles_file": str(config.eval.needles_path()) if config.eval.task == "niah" else None,
            "dtype": str(config.eval.dtype).removeprefix("torch."), "device": config.eval.device}
    return write_choice(profile_path, rows, grid, config.max_model_len, config.tolerance)


def calibrate_from_runs(profile_path: Path, runs: list[Path], max_model_len: int,
                        tolerance: float) -> tuple[Profile, dict]:
    """The same choice from `rheads eval niah` runs already made (their --out folders) with this profile's
    scores, on one grid (lengths, depths, task, needles, dtype), at any windows; written into the profile."""
    from .grid import short_sha

    profile = Profile.load(profile_path)
    scores = short_sha(json.dumps(profile.kv_head_scores).encode())
    rows, grids = [], {}
    for run in map(Path, runs):
        meta = json.loads((run / "meta.json").read_text())
        summary = json.loads((run / "summary.json").read_text())
        if meta["profile_scores"] != scores:
            raise ValueError(f"{run} was evaluated with other head scores than {profile_path}'s")
        grids[run] = {"lengths": summary["lengths"], "depths": summary["depths"], "task": meta["task"],
                      "needles_file": meta["needles_file"], "dtype": meta["dtype"], "device": meta["device"]}
        rows += rows_of(summary, meta["window"])
    if len({json.dumps(g, sort_keys=True) for g in grids.values()}) != 1:
        raise ValueError(f"the runs were measured on different grids: {grids}")
    return write_choice(profile_path, rows, next(iter(grids.values())) | {"runs": [str(r) for r in runs]},
                        max_model_len, tolerance)


def write_choice(profile_path: Path, rows: list[dict], grid: dict, max_model_len: int,
                 tolerance: float) -> tuple[Profile, dict]:
    """Choose among `rows` and write the choice and its record (`grid` describes what they were measured on)
    into the profile; (the profile, the record)."""
    fulls = [r for r in rows if r["selection"] == "full"]
    best_full = max(fulls, key=lambda r: r["accuracy"])  # full ignores the window: the same cells each run
    rows = [r for r in rows if r["selection"] != "full"] + [best_full]
    chosen = choose(rows, tolerance)
    record = {"date": datetime.date.today().isoformat(), "max_model_len": max_model_len, **grid,
              "cells_per_config": chosen["cells"], "tolerance": tolerance, "full_accuracy": best_full["accuracy"],
              "chosen": chosen, "rows": rows}
    profile = Profile.load(profile_path)
    profile.default_budget = chosen["budget"]
    profile.default_window = None if chosen["selection"] == "full" else chosen["window"]
    profile.calibration = record
    profile.save(profile_path)
    return profile, record


def format_calibration(record: dict) -> str:
    lines = [f"{'window':>8}{'configuration':>16}{'KV/seq':>10}{'accuracy':>10}",
             "-" * 44]
    for r in sorted(record["rows"], key=lambda r: r["kv_bytes_per_seq"]):
        name = r["selection"] if r["selection"] in ("full", "window") else f"{r['selection']}-{r['budget']:g}"
        mark = "  <- chosen" if r == record["chosen"] else ""
        lines.append(f"{r['window']:>8}{name:>16}{r['kv_fraction_of_full']:>10.0%}{r['accuracy']:>10.3f}{mark}")
    c = record["chosen"]
    lines.append(f"chosen: the fewest KV bytes within {record['tolerance']:g} of the full cache's "
                 f"{record['full_accuracy']:.3f} on {c['cells']} cells at {record['lengths']} tokens")
    return "\n".join(lines)
