"""Helpers shared by the server's tests: a real uvicorn server in a thread on a free 127.0.0.1 port,
the SmolLM2 engine behind it, /metrics scraping and OpenAI error-shape checks."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from rheads.engine import EngineConfig, LLMEngine, SamplingParams

REPO = Path(__file__).resolve().parents[1]
PROFILE = REPO / "profiles" / "SmolLM2-135M-Instruct.json"
PRESET = "smollm2-135m-instruct"
NAMES = ["HuggingFaceTB/SmolLM2-135M-Instruct", PRESET]
KEY = "sk-test-rheads"
MAX_MODEL_LEN = 2048


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """An app under uvicorn in a background thread, on a free 127.0.0.1 port; `send_buffer` bytes (the kernel's
    SO_SNDBUF, inherited by each connection) bound what the kernel takes of a response before the client reads."""

    def __init__(self, app, health_headers: dict[str, str] | None = None, send_buffer: int | None = None):
        self.app, self.port = app, free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        sockets = None
        if send_buffer is not None:  # a listening socket of our own, to set the option before it listens
            listener = socket.socket()
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
            listener.bind(("127.0.0.1", self.port))
            sockets = [listener]
        self.thread = threading.Thread(target=self._run, args=(sockets,), name=f"uvicorn-{self.port}", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{self.base}/health", headers=health_headers, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or not self.thread.is_alive():
                self.stop()
                raise RuntimeError("the test server did not come up")
            time.sleep(0.1)

    def _run(self, sockets: list[socket.socket] | None) -> None:
        try:
            self.server.run(sockets)
        except SystemExit:  # uvicorn's answer to a failed start-up: the thread ends, and __init__ says so
            pass

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive(), "uvicorn did not stop"


def build_engine(**overrides) -> LLMEngine:
    config = dict(budget=0.5, kv_cache_memory=64 << 20, max_num_seqs=8, max_num_batched_tokens=256,
                  max_model_len=MAX_MODEL_LEN)
    return LLMEngine.from_model(PRESET, profile=PROFILE, config=EngineConfig(**{**config, **overrides}))


def offline_greedy(engine: LLMEngine, prompt_ids: list[int], max_tokens: int) -> tuple[list[int], str, str]:
    """The engine's own greedy output, stepped directly (before any server owns the engine)."""
    engine.add_request("offline-reference", prompt_ids, SamplingParams(max_tokens=max_tokens, temperature=0.0))
    ids, text, finish = [], "", None
    while engine.has_unfinished():
        for out in engine.step():
            ids += out.new_token_ids
            text += out.new_text
            finish = out.finish_reason
    return ids, text, finish


def scrape(base: str) -> dict[str, float]:
    """/metrics as {sample name: value} (histogram buckets left out), checked to parse."""
    text = httpx.get(f"{base}/metrics", timeout=10).text
    samples = {}
    for family in text_string_to_metric_families(text):
        samples[family.name] = samples.get(family.name, 0.0)
        for s in family.samples:
            if "le" not in s.labels:
                samples[s.name] = s.value
    return samples


def wait_idle(base: str, timeout: float = 10.0) -> dict[str, float]:
    """Poll /metrics until no request runs or waits and no KV byte is held; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        m = scrape(base)
        idle = (m["rheads:kv_cache_bytes_used"] == 0 and m["rheads:num_requests_running"] == 0
                and m["rheads:num_requests_waiting"] == 0)
        if idle:
            return m
        if time.monotonic() > deadline:
            pytest.fail(f"server still busy after {timeout}s: bytes_used={m['rheads:kv_cache_bytes_used']}, "
                        f"running={m['rheads:num_requests_running']}, waiting={m['rheads:num_requests_waiting']}")
        time.sleep(0.1)


def assert_error(response: httpx.Response, status: int, type_: str | None = None, param: str | None = "any") -> dict:
    """Exact status and OpenAI's error shape; returns the inner error object."""
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    assert error["code"] == status
    if type_ is not None:
        assert error["type"] == type_, error
    if param != "any":
        assert error["param"] == param, error
    return error


def sse_events(response: httpx.Response):
    """The JSON payloads of a server-sent event stream, up to [DONE]."""
    for line in response.iter_lines():
        if not line.startswith("data: "):
            continue
        data = line[len("data: "):]
        if data == "[DONE]":
            return
        yield json.loads(data)
