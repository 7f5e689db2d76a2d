"""Prefix caching end to end over HTTP: the time to first token of requests that repeat a prefix.

Workloads, each against `rheads serve` at --budgets (0.5: the profile; 1.0: `--profile none`) and, with
--peers vllm, `vllm serve`, with prefix caching on and off (`--no-enable-prefix-caching`), in one run:

- document: a --doc-tokens document (the shipped CC0 haystack) followed by 8 questions, one request each,
  one after the other (completions, token-id prompts);
- chat: an 8-turn conversation (chat completions) whose first message holds the document's first half,
  each turn resending every message before it plus the model's own answers;
- shared (--shared N): one question on a new document, then N questions on it at once: their TTFT p50/p99
  against the first's;
- documents (--documents D): D distinct documents, one request each, then a new question on each, the most
  recent first: how many are still cached (a re-ask whose cached tokens cover half its document: `HELD`),
  the distinct documents the cache holds at once.

On a GPU with --shape and --tokenizer, the model is random bf16 weights at that shape (benchmarks/gpu_serving.py's
model directory and synthetic profile), so that vLLM and rheads serve the same weights in the same KV bytes.

Every request streams, with usage, so its TTFT and `usage.prompt_tokens_details.cached_tokens` are read
from the response; the table gives the first request's TTFT against the later ones' median (after a short
warm-up request, so that the first one pays no start-up cost).

    python benchmarks/prefix_cache.py --doc-tokens 4000 --max-tokens 16
    python benchmarks/prefix_cache.py --device cuda --shape llama-3.1-8b --tokenizer .bench/tokenizer \
        --doc-tokens 32000 --kv-cache-memory 30GiB --shared 16 --documents 24 --peers vllm --vllm-pythonpath /tmp/vsite

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

from concurrent.futures import ThreadPoolExecutor

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load import make_prompt  # noqa: E402
from servers import REPO, ServerProcess, rheads_command, vllm_command, vllm_env  # noqa: E402

# A re-ask found its document still cached when its cached tokens cover half of it: with streaming heads, one
# that finds no snapshot at the document's end recomputes them over the last layers x window tokens of it,
# which are computed, not cached (rheads/engine/prefix_cache.py).
HELD = 0.5
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
    details = usage.get("prompt_tokens_details") or {}  # vLLM gives it with --enable-prompt-tokens-details
    return {"ttft_s": ttft if ttft is not None else time.perf_counter() - start, "text": text,
            "prompt_tokens": usage["prompt_tokens"], "cached_tokens": details.get("cached_tokens") or 0}


def question_ids(http: httpx.Client, question: str) -> list[int]:
    return http.post("/tokenize", json={"prompt": f"\n\nQuestion: {question}\nAnswer:",
                                        "add_special_tokens": False}).json()["tokens"]


def document(http: httpx.Client, model: str, doc_ids: list[int], max_tokens: int) -> list[dict]:
    return [stream(http, "/v1/completions", {"model": model, "prompt": doc_ids + question_ids(http, question),
                                             "max_tokens": max_tokens}) for question in QUESTIONS]


def shared(http: httpx.Client, model: str, doc_ids: list[int], max_tokens: int, n: int) -> dict:
    """One question on the document, then `n` at once (threads, each its own connection)."""
    asks = [question_ids(http, f"{QUESTIONS[i % len(QUESTIONS)]} ({i})") for i in range(n + 1)]
    body = lambda ids: {"model": model, "prompt": doc_ids + ids, "max_tokens": max_tokens}  # noqa: E731
    first = stream(http, "/v1/completions", body(asks[0]))

    def one(ids):
        with httpx.Client(base_url=str(http.base_url), timeout=http.timeout) as own:
            return stream(own, "/v1/completions", body(ids))

    with ThreadPoolExecutor(n) as pool:
        later = list(pool.map(one, asks[1:]))
    ttfts = sorted(r["ttft_s"] for r in later)
    return {"first_ttft_s": first["ttft_s"], "concurrent": n, "later_ttft_p50_s": statistics.median(ttfts),
            "later_ttft_p99_s": ttfts[min(len(ttfts) - 1, round(0.99 * (len(ttfts) - 1)))],
            "later_cached_fraction": sum(r["cached_tokens"] for r in later) / sum(r["prompt_tokens"] for r in later)}


def documents(http: httpx.Client, model: str, haystack_ids: list[int], doc_tokens: int, count: int) -> dict:
    """`count` distinct documents, one request each; then a new question on each, the most recent first:
    the documents still cached are counted until the first that is not (an older one is evicted first)."""
    docs = [make_prompt(haystack_ids, 1 + i, doc_tokens) for i in range(count)]
    ask, again = question_ids(http, QUESTIONS[0]), question_ids(http, QUESTIONS[1])
    for doc in docs:
        stream(http, "/v1/completions", {"model": model, "prompt": doc + ask, "max_tokens": 1})
    cached = []
    for doc in reversed(docs):
        cached.append(stream(http, "/v1/completions", {"model": model, "prompt": doc + again, "max_tokens": 1}))
        if cached[-1]["cached_tokens"] < HELD * doc_tokens:
            break
    held = sum(r["cached_tokens"] >= HELD * doc_tokens for r in cached)
    return {"documents": count, "doc_tokens": doc_tokens, "held": held,
            "cached_tokens": [r["cached_tokens"] for r in cached], "ttft_s": [r["ttft_s"] for r in cached]}


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


def servers(args: argparse.Namespace, model: str, profile: str) -> list[tuple[str, object, dict | None]]:
    """(name, command(port), extra environment) of every configuration: rheads at each budget, then the
    peers, each with prefix caching on and off."""
    out = []
    modes = [mode == "on" for mode in args.caching.split(",")]
    for budget in map(float, args.budgets.split(",") if args.budgets else []):
        for caching in modes:
            flags = [model, "--kv-cache-memory", args.kv_cache_memory, "--device", args.device,
                     "--budget", str(budget), "--profile", profile if budget < 1 else "none",
                     *(["--window", str(args.window)] if args.window else []),
                     *(["--sink", str(args.sink)] if args.sink is not None else []),
                     "--enable-prefix-caching" if caching else "--no-enable-prefix-caching",
                     *(["--max-model-len", str(args.max_model_len)] if args.max_model_len else [])]
            out.append((f"budget {budget:g}, caching {'on' if caching else 'off'}",
                        lambda port, f=flags: rheads_command(f, port), None))
    if "vllm" in args.peers.split(","):
        from rheads.cli import parse_memory

        for caching in modes:
            flags = ["--dtype", "bfloat16", "--enable-prompt-tokens-details",
                     "--kv-cache-memory-bytes", str(int(parse_memory(args.kv_cache_memory))),
                     "--enable-prefix-caching" if caching else "--no-enable-prefix-caching",
                     *(["--max-model-len", str(args.max_model_len)] if args.max_model_len else [])]
            out.append((f"vllm, caching {'on' if caching else 'off'}",
                        lambda port, f=flags: vllm_command(model, f, port), vllm_env(args.vllm_pythonpath)))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--profile", default=str(REPO / "profiles" / "SmolLM2-135M-Instruct.json"))
    p.add_argument("--shape", help="random bf16 weights at this shape (gpu_serving's SHAPES) instead of --model")
    p.add_argument("--tokenizer", type=Path, help="the tokenizer of the --shape model (a directory)")
    p.add_argument("--workdir", type=Path, default=REPO / ".bench", help="where the --shape model is saved")
    p.add_argument("--budgets", default="0.5,1.0", help="rheads configurations ('': the peers alone)")
    p.add_argument("--peers", default="", help="'vllm': also `vllm serve` with the same model and KV bytes")
    p.add_argument("--vllm-pythonpath", help="PYTHONPATH for `vllm serve` alone (benchmarks/vllm_parts.py)")
    p.add_argument("--caching", default="on,off", choices=["on,off", "on", "off"],
                   help="servers with prefix caching on, off or both (a first request is cold either way)")
    p.add_argument("--window", type=int, help="rheads' streaming window (default: the profile's); a smaller one "
                   "shortens the recompute of the streaming heads (layers x window tokens) on a short document")
    p.add_argument("--sink", type=int, help="rheads' attention sinks (default: the profile's)")
    p.add_argument("--doc-tokens", type=int, default=4000)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--shared", type=int, default=0, help="questions at once on one document (0: skip)")
    p.add_argument("--documents", type=int, default=0, help="distinct documents to cache (0: skip)")
    p.add_argument("--kv-cache-memory", default="256MiB")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of each server")
    p.add_argument("--startup-timeout", type=float, default=300.0)
    p.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "prefix_cache_cpu_smollm2.json")
    args = p.parse_args(argv)
    model, profile = args.model, args.profile
    if args.shape:
        model, profile = random_model(args)
    haystack = "\n\n".join(path.read_text() for path in sorted((REPO / "rheads" / "data" / "haystack").glob("*.txt")))
    started = datetime.datetime.now(datetime.timezone.utc)
    runs = {}
    with tempfile.TemporaryDirectory(prefix="rheads-prefix-cache-") as logs:
        for name, command, env in servers(args, model, profile):
            print(f"[{name}] {' '.join(command(0))}", file=sys.stderr, flush=True)
            with ServerProcess(name, command, args.startup_timeout, Path(logs), threads=args.threads,
                               env=env) as server, httpx.Client(base_url=server.base, timeout=600) as http:
                served = http.get("/v1/models").json()["data"][0]["id"]
                stream(http, "/v1/completions", {"model": served, "prompt": "Warm up.", "max_tokens": 2})
                haystack_ids = http.post("/tokenize", json={"prompt": haystack, "add_special_tokens": False}).json()
                haystack_ids = haystack_ids["tokens"]
                doc_ids = make_prompt(haystack_ids, 0, args.doc_tokens)
                half = http.post("/detokenize", json={"tokens": doc_ids[:len(doc_ids) // 2]}).json()["prompt"]
                run = {"document": summary(document(http, served, doc_ids, args.max_tokens)),
                       "banner": server.banner()}
                if not args.shape:  # a random model's chat answers are noise of any length
                    run["chat"] = summary(chat(http, served, half, args.max_tokens))
                if args.shared:
                    run["shared"] = shared(http, served, make_prompt(haystack_ids, 7, args.doc_tokens),
                                           args.max_tokens, args.shared)
                if args.documents:
                    run["documents"] = documents(http, served, haystack_ids, args.doc_tokens, args.documents)
                runs[name] = run
    table = format_runs(runs)
    print(f"\n{model} on {args.device} ({os.cpu_count()} CPUs, {args.threads} threads): a {args.doc_tokens}-token "
          f"document + 8 questions, an 8-turn chat; {args.max_tokens} output tokens")
    print(table)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "started_utc": started.isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "load_average": os.getloadavg()},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "runs": runs, "table": table}, indent=1))
    print(f"wrote {args.json}")
    return 0


def random_model(args: argparse.Namespace) -> tuple[str, str]:
    """gpu_serving's random-weight model directory at --shape and its synthetic profile."""
    from transformers import AutoConfig

    from gpu_serving import build_model_dir  # noqa: PLC0415 - torch and transformers only for --shape
    from rheads.profiling.profile import ModelIdentity, synthetic_profile

    if args.tokenizer is None:
        raise SystemExit("prefix_cache: --shape needs --tokenizer")
    model_dir = build_model_dir(args.workdir, args.shape, args.tokenizer, args.device)
    profile = args.workdir / f"random-{args.shape}.profile.json"
    synthetic_profile(ModelIdentity.from_config(AutoConfig.from_pretrained(model_dir), str(model_dir))).save(profile)
    return str(model_dir), str(profile)


def format_runs(runs: dict) -> str:
    header = f"{'server':<28} {'workload':<9} {'first TTFT':>11} {'later p50':>10} {'later/first':>12} {'cached':>7}"
    lines = [header, "-" * len(header)]
    for name, run in runs.items():
        for workload in ("document", "chat", "shared"):
            if s := run.get(workload):
                lines.append(f"{name:<28} {workload:<9} {s['first_ttft_s']:>10.3f}s {s['later_ttft_p50_s']:>9.3f}s "
                             f"{s['later_ttft_p50_s'] / s['first_ttft_s']:>12.3f} {s['later_cached_fraction']:>7.1%}")
        if d := run.get("documents"):
            lines.append(f"{name:<28} {'documents':<9} {d['held']} of {d['documents']} {d['doc_tokens']}-token "
                         "documents still cached")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
