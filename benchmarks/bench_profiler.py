"""Time one profiling sample: rheads' profiler against the straightforward method.

ours: `run_sample` with the rheads_profiler attention (SDPA prefill without logits, explicit attention
rows only at single-query decode steps).
straightforward: the model with eager attention, a full forward over the prompt with
output_attentions=True and full logits into a DynamicCache, then decode steps also with
output_attentions=True, taking the argmax of the last attention row of every head.

Both decode the same number of greedy steps (no early stop) on the same prompt. Each (method, length)
runs in a fresh spawned process: peak memory is that process's peak RSS (ru_maxrss) minus its RSS
after loading the model. The child's address space is capped (--mem-cap-gb), so a method that needs
more memory fails with an allocation error, recorded as "oom", instead of waking the OOM killer.

    python benchmarks/bench_profiler.py --lengths 1000,2000 --threads 1
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import resource
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results" / "profiler.json"
METHODS = ("ours", "straightforward")


def _proc_kb(field: str) -> int:
    """A memory figure of this process from /proc/self/status, in KiB (VmRSS, VmSize, ...)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def straightforward_sample(model, prompt, steps: int, span: tuple[int, int]):
    """The copy test as most code does it: eager attention, every attention matrix materialised."""
    import torch
    from transformers import DynamicCache

    from rheads.profiling.profiler import SampleResult, copy_hits

    ids = torch.tensor(prompt.input_ids)
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(input_ids=ids[None, :-1], cache=cache, use_cache=True, output_attentions=True)
        copies = torch.zeros(model.config.num_hidden_layers, model.config.num_attention_heads, dtype=torch.int32)
        token, response = ids[-1:], []
        for _ in range(steps):
            out = model(input_ids=token[None], cache=cache, use_cache=True, output_attentions=True)
            token = out.logits[0, -1].argmax()[None]
            argmax = torch.stack([a[0, :, -1].argmax(-1) for a in out.attentions])
            copies += copy_hits(argmax, int(token), ids, span)
            response.append(int(token))
    return SampleResult(response, copies)


def _child(conn, method: str, model_spec: str, length: int, depth: float, needle_index: int,
           steps: int | None, threads: int | None, mem_cap_gb: float) -> None:
    """One timed sample in a fresh process; sends a result dict back through conn."""
    import torch

    from rheads.models import load_model, resolve_model
    from rheads.niah import build_prompt, load_needles
    from rheads.profiling.profiler import ATTENTION_NAME, run_sample

    if threads:
        torch.set_num_threads(threads)
    model, tokenizer = load_model(resolve_model(model_spec))
    prompt = build_prompt(tokenizer, load_needles()[needle_index], length, depth)
    with torch.inference_mode():  # touch every weight page, so that the baseline RSS holds the model
        model(input_ids=torch.tensor([prompt.input_ids[:16]]))
    model.config._attn_implementation = ATTENTION_NAME if method == "ours" else "eager"
    span = prompt.answer_span
    steps = steps or (span[1] - span[0]) + 32
    rss_kb = _proc_kb("VmRSS")
    cap = _proc_kb("VmSize") * 1024 + int(mem_cap_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (cap, resource.getrlimit(resource.RLIMIT_AS)[1]))
    result: dict[str, Any] = {"method": method, "length": length, "steps": steps}
    try:
        start = time.perf_counter()
        if method == "ours":
            sample = run_sample(model, prompt, steps, set(), span)
        else:
            sample = straightforward_sample(model, prompt, steps, span)
        result.update(status="ok", seconds=time.perf_counter() - start,
                      copies=sample.copies.tolist(), response=sample.response_ids)
    except (MemoryError, RuntimeError) as error:
        if "memory" not in str(error).lower() and not isinstance(error, MemoryError):
            raise
        result.update(status="oom", error=str(error).splitlines()[0][:200])
    result["peak_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_kb) / 1024
    conn.send(result)


def run_one(method: str, length: int, args: argparse.Namespace) -> dict[str, Any]:
    """Run one (method, length) in a spawned child, turning a timeout or a crash into a record."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child, method, args.model, length, args.depth, args.needle,
                                            args.steps, args.threads, args.mem_cap_gb))
    start = time.perf_counter()
    proc.start()
    child.close()
    if parent.poll(args.time_cap):
        result = parent.recv()
    elif proc.is_alive():
        result = {"method": method, "length": length, "status": "timeout",
                  "error": f"over the {args.time_cap:.0f} s cap"}
    else:
        result = {"method": method, "length": length, "status": "crashed"}
    proc.join(5)
    if proc.is_alive():
        proc.kill()
        proc.join()
    if result["status"] == "crashed" or proc.exitcode:
        result.setdefault("error", f"child exit code {proc.exitcode}")
        if proc.exitcode and proc.exitcode < 0 and result["status"] == "crashed":
            result["status"] = "oom"  # killed by a signal: almost always the OOM killer
    result["wall_seconds"] = time.perf_counter() - start
    return result


def _cell(result: dict[str, Any], key: str, fmt: str) -> str:
    return format(result[key], fmt) if result.get("status") == "ok" else result.get("status", "-")


def _pick(results: list[dict[str, Any]], length: int, method: str) -> dict[str, Any]:
    return next(r for r in results if r["length"] == length and r["method"] == method)


def summarise_rows(results: list[dict[str, Any]], lengths: list[int]) -> list[dict[str, Any]]:
    """One row per length: both methods' seconds and peak memory, the ratio and copy agreement."""
    rows = []
    for length in lengths:
        ours, plain = (_pick(results, length, m) for m in METHODS)
        both = ours.get("status") == plain.get("status") == "ok"
        rows.append({
            "length": length, "steps": ours.get("steps"),
            "ours_s": ours.get("seconds"), "straightforward_s": plain.get("seconds"),
            "ratio": plain["seconds"] / ours["seconds"] if both else None,
            "ours_peak_mb": ours.get("peak_mb"), "straightforward_peak_mb": plain.get("peak_mb"),
            "ours_status": ours["status"], "straightforward_status": plain["status"],
            "copies_agree": ours["copies"] == plain["copies"] if both else None,
            "responses_agree": ours["response"] == plain["response"] if both else None,
            "copies_total": sum(map(sum, ours["copies"])) if ours.get("status") == "ok" else None,
        })
    return rows


def format_table(results: list[dict[str, Any]], rows: list[dict[str, Any]]) -> str:
    head = f"{'length':>7}{'steps':>6}{'ours s':>9}{'plain s':>10}{'ratio':>8}{'ours MB':>9}{'plain MB':>10}  agree"
    lines = [head]
    for row in rows:
        ours, plain = (_pick(results, row["length"], m) for m in METHODS)
        ratio = f"{row['ratio']:.2f}" if row["ratio"] is not None else "-"
        agree = {True: "yes", False: "no", None: "-"}[row["copies_agree"]]
        lines.append(f"{row['length']:>7}{row['steps'] or '-':>6}{_cell(ours, 'seconds', '.2f'):>9}"
                     f"{_cell(plain, 'seconds', '.2f'):>10}{ratio:>8}{_cell(ours, 'peak_mb', '.0f'):>9}"
                     f"{_cell(plain, 'peak_mb', '.0f'):>10}  {agree}")
    return "\n".join(lines)


def _available_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return 8.0


def main(argv: list[str] | None = None) -> int:
    from tqdm.auto import tqdm

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="model spec (default: %(default)s)")
    parser.add_argument("--lengths", default="1000,2000,4000", help="comma-separated context lengths")
    parser.add_argument("--depth", type=float, default=0.5, help="needle depth (default: %(default)s)")
    parser.add_argument("--needle", type=int, default=0, help="index of the shipped needle (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=None, help="decode steps (default: answer length + 32)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in each run")
    parser.add_argument("--time-cap", type=float, default=300.0, help="seconds before a run is stopped")
    parser.add_argument("--mem-cap-gb", type=float, default=round(0.6 * _available_gb(), 1),
                        help="memory a run may add after loading the model (default: %(default)s)")
    parser.add_argument("--json", type=Path, default=RESULTS, help="where to save results (default: %(default)s)")
    args = parser.parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",") if x.strip()]

    results = []
    runs = [(length, method) for length in lengths for method in METHODS]
    with tqdm(runs, desc="bench_profiler", unit="run") as bar:
        for length, method in bar:
            bar.set_postfix(length=length, method=method)
            results.append(run_one(method, length, args))
    rows = summarise_rows(results, lengths)
    print(f"{args.model}: seconds and peak RSS increase (MB) per sample; plain = straightforward eager")
    print(format_table(results, rows))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    args.json.write_text(json.dumps({
        "settings": settings, "machine": {"cpu_count": mp.cpu_count(), "platform": platform.platform()},
        "rows": rows, "runs": [{k: v for k, v in r.items() if k not in ("copies", "response")} for r in results],
    }, indent=1) + "\n")
    print(f"saved {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
