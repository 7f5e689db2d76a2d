"""vLLM for the GPU machine, in pieces: the peer of benchmarks/gpu_serving.py (issue 23).

The machine has no network and a call carries at most 64 MiB. vLLM 0.25.0 pins the machine's own torch
(2.11.0) and links libcudart.so.13 as that torch does, so its wheel runs there; but the wheel is 250 MB and
it declares ~70 dependencies, many of them kernels for other GPUs and features (FlashInfer, TileLang,
CUTLASS DSL, video codecs). This script carries what `vllm serve` of a bf16 Llama needs beyond the image:

- the vLLM wheel without the parts that model does not load on Hopper (`TRIM`: FlashAttention 2, which it
  uses only before Hopper; the MoE kernels, imported only if present; the vendored DeepGEMM and SM100
  sources; the optional Rust front end), rewritten with its RECORD to match;
- benchmarks/vllm_requirements.txt: the Python packages its front end and engine import on that path and
  the image lacks, found by importing vLLM's entry points, engine core, GPU worker and model runner, the
  Llama model, the FlashAttention backend, the compiler and the structured-output backend in an
  environment holding only the image's packages, adding each missing module until all import, and
  resolving the result with pip against vLLM's own pins. On the machine they are installed apart from
  rheads' (`SITE=/tmp/vsite`), and gpu_serving.py gives vLLM that PYTHONPATH alone (--vllm-pythonpath).
  FlashInfer is not carried: its sampler is turned off (VLLM_USE_FLASHINFER_SAMPLER=0; vLLM imports it
  unguarded otherwise), and attention takes vLLM's Hopper default, FlashAttention 3, which the wheel holds.

    python benchmarks/vllm_parts.py --out .vllmparts

then, on the machine, one call per piece as gpu_parts.py prints, with PIECES=/tmp/vp SITE=/tmp/vsite before
`bash .vllmparts/setup.sh ...`, and `gpu_serving.py --peers vllm --vllm-pythonpath /tmp/vsite`.
"""

from __future__ import annotations

import argparse
import sys
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_parts import PLATFORMS, download, parse_size, prepare  # noqa: E402
from gpu_unpack import MIB, PartsError  # noqa: E402

VLLM = "vllm==0.25.0"
REQUIREMENTS = Path(__file__).resolve().parent / "vllm_requirements.txt"
TRIM = ("vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so", "vllm/_moe_C_stable_libtorch.abi3.so",
        "vllm/third_party/deep_gemm/", "vllm/third_party/fmha_sm100/", "vllm/vllm-rs")  # its pynvml stays: CUDA needs it


def trimmed(wheel: Path, out_dir: Path) -> Path:
    """`wheel` without the TRIM paths, its RECORD listing only what is left (pip installs from RECORD)."""
    out = out_dir / wheel.name
    if out.exists():
        return out
    keep = lambda name: not name.startswith(TRIM)  # noqa: E731
    tmp = out.with_suffix(".tmp")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            if not keep(info.filename):
                continue
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                data = b"".join(line for line in data.splitlines(keepends=True) if keep(line.decode().split(",")[0]))
            dst.writestr(info, data)
    tmp.rename(out)
    return out


def requirements() -> list[str]:
    return [line.split("#")[0].strip() for line in REQUIREMENTS.read_text().splitlines()
            if line.split("#")[0].strip()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path(".vllmparts"), help="the pieces' folder (default: %(default)s)")
    p.add_argument("--piece-size", type=parse_size, default=60 * MIB, help="at most this per piece (default 60MiB)")
    p.add_argument("--python-version", default="3.12", help="the GPU machine's Python (default: %(default)s)")
    args = p.parse_args(argv)
    try:
        platforms = list(PLATFORMS) + [f"manylinux_2_{n}_x86_64" for n in (24, 27, 31, 34, 35)]
        wheels = download([VLLM, *requirements()], args.out / "wheels", args.python_version, platforms)
        packed = args.out / "packed"
        packed.mkdir(parents=True, exist_ok=True)
        for old in packed.iterdir():
            old.unlink()
        (args.out / "trimmed").mkdir(exist_ok=True)
        for wheel in wheels:  # the folder gpu_parts packs: the trimmed vLLM wheel and the others as downloaded
            source = trimmed(wheel, args.out / "trimmed") if wheel.name.startswith("vllm-") else wheel
            (packed / wheel.name).hardlink_to(source)
        prepare(argparse.Namespace(models="", server=False, wheels=packed, out=args.out, piece_size=args.piece_size,
                                   python_version=args.python_version, platform=None,
                                   then="PYTHONPATH=/tmp/vsite python3 -m vllm.entrypoints.cli.main --version"))
    except PartsError as error:
        print(f"vllm_parts: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
