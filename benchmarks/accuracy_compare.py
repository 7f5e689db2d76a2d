"""Needle accuracy against KV bytes across several `rheads eval niah` runs on one grid: a table and a plot.

Each run directory holds one profile's (or window's) configurations; runs that share a grid share their
full-cache and window cells (benchmarks/accuracy_long.sh reuses them). This reads every run's cells.jsonl,
counts correct cells per configuration and length, and takes each configuration's KV bytes per sequence
from the run's own full and window rows (the engine's formula: a head costs its pages when full, its sink
+ window slot when streaming, so bytes are linear in the number of full heads between those two rows).

    python benchmarks/accuracy_compare.py shipped=RUN1 attention-max=RUN2 ... --length 31000 \\
        --json benchmarks/results/accuracy_31k.json --png benchmarks/results/accuracy_31k.png
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from rheads.engine.llm import DEFAULT_WINDOW

MIB = 1 << 20


def load_run(path: Path, length: int) -> dict[str, dict]:
    """config name -> {correct, cells, full_heads, selection, budget} at `length`, from one run's cells."""
    rows: dict[str, dict] = defaultdict(lambda: {"correct": 0, "cells": 0})
    for line in (path / "cells.jsonl").read_text().splitlines():
        cell = json.loads(line)
        if cell["length"] != length:
            continue
        row = rows[cell["config"]]
        row.update(full_heads=cell["full_heads"], selection=cell["selection"], budget=cell["budget"],
                   seed=cell["seed"])
        row["correct"] += bool(cell["correct"])
        row["cells"] += 1
    return dict(rows)


def head_bytes(summary: dict, length: int) -> tuple[int, int, int]:
    """(heads, bytes per full head, bytes per streaming head) of a sequence of `length` tokens, from a run's
    full and window rows (measured at its longest length: a full head's pages scale with the tokens)."""
    rows = {c["selection"]: c for c in summary["configs"] if c["selection"] in ("full", "window")}
    if len(rows) < 2:
        raise SystemExit("accuracy_compare: a run's summary.json lacks its full-cache or window row")
    heads, page = rows["full"]["total_heads"], summary["meta"]["page_size"]
    pages = lambda n: -(-n // page)  # noqa: E731
    full = rows["full"]["kv_bytes_per_seq"] // heads * pages(length) // pages(max(summary["lengths"]))
    return heads, full, rows["window"]["kv_bytes_per_seq"] // heads


def compare(runs: list[tuple[str, Path]], length: int) -> list[dict]:
    """One row per (run, configuration), the full cache and each window once, sorted by KV bytes."""
    out, seen = [], set()
    for label, path in runs:
        summary = json.loads((path / "summary.json").read_text())
        window = summary["meta"]["window"]
        heads, full_bytes, slot_bytes = head_bytes(summary, length)
        for name, row in load_run(path, length).items():
            shared = {"full": "full cache", "window": f"window {window} alone"}.get(row["selection"])
            if shared is not None:
                if shared in seen:
                    continue
                seen.add(shared)
            suffix = f", window {window}" if window != DEFAULT_WINDOW else ""
            kv = row["full_heads"] * full_bytes + (heads - row["full_heads"]) * slot_bytes
            out.append({"label": label, "config": name, "what": shared or f"{label} {name}{suffix}",
                        "window": window, **row, "kv_bytes": kv, "kv_fraction": kv / (heads * full_bytes)})
    return sorted(out, key=lambda r: (r["kv_bytes"], r["what"]))


def format_table(rows: list[dict], length: int) -> str:
    full = next(r for r in rows if r["selection"] == "full")
    lines = [f"| configuration at {length} tokens | full KV heads | KV per sequence | of full | correct | "
             "vs full (points) |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        points = 100 * (r["correct"] / r["cells"] - full["correct"] / full["cells"])
        lines.append(f"| {r['what']} | {r['full_heads']} | {r['kv_bytes'] / MIB:.1f} MiB | "
                     f"{100 * r['kv_fraction']:.0f}% | {r['correct']}/{r['cells']} | {points:+.1f} |")
    return "\n".join(lines)


def write_plot(rows: list[dict], length: int, png: Path, title: str) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9.5, 4.8), layout="constrained")
    ax = fig.subplots()
    series: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        name = r["selection"] if r["selection"] in ("full", "window", "random") else r["label"] + (
            f" (window {r['window']})" if r["window"] != DEFAULT_WINDOW else "")
        series[name].append(r)
    for name, mine in series.items():
        mine.sort(key=lambda r: r["kv_bytes"])
        xs = [r["kv_bytes"] / MIB for r in mine]
        ys = [r["correct"] / r["cells"] for r in mine]
        fmt = {"full": "*", "window": "X", "random": "s--"}.get(name, "o-")
        ax.plot(xs, ys, fmt, label=name, markersize=8)
        for r, x, y in zip(mine, xs, ys):
            if r["selection"] in ("retrieval", "random"):
                ax.annotate(f"{r['budget']:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    full = next(r for r in rows if r["selection"] == "full")
    ax.axhline(full["correct"] / full["cells"] - 0.02, color="grey", lw=0.8, ls=":",
               label="full cache - 2 points")
    ax.set_xlabel(f"KV cache per sequence at {length} tokens (MiB)")
    ax.set_ylabel(f"accuracy ({full['cells']} cells a point)")
    ax.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title(title, fontsize=9)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="LABEL=DIR: an `rheads eval niah` output directory and its name")
    p.add_argument("--length", type=int, required=True, help="the grid's context length to compare at")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--png", type=Path, default=None)
    p.add_argument("--title", default="needle accuracy against KV memory")
    args = p.parse_args(argv)
    runs = []
    for spec in args.runs:
        label, sep, path = spec.partition("=")
        if not sep or not Path(path).is_dir():
            p.error(f"{spec!r} is not LABEL=DIR with DIR an eval output directory")
        runs.append((label, Path(path)))
    rows = compare(runs, args.length)
    print(format_table(rows, args.length))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"length": args.length, "rows": rows}, indent=1) + "\n")
    if args.png:
        write_plot(rows, args.length, args.png, args.title)


if __name__ == "__main__":
    main()
