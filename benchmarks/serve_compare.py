"""Serve the same model twice, compressed and full, and run the same load against each, in one run.

Starts `rheads serve` as a subprocess on a free 127.0.0.1 port with budget 0.5 and the shipped profile,
runs benchmarks/load.py's load against it, stops it, then does the same with budget 1.0 and
`--profile none` (every head keeps its full cache); every other flag is the same. Prints the two side
by side with the ratios (0.5 over 1.0) and saves the JSON.

    python benchmarks/serve_compare.py --concurrency 8 --requests 24 --prompt-tokens 600 --max-tokens 32

Everything talks only to 127.0.0.1, is bounded in time and requests, and stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load import ROWS, format_comparison, run_load  # noqa: E402
from servers import REPO, ServerProcess, rheads_command  # noqa: E402

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct", help="preset, Hugging Face id or directory")
    p.add_argument("--profile", default=str(REPO / "profiles" / "SmolLM2-135M-Instruct.json"),
                   help="profile for the compressed server")
    p.add_argument("--budget", type=float, default=0.5, help="the compressed server's budget")
    p.add_argument("--kv-cache-memory", default="256MiB", help="the same for both servers")
    p.add_argument("--max-num-seqs", type=int, default=16, help="the same for both servers")
    p.add_argument("--max-num-batched-tokens", type=int, default=None, help="(default: the server's)")
    p.add_argument("--max-model-len", type=int, default=None, help="(default: the model's)")
    p.add_argument("--device", default="cpu", help="passed to rheads serve")
    p.add_argument("--threads", type=int, default=1,
                   help="OMP_NUM_THREADS of each server (one is much faster on a busy two-core box)")
    p.add_argument("--startup-timeout", type=float, default=300.0)
    p.add_argument("--concurrency", "-c", type=int, default=8)
    p.add_argument("--requests", "-n", type=int, default=24)
    p.add_argument("--duration", type=float, default=240.0, help="per server: seconds before its load stops")
    p.add_argument("--prompt-tokens", type=int, default=600)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--metrics-interval", type=float, default=0.25)
    p.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "serve_cpu_smollm2.json")
    p.add_argument("--keep-records", action="store_true", help="keep every request's record in the JSON")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    common = [args.model, "--kv-cache-memory", args.kv_cache_memory, "--max-num-seqs", str(args.max_num_seqs),
              "--device", args.device]
    if args.max_num_batched_tokens:
        common += ["--max-num-batched-tokens", str(args.max_num_batched_tokens)]
    if args.max_model_len:
        common += ["--max-model-len", str(args.max_model_len)]
    compressed, full = f"budget {args.budget:g}", "budget 1.0"
    servers = {compressed: common + ["--profile", args.profile, "--budget", str(args.budget)],
               full: common + ["--profile", "none", "--budget", "1.0"]}

    started = datetime.datetime.now(datetime.timezone.utc)
    summaries, details = {}, {}
    with tempfile.TemporaryDirectory(prefix="rheads-serve-compare-") as logs:
        for name, flags in servers.items():
            print(f"[{name}] starting: rheads serve {' '.join(flags)}", file=sys.stderr, flush=True)
            server = ServerProcess(name, lambda port: rheads_command(flags, port), args.startup_timeout,
                                   Path(logs), threads=args.threads)
            try:
                print(f"[{name}] up in {server.startup_s:.1f}s on {server.base}; {server.banner()}",
                      file=sys.stderr, flush=True)
                summary = asyncio.run(run_load(
                    server.base, args.concurrency, args.requests, args.duration, args.prompt_tokens,
                    args.max_tokens, metrics_interval=args.metrics_interval, progress=not args.no_progress,
                    label=name))
            finally:
                code = server.stop()
            if not args.keep_records:
                summary.pop("records")
            summary["server_process"] = {"command": ["rheads", "serve", *flags], "startup_s": server.startup_s,
                                         "banner": server.banner(), "exit_code": code}
            summaries[name] = summary
            details[name] = summary["errors"]

    table = format_comparison(summaries, ratio_of=(compressed, full))

    def ratio(get) -> float | None:
        a, b = get(summaries[compressed]), get(summaries[full])
        return a / b if a is not None and b else None
    print()
    print(f"rheads serve, {args.model} on {args.device} ({os.cpu_count()} CPUs, {args.threads} thread/server): "
          f"{args.concurrency} streaming clients, {args.requests} requests, {args.prompt_tokens}-token prompts, "
          f"{args.max_tokens} output tokens, --kv-cache-memory {args.kv_cache_memory} "
          f"--max-num-seqs {args.max_num_seqs}")
    print(table)
    for name, errors in details.items():
        if errors:
            print(f"{name} errors:", *errors, sep="\n  ")
    result = {
        "started_utc": started.isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "load_average": os.getloadavg(), "python": platform.python_version()},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "runs": summaries,
        "ratios": {f"{label} ({compressed} / {full})": ratio(get) for label, get, _, as_ratio in ROWS if as_ratio},
        "table": table,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.json}")
    return 0 if all(s["requests"]["completed"] for s in summaries.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
