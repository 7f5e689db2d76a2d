"""The `rheads` command line: profile a model, import or show profiles, serve, evaluate."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import __version__

PROFILE_EPILOG = """\
examples:
  rheads profile smollm2-135m-instruct --out profiles/SmolLM2-135M-Instruct.json
  rheads profile qwen2.5-coder-0.5b-instruct --lengths 4000,8000 --depths 0,0.5,1 --out qwen.json
  rheads profile import retrieval-head llama-2-7b-80k.json --out profiles/yaofu/llama-2-7b-80k.json
  rheads profile import duo-attention full_attention_heads.tsv --model meta-llama/Llama-3.1-8B-Instruct
  rheads profile show profiles/SmolLM2-135M-Instruct.json --heatmap heads.png
  rheads profile rescore qwen.json --score attention --kv-aggregate mean --out qwen-attention-mean.json
"""


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    return [int(float(x)) for x in text.split(",") if x.strip()]


def _add_grid_arguments(p: argparse.ArgumentParser, defaults, out_help: str, needles_default: str,
                        haystack_default: str) -> None:
    """MODEL, --out and the needle-in-a-haystack grid, shared by `profile` and `eval niah`."""
    p.add_argument("model", help="preset name, Hugging Face id, local model directory or .gguf file")
    p.add_argument("--out", required=True, type=Path, help=out_help)
    p.add_argument("--lengths", type=_ints, default=defaults.lengths,
                   help="comma-separated context lengths in tokens (default: %(default)s)")
    p.add_argument("--depths", type=_floats, default=defaults.depths,
                   help="comma-separated needle depths in [0, 1] (default: %(default)s)")
    p.add_argument("--needles", type=Path, default=None,
                   help=f"needles JSONL with needle, question, real_needle (default: {needles_default})")
    p.add_argument("--haystack", type=Path, nargs="+", default=None,
                   help=f"haystack .txt files or directories (default: {haystack_default})")



def _add_kv_cache_dtype_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kv-cache-dtype", choices=["auto", "fp8"], default="auto",
                   help="what both KV pools store: auto (the model's dtype) or fp8 (e4m3, half a bf16 cache's bytes; "
                   "one scale per layer and KV head, fixed at start-up from a calibration prompt; a GPU of compute "
                   "capability 8.9 or later) (default: %(default)s)")


def _add_eval_runtime_arguments(p: argparse.ArgumentParser, dtype_what: str) -> None:
    """Where and how an evaluation runs the model: threads, device, dtype, remote code."""
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help=f"{dtype_what} (auto: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model repos to run their own code")


def _add_task_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", choices=["niah", "multikey", "multivalue", "vartrack"], default="niah",
                   help="niah: one needle; or RULER's harder kinds, generated from the haystack: multikey (four "
                   "keys, one asked), multivalue (four values of one key, all asked), vartrack (follow a chain "
                   "of variable assignments); with --num-needles instances, 12 by default (default: %(default)s)")


def _add_eval_grid_arguments(p: argparse.ArgumentParser, defaults) -> None:
    """The grid arguments of `eval niah` and `eval causality`: held-out needles and haystack by default."""
    _add_grid_arguments(p, defaults, "output directory (an existing one is resumed)",
                        "rheads/data/eval_needles.jsonl, 12 needles no shipped profile was made with",
                        "rheads/data/haystack, unseen by the shipped profiles")


def build_profile_parser(sub: argparse._SubParsersAction) -> None:
    from .profiling.profiler import ProfileConfig

    defaults = ProfileConfig()
    p = sub.add_parser(
        "profile", help="measure every attention head's retrieval score and save a profile",
        description="Needle-in-a-haystack runs over lengths x depths x needles; at every greedy decode "
        "step, a head copies if its attention argmax lies in the needle's answer and holds the token just "
        "generated (Wu et al. 2024). Resumable: an existing --out file gains the samples it lacks. "
        "Sub-commands: `rheads profile import ...`, `rheads profile show FILE`, `rheads profile rescore FILE`.",
        epilog=PROFILE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_grid_arguments(p, defaults, "profile JSON to write (or to resume)", "the 3 published needles",
                        "the text shipped with rheads")
    p.add_argument("--kv-aggregate", choices=["max", "mean"], default=defaults.kv_aggregate,
                   help="how a KV head's score is made from its query heads' (default: %(default)s)")
    p.add_argument("--score", choices=["copy", "attention"], default=defaults.score,
                   help="rank heads by copies (the paper's argmax test) or by attention mass on the answer; both "
                   "are recorded, `rheads profile rescore` switches (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens,
                   help="greedy decode steps per sample (default: answer length + 32)")
    p.add_argument("--recall-threshold", type=float, default=defaults.recall_threshold,
                   help="keep a sample when the answer's unigram recall exceeds this (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="samples of one length run together (default: 8 on a GPU, 1 on a CPU)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: %(default)s)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="weights and activations (auto: bfloat16 on GPU, float32 on CPU)")


# serve's defaults by device: on a GPU the KV pools take most of the memory the weights leave (as
# vLLM's --gpu-memory-utilization does) and a prefill chunk is large enough to keep the GEMMs busy
# (8192 tokens: a 32k prefill in four steps, benchmarks/gpu_serving.py); on a CPU both stay small
GPU_KV_FRACTION = 0.85
GPU_BATCHED_TOKENS = 8192
CPU_KV_MEMORY = "512MiB"
CPU_BATCHED_TOKENS = 1024


def parse_memory(text: str) -> int | float:
    """'512MiB', '4GB', '1073741824' -> bytes; a number in (0, 1] -> that fraction of free GPU memory."""
    units = {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "kb": 10**3, "mb": 10**6, "gb": 10**9, "b": 1}
    lowered = text.strip().lower()
    for unit, scale in units.items():
        if lowered.endswith(unit):
            return int(float(lowered[: -len(unit)]) * scale)
    value = float(lowered)
    if 0 < value <= 1:
        return value
    return int(value)


def torch_dtype(name: str, device: str):
    """--dtype's value as a torch dtype; auto: bfloat16 on a GPU, float32 on a CPU."""
    import torch

    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _or_auto(convert):
    """An argparse type that also takes 'auto' (None: the caller picks by device)."""
    def parse(text: str):
        return None if text.strip().lower() == "auto" else convert(text)
    parse.__name__ = convert.__name__  # argparse names the type in its error messages
    return parse


def parse_bytes(text: str) -> int:
    """'1MiB', '64KiB', '1048576' -> bytes (a whole number of them, at least one)."""
    value = int(text) if text.strip().isdigit() else parse_memory(text)
    if isinstance(value, float) or value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of bytes (e.g. 1MiB or 1048576)")
    return value


CHAT_TEMPLATES = Path(__file__).parent / "data" / "chat_templates"


def chat_template_text(value: str) -> str:
    """--chat-template: a file's text, or a shipped template's by name."""
    path = Path(value) if Path(value).is_file() else CHAT_TEMPLATES / f"{value}.jinja"
    if not path.is_file():
        shipped = ", ".join(sorted(p.stem for p in CHAT_TEMPLATES.glob("*.jinja")))
        raise argparse.ArgumentTypeError(f"no chat template file {value!r} (shipped ones: {shipped})")
    return path.read_text()


def build_serve_parser(sub: argparse._SubParsersAction) -> None:
    from .models import DEFAULT_MODEL

    p = sub.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API",
        description="Serve MODEL with a full KV cache for its retrieval heads and sink + window caches for "
        "the rest, behind /v1/completions, /v1/chat/completions, /v1/models, /tokenize, /detokenize, "
        "/health and /metrics (Prometheus).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help="preset name, Hugging Face id, local model directory or .gguf file")
    p.add_argument("--model", dest="model_flag", default=None, help="same as the positional MODEL")
    p.add_argument("--profile", default="auto",
                   help="'auto' (the shipped profile for MODEL), a profile JSON, or 'none' (budget 1.0 or 0 only)")
    p.add_argument("--budget", type=float, default=None,
                   help="fraction of KV heads keeping a full cache, top by profile score (default: the "
                   "profile's default_budget: 0.5 for SmolLM2; 0.75 for Qwen2.5-Coder, calibrated at 31k, where "
                   "0.5 answers 8-23 points below the full cache at 8k-31k, see benchmarks/RESULTS.md; 0.5 for "
                   "imported ones; 1.0 with --profile none)")
    p.add_argument("--threshold", type=float, default=None,
                   help="instead of --budget: every KV head scoring above this keeps a full cache")
    p.add_argument("--sink", type=int, default=64, help="attention-sink tokens kept by streaming heads")
    p.add_argument("--window", type=int, default=None,
                   help="recent tokens kept by streaming heads (default: the profile's calibrated window, else 256)")
    p.add_argument("--page-size", type=int, default=16, help="tokens per page of the full-head pool")
    p.add_argument("--kv-cache-memory", type=_or_auto(parse_memory), default="auto",
                   help="KV memory for both pools: bytes with a unit (4GiB) or, on a GPU, a fraction of the memory "
                   f"free once the weights are loaded (auto: {GPU_KV_FRACTION:g} on a GPU, {CPU_KV_MEMORY} on a CPU)")
    p.add_argument("--max-model-len", type=int, default=None, help="context limit (default: the model's)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="most sequences in the running batch")
    p.add_argument("--max-num-batched-tokens", type=_or_auto(int), default="auto",
                   help=f"prefill tokens per engine step, the chunk size; decoding sequences add one each "
                   f"(auto: {GPU_BATCHED_TOKENS} on a GPU, {CPU_BATCHED_TOKENS} on a CPU)")
    p.add_argument("--max-waiting", type=int, default=256, help="waiting requests before new ones get 429")
    p.add_argument("--async-decode", action=argparse.BooleanOptionalAction, default=None,
                   help="launch each decode step before the previous one's tokens are read back, so the "
                        "host's per-token work overlaps the GPU; None: on with CUDA")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse the cache of prompt prefixes seen before (vLLM's automatic prefix caching); "
                        "on by default")
    p.add_argument("--snapshot-slots", type=int, default=None,
                   help="window slots kept for prefix-cache snapshots of the streaming heads alone, beside the "
                        "--max-num-seqs slots of live requests (default: max-num-seqs / 8, at least 1)")
    p.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="processes the model is sharded over, one per GPU (NCCL) or all on the CPU (gloo), each "
                   "layer's retrieval heads balanced over them; serves without CUDA graphs or async decode "
                   "(default: %(default)s)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind")
    p.add_argument("--port", type=int, default=8000, help="port to bind")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' (default: $RHEADS_API_KEY, else no key)")
    p.add_argument("--protect-health-and-metrics", action="store_true",
                   help="/health and /metrics need the API key too (default: they are open)")
    p.add_argument("--max-request-bytes", type=parse_bytes, default=1 << 20,
                   help="largest request body in bytes (a unit is allowed: 1MiB); a larger one gets 413")
    p.add_argument("--max-tokens-limit", type=int, default=None,
                   help="largest max_tokens a request may ask for (default: the max model len)")
    p.add_argument("--allowed-origins", nargs="+", default=None, metavar="ORIGIN",
                   help="origins allowed by CORS, e.g. https://app.example.com (default: no CORS headers)")
    p.add_argument("--shutdown-grace-seconds", type=float, default=30.0,
                   help="on SIGTERM or Ctrl-C, how long in-flight requests may take to finish before being cut")
    p.add_argument("--chat-template", type=chat_template_text, default=None, metavar="FILE_OR_NAME",
                   help="a Jinja chat template file, or a shipped one by name (hermes_tools: ChatML with tool "
                        "calls), over the model's own (default: the model's)")
    p.add_argument("--served-model-name", nargs="+", default=None,
                   help="model names the API accepts (default: the model's Hugging Face id and the preset name)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="weights and KV dtype (auto: bfloat16 on GPU, float32 on CPU)")
    _add_kv_cache_dtype_argument(p)
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow model repos to run their own Python code (off: nothing else ever does)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--log-level", default="info", help="uvicorn log level")


EVAL_EPILOG = """\
examples:
  rheads eval niah smollm2-135m-instruct --lengths 1000,2000 --depths 0,0.5,1 --num-needles 4 --out eval/smollm2
  rheads eval niah qwen2.5-coder-0.5b-instruct --budgets 0.5,0.25 --random-seeds 0,1 --out eval/qwen
  rheads eval properties profiles/SmolLM2-135M-Instruct.json profiles/Qwen2.5-Coder-0.5B-Instruct.json
  rheads eval causality smollm2-135m-instruct --ks 0,5,10,20,50 --lengths 1000,2000 --depths 0.25,0.5,0.75 \
      --num-needles 4 --random-seeds 0,1,2 --threads 1 --out eval/causality_smollm2
"""


def _seeds(text: str) -> list[int]:
    return [] if text.strip().lower() in ("", "none") else _ints(text)


def build_eval_parser(sub: argparse._SubParsersAction) -> None:
    from .evaluation.niah_eval import EvalConfig

    defaults = EvalConfig()
    e = sub.add_parser(
        "eval", help="evaluate cache configurations (needle in a haystack) and profile properties",
        description="`rheads eval niah MODEL`: needle-in-a-haystack accuracy of the full cache, retrieval "
        "heads at several budgets, random heads at the same budgets, and the window alone, through the "
        "serving engine. `rheads eval properties PROFILE...`: sparsity and dynamic activation of profiles. "
        "`rheads eval causality MODEL`: the paper's causality test, needle accuracy with the top-K retrieval "
        "heads masked against K random non-retrieval heads masked.",
        epilog=EVAL_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    esub = e.add_subparsers(dest="eval_command", metavar="EVAL_COMMAND")

    n = esub.add_parser(
        "niah", help="needle-in-a-haystack accuracy per cache configuration, through the engine",
        description="Loads MODEL once and, for each cache configuration -- full (budget 1.0); the profile's "
        "retrieval KV heads at each --budgets value; the same budgets with random KV heads for each "
        "--random-seeds value; every head on the sink + window (budget 0) -- runs every (length, depth, "
        "needle) prompt through the serving engine at once (continuous batching, greedy, max_tokens = "
        "answer tokens + 32). A cell is correct when the answer's unigram recall exceeds 0.5. Writes "
        "cells.jsonl (after every configuration; a rerun skips cells already there), summary.json, "
        "heatmaps.png and accuracy_vs_memory.png into --out, and prints the summary table.",
        epilog=EVAL_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_eval_grid_arguments(n, defaults)
    n.add_argument("--profile", default="auto",
                   help="profile JSON for the retrieval configurations (default: the shipped profile of MODEL; "
                   "'none' with --budgets '' runs full and window only)")
    n.add_argument("--num-needles", type=int, default=None, help="use only the first N needles (default: all)")
    _add_task_argument(n)
    n.add_argument("--budgets", type=_floats, default=defaults.budgets,
                   help="fractions of KV heads with a full cache, for retrieval and random (default: %(default)s)")
    n.add_argument("--random-seeds", type=_seeds, default=defaults.random_seeds,
                   help="seeds of the random-head control, '' or none for no random configs (default: %(default)s)")
    n.add_argument("--sink", type=int, default=defaults.sink, help="attention-sink tokens (default: %(default)s)")
    n.add_argument("--window", type=int, default=defaults.window, help="recent-window tokens (default: %(default)s)")
    n.add_argument("--page-size", type=int, default=defaults.page_size, help="tokens per page (default: %(default)s)")
    n.add_argument("--kv-cache-memory", type=parse_memory, default=None,
                   help="KV pool bytes per engine, e.g. 1GiB (default: 512MiB or one longest full-cache sequence)")
    n.add_argument("--max-num-seqs", type=int, default=defaults.max_num_seqs,
                   help="most sequences in a running batch (default: %(default)s)")
    _add_kv_cache_dtype_argument(n)
    n.add_argument("--max-num-batched-tokens", type=int, default=defaults.max_num_batched_tokens,
                   help="prefill tokens per engine step (default: %(default)s)")
    _add_eval_runtime_arguments(n, "weights and KV dtype")

    from .evaluation.causality import NON_RETRIEVAL_BELOW, CausalityConfig

    causal_defaults = CausalityConfig()
    c = esub.add_parser(
        "causality", help="needle accuracy with the top-K retrieval heads masked vs K random heads masked",
        description="The retrieval-head paper's causality test. Loads MODEL once; for each K in --ks, masks "
        "the K query heads with the highest retrieval scores in the profile, and, for each --random-seeds "
        f"value, K query heads drawn at random among those scoring below {NON_RETRIEVAL_BELOW:g}; a masked head "
        "attends uniformly (its query is zeroed, so its output is the mean of the values it can see). Every "
        "(length, depth, needle) prompt of `rheads eval niah`'s grid is answered by plain transformers "
        "model.generate (greedy, KV cache, max_new_tokens = answer tokens + 32), not the serving engine; a "
        "cell is correct when the answer's unigram recall exceeds 0.5. Writes cells.jsonl (after every cell; "
        "a rerun skips cells already there), summary.json and accuracy_vs_masked_heads.png into --out, and "
        "prints accuracy per K for both selections.",
        epilog=EVAL_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_eval_grid_arguments(c, causal_defaults)
    c.add_argument("--ks", type=_ints, default=causal_defaults.ks,
                   help="comma-separated numbers of query heads to mask; 0 is the unmasked model, the start "
                   "of both curves (default: %(default)s)")
    c.add_argument("--profile", default="auto",
                   help="profile JSON whose query-head scores pick the heads (default: the shipped profile of MODEL)")
    c.add_argument("--num-needles", type=int, default=None, help="use only the first N needles (default: all)")
    _add_task_argument(c)
    c.add_argument("--random-seeds", type=_seeds, default=causal_defaults.random_seeds,
                   help="seeds of the random-head control, '' or none for retrieval heads only (default: %(default)s)")
    _add_eval_runtime_arguments(c, "weights dtype")

    pr = esub.add_parser(
        "properties", help="sparsity and dynamic activation of one or more profiles",
        description="For each profile: the share of heads scoring > 0.1, > 0.5 and exactly 0 (query and KV "
        "heads), and, from the per-sample records of kept samples, how many query heads copy in every "
        "sample versus only in some, with a histogram of how often each head is active.")
    pr.add_argument("profiles", type=Path, nargs="+", metavar="PROFILE", help="profile JSON files")
    pr.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rheads",
        description="Serve long-context LLMs with a full KV cache only for retrieval heads; every other "
        "head keeps attention sinks + a recent window.",
    )
    parser.add_argument("--version", action="version", version=f"rheads {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    build_profile_parser(sub)
    build_serve_parser(sub)
    build_eval_parser(sub)
    build_calibrate_parser(sub)
    return parser


def build_calibrate_parser(sub: argparse._SubParsersAction) -> None:
    from .evaluation.calibrate import CalibrationConfig

    defaults = CalibrationConfig(max_model_len=0)
    c = sub.add_parser(
        "calibrate", help="measure the smallest budget and window that keep the full cache's needle accuracy "
        "at the served length, and write them into the profile",
        description="Profiles MODEL at the served length if its profile does not reach it (the profile's own "
        "needles, haystack and dtype; resumed into the same file), then runs `rheads eval niah`'s grid at that "
        "length (held-out needles) for every --windows x --budgets, and writes into the profile the "
        "configuration with the fewest KV bytes per sequence whose accuracy is within --tolerance of the full "
        "cache's, with the grid it was measured on: `rheads serve` then uses that budget and window by "
        "default. Resumable (each window's cells are kept in --out).",
        epilog="example:\n  rheads calibrate qwen2.5-coder-0.5b-instruct --max-model-len 32768 --device cuda "
        "--out calib/ --budgets 0.4,0.5,0.6,0.75",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_eval_grid_arguments(c, defaults.eval)
    c.set_defaults(lengths=None)
    c.add_argument("--max-model-len", type=int, required=True, help="the context length to be served")
    c.add_argument("--profile", default="auto", help="profile JSON to calibrate, written in place (default: the "
                   "shipped profile of MODEL)")
    c.add_argument("--tolerance", type=float, default=defaults.tolerance,
                   help="accuracy a configuration may lose against the full cache (default: %(default)s)")
    c.add_argument("--budgets", type=_floats, default=[0.25, 0.4, 0.5, 0.6, 0.75],
                   help="budgets to try (default: %(default)s)")
    c.add_argument("--windows", type=_ints, default=defaults.windows, help="windows to try (default: %(default)s)")
    c.add_argument("--num-needles", type=int, default=None, help="use only the first N needles (default: all)")
    _add_task_argument(c)
    c.add_argument("--kv-cache-memory", type=parse_memory, default=None,
                   help="KV pool bytes per engine (default: 512MiB or one longest full-cache sequence)")
    c.add_argument("--max-num-batched-tokens", type=int, default=defaults.eval.max_num_batched_tokens,
                   help="prefill tokens per engine step (default: %(default)s)")
    c.add_argument("--profile-batch-size", type=int, default=None,
                   help="samples per batch when profiling (default: 8 on a GPU, 1 on a CPU)")
    c.add_argument("--from-runs", nargs="+", type=Path, metavar="DIR",
                   help="choose from these `rheads eval niah` runs (their --out folders, made with this profile on "
                   "one grid) instead of running the grid")
    _add_eval_runtime_arguments(c, "weights and KV dtype")


def run_calibrate(args: argparse.Namespace) -> int:
    from .evaluation.calibrate import CalibrationConfig, calibrate, calibrate_from_runs, format_calibration
    from .evaluation.niah_eval import EvalConfig
    from .models import resolve_model
    from .profiling.profile import find_profile

    if args.from_runs:
        if args.profile == "auto":
            raise SystemExit("rheads: error: --from-runs needs --profile (the profile the runs were made with)")
        profile, record = calibrate_from_runs(Path(args.profile), args.from_runs, args.max_model_len, args.tolerance)
        print(format_calibration(record))
        print(f"wrote {args.profile}: default_budget {profile.default_budget:g}, "
              f"default_window {profile.default_window}")
        return 0

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    memory = args.kv_cache_memory
    if isinstance(memory, float):
        raise SystemExit("rheads: error: give --kv-cache-memory in bytes, e.g. 2GiB")
    grid = EvalConfig(depths=args.depths, needles_file=args.needles, num_needles=args.num_needles, task=args.task,
                      haystack_paths=args.haystack, budgets=args.budgets, kv_cache_memory=memory,
                      max_num_batched_tokens=args.max_num_batched_tokens, device=args.device,
                      dtype=torch_dtype(args.dtype, args.device))
    config = CalibrationConfig(max_model_len=args.max_model_len, tolerance=args.tolerance, windows=args.windows,
                               lengths=args.lengths, eval=grid,
                               profile_batch_size=args.profile_batch_size or (8 if args.device.startswith("cuda")
                                                                              else 1))
    path = find_profile(resolve_model(args.model).name) if args.profile == "auto" else Path(args.profile)
    profile, record = calibrate(args.model, path, config, args.out, trust_remote_code=args.trust_remote_code)
    print(format_calibration(record))
    print(f"wrote {path}: default_budget {profile.default_budget:g}, default_window {profile.default_window}")
    return 0


def build_import_parser() -> argparse.ArgumentParser:
    from .profiling.importers import IMPORTERS

    p = argparse.ArgumentParser(
        prog="rheads profile import",
        description="Convert published head scores into an rheads profile.",
    )
    p.add_argument("format", choices=sorted(IMPORTERS), help="the published format")
    p.add_argument("source", type=Path, help="the published file (head_score/*.json or full_attention_heads.tsv)")
    p.add_argument("--model", default=None,
                   help="Hugging Face id the scores belong to (default: inferred from the file name)")
    p.add_argument("--out", type=Path, default=None,
                   help="profile JSON to write (default: profiles/<Hugging Face id>.json)")
    return p


def build_show_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rheads profile show",
        description="Print a profile's sparsity figures and top heads, and draw a layer x head heatmap.",
    )
    p.add_argument("profile", type=Path, help="profile JSON")
    p.add_argument("--top", type=int, default=10, help="how many top heads to list (default: %(default)s)")
    p.add_argument("--heatmap", type=Path, default=None,
                   help="PNG to write (default: next to the profile, <name>.heads.png)")
    return p


def run_profile(args: argparse.Namespace) -> int:
    import torch

    from .profiling.profiler import ProfileConfig, profile_model

    if args.threads:
        torch.set_num_threads(args.threads)
    config = ProfileConfig(
        lengths=args.lengths, depths=args.depths, needles_file=args.needles,
        haystack_paths=args.haystack, kv_aggregate=args.kv_aggregate, score=args.score,
        max_new_tokens=args.max_new_tokens, recall_threshold=args.recall_threshold,
        batch_size=args.batch_size or (8 if args.device.startswith("cuda") else 1),
        dtype=torch_dtype(args.dtype, args.device),
    )
    profile = profile_model(args.model, config, args.out, device=args.device)
    print(f"wrote {args.out}: {profile.samples_kept} of {profile.samples_total} samples kept")
    return 0


def run_import(argv: list[str]) -> int:
    from .profiling.importers import IMPORTERS, default_profile_path

    args = build_import_parser().parse_args(argv)
    profile = IMPORTERS[args.format](args.source, model_name=args.model)
    out = args.out or default_profile_path(profile.model.name)
    profile.save(out)
    print(f"wrote {out} ({profile.model.name}, {profile.model.num_layers} layers)")
    return 0


def build_rescore_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rheads profile rescore",
        description="Re-rank a profile's heads from its recorded samples by another score or KV aggregate, "
        "without running the model again.")
    p.add_argument("profile", type=Path, help="profile JSON made by `rheads profile`")
    p.add_argument("--score", choices=["copy", "attention"], default=None, help="default: the profile's")
    p.add_argument("--kv-aggregate", choices=["max", "mean"], default=None, help="default: the profile's")
    p.add_argument("--out", type=Path, required=True, help="profile JSON to write")
    return p


def run_rescore(argv: list[str]) -> int:
    from .profiling.profile import Profile
    from .profiling.profiler import rescore

    args = build_rescore_parser().parse_args(argv)
    profile = rescore(Profile.load(args.profile), args.score, args.kv_aggregate)
    profile.save(args.out)
    print(f"wrote {args.out}: heads ranked by {profile.method.params.get('score', 'copy')}, "
          f"KV heads by the {profile.method.kv_aggregate} of their query heads")
    return 0


def run_show(argv: list[str]) -> int:
    from .profiling.profile import Profile
    from .profiling.report import format_report, write_heatmap

    args = build_show_parser().parse_args(argv)
    profile = Profile.load(args.profile)
    print(format_report(profile, top=args.top))
    png = args.heatmap or args.profile.with_suffix(".heads.png")
    write_heatmap(profile, png)
    print(f"heatmap: {png}")
    return 0


def run_serve(args: argparse.Namespace) -> int:
    import os
    import signal

    import torch
    import uvicorn

    from server.app import ServerSettings, create_app

    from .engine import EngineConfig, LLMEngine
    from .models import PRESETS, resolve_model

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch_dtype(args.dtype, device)
    gpu = device.startswith("cuda")
    memory = args.kv_cache_memory or (GPU_KV_FRACTION if gpu else parse_memory(CPU_KV_MEMORY))
    if isinstance(memory, float) and not gpu:
        raise SystemExit("rheads: error: a fractional --kv-cache-memory needs a GPU; give bytes, e.g. 2GiB")
    batched_tokens = args.max_num_batched_tokens or (GPU_BATCHED_TOKENS if gpu else CPU_BATCHED_TOKENS)
    profile = None if args.profile == "none" else args.profile
    config = EngineConfig(budget=args.budget, threshold=args.threshold,
                          sink=args.sink, window=args.window, page_size=args.page_size,
                          kv_cache_memory=memory, max_num_seqs=args.max_num_seqs,
                          max_num_batched_tokens=batched_tokens,
                          max_model_len=args.max_model_len, device=device, dtype=dtype,
                          kv_cache_dtype=args.kv_cache_dtype, async_decode=args.async_decode, enable_prefix_caching=args.enable_prefix_caching,
                          snapshot_slots=args.snapshot_slots)
    model = args.model_flag or args.model
    if args.tensor_parallel_size > 1:
        from .engine.tensor_parallel import start_serving, stop_serving

        engine, followers = start_serving(args.tensor_parallel_size, model, profile, config, args.trust_remote_code)
    else:
        engine = LLMEngine.from_model(model, profile, config, trust_remote_code=args.trust_remote_code)
    source = resolve_model(model)
    names = args.served_model_name or [source.name] + ([source.preset] if source.preset in PRESETS else [])
    usage, split = engine.usage(), engine.shard.plan.split if args.tensor_parallel_size > 1 else engine.split
    pools = "rank 0's KV pools (every rank's as many pages and slots)" if args.tensor_parallel_size > 1 else "KV pools"
    stored = str(engine.cache.config.storage_dtype).removeprefix("torch.")
    print(f"rheads: {source.name}: {sum(split.num_full)} of {split.num_layers * split.num_kv_heads} "
          f"KV heads full (budget {split.fraction_full:.2f}); {pools} {usage.bytes_capacity / 2**20:.0f} MiB "
          f"of {stored}: {usage.pages_total} pages of {engine.cache.bytes_per_page} bytes, {usage.slots_total} window "
          f"slots of {engine.cache.bytes_per_slot} bytes", file=sys.stderr)
    settings = ServerSettings(served_model_names=names, api_key=args.api_key or os.environ.get("RHEADS_API_KEY"),
                              max_waiting=args.max_waiting, protect_health_and_metrics=args.protect_health_and_metrics,
                              max_request_bytes=args.max_request_bytes, max_tokens_limit=args.max_tokens_limit,
                              allowed_origins=args.allowed_origins or [], chat_template=args.chat_template)
    app = create_app(engine, settings)
    # On SIGTERM or SIGINT uvicorn stops accepting connections, lets in-flight requests finish (up to the
    # grace period; the engine thread serves them until the app shuts down), then raises the signal again
    # under the handler it found: this one, so that a drained shutdown exits with status 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: sys.exit(0))
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                    timeout_graceful_shutdown=args.shutdown_grace_seconds)
    finally:
        if args.tensor_parallel_size > 1:
            stop_serving(engine, followers)
    return 0


def run_eval(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import json

    import torch

    if args.eval_command == "properties":
        from .evaluation.niah_eval import format_properties, profile_properties
        from .profiling.profile import Profile

        results = []
        for path in args.profiles:
            props = profile_properties(Profile.load(path))
            props["path"] = str(path)
            results.append(props)
            print(format_properties(props) + "\n")
        if args.json:
            args.json.write_text(json.dumps(results, indent=1) + "\n")
            print(f"wrote {args.json}")
        return 0
    if args.eval_command not in ("niah", "causality"):
        try:
            parser.parse_args(["eval", "--help"])
        except SystemExit:
            pass
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch_dtype(args.dtype, args.device)
    if args.eval_command == "causality":
        from .evaluation.causality import PLOT_NAME, CausalityConfig, evaluate_causality

        config = CausalityConfig(
            lengths=args.lengths, depths=args.depths, needles_file=args.needles, num_needles=args.num_needles,
            haystack_paths=args.haystack, random_seeds=args.random_seeds, ks=args.ks, device=args.device,
            dtype=dtype,
        )
        result = evaluate_causality(args.model, config, args.out, profile=args.profile,
                                    trust_remote_code=args.trust_remote_code)
        print(result.table)
        print(f"\n{result.evaluated} cells evaluated now; results in {args.out}/ (cells.jsonl, summary.json, "
              f"{PLOT_NAME})")
        return 0
    from .evaluation.niah_eval import EvalConfig, evaluate_niah

    memory = args.kv_cache_memory
    if isinstance(memory, float):
        raise SystemExit("rheads: error: give --kv-cache-memory in bytes, e.g. 2GiB")
    config = EvalConfig(
        lengths=args.lengths, depths=args.depths, needles_file=args.needles, num_needles=args.num_needles,
        task=args.task, haystack_paths=args.haystack, budgets=args.budgets, random_seeds=args.random_seeds,
        sink=args.sink,
        window=args.window, page_size=args.page_size, kv_cache_memory=memory, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, device=args.device, dtype=dtype,
        kv_cache_dtype=args.kv_cache_dtype,
    )
    profile = None if args.profile == "none" else args.profile
    result = evaluate_niah(args.model, config, args.out, profile=profile, trust_remote_code=args.trust_remote_code)
    print(result.table)
    print(f"\n{result.evaluated} cells evaluated now; results in {args.out}/ (cells.jsonl, summary.json, "
          "heatmaps.png, accuracy_vs_memory.png)")
    return 0


def main(argv: list[str] | None = None) -> int:
    from .models import ModelNotFoundError, UnsupportedModelError
    from .profiling.profile import ProfileError

    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:2] == ["profile", "import"]:
            return run_import(argv[2:])
        if argv[:2] == ["profile", "show"]:
            return run_show(argv[2:])
        if argv[:2] == ["profile", "rescore"]:
            return run_rescore(argv[2:])
        args = build_parser().parse_args(argv)
        if args.command == "profile":
            return run_profile(args)
        if args.command == "serve":
            return run_serve(args)
        if args.command == "eval":
            return run_eval(args, build_parser())
        if args.command == "calibrate":
            return run_calibrate(args)
        build_parser().print_help()
        return 2
    except (ProfileError, ModelNotFoundError, UnsupportedModelError, ValueError) as error:
        print(f"rheads: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
