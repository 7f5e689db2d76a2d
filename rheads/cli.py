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
"""


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    return [int(float(x)) for x in text.split(",") if x.strip()]


def build_profile_parser(sub: argparse._SubParsersAction) -> None:
    from .profiler import ProfileConfig

    defaults = ProfileConfig()
    p = sub.add_parser(
        "profile", help="measure every attention head's retrieval score and save a profile",
        description="Needle-in-a-haystack runs over lengths x depths x needles; at every greedy decode "
        "step, a head copies if its attention argmax lies in the needle's answer and holds the token just "
        "generated (Wu et al. 2024). Resumable: an existing --out file gains the samples it lacks. "
        "Sub-commands: `rheads profile import ...`, `rheads profile show FILE`.",
        epilog=PROFILE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="preset name, Hugging Face id, local model directory or .gguf file")
    p.add_argument("--out", required=True, type=Path, help="profile JSON to write (or to resume)")
    p.add_argument("--lengths", type=_ints, default=defaults.lengths,
                   help="comma-separated context lengths in tokens (default: %(default)s)")
    p.add_argument("--depths", type=_floats, default=defaults.depths,
                   help="comma-separated needle depths in [0, 1] (default: %(default)s)")
    p.add_argument("--needles", type=Path, default=None,
                   help="needles JSONL with needle, question, real_needle (default: the 3 published needles)")
    p.add_argument("--haystack", type=Path, nargs="+", default=None,
                   help="haystack .txt files or directories (default: the text shipped with rheads)")
    p.add_argument("--kv-aggregate", choices=["max", "mean"], default=defaults.kv_aggregate,
                   help="how a KV head's score is made from its query heads' (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens,
                   help="greedy decode steps per sample (default: answer length + 32)")
    p.add_argument("--recall-threshold", type=float, default=defaults.recall_threshold,
                   help="keep a sample when the answer's unigram recall exceeds this (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rheads",
        description="Serve long-context LLMs with a full KV cache only for retrieval heads; every other "
        "head keeps attention sinks + a recent window.",
    )
    parser.add_argument("--version", action="version", version=f"rheads {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    build_profile_parser(sub)
    return parser


def build_import_parser() -> argparse.ArgumentParser:
    from .importers import IMPORTERS

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

    from .profiler import ProfileConfig, profile_model

    if args.threads:
        torch.set_num_threads(args.threads)
    config = ProfileConfig(
        lengths=args.lengths, depths=args.depths, needles_file=args.needles,
        haystack_paths=args.haystack, kv_aggregate=args.kv_aggregate,
        max_new_tokens=args.max_new_tokens, recall_threshold=args.recall_threshold,
    )
    profile = profile_model(args.model, config, args.out, device=args.device)
    print(f"wrote {args.out}: {profile.samples_kept} of {profile.samples_total} samples kept")
    return 0


def run_import(argv: list[str]) -> int:
    from .importers import IMPORTERS, default_profile_path

    args = build_import_parser().parse_args(argv)
    profile = IMPORTERS[args.format](args.source, model_name=args.model)
    out = args.out or default_profile_path(profile.model.name)
    profile.save(out)
    print(f"wrote {out} ({profile.model.name}, {profile.model.num_layers} layers)")
    return 0


def run_show(argv: list[str]) -> int:
    from .profile import Profile
    from .report import format_report, write_heatmap

    args = build_show_parser().parse_args(argv)
    profile = Profile.load(args.profile)
    print(format_report(profile, top=args.top))
    png = args.heatmap or args.profile.with_suffix(".heads.png")
    write_heatmap(profile, png)
    print(f"heatmap: {png}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from .models import ModelNotFoundError
    from .profile import ProfileError

    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:2] == ["profile", "import"]:
            return run_import(argv[2:])
        if argv[:2] == ["profile", "show"]:
            return run_show(argv[2:])
        args = build_parser().parse_args(argv)
        if args.command == "profile":
            return run_profile(args)
        build_parser().print_help()
        return 2
    except (ProfileError, ModelNotFoundError) as error:
        print(f"rheads: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
