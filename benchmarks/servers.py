"""A server under test as a subprocess on a free 127.0.0.1 port: started, waited for, stopped.

Used by serve_compare.py (rheads at two budgets) and gpu_serving.py (rheads, vLLM and `transformers serve`).
Output goes to a log file, so a server that fails to start says why.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_command(model: str, flags: list[str], port: int) -> list[str]:
    return [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", model, *flags, "--host", "127.0.0.1",
            "--port", str(port), "--uvicorn-log-level", "warning"]


def vllm_env(pythonpath: str | None) -> dict[str, str]:
    """What `vllm serve` runs with here: its own PYTHONPATH (benchmarks/vllm_parts.py's wheels), no usage
    stats or hub, and its FlashInfer sampler off (greedy requests never reach it; FlashInfer is not carried)."""
    return {"VLLM_USE_FLASHINFER_SAMPLER": "0", "VLLM_NO_USAGE_STATS": "1", "HF_HUB_OFFLINE": "1",
            **({"PYTHONPATH": pythonpath} if pythonpath else {})}


def rheads_command(flags: list[str], port: int) -> list[str]:
    return [sys.executable, "-m", "rheads.cli", "serve", *flags, "--host", "127.0.0.1", "--port", str(port),
            "--log-level", "warning"]


class ServerProcess:
    """`command(port)` in a subprocess (with `env` added to this one's); ready when GET `ready_path` answers 200;
    stopped with SIGINT, then SIGKILL."""

    def __init__(self, name: str, command, startup_timeout: float, log_dir: Path, threads: int | None = None,
                 ready_path: str = "/health", env: dict[str, str] | None = None):
        self.name, self.port = name, free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.cmd = command(self.port)
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})}
        if threads:
            env |= {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        self.log_path = log_dir / f"serve_{name.replace(' ', '_').replace('/', '_')}.log"
        self.log = self.log_path.open("w")
        self.proc = subprocess.Popen(self.cmd, cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        started = time.monotonic()
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{name}: exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(f"{self.base}{ready_path}", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() - started > startup_timeout:
                self.stop()
                raise RuntimeError(f"{name}: no {ready_path} after {startup_timeout:.0f}s:\n{self.output()}")
            time.sleep(0.25)
        self.startup_s = time.monotonic() - started

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text(errors="replace")[-4000:]

    def banner(self) -> str:
        """rheads' start-up line naming the head split and the pool sizes (empty for other servers)."""
        return next((line for line in self.output().splitlines() if line.startswith("rheads: ")), "")

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # uvicorn's graceful shutdown
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()
        return self.proc.returncode

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
