"""Prefix caching end to end over HTTP: the time to first token of requests that repeat a prefix.

Two workloads, each against `rheads serve` at budgets 0.5 (the shipped profile) and 1.0 (`--profile none`),
with prefix caching on and off (`--no-enable-prefix-caching`), in one run:

- document: a ~4k-token document (the shipped CC0 haystack) followed by 8 questions, one request each,
  one after the other (completions, token-id prompts);
- chat: an 8-turn conversation (chat completions) whose first message holds the document's first half,
  each turn resending every message before it plus the model's own answers.

Every request streams, with usage, so its TTFT and `usage.prompt_tokens_details.cached_tokens` are read
from the response; the table gives the first request's TTFT against the later ones' median (after a short
warm-up request, so that the first one pays no start-up cost).

    python benchmarks/prefix_cache.py --doc-tokens 4000 --max-tokens 16

Everything talks only to 127.0.0.1, is bounded in requests, and stops by itself.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from servers import REPO, ServerProcess, rheads_command  # noqa: E402

QUESTIONS = ["What is the main subject of the text above?", "Who is the text written for?",
             "Summarise the second paragraph in one sentence.", "Which examples does the author give?",
             "What does the author argue against?", "Name one word the author uses often.",
             "What is the tone of the text?", "How does the text end?"]


def stream(http: httpx.Client, path: str, body: dict) -> dict:
    """One streamed request: its TTFT (the first chunk with text), its answer and its usage."""
    start, ttft, text, usage = time.perf_counter(), None, "", None
    body = {**body, "stream": True, "stream_options": {"include_usage": True}, "temperature": 0}
    with http.stream("POST", path, json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            for choice in event.get("choices", []):
                piece = choice.get("text") or (choice.get("delta") or {}).get("content") or ""
                if piece and ttft is None:
                    ttft = time.perf_counter() - start
                text += piece
            usage = event.get("usage") or usage
    return {"ttft_s": ttft if ttft is not None else time.perf_counter() - start, "text": text,
            "prompt_tokens": usage["prompt_tokens"], "cached_tokens": usage["prompt_tokens_details"]["cached_tokens"]}


def document(http: httpx.Client, model: str, doc_ids: list[int], max_tokens: int) -> list[dict]:
    records = []
    for question in QUESTIONS:
        ids = http.post("/tokenize", json={"prompt": f"\n\nQuestion: {question}\nAnswer:",
                                           "add_special_tokens": False}).json()["tokens"]
        records.append(stream(http, "/v1/completions", {"model": model, "prompt": doc_ids + ids,
                                                        "max_tokens": max_tokens}))
    return records


def chat(http: httpx.Client, model: str, text: str, max_tokens: int) -> list[dict]:
    messages, records = [], []
    for turn, question in enumerate(QUESTIONS):
        messages.append({"role": "user", "content": f"{text}\n\n{question}" if turn == 0 else question})
        record = stream(http, "/v1/chat/completions", {"model": model, "messages": messages,
                                                       "max_tokens": max_tokens})
        messages.append({"role": "assistant", "content": record["text"]})
        records.append(record)
    return records


def summary(records: list[dict]) -> dict:
    later = [r["ttft_s"] for r in records[1:]]
    return {"first_ttft_s": records[0]["ttft_s"], "later_ttft_p50_s": statistics.median(later),
            "later_over_first": statistics.median(later) / records[0]["ttft_s"],
            "later_cached_fraction": sum(r["cached_tokens"] for r in records[1:])
            / sum(r["prompt_tokens"] for r in records[1:]),
            "prompt_tokens": [r["prompt_tokens"] for r in records], "cached_tokens": [r["cached_tokens"] for r in records],
            "ttft_s": [r["ttft_s"] for r in records]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--profile", default=str(REPO / "profiles" / "SmolLM2-135M-Instruct.json"))
    p.add_argument("--budgets", default="0.5,1.0")
    p.add_argument("--doc-tokens", type=int, default=4000)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--kv-cache-memory", default="256MiB")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of each server")
    p.add_argument("--startup-timeout", type=float, default=300.0)
    p.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "prefix_cache_cpu_smollm2.json")
    args = p.parse_args(argv)
    haystack = "\n\n".join(path.read_text() for path in sorted((REPO / "rheads" / "data" / "haystack").glob("*.txt")))
    started = datetime.datetime.now(datetime.timezone.utc)
    runs = {}
    with tempfile.TemporaryDirectory(prefix="rheads-prefix-cache-") as logs:
        for budget in map(float, args.budgets.split(",")):
            for caching in (True, False):
                name = f"budget {budget:g}, caching {'on' if caching else 'off'}"
                flags = [args.model, "--kv-cache-memory", args.kv_cache_memory, "--device", args.device,
                         "--budget", str(budget), "--profile", args.profile if budget < 1 else "none",
                         "--enable-prefix-caching" if caching else "--no-enable-prefix-caching"]
                print(f"[{name}] rheads serve {' '.join(flags)}", file=sys.stderr, flush=True)
                with ServerProcess(name, lambda port, f=flags: rheads_command(f, port), args.startup_timeout,
                                   Path(logs), threads=args.threads) as server, \
                        httpx.Client(base_url=server.base, timeout=600) as http:
                    model = http.get("/v1/models").json()["data"][0]["id"]
                    stream(http, "/v1/completions", {"model": model, "prompt": "Warm up.", "max_tokens": 2})
                    ids = http.post("/tokenize", json={"prompt": haystack, "add_special_tokens": False}).json()
                    doc_ids = ids["tokens"][:args.doc_tokens]
                    half = http.post("/detokenize", json={"tokens": doc_ids[:len(doc_ids) // 2]}).json()["prompt"]
                    runs[name] = {"document": summary(document(http, model, doc_ids, args.max_tokens)),
                                  "chat": summary(chat(http, model, half, args.max_tokens)),
                                  "banner": server.banner()}
    header = f"{'server':<28} {'workload':<9} {'first TTFT':>11} {'later p50':>10} {'later/first':>12} {'cached':>7}"
    lines = [header, "-" * len(header)]
    for name, run in runs.items():
        for workload in ("document", "chat"):
            s = run[workload]
            lines.append(f"{name:<28} {workload:<9} {s['first_ttft_s']:>10.3f}s {s['later_ttft_p50_s']:>9.3f}s "
                         f"{s['later_over_first']:>12.3f} {s['later_cached_fraction']:>7.1%}")
    table = "\n".join(lines)
    print(f"\nrheads serve {args.model} on {args.device} ({os.cpu_count()} CPUs, {args.threads} threads): "
          f"a {args.doc_tokens}-token document + 8 questions, and an 8-turn chat; {args.max_tokens} output tokens")
    print(table)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "started_utc": started.isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "load_average": os.getloadavg()},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "runs": runs, "table": table}, indent=1))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
