"""Load generator for an rheads (or any OpenAI-compatible) server: N concurrent streaming clients.

Each request is a /v1/completions stream of a `--prompt-tokens`-token prompt cut from the haystack text
shipped with rheads (tokenized once by the server's /tokenize, then sent as token ids, so every prompt
has exactly that many tokens), with `--max-tokens` output tokens, temperature 0 and ignore_eos; closed loop
(each client sends its next request when one ends) or, with `--rate`, open loop. The run
stops after `--requests` requests or `--duration` seconds, whichever comes first (requests still in
flight at the deadline are cancelled and counted as unfinished). While it runs, /metrics is sampled
for the KV bytes held and the bytes a full cache would hold for the same tokens.

    python benchmarks/load.py --base-url http://127.0.0.1:8000 --concurrency 8 --requests 24 \\
        --prompt-tokens 600 --max-tokens 32 --json load.json

Talks only to --base-url; everything it starts stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families
from tqdm.auto import tqdm

from rheads.niah import haystack_files

REJECTED = (429, 503)
RHEADS_BODY = {"ignore_eos": True}  # fixed output lengths (vLLM's extension; peers may refuse the field)


@dataclass
class Record:
    """One request: outcome, per-token arrival times (relative to its start) and token counts."""

    outcome: str  # "completed", "failed", "rejected" or "unfinished"
    status: int | None = None
    start: float = 0.0  # seconds since the run began
    token_times: list[float] = field(default_factory=list)  # arrival of each streamed chunk, from start
    end: float | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0
    error: str | None = None

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] if self.token_times else None

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in [0, 100]); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarize(values: list[float], qs: tuple[int, ...]) -> dict:
    out = {f"p{q}": percentile(values, q) for q in qs}
    out["mean"] = sum(values) / len(values) if values else None
    out["count"] = len(values)
    return out


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text as {sample name: value}, histogram buckets left out, labels summed over."""
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if "le" not in s.labels:
                samples[s.name] = samples.get(s.name, 0.0) + s.value
    return samples


class MetricsSampler:
    """Scrapes /metrics every `interval` seconds until stopped; keeps the KV and queue gauges."""

    FIELDS = {"used": "rheads:kv_cache_bytes_used", "full": "rheads:kv_cache_bytes_full_equivalent",
              "usage": "rheads:kv_cache_usage_perc", "running": "rheads:num_requests_running",
              "waiting": "rheads:num_requests_waiting"}

    def __init__(self, client: httpx.AsyncClient, interval: float):
        self.client, self.interval = client, interval
        self.samples: list[dict] = []
        self.errors = 0
        self.last: dict[str, float] = {}

    async def scrape(self) -> dict[str, float] | None:
        try:
            r = await self.client.get("/metrics")
            r.raise_for_status()
            self.last = parse_metrics(r.text)
            return self.last
        except (httpx.HTTPError, ValueError):
            self.errors += 1
            return None

    async def run(self, t0: float, stop: asyncio.Event) -> None:
        while not stop.is_set():
            m = await self.scrape()
            if m is not None and all(name in m for name in self.FIELDS.values()):
                self.samples.append({"t": time.perf_counter() - t0,
                                     **{key: m[name] for key, name in self.FIELDS.items()}})
            try:
                await asyncio.wait_for(stop.wait(), self.interval)
            except asyncio.TimeoutError:
                pass

    def kv_summary(self) -> dict:
        busy = [s for s in self.samples if s["full"] > 0]  # samples while some sequence held the cache
        peak_used = max((s["used"] for s in busy), default=0.0)
        peak_full = max((s["full"] for s in busy), default=0.0)
        mean_used = sum(s["used"] for s in busy) / len(busy) if busy else 0.0
        mean_full = sum(s["full"] for s in busy) / len(busy) if busy else 0.0
        return {
            "samples": len(self.samples), "busy_samples": len(busy), "scrape_errors": self.errors,
            "peak_bytes_used": peak_used, "peak_bytes_full_equivalent": peak_full,
            "peak_ratio": peak_used / peak_full if peak_full else None,
            "mean_bytes_used": mean_used, "mean_bytes_full_equivalent": mean_full,
            "mean_ratio": mean_used / mean_full if mean_full else None,
            "peak_usage_perc": max((s["usage"] for s in self.samples), default=0.0),
            "peak_running": max((s["running"] for s in self.samples), default=0.0),
            "peak_waiting": max((s["waiting"] for s in self.samples), default=0.0),
        }


async def haystack_ids(client: httpx.AsyncClient) -> list[int]:
    """The shipped haystack text as the server's token ids."""
    text = "\n\n".join(path.read_text() for path in haystack_files())
    r = await client.post("/tokenize", json={"prompt": text, "add_special_tokens": False})
    r.raise_for_status()
    return r.json()["tokens"]


def make_prompt(ids: list[int], index: int, length: int) -> list[int]:
    """Request `index`'s prompt: `length` tokens from its own offset, wrapping around the haystack."""
    start = (index * 1009) % len(ids)
    return [ids[(start + j) % len(ids)] for j in range(length)]



async def sse_payloads(response: httpx.Response) -> AsyncIterator[dict | None]:
    """The JSON payloads of a server-sent-events stream, then None for its closing [DONE]."""
    async for line in response.aiter_lines():
        if not line.startswith("data: "):
            continue
        data = line[len("data: "):]
        if data == "[DONE]":
            yield None
            return
        yield json.loads(data)

async def one_request(client: httpx.AsyncClient, model: str | None, prompt: str | list[int], max_tokens: int,
                      t0: float, record: Record, extra_body: dict | None = None) -> None:
    """Stream one completion, filling `record` in place (so a cancelled request keeps what it got)."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, **(RHEADS_BODY if extra_body is None else extra_body)}
    if model:
        body["model"] = model
    begin = time.perf_counter()
    record.start = begin - t0
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            record.status = r.status_code
            if r.status_code != 200:
                record.error = (await r.aread()).decode(errors="replace")[:300]
                record.outcome = "rejected" if r.status_code in REJECTED else "failed"
                return
            done = finished = False
            async for payload in sse_payloads(r):
                if payload is None:
                    done = True
                    break
                if "error" in payload:
                    record.outcome, record.error = "failed", str(payload["error"].get("message"))[:300]
                    return
                if payload.get("choices"):  # a chunk per token; its text may be empty (a held-back partial character)
                    record.token_times.append(time.perf_counter() - begin)
                    finished = finished or any(c.get("finish_reason") for c in payload["choices"])
                if payload.get("usage"):
                    record.prompt_tokens = payload["usage"]["prompt_tokens"]
                    record.output_tokens = payload["usage"]["completion_tokens"]
            record.end = time.perf_counter() - begin
            if done or finished:  # some servers (transformers serve) end the stream without [DONE]
                record.outcome = "completed"
                record.output_tokens = record.output_tokens or len(record.token_times)
                record.prompt_tokens = record.prompt_tokens or len(prompt)
            else:
                record.outcome, record.error = "failed", "stream ended without [DONE]"
    except (httpx.HTTPError, json.JSONDecodeError) as error:
        record.outcome, record.error = "failed", f"{type(error).__name__}: {error}"[:300]


async def run_load(base_url: str, concurrency: int = 8, requests: int = 64, duration: float = 300.0,
                   prompt_tokens: int = 600, max_tokens: int = 32, api_key: str | None = None,
                   model: str | None = None, metrics_interval: float = 0.25, request_timeout: float = 600.0,
                   progress: bool = True, label: str = "load",
                   prompts: Callable[[int], str | list[int]] | None = None, rate: float | None = None,
                   extra_body: dict | None = None) -> dict:
    """Run the load and return the summary (and every request's record under "records").

    Closed loop by default: `concurrency` clients, each sending its next request when the last one
    ends. With `rate` (requests/s) it is open loop: request i starts at i / rate seconds whatever is in
    flight (at most `concurrency` at once). `prompts(i)` gives request i's prompt (default: `prompt_tokens`
    token ids of the shipped haystack, through the server's /tokenize). `extra_body` replaces the
    rheads-specific fields (ignore_eos) for other servers.
    """
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=request_timeout,
                                 limits=limits) as client, \
            httpx.AsyncClient(base_url=base_url, headers=headers, timeout=10) as side:
        if prompts is not None:
            prompt_tokens = None  # the caller's prompts: their lengths are in the records, not this setting
        else:
            ids = await haystack_ids(side)
            prompts = lambda index: make_prompt(ids, index, prompt_tokens)  # noqa: E731
        if model is None:
            r = await side.get("/v1/models")
            r.raise_for_status()
            model = r.json()["data"][0]["id"]
        sampler = MetricsSampler(side, metrics_interval)
        before = await sampler.scrape()  # None: no /metrics here (another server), so no sampling
        records: list[Record] = []
        issued = 0
        bar = tqdm(total=requests, desc=label, unit="req", disable=not progress, leave=False)
        t0 = time.perf_counter()
        deadline = t0 + duration

        in_flight = asyncio.Semaphore(concurrency)

        async def send(index: int) -> None:
            record = Record("unfinished")
            records.append(record)
            async with in_flight:
                await one_request(client, model, prompts(index), max_tokens, t0, record, extra_body)
            bar.update(1)
            bar.set_postfix(ok=sum(r.outcome == "completed" for r in records))

        async def worker() -> None:
            nonlocal issued
            while issued < requests and time.perf_counter() < deadline:
                issued += 1
                await send(issued - 1)

        async def scheduled(index: int) -> None:
            await asyncio.sleep(max(0.0, t0 + index / rate - time.perf_counter()))
            if time.perf_counter() < deadline:
                await send(index)

        stop = asyncio.Event()
        sampling = asyncio.create_task(sampler.run(t0, stop)) if before is not None else None
        if rate:
            workers = [asyncio.create_task(scheduled(i)) for i in range(requests)]
        else:
            workers = [asyncio.create_task(worker()) for _ in range(concurrency)]
        _, pending = await asyncio.wait(workers, timeout=max(deadline - time.perf_counter(), 0))
        for task in pending:  # the deadline: cancel what is still streaming (the server aborts it)
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        elapsed = time.perf_counter() - t0
        stop.set()
        if sampling is not None:
            await sampling
        bar.close()
        after = (await sampler.scrape() or {}) if before is not None else {}
        before = before or {}

    done = [r for r in records if r.outcome == "completed"]
    # tokens streamed by requests cut off at the deadline count too (one chunk per token)
    output_tokens = sum(r.output_tokens if r.outcome == "completed" else len(r.token_times) for r in records)
    prompt_total = sum(r.prompt_tokens for r in done)
    counts = {k: sum(r.outcome == k for r in records) for k in ("completed", "failed", "rejected", "unfinished")}
    delta = lambda name: after.get(name, 0.0) - before.get(name, 0.0)  # noqa: E731
    return {
        "config": {"base_url": base_url, "model": model, "concurrency": concurrency, "requests": requests,
                   "rate": rate,
                   "duration_limit_s": duration, "prompt_tokens": prompt_tokens, "max_tokens": max_tokens},
        "requests": {"sent": len(records), **counts},
        "elapsed_s": elapsed,
        "request_throughput": len(done) / elapsed if elapsed else None,
        "output_token_throughput": output_tokens / elapsed if elapsed else None,
        "total_token_throughput": (output_tokens + prompt_total) / elapsed if elapsed else None,
        "output_tokens": output_tokens,
        "ttft_s": summarize([r.ttft for r in done if r.ttft is not None], (50, 90, 99)),
        "itl_s": summarize([x for r in done for x in r.itls], (50, 90, 99)),
        "e2e_s": summarize([r.end for r in done if r.end is not None], (50, 99)),
        "kv": sampler.kv_summary(),
        "server": {"prompt_tokens": delta("rheads:prompt_tokens_total"),
                   "generation_tokens": delta("rheads:generation_tokens_total"),
                   "preemptions": delta("rheads:num_preemptions")},
        "decoding": decoding_concurrency(records),
        "errors": sorted({r.error for r in records if r.error})[:10],
        "records": [asdict(r) for r in records],
    }


def decoding_concurrency(records: list[Record]) -> dict:
    """Client-side view of what a server sustains, for servers without our metrics: the most requests
    streaming tokens at once (between their first and last token), and the rate at which tokens
    arrived while at least 90% of that many were streaming (the decode rate at saturation)."""
    spans = [(r.start + r.token_times[0], r.start + r.token_times[-1]) for r in records if len(r.token_times) > 1]
    if not spans:
        return {"peak": 0, "tokens_per_s_at_peak": None, "seconds_at_peak": 0.0}
    events = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans], key=lambda e: (e[0], -e[1]))
    level, peak, timeline = 0, 0, []
    for t, delta in events:
        level += delta
        timeline.append((t, level))
        peak = max(peak, level)
    floor = math.ceil(0.9 * peak)
    windows = [(t, t_next) for (t, n), (t_next, _) in zip(timeline, timeline[1:]) if n >= floor and t_next > t]
    seconds = sum(b - a for a, b in windows)
    arrivals = [r.start + x for r in records for x in r.token_times[1:]]
    tokens = sum(any(a < x <= b for a, b in windows) for x in arrivals)
    return {"peak": peak, "tokens_per_s_at_peak": tokens / seconds if seconds else None, "seconds_at_peak": seconds}


# --- reporting -------------------------------------------------------------------------------------

def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:.1f}"


def _mib(x: float | None) -> str:
    return "-" if x is None else f"{x / 2**20:.1f}"


def _num(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


ROWS = [  # (label, how to read it from a summary, formatter, compare as a ratio)
    ("requests completed", lambda s: s["requests"]["completed"], str, False),
    ("requests failed", lambda s: s["requests"]["failed"], str, False),
    ("requests rejected (429/503)", lambda s: s["requests"]["rejected"], str, False),
    ("requests unfinished at deadline", lambda s: s["requests"]["unfinished"], str, False),
    ("elapsed (s)", lambda s: s["elapsed_s"], lambda x: _num(x, 1), True),
    ("request throughput (req/s)", lambda s: s["request_throughput"], _num, True),
    ("output throughput (tok/s)", lambda s: s["output_token_throughput"], lambda x: _num(x, 2), True),
    ("TTFT p50 (ms)", lambda s: s["ttft_s"]["p50"], _ms, True),
    ("TTFT p90 (ms)", lambda s: s["ttft_s"]["p90"], _ms, True),
    ("TTFT p99 (ms)", lambda s: s["ttft_s"]["p99"], _ms, True),
    ("ITL p50 (ms)", lambda s: s["itl_s"]["p50"], _ms, True),
    ("ITL p90 (ms)", lambda s: s["itl_s"]["p90"], _ms, True),
    ("ITL p99 (ms)", lambda s: s["itl_s"]["p99"], _ms, True),
    ("E2E p50 (ms)", lambda s: s["e2e_s"]["p50"], _ms, True),
    ("E2E p99 (ms)", lambda s: s["e2e_s"]["p99"], _ms, True),
    ("KV used, peak (MiB)", lambda s: s["kv"]["peak_bytes_used"], _mib, True),
    ("KV full-cache equiv., peak (MiB)", lambda s: s["kv"]["peak_bytes_full_equivalent"], _mib, True),
    ("KV used / full, peak", lambda s: s["kv"]["peak_ratio"], _num, True),
    ("KV used, mean (MiB)", lambda s: s["kv"]["mean_bytes_used"], _mib, True),
    ("KV full-cache equiv., mean (MiB)", lambda s: s["kv"]["mean_bytes_full_equivalent"], _mib, True),
    ("KV used / full, mean", lambda s: s["kv"]["mean_ratio"], _num, True),
    ("KV pool usage, peak (%)", lambda s: s["kv"]["peak_usage_perc"] * 100, lambda x: _num(x, 1), True),
    ("preemptions", lambda s: s["server"]["preemptions"], lambda x: _num(x, 0), False),
]


def format_table(summary: dict) -> str:
    width = max(len(label) for label, *_ in ROWS)
    lines = [f"{'metric':<{width}}  value", "-" * (width + 12)]
    for label, get, fmt, _ in ROWS:
        lines.append(f"{label:<{width}}  {fmt(get(summary))}")
    return "\n".join(lines)


def format_comparison(summaries: dict[str, dict], ratio_of: tuple[str, str] | None = None) -> str:
    """Side by side, plus a ratio column (first name over second) for the rows where it means something."""
    names = list(summaries)
    width = max(len(label) for label, *_ in ROWS)
    cols = [max(12, len(n)) for n in names]
    head = f"{'metric':<{width}}  " + "  ".join(f"{n:>{c}}" for n, c in zip(names, cols))
    if ratio_of:
        head += f"  {ratio_of[0] + ' / ' + ratio_of[1]:>14}"
    lines = [head, "-" * len(head)]
    for label, get, fmt, as_ratio in ROWS:
        values = [get(summaries[n]) for n in names]
        line = f"{label:<{width}}  " + "  ".join(f"{fmt(v):>{c}}" for v, c in zip(values, cols))
        if ratio_of:
            a, b = get(summaries[ratio_of[0]]), get(summaries[ratio_of[1]])
            ratio = f"{a / b:.3f}" if as_ratio and a is not None and b else "-"
            line += f"  {ratio:>14}"
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server (no /v1)")
    p.add_argument("--api-key", default=None, help="sent as Authorization: Bearer KEY")
    p.add_argument("--model", default=None, help="model name to send (default: the first of /v1/models)")
    p.add_argument("--concurrency", "-c", type=int, default=8, help="concurrent streaming clients")
    p.add_argument("--requests", "-n", type=int, default=64, help="requests in all (the run stops after them)")
    p.add_argument("--duration", type=float, default=300.0, help="seconds before the run stops regardless")
    p.add_argument("--prompt-tokens", type=int, default=600, help="prompt length in tokens")
    p.add_argument("--max-tokens", type=int, default=32, help="output tokens per request (ignore_eos)")
    p.add_argument("--rate", type=float, default=None,
                   help="open loop: start a request every 1/RATE seconds (at most --concurrency in flight)")
    p.add_argument("--metrics-interval", type=float, default=0.25, help="seconds between /metrics samples")
    p.add_argument("--json", type=Path, default=None, help="write the summary (and per-request records) here")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    args = p.parse_args(argv)
    try:
        summary = asyncio.run(run_load(
            args.base_url.rstrip("/"), args.concurrency, args.requests, args.duration, args.prompt_tokens,
            args.max_tokens, args.api_key, args.model, args.metrics_interval, progress=not args.no_progress,
            rate=args.rate))
    except httpx.HTTPStatusError as error:  # setup (/tokenize, /v1/models) refused: say why, briefly
        print(f"load: {error.request.url} answered {error.response.status_code}: {error.response.text[:300]}",
              file=sys.stderr)
        return 2
    except httpx.TransportError as error:
        print(f"load: cannot reach {args.base_url}: {type(error).__name__}: {error}", file=sys.stderr)
        return 2
    print(format_table(summary))
    if summary["errors"]:
        print("errors:", *summary["errors"], sep="\n  ")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=1))
        print(f"wrote {args.json}")
    return 0 if summary["requests"]["completed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
