"""The server's threads under load: the tokenizer shared by nobody, a slow reader's bounded buffer, the exact
waiting count behind 429, logged aborts and failures, the engine thread's start-up and its death.

A real uvicorn on 127.0.0.1 serves the SmolLM2 engine (tests/serving.py); the engine's own tokenizer is
wrapped so that any use of it outside the engine thread is recorded."""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import socket
import threading
import time

import httpx
import openai
import pytest
from serving import (  # tests/serving.py
    KEY, MAX_MODEL_LEN, NAMES, PRESET, Served, assert_error, build_engine, scrape, wait_idle,
)

from rheads.engine import EngineBrokenError, SamplingParams
from server.app import ServerSettings, create_app
from server.engine_client import EngineClient, EngineStartError, QueueFullError

ENGINE_THREAD = "rheads-engine"
HEADERS = {"Authorization": f"Bearer {KEY}"}


class EngineThreadOnly:
    """The engine's tokenizer, for the engine thread alone: records which other threads touch it and how."""

    def __init__(self, tokenizer):
        self._tokenizer, self.strangers = tokenizer, set()

    def _touch(self, name: str) -> None:
        if threading.current_thread().name != ENGINE_THREAD:
            self.strangers.add((threading.current_thread().name, name))

    def __getattr__(self, name: str):
        self._touch(name)
        return getattr(self._tokenizer, name)

    def __call__(self, *args, **kwargs):
        self._touch("__call__")
        return self._tokenizer(*args, **kwargs)

    def __deepcopy__(self, memo):  # a copy is the server's own: unguarded
        return copy.deepcopy(self._tokenizer, memo)


@pytest.fixture(scope="module")
def engine(one_thread_module):
    eng = build_engine()
    eng.tokenizer = EngineThreadOnly(eng.tokenizer)
    return eng


@pytest.fixture(scope="module")
def tokenizer(engine):
    """A tokenizer for the test's own use."""
    return copy.deepcopy(engine.tokenizer)


@pytest.fixture(scope="module")
def served(engine):
    """Its connections' kernel send buffers are small: a response the client does not read soon stops fitting
    anywhere on its way."""
    srv = Served(create_app(engine, ServerSettings(served_model_names=NAMES, api_key=KEY)), send_buffer=4096)
    yield srv
    srv.stop()
    assert not engine.tokenizer.strangers, "the server used the engine's tokenizer outside the engine thread"


def chat_prompt_tokens(tokenizer, content: str) -> int:
    text = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


# --- the tokenizer --------------------------------------------------------------------------------------

def test_the_tokenizer_under_concurrent_use(served, engine, tokenizer):
    """200 chat requests with long prompts at once (encoded on the tokenizing worker) while streams decode
    their logprobs (on the event loop) and the engine detokenizes them (on its thread): every prompt is
    counted exactly, no stream sees an error, and only the engine thread used the engine's tokenizer."""
    words = ["river", "stone", "lantern", "orchard", "meadow", "harbour", "violin", "ember", "quartz", "saddle"]
    contents = [" ".join(words[(i + j) % len(words)] + str(j % 97) for j in range(500)) for i in range(200)]
    expected = [chat_prompt_tokens(tokenizer, c) for c in contents]
    assert min(expected) + 1000 > MAX_MODEL_LEN  # each is refused after tokenizing, so none needs a prefill

    async def run() -> None:
        client = openai.AsyncOpenAI(base_url=f"{served.base}/v1", api_key=KEY, max_retries=0, timeout=60)
        burst_done, received = asyncio.Event(), [0] * 4

        async def stream(i: int) -> int:
            response = await client.chat.completions.create(
                model=PRESET, messages=[{"role": "user", "content": f"Tell story number {i}."}], stream=True,
                max_tokens=1500, temperature=0, extra_body={"ignore_eos": True}, logprobs=True, top_logprobs=5)
            async for chunk in response:
                for choice in chunk.choices:
                    assert choice.finish_reason is None, "a stream ended before the burst did"
                    received[i] += len(choice.logprobs.content) if choice.logprobs else 0
                if burst_done.is_set():
                    await response.close()  # a client leaving mid-stream: aborted
                    break
            return received[i]

        async def refused(content: str) -> str:
            with pytest.raises(openai.BadRequestError) as caught:
                await client.chat.completions.create(model=PRESET, messages=[{"role": "user", "content": content}],
                                                     max_tokens=1000)
            return caught.value.body["message"]

        streams = [asyncio.create_task(stream(i)) for i in range(len(received))]
        while not all(received):  # every stream under way
            await asyncio.sleep(0.01)
        messages = await asyncio.gather(*[refused(c) for c in contents])
        burst_done.set()
        assert all(await asyncio.gather(*streams))
        for message, n in zip(messages, expected):
            assert f"has {n} prompt tokens" in message, message
        await client.close()

    asyncio.run(run())
    wait_idle(served.base)
    assert not engine.tokenizer.strangers


# --- backpressure ---------------------------------------------------------------------------------------

def dechunked(response: bytes) -> bytes:
    """The body of an HTTP/1.1 response in chunked transfer encoding."""
    head, _, rest = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"transfer-encoding: chunked" in head.lower(), head
    body = b""
    while (size := int((line := rest.partition(b"\r\n"))[0], 16)) > 0:
        body += line[2][:size]
        rest = line[2][size + 2:]
    return body


def test_a_slow_reader_holds_one_buffered_output(served):
    """A client that reads nothing while its stream is generated: the engine goes on at its own pace, what the
    socket cannot take waits merged into one output, and the stream, read at last, holds every token."""
    n = 100  # each chunk has 20 top logprobs: together more than the connection holds
    body = {"messages": [{"role": "user", "content": "Count slowly."}], "max_tokens": n, "temperature": 0,
            "ignore_eos": True, "logprobs": True, "top_logprobs": 20}
    whole = httpx.post(f"{served.base}/v1/chat/completions", headers=HEADERS, json=body, timeout=60).json()
    before = scrape(served.base)
    payload = json.dumps({**body, "stream": True}).encode()
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting: a small window
        sock.connect(("127.0.0.1", served.port))
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + KEY.encode() + b"\r\nConnection: close\r\n"
                     b"Content-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload)
        deadline = time.monotonic() + 60
        finished = "rheads:e2e_request_latency_seconds_count"
        while (m := scrape(served.base))[finished] == before[finished]:
            assert m["rheads:stream_outputs_buffered"] <= 1
            assert time.monotonic() < deadline, "the engine waited for the client"
            time.sleep(0.05)
        assert m["rheads:stream_outputs_buffered"] <= 1
        assert m["rheads:stream_outputs_coalesced_total"] > before["rheads:stream_outputs_coalesced_total"]
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    events = [json.loads(line[6:]) for line in dechunked(raw).decode().split("\n")
              if line.startswith("data: ") and line != "data: [DONE]"]
    choices = [c for e in events for c in e["choices"]]
    tokens = [t for c in choices if c["logprobs"] for t in c["logprobs"]["content"]]
    assert len(tokens) == n and len(choices) < n  # every token, in fewer chunks
    assert "".join(c["delta"].get("content", "") for c in choices) == whole["choices"][0]["message"]["content"]
    assert choices[-1]["finish_reason"] == "length"
    assert wait_idle(served.base)["rheads:stream_outputs_buffered"] == 0


# --- the waiting count ----------------------------------------------------------------------------------

class _QueueEngine:
    """An engine that only queues: requests wait until the test admits them."""

    def __init__(self):
        self.waiting: list[str] = []

    def prepare_thread(self) -> None:
        pass

    def add_request(self, request_id, prompt_ids, params, validated=False) -> None:
        self.waiting.append(request_id)

    def abort(self, request_id) -> None:
        self.waiting.remove(request_id)

    def has_unfinished(self) -> bool:
        return False

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)


class _NoMetrics:
    def observe_engine(self, engine) -> None:
        pass


def test_the_waiting_count_is_exact():
    """Posted and engine-waiting requests count alike, however the engine thread's turns fall between
    submissions: exactly max_waiting wait, and each one admitted makes room for exactly one more."""
    engine = _QueueEngine()

    async def run() -> None:
        client = EngineClient(engine, _NoMetrics(), max_waiting=4)
        await client.start(timeout=30)
        ready, accepted, refused = asyncio.Event(), 0, 0
        try:
            for i in range(40):
                try:
                    client.submit(f"r{i}", [1], SamplingParams(), ready)
                    accepted += 1
                except QueueFullError:
                    refused += 1
                if i % 3 == 0:
                    await asyncio.sleep(0.01)  # let the engine thread take some
            assert (accepted, refused) == (4, 36)
            deadline = time.monotonic() + 10
            while len(engine.waiting) < 4:  # all taken by the engine thread: still four waiting
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            with pytest.raises(QueueFullError):
                client.submit("late", [1], SamplingParams(), ready)
            del engine.waiting[:2]  # two admitted to the batch
            while True:
                try:
                    client.submit("next", [1], SamplingParams(), ready)
                    break
                except QueueFullError:
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.01)
            client.submit("last", [1], SamplingParams(), ready)
            with pytest.raises(QueueFullError):
                client.submit("over", [1], SamplingParams(), ready)
        finally:
            client.shutdown()

    asyncio.run(run())


# --- logging, start-up, death ---------------------------------------------------------------------------

def sse_data(response: httpx.Response):
    """Each server-sent event's data, as sent."""
    return (line[6:] for line in response.iter_lines() if line.startswith("data: "))


def last_event(events) -> str:
    """The stream's last event before [DONE]."""
    rest = list(events)
    assert rest[-1] == "[DONE]"
    return rest[-2]


def test_aborts_and_failed_steps_are_logged_with_request_ids(served, engine, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="rheads.server")
    body = {"messages": [{"role": "user", "content": "Go on."}], "max_tokens": 500, "ignore_eos": True,
            "stream": True}
    with httpx.stream("POST", f"{served.base}/v1/chat/completions", headers=HEADERS, json=body, timeout=60) as r:
        left = json.loads(next(sse_data(r)))["id"]
    wait_idle(served.base)
    assert any(f"request {left}-0 aborted" in rec.getMessage() for rec in caplog.records), caplog.text

    real, armed = engine.step, threading.Event()

    def step():
        if armed.is_set():
            armed.clear()
            raise RuntimeError("a step that fails")
        return real()

    monkeypatch.setattr(engine, "step", step)
    with httpx.stream("POST", f"{served.base}/v1/chat/completions", headers=HEADERS, json=body, timeout=60) as r:
        events = sse_data(r)
        failed = json.loads(next(events))["id"]
        armed.set()
        assert "a step that fails" in last_event(events)
    errors = [rec for rec in caplog.records if rec.levelno == logging.ERROR and rec.name == "rheads.server"]
    assert any(f"{failed}-0" in rec.getMessage() and "a step that fails" in str(rec.exc_info[1]) for rec in errors)
    wait_idle(served.base)


def test_an_engine_thread_that_does_not_get_ready_fails_the_start_up(engine, monkeypatch):
    release = threading.Event()
    monkeypatch.setattr(engine, "prepare_thread", lambda: release.wait(30))
    app = create_app(engine, ServerSettings(served_model_names=NAMES, engine_start_timeout=0.5))
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="did not come up"):
        Served(app)
    assert time.monotonic() - started < 20
    release.set()  # the thread sees the stop and never steps
    client = app.state.client
    client._thread.join(10)
    assert not client._thread.is_alive()
    with pytest.raises(EngineStartError):
        asyncio.run(EngineClient(_SlowStart(), _NoMetrics()).start(timeout=0.2))


class _SlowStart(_QueueEngine):
    def prepare_thread(self) -> None:
        time.sleep(1)


@pytest.mark.parametrize("error, fail_all_fails, cause", [
    (RuntimeError("the device is gone"), True, "and cannot be reset"),
    (EngineBrokenError("the group is gone: restart the server"), False, "restart the server")],
    ids=["unreportable", "broken"])
def test_a_dead_engine_thread_fails_fast_with_503(one_thread_module, caplog, error, fail_all_fails, cause):
    """A failure the engine thread cannot report through the engine (fail_all fails too), or an engine that
    cannot step again (`EngineBrokenError`: a tensor-parallel forward failed on rank 0), ends it: the request
    in flight gets an error, /health and every new request a 503 that says why, at once."""
    engine = build_engine()
    srv = Served(create_app(engine, ServerSettings(served_model_names=NAMES)))
    try:
        armed = threading.Event()
        real = engine.step

        def step():
            if armed.is_set():
                raise error
            return real()

        engine.step = step
        if fail_all_fails:
            engine.fail_all = lambda error: (_ for _ in ()).throw(RuntimeError("and cannot be reset"))
        body = {"prompt": "Once", "max_tokens": 500, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{srv.base}/v1/completions", json=body, timeout=60) as r:
            events = sse_data(r)
            next(events)
            armed.set()
            assert "engine thread died" in last_event(events)
        health = httpx.get(f"{srv.base}/health", timeout=5)
        assert "engine thread has died" in assert_error(health, 503, "ServiceUnavailableError")["message"]
        started = time.monotonic()
        for path, json_body in [("/v1/completions", {"prompt": "Hi"}),
                                ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]})]:
            refused = httpx.post(srv.base + path, json=json_body, timeout=5)
            assert cause in assert_error(refused, 503, "ServiceUnavailableError")["message"]
        assert time.monotonic() - started < 5
        assert any(rec.levelno == logging.CRITICAL and rec.name == "rheads.server" for rec in caplog.records)
    finally:
        srv.stop()
