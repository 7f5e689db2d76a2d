"""The GPU machine's side of benchmarks/gpu_parts.py: collect the pieces, check them, reassemble and install.

Runs there under the machine's own python3 (through .gpuparts/setup.sh), so it uses the standard library
alone. /tmp survives between calls only while the machine stays warm, so the pieces wait in /tmp/p:

    python3 benchmarks/gpu_unpack.py --out .gpuparts copy N    # piece N, carried in this call, to /tmp/p
    python3 benchmarks/gpu_unpack.py --out .gpuparts install   # every piece checked, wheels into /tmp/site

Every step checks sha256s against .gpuparts/manifest.json (carried in every call), so a piece damaged or
lost on the way is named with the call to make again, rather than failing later as a broken import.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

MIB = 1 << 20


class PartsError(RuntimeError):
    """Something is missing or damaged; the message says which pieces and what to do."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(4 * MIB), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(out: Path) -> dict:
    path = out / "manifest.json"
    if not path.is_file():
        raise PartsError(f"no {path}: carry .gpuparts/manifest.json in this call")
    return json.loads(path.read_text())


def _bad_pieces(manifest: dict, pieces: Path, names: list[str] | None = None) -> tuple[list[str], list[str]]:
    """(missing, corrupt) pieces in `pieces`, of `names` (default: all)."""
    missing, corrupt = [], []
    for piece in manifest["pieces"]:
        path = pieces / piece["name"]
        if names is not None and piece["name"] not in names:
            continue
        if not path.is_file():
            missing.append(piece["name"])
        elif path.stat().st_size != piece["size"] or sha256_of(path) != piece["sha256"]:
            corrupt.append(piece["name"])
    return missing, corrupt


def copy_piece(out: Path, index: int, pieces: Path) -> None:
    """Copy one carried piece next to those of earlier calls and check it; say which are still to come."""
    manifest = read_manifest(out)
    if not 0 <= index < len(manifest["pieces"]):
        raise PartsError(f"piece {index} does not exist: the manifest has pieces 0 to {len(manifest['pieces']) - 1}")
    name = manifest["pieces"][index]["name"]
    if not (out / name).is_file():
        raise PartsError(f"{out / name} is not here: carry {out.name}/{name} in the call that copies it")
    pieces.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(out / name, pieces / name)
    if _bad_pieces(manifest, pieces, [name])[1]:
        raise PartsError(f"{name} arrived damaged (size or sha256 differ from the manifest): carry it again")
    missing = [p["name"] for p in manifest["pieces"] if not (pieces / p["name"]).is_file()]
    print(f"gpu_unpack: {name} copied to {pieces}; still missing: {', '.join(missing) or 'none'}")


def assemble(manifest: dict, pieces: Path, files_dir: Path) -> list[Path]:
    """Check every piece, then cut their concatenation back into the files, each checked by its sha256."""
    missing, corrupt = _bad_pieces(manifest, pieces)
    if missing or corrupt:
        indices = [str(i) for i, p in enumerate(manifest["pieces"]) if p["name"] in missing + corrupt]
        raise PartsError(f"in {pieces}: missing {', '.join(missing) or 'none'}; damaged {', '.join(corrupt) or 'none'}"
                         f". Make the `setup.sh copy N` call again for N in {', '.join(indices)}.")
    files_dir.mkdir(parents=True, exist_ok=True)
    stream = (pieces / p["name"] for p in manifest["pieces"])
    src, done = open(next(stream), "rb"), []
    try:
        for entry in manifest["files"]:
            path, left, digest = files_dir / entry["name"], entry["size"], hashlib.sha256()
            with open(path, "wb") as dst:
                while left:
                    block = src.read(min(left, 4 * MIB))
                    if not block:  # this piece is spent: the file goes on in the next
                        src.close()
                        src = open(next(stream), "rb")
                        continue
                    dst.write(block)
                    digest.update(block)
                    left -= len(block)
            if digest.hexdigest() != entry["sha256"]:
                raise PartsError(f"{entry['name']} reassembled with the wrong sha256: the pieces do not match "
                                 "the manifest (were they made by two runs?); make them again")
            done.append(path)
    finally:
        src.close()
    return done


def install_all(out: Path, pieces: Path, target: Path) -> Path:
    """Reassemble, install the wheels into `target` (once per manifest) and write the env file to source."""
    manifest = read_manifest(out)
    stamp = target / ".gpu_parts_installed"
    key = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()
    if not (stamp.is_file() and stamp.read_text() == key):
        files = assemble(manifest, pieces, pieces / "files")
        wheels = [str(f) for f in files if f.name.endswith(".whl")]
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--no-compile",
               "--no-cache-dir", "--upgrade", "--target", str(target), *wheels]
        if subprocess.run(cmd).returncode != 0:
            raise PartsError("pip install failed (above)")
        stamp.write_text(key)
    env = pieces / "env.sh"
    env.write_text(f'export PYTHONPATH={target}:"$PWD"${{PYTHONPATH:+:$PYTHONPATH}}  # sourced from the repo root\n'
                   f"export RHEADS_CACHE={pieces.parent / 'rheads'} HF_HUB_OFFLINE=1\n")
    print(f"gpu_unpack: the wheels are installed into {target}. Now: . {env}\n{env.read_text()}", end="")
    return env


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path(".gpuparts"), help="the carried folder (default: %(default)s)")
    p.add_argument("--pieces", type=Path, default=Path("/tmp/p"), help="where the pieces gather (default: %(default)s)")
    p.add_argument("--target", type=Path, default=Path("/tmp/site"), help="where wheels install (default: %(default)s)")
    sub = p.add_subparsers(dest="step", required=True)
    sub.add_parser("copy", help="copy one carried piece to --pieces and check it").add_argument("index", type=int)
    sub.add_parser("install", help="check every piece, reassemble, pip install into --target")
    args = p.parse_args(argv)
    try:
        if args.step == "copy":
            copy_piece(args.out, args.index, args.pieces)
        else:
            install_all(args.out, args.pieces, args.target)
    except PartsError as error:
        print(f"gpu_unpack: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
