"""End to end over HTTP on a GPU: rheads at several budgets against vLLM and `transformers serve`, in one run.

The model: random bf16 weights at the Llama-3.1-8B shape (speed and memory depend on shapes, not on
trained values), saved once into --workdir with the tokenizer from --tokenizer and no EOS token (every
request runs to its fixed output length), plus a synthetic profile. For each configuration in turn --
rheads at each --budgets value, then each of --peers with the same KV bytes: `vllm serve` (its defaults:
CUDA graphs, chunked prefill, prefix caching; `--kv-cache-memory-bytes`) and `transformers serve
--continuous-batching` -- the script starts the server on 127.0.0.1, warms it up and, for each --contexts
length, runs:

  saturation  as many concurrent requests as rheads' cache holds at that budget (a peer gets budget
              1.0's number), each with a context-length prompt and --max-tokens outputs: output tokens/s,
              the most requests streaming at once, tokens/s while that many stream;
  rate        --rate-requests requests at a fixed rate: TTFT and inter-token latency p50/p99.

With --arrivals RATE, once per configuration:

  arrivals    --arrival-streams requests of short prompts decode --arrival-stream-tokens tokens each,
              first alone, then while --arrival-prompt-tokens prompts arrive at RATE per second (one
              output token each): the streams' inter-token latency in both, and the arrivals' TTFT. A
              step that prefills an arrival holds up every stream's next token.

GPU memory is polled throughout (NVML); rheads' step metrics give the decode step time against the
hardware limit ((weights + KV bytes read) / the HBM bandwidth measured here by a device copy).
Prints a table per context and writes --json (with --merge, updates the contexts it ran in an existing
one, so 8k and 32k can run as two calls; with --section NAME, writes under that key of the file, so a
run with other settings, such as long outputs, sits beside the main one).

    python benchmarks/gpu_serving.py --tokenizer .bench/tokenizer --contexts 8192 --json benchmarks/results/gpu_serving.json
    python benchmarks/gpu_serving.py --tokenizer .bench/tokenizer --contexts 32768 --merge --json ...
    python benchmarks/gpu_serving.py --shape tiny --device cpu --contexts 256 ...      # smoke run on a CPU

Everything talks only to 127.0.0.1, is bounded in requests and time, and stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import random
import shlex
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import SHAPES  # noqa: E402
from load import make_prompt, run_load  # noqa: E402
from servers import REPO, ServerProcess, rheads_command, vllm_command, vllm_env  # noqa: E402

from rheads.engine.cache import HeadSplitCache  # noqa: E402
from rheads.engine.heads import random_split  # noqa: E402
from rheads.engine.llm import EngineConfig, cache_config_of  # noqa: E402
from rheads.niah import haystack_files  # noqa: E402
from rheads.profiling.profile import ModelIdentity, head_dim_of, synthetic_profile  # noqa: E402

PEERS = {"vllm": "vllm", "transformers": "transformers serve"}  # --peers value: the configuration's name
PEER = PEERS["transformers"]
GIB = 1 << 30


# --- the model under test ------------------------------------------------------------------------

def build_model_dir(workdir: Path, shape: str, tokenizer_dir: Path, device: str) -> Path:
    """Random bf16 weights at `shape`, the tokenizer, no EOS; reused when already there."""
    out = workdir / f"random-{shape}"
    if (out / "model.safetensors.index.json").exists() or (out / "model.safetensors").exists():
        return out
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    shape_fields = SHAPES[shape] | {"vocab_size": max(SHAPES[shape]["vocab_size"], len(tokenizer))}
    config = LlamaConfig(**shape_fields, bos_token_id=None, eos_token_id=None)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.generation_config = GenerationConfig(bos_token_id=None, eos_token_id=None, pad_token_id=0)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    del model
    tmp.rename(out)
    return out


def weights_read_per_step(config: LlamaConfig) -> int:
    """Bytes of weights a decode step reads: every parameter but the embedding table (rows only)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    total = sum(p.numel() for p in model.parameters())
    return 2 * (total - model.get_input_embeddings().weight.numel())


def capacity(config: LlamaConfig, budget: float, tokens: int, args: argparse.Namespace) -> int:
    """How many sequences of `tokens` tokens rheads' cache holds at `budget` (its own allocator's sizes)."""
    split = random_split(config.num_hidden_layers, config.num_key_value_heads, budget, seed=0)
    engine = EngineConfig(sink=args.sink, window=args.window, max_num_seqs=args.max_num_seqs, dtype=torch.bfloat16,
                          device="meta", kv_cache_dtype=args.kv_cache_dtype)  # as `rheads serve` sets it up
    cache = HeadSplitCache(split, head_dim_of(config), cache_config_of(engine, int(args.kv_cache_gib * GIB)))
    if not cache.has_full_heads:
        return cache.num_seq_slots
    return min(cache.num_seq_slots, cache.num_pages // cache.pages_for(tokens))


def hbm_bandwidth(device: str) -> float | None:
    """Bytes/s of a large device-to-device copy (read + write), the bandwidth a decode step can reach."""
    if not device.startswith("cuda"):
        return None
    src = torch.empty(2 * GIB, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    start, reps = time.perf_counter(), 20
    for _ in range(reps):
        dst.copy_(src)
    torch.cuda.synchronize()
    rate = 2 * src.numel() * reps / (time.perf_counter() - start)
    del src, dst
    torch.cuda.empty_cache()
    return rate


class GpuMemory:
    """Polls the device's used memory (NVML) in a thread; `peak()` is the most seen since `reset()`."""

    def __init__(self, interval: float = 0.2):
        try:
            import pynvml
            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            self._read = lambda: pynvml.nvmlDeviceGetMemoryInfo(self._handle).used
        except Exception:  # noqa: BLE001 - no NVIDIA driver (CPU smoke runs): no figure
            self._read = None
        self.baseline = self._read() if self._read else 0
        self._peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._poll, args=(interval,), daemon=True)
        if self._read:
            self._thread.start()

    def _poll(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self._peak = max(self._peak, self._read())

    def reset(self) -> None:
        self._peak = self._read() if self._read else 0

    def peak(self) -> int | None:
        return self._peak - self.baseline if self._read else None

    def close(self) -> None:
        self._stop.set()


# --- prompts and server metrics ------------------------------------------------------------------

def make_prompts(tokenizer_dir: Path, length: int, count: int, uneven: bool = False) -> list[str]:
    """`count` different texts of `length` tokens each (uneven: of lengths drawn from [length / 2,
    length], seeded), cut from the shipped haystack at spread offsets."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = tokenizer("\n\n".join(p.read_text() for p in haystack_files()), add_special_tokens=False)["input_ids"]
    lengths = random.Random(length).choices(range(length // 2, length + 1), k=count) if uneven else [length] * count
    return [tokenizer.decode(make_prompt(ids, index, n)) for index, n in enumerate(lengths)]


def step_totals(base_url: str) -> dict[str, dict[str, float]]:
    """rheads' engine_step_* counters by kind ("decode", "mixed"); {} for servers without them."""
    try:
        return _step_totals_from_text(httpx.get(f"{base_url}/metrics", timeout=10).text)
    except (httpx.HTTPError, ValueError):
        return {}


def _step_totals_from_text(text: str) -> dict[str, dict[str, float]]:
    families = list(text_string_to_metric_families(text))
    names = {"rheads:engine_step_seconds_count": "steps", "rheads:engine_step_seconds_sum": "seconds",
             "rheads:engine_step_sequences_total": "sequences", "rheads:engine_step_kv_bytes_total": "kv_bytes"}
    out: dict[str, dict[str, float]] = {}
    for family in families:
        for s in family.samples:
            if s.name in names:
                out.setdefault(s.labels["kind"], {})[names[s.name]] = s.value
    return out


def decode_steps(before: dict, after: dict, weights_bytes: int, bandwidth: float | None) -> dict | None:
    """Decode steps between two scrapes: mean time and batch, and time over the hardware limit."""
    a, b = before.get("decode", {}), after.get("decode", {})
    steps = b.get("steps", 0) - a.get("steps", 0)
    if steps <= 0:
        return None
    seconds = b["seconds"] - a.get("seconds", 0)
    kv = b["kv_bytes"] - a.get("kv_bytes", 0)
    limit = (steps * weights_bytes + kv) / bandwidth if bandwidth else None
    return {"steps": int(steps), "mean_step_s": seconds / steps,
            "mean_batch": (b["sequences"] - a.get("sequences", 0)) / steps, "mean_kv_bytes_read": kv / steps,
            "limit_step_s": limit / steps if limit else None, "step_over_limit": seconds / limit if limit else None}


def brief(summary: dict) -> dict:
    """The figures of one load phase that go into the report (records left out)."""
    keep = ("config", "requests", "elapsed_s", "output_token_throughput", "output_tokens", "ttft_s", "itl_s",
            "e2e_s", "decoding", "errors")
    out = {k: summary[k] for k in keep}
    if summary["kv"]["samples"]:
        out["kv"] = {k: summary["kv"][k] for k in ("peak_bytes_used", "peak_bytes_full_equivalent", "peak_ratio",
                                                    "peak_running", "peak_waiting")}
    return out


# --- one configuration ---------------------------------------------------------------------------

def kv_bytes_per_token(config: LlamaConfig) -> int:
    """K and V of every layer's KV heads in bf16: a full cache's bytes per token."""
    return config.num_hidden_layers * config.num_key_value_heads * head_dim_of(config) * 2 * 2


def peer_command(peer: str, name: str, model_dir: Path, args: argparse.Namespace, max_model_len: int,
                 config: LlamaConfig):
    """`command(port)` for a peer server with rheads' KV bytes, batch limits and context length."""
    if peer == "vllm":
        flags = ["--dtype", "bfloat16", "--served-model-name", name, "--kv-cache-memory-bytes",
                 str(int(args.kv_cache_gib * GIB)), "--max-num-seqs", str(args.max_num_seqs), "--max-model-len",
                 str(max_model_len), "--max-num-batched-tokens", str(args.max_num_batched_tokens),
                 "--kv-cache-dtype", args.kv_cache_dtype]
        return lambda port: vllm_command(str(model_dir), flags, port)
    blocks = int(args.kv_cache_gib * GIB) // (256 * kv_bytes_per_token(config))  # its blocks hold 256 tokens
    return lambda port: [sys.executable, "-c", "from transformers.cli.transformers import main; main()",
                         "serve", str(model_dir), "--continuous-batching", "--host", "127.0.0.1",
                         "--port", str(port), "--device", args.device, "--dtype", "bfloat16",
                         "--cb-block-size", "256", "--cb-num-blocks", str(blocks),
                         "--cb-max-batch-tokens", str(args.max_num_batched_tokens), "--log-level", "warning"]


def rheads_server_command(name: str, budget: float, model_dir: Path, profile: Path, args: argparse.Namespace,
                          max_model_len: int):
    """`command(port)` for rheads at `budget`."""
    flags = [str(model_dir), "--profile", str(profile) if budget < 1 else "none", "--budget", f"{budget:g}",
             "--kv-cache-memory", f"{args.kv_cache_gib}GiB", "--max-num-seqs", str(args.max_num_seqs),
             "--max-num-batched-tokens", str(args.max_num_batched_tokens), "--max-model-len", str(max_model_len),
             "--sink", str(args.sink), "--window", str(args.window), "--device", args.device,
             "--dtype", "bfloat16" if args.device.startswith("cuda") else "float32", "--served-model-name", name,
             "--kv-cache-dtype", args.kv_cache_dtype]
    return lambda port: rheads_command(flags, port)


def warm_up(base: str, model: str, extra_body: dict, sizes: list[int]) -> None:
    """Short requests at each batch size, so CUDA graphs and kernels compile before anything is timed."""
    for size in sizes:
        asyncio.run(run_load(base, size, size, 120.0, max_tokens=4, model=model, progress=False,
                             prompts=lambda i: f"warm up request {i}", extra_body=extra_body))


async def streams_with_arrivals(base: str, model: str, extra_body: dict | None, args: argparse.Namespace,
                                setup: dict) -> dict:
    """The arrivals phase (module docstring): the streams alone, then beside the arrivals."""
    streams, arriving = setup["stream_prompts"], setup["arrival_prompts"]
    timeout = args.arrival_duration + 60

    def stream_load(label: str):
        return run_load(base, args.arrival_streams, args.arrival_streams, args.arrival_duration,
                        max_tokens=args.arrival_stream_tokens, model=model, label=label, progress=False,
                        prompts=lambda i: streams[i % len(streams)], extra_body=extra_body, request_timeout=timeout)

    alone = await stream_load("streams alone")
    # arrivals for twice as long as the streams took alone (they take longer beside them), within the limit
    arrival_s = min(2 * alone["elapsed_s"], args.arrival_duration)
    beside, arrivals = await asyncio.gather(stream_load("streams beside arrivals"), run_load(
        base, 256, len(arriving), arrival_s, max_tokens=1, model=model, label="arrivals",
        progress=False, prompts=lambda i: arriving[i], rate=args.arrivals, extra_body=extra_body,
        request_timeout=timeout))
    return {"streams_alone": brief(alone), "streams_beside_arrivals": brief(beside), "arrivals": brief(arrivals)}


def run_config(name: str, budget: float | None, setup: dict, args: argparse.Namespace, memory: GpuMemory,
               logs: Path, peer: str | None = None) -> dict:
    """One server: rheads at `budget`, or the --peers entry `peer` (budget None)."""
    config, contexts = setup["config"], setup["contexts"]
    if peer is None:
        command = rheads_server_command(name, budget, setup["model_dir"], setup["profile"], args,
                                        setup["max_model_len"])
    else:
        command = peer_command(peer, name, setup["model_dir"], args, setup["max_model_len"], config)
    # transformers serve names its model by its path and refuses ignore_eos (its model dir has no EOS)
    model = str(setup["model_dir"]) if peer == "transformers" else name
    extra_body = {} if peer == "transformers" else None
    env = vllm_env(args.vllm_pythonpath) if peer == "vllm" else None
    memory.reset()  # each context's peak counts from the server's start: start-up (graph capture) included
    print(f"[{name}] starting", file=sys.stderr, flush=True)
    server = ServerProcess(name, command, args.startup_timeout, logs, ready_path="/health", env=env)
    out: dict = {"budget": budget, "peer": peer, "contexts": {}}
    try:
        out["startup_s"], out["banner"] = server.startup_s, server.banner()
        sizes = [s for s in (1, 2, 4, 8, 16, 24, 32, 48, 64) if s <= args.max_num_seqs]
        warm_up(server.base, model, extra_body or {}, sizes if peer != "transformers" else [1, 4])
        for context in contexts:
            n = capacity(config, 1.0 if peer else budget, context + args.max_tokens, args)
            prompts = setup["prompts"][context]
            before = step_totals(server.base)
            saturation = asyncio.run(run_load(
                server.base, n, n, args.saturation_duration, max_tokens=args.max_tokens, model=model,
                label=f"{name} {context} saturation", progress=not args.no_progress,
                prompts=lambda i: prompts[i % len(prompts)],
                extra_body=extra_body, request_timeout=args.saturation_duration + 30))
            steps = decode_steps(before, step_totals(server.base), setup["weights_bytes"], setup["bandwidth"])
            rate = asyncio.run(run_load(
                server.base, 256, args.rate_requests, args.rate_duration, max_tokens=args.rate_max_tokens,
                model=model, label=f"{name} {context} rate", progress=not args.no_progress,
                prompts=lambda i: prompts[-1 - i % len(prompts)],
                rate=args.rates[context], extra_body=extra_body, request_timeout=args.rate_duration + 30))
            out["contexts"][str(context)] = {"offered_concurrency": n, "saturation": brief(saturation),
                                             "decode_steps": steps, "rate": brief(rate),
                                             "peak_gpu_memory_bytes": memory.peak()}
            print(f"[{name}] {context}: {saturation['output_token_throughput']:.1f} tok/s with {n} offered, "
                  f"peak streaming {saturation['decoding']['peak']}", file=sys.stderr, flush=True)
        if args.arrivals:
            out["arrivals"] = asyncio.run(streams_with_arrivals(server.base, model, extra_body, args, setup))
    finally:
        out["exit_code"] = server.stop()
        out["log_tail"] = server.output()[-1500:]
    return out


# --- report --------------------------------------------------------------------------------------

def _get(d: dict | None, *keys):
    for k in keys:
        if d is None:
            return None
        d = d.get(k)
    return d


ROWS = [  # label, path into a context's result, format
    ("requests offered at once", ("offered_concurrency",), "{:.0f}"),
    ("completed / sent", None, None),
    ("most streaming at once", ("saturation", "decoding", "peak"), "{:.0f}"),
    ("output tok/s (whole run)", ("saturation", "output_token_throughput"), "{:.1f}"),
    ("output tok/s at peak streaming", ("saturation", "decoding", "tokens_per_s_at_peak"), "{:.1f}"),
    ("mean decode step (ms)", ("decode_steps", "mean_step_s"), "{:.2f}", 1000),
    ("mean decode batch", ("decode_steps", "mean_batch"), "{:.1f}"),
    ("decode step / HW limit", ("decode_steps", "step_over_limit"), "{:.2f}"),
    ("rate: TTFT p50 (ms)", ("rate", "ttft_s", "p50"), "{:.0f}", 1000),
    ("rate: TTFT p99 (ms)", ("rate", "ttft_s", "p99"), "{:.0f}", 1000),
    ("rate: ITL p50 (ms)", ("rate", "itl_s", "p50"), "{:.1f}", 1000),
    ("rate: ITL p99 (ms)", ("rate", "itl_s", "p99"), "{:.1f}", 1000),
    ("rate: completed / sent", None, None),
    ("peak GPU memory (GiB)", ("peak_gpu_memory_bytes",), "{:.1f}", 1 / GIB),
]


def _table(title: str, names: list[str], rows: list[tuple[str, list[str]]]) -> str:
    """A column per configuration, a line per (label, cells)."""
    width = 32
    lines = [f"{title:<{width}}" + "".join(f"{n:>20}" for n in names), "-" * (width + 20 * len(names))]
    lines += [f"{label:<{width}}" + "".join(f"{c:>20}" for c in cells) for label, cells in rows]
    return "\n".join(lines)


def _cell(summary: dict, path: tuple | None, fmt: str | None, scale: float) -> str:
    """One figure of a summary, formatted; a None path gives its phase's completed / sent."""
    if path is None:
        return f"{summary['requests']['completed']}/{summary['requests']['sent']}"
    v = _get(summary, *path)
    return "-" if v is None else fmt.format(v * scale)


def format_context(report: dict, context: str) -> str:
    names = [n for n, c in report["configs"].items() if context in c["contexts"]]
    rows = []
    for label, path, fmt, *scale in ROWS:
        results = [report["configs"][n]["contexts"][context] for n in names]
        if path is None:  # completed / sent of the phase the label names
            results = [r["rate" if label.startswith("rate") else "saturation"] for r in results]
        rows.append((label, [_cell(r, path, fmt, scale[0] if scale else 1) for r in results]))
    return _table("context " + context, names, rows)


ARRIVAL_ROWS = [  # label, phase, path into its summary, format, scale
    ("streams' ITL p50 alone (ms)", "streams_alone", ("itl_s", "p50"), "{:.1f}", 1000),
    ("streams' ITL p50 beside arrivals", "streams_beside_arrivals", ("itl_s", "p50"), "{:.1f}", 1000),
    ("streams' ITL p99 alone (ms)", "streams_alone", ("itl_s", "p99"), "{:.1f}", 1000),
    ("streams' ITL p99 beside arrivals", "streams_beside_arrivals", ("itl_s", "p99"), "{:.1f}", 1000),
    ("streams' output tok/s alone", "streams_alone", ("output_token_throughput",), "{:.1f}", 1),
    ("streams' tok/s beside arrivals", "streams_beside_arrivals", ("output_token_throughput",), "{:.1f}", 1),
    ("arrivals' TTFT p50 (ms)", "arrivals", ("ttft_s", "p50"), "{:.0f}", 1000),
    ("arrivals' TTFT p99 (ms)", "arrivals", ("ttft_s", "p99"), "{:.0f}", 1000),
    ("arrivals completed / sent", "arrivals", None, None, None),
]


def format_arrivals(report: dict) -> str | None:
    """The arrivals phase's table, or None where no configuration ran it."""
    names = [n for n, c in report["configs"].items() if c.get("arrivals")]
    if not names:
        return None
    rate = report["configs"][names[0]]["arrivals"]["arrivals"]["config"]["rate"]
    rows = [(label, [_cell(report["configs"][n]["arrivals"][phase], path, fmt, scale) for n in names])
            for label, phase, path, fmt, scale in ARRIVAL_ROWS]
    return _table(f"arrivals at {rate}/s", names, rows)


def ratios(report: dict) -> dict:
    """The headline ratios at 32k (budget 0.5 over budget 1.0 and over the peer) and the step figure."""
    def at(name: str, *path):
        return _get(report["configs"].get(name), "contexts", "32768", *path)

    def ratio(a, b):
        return a / b if a is not None and b else None

    half, full = "rheads-0.5", "rheads-1.0"
    step = [at(n, "decode_steps", "step_over_limit") for n in (half, full)]
    return {
        "concurrency_ratio_32k": ratio(at(half, "saturation", "decoding", "peak"),
                                       at(full, "saturation", "decoding", "peak")),
        "throughput_ratio_32k": ratio(at(half, "saturation", "output_token_throughput"),
                                      at(full, "saturation", "output_token_throughput")),
        "decode_throughput_ratio_32k": ratio(at(half, "saturation", "decoding", "tokens_per_s_at_peak"),
                                             at(full, "saturation", "decoding", "tokens_per_s_at_peak")),
        # the server's own view of its decode steps: tokens per second of step time (mean batch / mean step)
        "decode_step_throughput_ratio_32k": ratio(
            ratio(at(half, "decode_steps", "mean_batch"), at(half, "decode_steps", "mean_step_s")),
            ratio(at(full, "decode_steps", "mean_batch"), at(full, "decode_steps", "mean_step_s"))),
        "throughput_vs_peer_32k": ratio(at(half, "saturation", "output_token_throughput"),
                                        at(PEER, "saturation", "output_token_throughput")),
        "full_vs_peer_32k": ratio(at(full, "saturation", "output_token_throughput"),
                                  at(PEER, "saturation", "output_token_throughput")),
        # issue 23's targets: budget 1.0 at least 0.9x vLLM's tok/s, budget 0.5 1.7x its tok/s and 1.9x its streams
        "full_vs_vllm_32k": ratio(at(full, "saturation", "output_token_throughput"),
                                  at(PEERS["vllm"], "saturation", "output_token_throughput")),
        "throughput_vs_vllm_32k": ratio(at(half, "saturation", "output_token_throughput"),
                                        at(PEERS["vllm"], "saturation", "output_token_throughput")),
        "concurrency_vs_vllm_32k": ratio(at(half, "saturation", "decoding", "peak"),
                                         at(PEERS["vllm"], "saturation", "decoding", "peak")),
        "decode_step_over_limit": step[0],
        "decode_step_over_limit_full": step[1],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--tokenizer", type=Path, required=True, help="directory with the tokenizer files to serve with")
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.1-8b")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workdir", type=Path, default=REPO / ".bench", help="model directory and profile go here")
    p.add_argument("--budgets", default="1.0,0.5,0.25", help="rheads configurations ('': the peer alone)")
    p.add_argument("--peers", default="transformers",
                   help=f"peer servers after rheads, comma-separated, of: {', '.join(PEERS)} ('': none)")
    p.add_argument("--no-peer", action="store_true", help="the same as --peers ''")
    p.add_argument("--vllm-pythonpath", help="PYTHONPATH for `vllm serve` alone (where benchmarks/vllm_parts.py's "
                   "wheels are installed), so that its pins do not meet rheads' packages")
    p.add_argument("--contexts", default="8192,32768", help="prompt lengths in tokens ('': the arrivals phase alone)")
    p.add_argument("--uneven", action="store_true",
                   help="prompts of lengths drawn from [context / 2, context] (concurrency as for context)")
    p.add_argument("--kv-cache-gib", type=float, default=30.0, help="KV memory of every server")
    p.add_argument("--kv-cache-dtype", choices=["auto", "fp8"], default="auto",
                   help="what rheads' and vLLM's KV caches store (fp8: e4m3; transformers serve has no such option)")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--sink", type=int, default=64)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=256, help="output tokens per saturation request")
    p.add_argument("--saturation-duration", type=float, default=150.0, help="seconds before a saturation phase stops")
    p.add_argument("--rate", default="8192:1.0,32768:0.25",
                   help="requests/s per context for the fixed-rate phase (CONTEXT:RATE,...; others get the last)")
    p.add_argument("--rate-requests", type=int, default=16)
    p.add_argument("--rate-max-tokens", type=int, default=64)
    p.add_argument("--rate-duration", type=float, default=90.0, help="seconds before a rate phase stops")
    p.add_argument("--arrivals", type=float, default=None, help="requests/s of the arrivals phase (none: skip it)")
    p.add_argument("--arrival-streams", type=int, default=16, help="requests that decode through the arrivals")
    p.add_argument("--arrival-stream-prompt-tokens", type=int, default=1024)
    p.add_argument("--arrival-stream-tokens", type=int, default=1024, help="output tokens per stream")
    p.add_argument("--arrival-prompt-tokens", type=int, default=512)
    p.add_argument("--arrival-duration", type=float, default=60.0, help="seconds before each arrivals run stops")
    p.add_argument("--startup-timeout", type=float, default=300.0)
    p.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "gpu_serving.json")
    p.add_argument("--merge", action="store_true", help="update the contexts run here in an existing --json")
    p.add_argument("--section", help="write this run under this key of --json (e.g. long_output), keeping the rest")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs)")
    args = p.parse_args(argv)
    contexts = [int(c) for c in args.contexts.split(",") if c]
    rate_of = dict(tuple(map(float, kv.split(":"))) for kv in args.rate.split(","))
    args.rates = {c: rate_of.get(float(c), list(rate_of.values())[-1]) for c in contexts}

    args.workdir.mkdir(parents=True, exist_ok=True)
    bandwidth = hbm_bandwidth(args.device)
    memory = GpuMemory()
    print("building the model directory (random weights) ...", file=sys.stderr, flush=True)
    model_dir = build_model_dir(args.workdir, args.shape, args.tokenizer, args.device)
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    config = AutoConfig.from_pretrained(model_dir)  # what the servers will load
    profile = args.workdir / f"random-{args.shape}.profile.json"
    synthetic_profile(ModelIdentity.from_config(config, str(model_dir))).save(profile)
    budgets = [float(b) for b in args.budgets.split(",") if b]
    most = max((capacity(config, b, c + args.max_tokens, args) for b in budgets or [1.0] for c in contexts), default=0)
    longest = max([c + max(args.max_tokens, args.rate_max_tokens) for c in contexts]
                  + ([args.arrival_stream_prompt_tokens + args.arrival_stream_tokens] if args.arrivals else []))
    setup = {"config": config, "contexts": contexts, "model_dir": model_dir, "profile": profile,
             "max_model_len": longest + 64,
             "weights_bytes": weights_read_per_step(config), "bandwidth": bandwidth,
             # the rate phase takes prompts from the end, none of which a saturation phase sent (a server with
             # a prefix cache would answer those from it)
             "prompts": {c: make_prompts(args.tokenizer, c, most + args.rate_requests, args.uneven) for c in contexts}}
    if args.arrivals:
        setup["stream_prompts"] = make_prompts(args.tokenizer, args.arrival_stream_prompt_tokens, args.arrival_streams)
        setup["arrival_prompts"] = make_prompts(args.tokenizer, args.arrival_prompt_tokens,
                                                int(args.arrivals * args.arrival_duration) + 1)
    peers = [] if args.no_peer else [name for name in args.peers.split(",") if name]
    if unknown := set(peers) - set(PEERS):
        p.error(f"--peers: unknown {sorted(unknown)}; choose from {', '.join(PEERS)}")
    configs = [(f"rheads-{b}", b, None) for b in budgets] + [(PEERS[peer], None, peer) for peer in peers]

    whole, report = open_report(args.json, args.merge, args.section)
    command, ran = shlex.join(["python", *sys.argv]), {str(c) for c in contexts}  # each figure keeps its command
    report.update({
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "date": datetime.date.today().isoformat(), "command": command,
        "shape": args.shape, "hbm_bandwidth_bytes_per_s": bandwidth, "weights_bytes_per_step": setup["weights_bytes"],
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    })
    with tempfile.TemporaryDirectory(prefix="rheads-gpu-serving-") as logs:
        for name, budget, peer in configs:
            try:
                result = run_config(name, budget, setup, args, memory, Path(logs), peer)
            except RuntimeError as error:  # a server that does not start: reported, the others still run
                print(error, file=sys.stderr)
                result = {"budget": budget, "contexts": {}, "error": str(error)[-2000:]}
            old = report["configs"].get(name, {"contexts": {}})
            result["contexts"] = {**old.get("contexts", {}), **result["contexts"]}
            if "arrivals" not in result and "arrivals" in old:
                result["arrivals"] = old["arrivals"]
            result["commands"] = {**old.get("commands", {}), **{c: command for c in result["contexts"] if c in ran}}
            report["configs"][name] = result
            save(whole, report, args.json)  # after every configuration: a run cut short keeps what it measured
    memory.close()
    save(whole, report, args.json)
    print(f"\n{report['device']}, {args.shape} random bf16 weights, KV memory {args.kv_cache_gib} GiB per server, "
          f"{args.max_tokens} output tokens (saturation), bandwidth "
          f"{bandwidth / 1e12 if bandwidth else float('nan'):.2f} TB/s")
    for table in report["tables"]:
        print(table, end="\n\n")
    print(json.dumps(report["ratios"], indent=1))
    print(f"wrote {args.json}")
    return 0


def open_report(path: Path, merge: bool, section: str | None) -> tuple[dict, dict]:
    """(the file's content, the report this run writes into it): the whole file, or one section of it
    with the rest kept as it is; with `merge` the report keeps what this run does not measure."""
    whole = json.loads(path.read_text()) if path.exists() and (merge or section) else {}
    report = whole if section is None else (whole.get(section, {}) if merge else {})
    report.setdefault("configs", {})
    if section is not None:
        whole[section] = report
    return whole, report


def save(whole: dict, report: dict, path: Path) -> None:
    """Recompute the report's ratios and tables from what it holds, and write the file it belongs to."""
    report["ratios"] = ratios(report)
    report["tables"] = [format_context(report, str(c)) for c in sorted({int(c) for r in report["configs"].values()
                                                                        for c in r["contexts"]})]
    arrivals = format_arrivals(report)
    if arrivals is not None:
        report["tables"].append(arrivals)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(whole, indent=1, default=str))


if __name__ == "__main__":
    raise SystemExit(main())
