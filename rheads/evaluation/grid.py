"""What the evaluations share: the (length x depth x needle) grid and its prompts, scoring, the output
directory's cells and resume checks, and the statistics of a summary.

`rheads eval niah` (niah_eval.py) and `rheads eval causality` (causality.py) both build their grid, score
their answers and resume their runs through these.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..niah import Needle, NiahPrompt, build_inserted_prompt, build_prompt, load_needles, unigram_recall
from .tasks import TaskNeedle, instance, task_recall

if TYPE_CHECKING:
    from .niah_eval import EvalConfig


# --- the grid --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Cell:
    length: int
    depth: float
    needle: int


def grid(config: EvalConfig, num_needles: int) -> list[Cell]:
    """Short contexts first, then needles, then depths."""
    return [Cell(length, float(depth), needle) for length, needle, depth in
            itertools.product(sorted(dict.fromkeys(config.lengths)), range(num_needles),
                              list(dict.fromkeys(config.depths)))]


def cell_key(config_name: str, length: int, depth: float, needle: int) -> tuple:
    return config_name, int(length), round(float(depth), 6), int(needle)


def score(needle: Needle, response: str, threshold: float = 0.5) -> tuple[float, bool]:
    """(unigram recall of the needle's answer, correct = recall > threshold); for a task instance, the share
    of its answers the response holds, correct when it holds them all."""
    if isinstance(needle, TaskNeedle):
        recall = task_recall(needle, response)
        return recall, recall == 1.0
    recall = unigram_recall(needle.real_needle, response)
    return recall, recall > threshold


def answer_tokens(prompt: NiahPrompt) -> int:
    """Tokens an answer needs: its span's, or every inserted answer's with a separator each."""
    spans = prompt.answer_spans or (prompt.answer_span,)
    return sum(end - start for start, end in spans) + 2 * (len(spans) - 1)


def eval_needles(config: EvalConfig) -> tuple[list[Needle], list[Needle]]:
    """(every needle of the needles file, the first config.num_needles of them: the ones evaluated); for a
    task other than niah, its generated instances (12 unless num_needles says)."""
    if config.task != "niah":
        instances = [instance(config.task, i) for i in range(config.num_needles or 12)]
        return instances, instances
    all_needles = load_needles(config.needles_path())
    needles = all_needles[:config.num_needles] if config.num_needles else all_needles
    if not needles:
        raise ValueError("no needles to evaluate")
    return all_needles, needles


def grid_prompts(model_config, tokenizer, needles: list[Needle], cells_grid: list[Cell],
                 config: EvalConfig) -> tuple[dict[Cell, NiahPrompt], int]:
    """Every cell's prompt, built once per run, and the most tokens an answer may add (answer + extra_tokens);
    refuses a grid whose longest prompt plus that exceeds the model's context."""
    prompts = {cell: _prompt(tokenizer, needles[cell.needle], cell, config) for cell in cells_grid}
    extra = max(map(answer_tokens, prompts.values())) + config.extra_tokens
    longest = max(len(p.input_ids) for p in prompts.values())
    max_position = getattr(model_config, "max_position_embeddings", None)
    if max_position and longest + extra > max_position:
        raise ValueError(f"length {longest} + {extra} answer tokens exceeds the model's "
                         f"{max_position}-token context")
    return prompts, extra


def _prompt(tokenizer, needle: Needle, cell: Cell, config: EvalConfig) -> NiahPrompt:
    if isinstance(needle, TaskNeedle):
        return build_inserted_prompt(tokenizer, needle.placed(cell.depth), needle.question, cell.length,
                                     config.haystack_paths)
    return build_prompt(tokenizer, needle, cell.length, cell.depth, config.haystack_paths)


# --- answers --------------------------------------------------------------------------------------------

@dataclass
class Answer:
    """A model's answer to one prompt, as the evaluations grade it."""
    text: str
    finish_reason: str
    num_output_tokens: int


# --- output directory and resuming ---------------------------------------------------------------------

def short_sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def load_cells(out: Path) -> list[dict]:
    """Every cell in out/cells.jsonl (an unreadable trailing line, from a crash mid-write, is dropped)."""
    path = Path(out) / "cells.jsonl"
    if not path.exists():
        return []
    cells = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                cells.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return cells


def save_cells(out: Path, cells: list[dict]) -> None:
    write_atomic(Path(out) / "cells.jsonl", "".join(json.dumps(c) + "\n" for c in cells))


def check_resumable(old: dict, new: dict, keys: tuple[str, ...]) -> None:
    """Refuse to add cells to an --out directory whose meta.json differs from this run's in any of keys."""
    for key in keys:
        if old.get(key) != new.get(key):
            raise ValueError(
                f"cannot resume in this --out directory: its cells were made with a different {key} "
                f"({json.dumps(old.get(key))[:200]}, now {json.dumps(new.get(key))[:200]}). "
                "Use the same settings or a new --out directory."
            )


def haystack_sha(files: list[Path]) -> str:
    """A short hash of the haystack files' names and contents (a resumed run must use the same text)."""
    hay = hashlib.sha256()
    for f in files:
        hay.update(f.name.encode() + b"\0" + f.read_bytes())
    return hay.hexdigest()[:16]


# --- statistics -----------------------------------------------------------------------------------------

def mean(xs: list[float]) -> float:
    """The mean, nan for no values (a configuration with no cells yet)."""
    return sum(xs) / len(xs) if xs else float("nan")


def std(xs: list[float]) -> float:
    """Sample standard deviation over seeds (0 for a single seed, nan where a seed has no cells yet)."""
    if any(math.isnan(x) for x in xs):
        return float("nan")
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def format_mean_std(value: float, spread: float | None = None, seeds: int = 1) -> str:
    """'0.50±0.10' over several seeds, '0.50' for one, '-' for no cells (nan)."""
    if value != value:  # nan: no cells
        return "-"
    return f"{value:.2f}±{spread:.2f}" if seeds > 1 and spread is not None else f"{value:.2f}"
