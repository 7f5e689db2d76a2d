"""Soak: many more streaming clients than the server admits, for a while; then check nothing was lost or leaked.

Starts `rheads serve` (the SmolLM2 preset, small limits: --max-num-seqs 4 --max-waiting 8) as a subprocess
on a free 127.0.0.1 port and runs `--concurrency` streaming clients against it for `--duration` seconds.
Each client loops: a /v1/completions stream of a random-length prompt (token ids cut from the shipped
haystack) and a random max_tokens; some clients walk away mid-stream on purpose (`--abandon-fraction`).
Every request ends as exactly one of:

    completed   the stream ended with a finish_reason and [DONE]
    rejected    429 or 503 (the client waits Retry-After, at most 2 s, and goes on)
    abandoned   the client closed the stream itself, on purpose
    lost        anything else: a 5xx, an error event, a broken or unfinished stream, a timeout

After the deadline no new request starts; those in flight finish. Then /metrics must show no request
running or waiting and no KV page or window slot in use, the server's RSS (VmRSS in /proc/PID/status)
is read before, during (peak) and after, and the server is stopped with SIGTERM (it must exit 0). Prints a
table and writes JSON; the exit status is 0 only if nothing was lost or leaked.

    python benchmarks/soak.py --duration 120

Talks only to 127.0.0.1; bounded in time (duration + drain timeouts); stops everything it starts.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import random
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load import MetricsSampler, haystack_ids, make_prompt, percentile, sse_payloads  # noqa: E402
from serve_compare import REPO, ServerProcess  # noqa: E402

REJECTED = (429, 503)
OUTCOMES = ("completed", "rejected", "abandoned", "lost")


def rss_bytes(pid: int) -> int | None:
    """VmRSS of a process, from /proc (no psutil needed); None once it has gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


@dataclass
class Tally:
    counts: dict[str, int] = field(default_factory=lambda: {k: 0 for k in OUTCOMES})
    statuses: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    ttft: list[float] = field(default_factory=list)
    e2e: list[float] = field(default_factory=list)
    output_tokens: int = 0

    def add(self, outcome: str, status: int | None = None, error: str | None = None) -> None:
        self.counts[outcome] += 1
        if status is not None:
            self.statuses[str(status)] = self.statuses.get(str(status), 0) + 1
        if error:
            self.errors[error] = self.errors.get(error, 0) + 1

    @property
    def sent(self) -> int:
        return sum(self.counts.values())


async def one_request(client: httpx.AsyncClient, prompt: list[int], max_tokens: int, abandon_after: int | None,
                      tally: Tally) -> float:
    """Stream one request and tally how it ended; returns seconds to wait before the next one."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.8, "seed": len(prompt),
            "ignore_eos": True, "stream": True}
    begin = time.perf_counter()
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code in REJECTED:
                await r.aread()
                tally.add("rejected", r.status_code)
                return min(float(r.headers.get("retry-after", 1)), 2.0)
            if r.status_code != 200:
                tally.add("lost", r.status_code, (await r.aread()).decode(errors="replace")[:120])
                return 0.0
            chunks, finish, done = 0, None, False
            async for payload in sse_payloads(r):
                if payload is None:
                    done = True
                    break
                if "error" in payload:
                    tally.add("lost", 200, str(payload["error"].get("message"))[:120])
                    return 0.0
                for choice in payload.get("choices", []):
                    if chunks == 0:
                        tally.ttft.append(time.perf_counter() - begin)
                    chunks += 1
                    finish = choice.get("finish_reason") or finish
                if abandon_after is not None and chunks >= abandon_after:
                    tally.add("abandoned", 200)  # leaving the block closes the connection mid-stream
                    return 0.0
            if done and finish is not None:
                tally.add("completed", 200)
                tally.e2e.append(time.perf_counter() - begin)
                tally.output_tokens += chunks
            else:
                tally.add("lost", 200, "stream ended without a finish_reason and [DONE]")
    except (httpx.HTTPError, json.JSONDecodeError) as error:
        tally.add("lost", None, f"{type(error).__name__}: {error}"[:120])
    return 0.0


async def soak(base: str, pid: int, args: argparse.Namespace) -> dict:
    rng = random.Random(args.seed)
    tally = Tally()
    limits = httpx.Limits(max_connections=args.concurrency + 4, max_keepalive_connections=args.concurrency + 4)
    async with httpx.AsyncClient(base_url=base, timeout=args.request_timeout, limits=limits) as client, \
            httpx.AsyncClient(base_url=base, timeout=10) as side:
        ids = await haystack_ids(side)
        warm = await side.post("/v1/completions", json={"prompt": ids[:64], "max_tokens": 4})
        warm.raise_for_status()
        rss = {"before": rss_bytes(pid), "peak": rss_bytes(pid)}
        sampler = MetricsSampler(side, args.metrics_interval)
        t0 = time.perf_counter()
        deadline = t0 + args.duration

        async def client_loop(worker: int) -> None:
            index = worker
            while time.perf_counter() < deadline:
                length = rng.randint(args.min_prompt_tokens, args.max_prompt_tokens)
                abandon = rng.randint(1, 8) if rng.random() < args.abandon_fraction else None
                wait = await one_request(client, make_prompt(ids, index, length),
                                         rng.randint(args.min_tokens, args.max_tokens), abandon, tally)
                index += args.concurrency
                if wait:
                    await asyncio.sleep(wait)

        async def watch_rss(stop: asyncio.Event) -> None:
            while not stop.is_set():
                rss["peak"] = max(rss["peak"] or 0, rss_bytes(pid) or 0)
                await asyncio.sleep(1.0)

        stop = asyncio.Event()
        side_tasks = [asyncio.create_task(sampler.run(t0, stop)), asyncio.create_task(watch_rss(stop))]
        clients = [asyncio.create_task(client_loop(i)) for i in range(args.concurrency)]
        # after the deadline no request starts; those in flight get `drain_timeout` to finish
        _, late = await asyncio.wait(clients, timeout=args.duration + args.drain_timeout)
        for task in late:
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)
        load_s = time.perf_counter() - t0
        stop.set()
        await asyncio.gather(*side_tasks)

        idle_deadline = time.perf_counter() + args.idle_timeout
        held = ("rheads:num_requests_running", "rheads:num_requests_waiting", "rheads:kv_cache_pages_used",
                "rheads:kv_cache_window_slots_used", "rheads:kv_cache_bytes_used")
        while True:  # the engine notices the last aborts within a step
            after = await sampler.scrape() or {}
            if all(after.get(name, 1) == 0 for name in held) or time.perf_counter() > idle_deadline:
                break
            await asyncio.sleep(0.25)
        rss["after"] = rss_bytes(pid)

    kv = sampler.kv_summary()
    return {
        "requests": {"sent": tally.sent, **tally.counts, "clients_cut_at_drain_timeout": len(late)},
        "statuses": tally.statuses,
        "errors": dict(sorted(tally.errors.items(), key=lambda kv: -kv[1])[:10]),
        "load_s": load_s,
        "completed_per_s": tally.counts["completed"] / load_s,
        "output_tokens_completed": tally.output_tokens,
        "ttft_s": {f"p{q}": percentile(tally.ttft, q) for q in (50, 99)},
        "e2e_s": {f"p{q}": percentile(tally.e2e, q) for q in (50, 99)},
        "peak_running": kv["peak_running"], "peak_waiting": kv["peak_waiting"],
        "after_load": {name.split(":")[1]: after.get(name) for name in (
            "rheads:num_requests_running", "rheads:num_requests_waiting", "rheads:kv_cache_pages_used",
            "rheads:kv_cache_window_slots_used", "rheads:kv_cache_bytes_used", "rheads:num_preemptions")},
        "rss_bytes": rss,
    }


def format_table(r: dict) -> str:
    q, a, rss = r["requests"], r["after_load"], r["rss_bytes"]
    mib = lambda x: "-" if x is None else f"{x / 2**20:.0f}"  # noqa: E731
    ms = lambda x: "-" if x is None else f"{x * 1000:,.0f}"  # noqa: E731
    rows = [
        ("requests sent", q["sent"]), ("completed", q["completed"]), ("rejected (429/503)", q["rejected"]),
        ("abandoned by the client (on purpose)", q["abandoned"]), ("lost (none of the above)", q["lost"]),
        ("completed per second", f"{r['completed_per_s']:.2f}"),
        ("TTFT p50 / p99 of completed (ms)", f"{ms(r['ttft_s']['p50'])} / {ms(r['ttft_s']['p99'])}"),
        ("peak running / waiting", f"{r['peak_running']:.0f} / {r['peak_waiting']:.0f}"),
        ("after load: running / waiting", f"{a['num_requests_running']:.0f} / {a['num_requests_waiting']:.0f}"),
        ("after load: KV pages / window slots used (leaked)",
         f"{a['kv_cache_pages_used']:.0f} / {a['kv_cache_window_slots_used']:.0f}"),
        ("after load: KV bytes used", f"{a['kv_cache_bytes_used']:.0f}"),
        ("server RSS before / peak / after (MiB)", f"{mib(rss['before'])} / {mib(rss['peak'])} / {mib(rss['after'])}"),
        ("server exit status after SIGTERM", r.get("exit_code")),
    ]
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--profile", default=str(REPO / "profiles" / "SmolLM2-135M-Instruct.json"))
    p.add_argument("--budget", type=float, default=0.5)
    p.add_argument("--kv-cache-memory", default="128MiB")
    p.add_argument("--max-num-seqs", type=int, default=4)
    p.add_argument("--max-waiting", type=int, default=8)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--threads", type=int, default=1, help="the server's torch threads")
    p.add_argument("--concurrency", "-c", type=int, default=32, help="streaming clients (well past 4 + 8)")
    p.add_argument("--duration", type=float, default=180.0, help="seconds during which requests start")
    p.add_argument("--drain-timeout", type=float, default=120.0, help="seconds in-flight requests get after it")
    p.add_argument("--idle-timeout", type=float, default=30.0, help="seconds for the server to show idle")
    p.add_argument("--request-timeout", type=float, default=300.0)
    p.add_argument("--min-prompt-tokens", type=int, default=16)
    p.add_argument("--max-prompt-tokens", type=int, default=400)
    p.add_argument("--min-tokens", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--abandon-fraction", type=float, default=0.1, help="requests whose client leaves mid-stream")
    p.add_argument("--metrics-interval", type=float, default=0.5)
    p.add_argument("--shutdown-grace-seconds", type=float, default=30.0)
    p.add_argument("--startup-timeout", type=float, default=300.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "soak_cpu_smollm2.json")
    args = p.parse_args(argv)

    flags = [args.model, "--profile", args.profile, "--budget", str(args.budget), "--kv-cache-memory",
             args.kv_cache_memory, "--max-num-seqs", str(args.max_num_seqs), "--max-waiting", str(args.max_waiting),
             "--max-model-len", str(args.max_model_len), "--threads", str(args.threads), "--device", "cpu",
             "--shutdown-grace-seconds", str(args.shutdown_grace_seconds)]
    started = datetime.datetime.now(datetime.timezone.utc)
    with tempfile.TemporaryDirectory(prefix="rheads-soak-") as logs:
        print(f"starting: rheads serve {' '.join(flags)}", file=sys.stderr, flush=True)
        server = ServerProcess("soak", flags, args.threads, args.startup_timeout, Path(logs))
        try:
            print(f"up in {server.startup_s:.1f}s on {server.base}; {server.banner()}; {args.concurrency} clients "
                  f"for {args.duration:.0f}s", file=sys.stderr, flush=True)
            result = asyncio.run(soak(server.base, server.proc.pid, args))
            server.proc.send_signal(signal.SIGTERM)  # the graceful path: nothing is in flight now
            try:
                result["exit_code"] = server.proc.wait(args.shutdown_grace_seconds + 30)
            except Exception:  # noqa: BLE001 - reported as no exit code; stop() kills it
                result["exit_code"] = None
        finally:
            server.stop()
        result["server_log_tail"] = server.output()[-2000:]

    after = result["after_load"]
    leaked = after["kv_cache_pages_used"] or after["kv_cache_window_slots_used"] or after["kv_cache_bytes_used"]
    ok = result["requests"]["lost"] == 0 and not leaked and result["exit_code"] == 0 and not (
        after["num_requests_running"] or after["num_requests_waiting"])
    table = format_table(result)
    print(f"\nsoak: rheads serve {args.model} on CPU ({os.cpu_count()} CPUs, {args.threads} server thread), "
          f"--max-num-seqs {args.max_num_seqs} --max-waiting {args.max_waiting}; {args.concurrency} streaming "
          f"clients for {args.duration:.0f}s; prompts {args.min_prompt_tokens}-{args.max_prompt_tokens} tokens, "
          f"max_tokens {args.min_tokens}-{args.max_tokens}, {args.abandon_fraction:.0%} abandoned mid-stream")
    print(table)
    if result["errors"]:
        print("errors:", *[f"{n} x {e}" for e, n in result["errors"].items()], sep="\n  ")
    print("PASS: nothing lost, nothing leaked, clean exit" if ok else "FAIL: see above")
    out = {"started_utc": started.isoformat(timespec="seconds"),
           "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                       "load_average": os.getloadavg(), "python": platform.python_version()},
           "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
           "server_command": ["rheads", "serve", *flags], "pass": ok, **result, "table": table}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.json}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
