"""Reliability and security: under load, faults and hostile input nothing is lost.

Two SmolLM2 engines are served per module on free 127.0.0.1 ports (helpers in tests/serving.py): `served`
with the default settings and an API key, `guarded` with every security flag set; the disconnect test serves
its own, of short prefill steps. Another server is a real `rheads serve` subprocess, for SIGTERM. Every request
goes to 127.0.0.1 only; every loop is bounded.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import httpx
import jinja2
import openai
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from pydantic import BaseModel
from serving import (  # tests/serving.py
    KEY, MAX_MODEL_LEN, NAMES, PRESET, REPO, Served, assert_error, build_engine, free_port, scrape, sse_events,
    wait_idle,
)

import rheads.engine.runner as engine_runner
from rheads.cli import build_parser, run_serve
from rheads.engine import LLMEngine
from server.app import ServerSettings, create_app
from server.engine_client import EngineClient
from server.protocol import ChatCompletionRequest, CompletionRequest

GUARDED_ORIGIN = "https://app.example.com"
GUARDED_MAX_TOKENS = 24
GUARDED_MAX_BYTES = 64 << 10
CHAT = [{"role": "user", "content": "Hi"}]
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def engine(one_thread_module):
    return build_engine()


@pytest.fixture(scope="module")
def served(engine):
    srv = Served(create_app(engine, ServerSettings(served_model_names=NAMES, api_key=KEY)))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def guarded(one_thread_module):
    settings = ServerSettings(served_model_names=NAMES, api_key=KEY, protect_health_and_metrics=True,
                              max_request_bytes=GUARDED_MAX_BYTES, max_tokens_limit=GUARDED_MAX_TOKENS,
                              allowed_origins=[GUARDED_ORIGIN])
    srv = Served(create_app(build_engine(max_num_seqs=2), settings), health_headers={"Authorization": f"Bearer {KEY}"})
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def http(served):
    with httpx.Client(base_url=served.base, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as h:
        yield h


def keyed(base: str, timeout: float | httpx.Timeout = 60) -> httpx.Client:
    return httpx.Client(base_url=base, headers={"Authorization": f"Bearer {KEY}"}, timeout=timeout)


# --- security settings ----------------------------------------------------------------------------

def test_serve_flags_reach_the_settings_and_uvicorn(monkeypatch, engine):
    """`rheads serve` parses every security flag and wires it through; the key may come from the env."""
    args = build_parser().parse_args(["serve"])
    assert (args.protect_health_and_metrics, args.max_request_bytes, args.max_tokens_limit, args.allowed_origins,
            args.shutdown_grace_seconds, args.trust_remote_code, args.api_key) == (False, 1 << 20, None, None, 30.0,
                                                                                   False, None)
    defaults = ServerSettings(served_model_names=NAMES)
    assert (defaults.protect_health_and_metrics, defaults.max_request_bytes, defaults.max_tokens_limit,
            defaults.allowed_origins) == (False, 1 << 20, None, [])

    seen = {}
    monkeypatch.setattr(LLMEngine, "from_model", classmethod(
        lambda cls, model, profile, config, trust_remote_code: seen.update(remote=trust_remote_code) or engine))
    monkeypatch.setattr("server.app.create_app", lambda eng, settings: seen.update(settings=settings) or "app")
    monkeypatch.setattr("uvicorn.run", lambda app, **kw: seen.update(app=app, uvicorn=kw))
    monkeypatch.setattr(signal, "signal", lambda sig, handler: seen.setdefault("signals", {}).update({sig: handler}))
    monkeypatch.setenv("RHEADS_API_KEY", "sk-from-env")
    args = build_parser().parse_args([
        "serve", "--protect-health-and-metrics", "--max-request-bytes", "64KiB", "--max-tokens-limit", "100",
        "--allowed-origins", "https://a.example", "https://b.example", "--shutdown-grace-seconds", "7",
        "--kv-cache-memory", "64MiB", "--port", "9"])
    assert run_serve(args) == 0
    settings = seen["settings"]
    assert settings.api_key == "sk-from-env" and settings.protect_health_and_metrics
    assert settings.max_request_bytes == 65536 and settings.max_tokens_limit == 100
    assert settings.allowed_origins == ["https://a.example", "https://b.example"]
    assert seen["uvicorn"]["timeout_graceful_shutdown"] == 7.0 and seen["remote"] is False
    assert set(seen["signals"]) == {signal.SIGTERM, signal.SIGINT}
    for handler in seen["signals"].values():  # uvicorn re-raises the signal it drained for: exit 0
        with pytest.raises(SystemExit) as exited:
            handler(signal.SIGTERM, None)
        assert exited.value.code == 0
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--max-request-bytes", "0.5"])


def test_prefix_caching_is_on_unless_turned_off(monkeypatch, engine):
    """vLLM's spelling: on by default, `--no-enable-prefix-caching` turns it off in the engine's config."""
    configs = []
    monkeypatch.setattr(LLMEngine, "from_model", classmethod(
        lambda cls, model, profile, config, trust_remote_code: configs.append(config) or engine))
    monkeypatch.setattr("server.app.create_app", lambda eng, settings: "app")
    monkeypatch.setattr("uvicorn.run", lambda app, **kw: None)
    monkeypatch.setattr(signal, "signal", lambda sig, handler: None)
    for flags in ([], ["--no-enable-prefix-caching"], ["--enable-prefix-caching"]):
        assert run_serve(build_parser().parse_args(["serve", "--kv-cache-memory", "64MiB", *flags])) == 0
    assert [c.enable_prefix_caching for c in configs] == [True, False, True]


def test_the_key_is_compared_in_constant_time(served, monkeypatch):
    """The key decides through hmac.compare_digest alone, of SHA-256 digests of the presented and the configured
    header: equal lengths whatever is sent, so neither a key's length nor its prefix shows in the time taken."""
    calls, verdict = [], {}
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return verdict.get("forced", real(a, b))

    monkeypatch.setattr(hmac, "compare_digest", spy)
    configured = hashlib.sha256(f"Bearer {KEY}".encode()).digest()

    def models(header: str | None) -> httpx.Response:
        return httpx.get(f"{served.base}/v1/models", headers={} if header is None else {"Authorization": header})

    wrong = ["Bearer wrong", "Bearer " + KEY[:-1], "Bearer " + KEY + "x" * 1000, "", "Bearer", KEY]
    for header in [*wrong, None]:
        calls.clear()
        assert_error(models(header), 401, "AuthenticationError")
        assert calls == [(hashlib.sha256((header or "").encode()).digest(), configured)], header
    calls.clear()
    assert models(f"Bearer {KEY}").status_code == 200 and calls == [(configured, configured)]
    # compare_digest's answer is the whole decision: no comparison of the raw key before or beside it
    verdict["forced"] = True
    for header in [*wrong, None]:
        assert models(header).status_code == 200, header
    verdict["forced"] = False
    assert_error(models(f"Bearer {KEY}"), 401, "AuthenticationError")


def test_health_and_metrics_are_open_by_default_and_keyed_on_request(served, guarded):
    for path in ("/health", "/metrics"):
        assert httpx.get(served.base + path).status_code == 200
        assert_error(httpx.get(guarded.base + path), 401, "AuthenticationError")
        assert_error(httpx.get(guarded.base + path, headers={"Authorization": "Bearer nope"}), 401)
        assert httpx.get(guarded.base + path, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


def test_bodies_over_the_limit_are_413(http, served):
    limit = 1 << 20
    small = json.dumps({"prompt": "Hi", "max_tokens": 1}).encode()
    padded = small[:-1] + b" " * (limit - len(small)) + b"}"  # exactly at the limit: served
    assert len(padded) == limit and http.post("/v1/completions", content=padded, headers=JSON).status_code == 200
    over = padded[:-1] + b" }"
    error = assert_error(http.post("/v1/completions", content=over, headers=JSON), 413, "RequestTooLargeError")
    assert str(limit) in error["message"]

    def chunks(body: bytes, size: int = 50_000):  # no Content-Length: sent chunked, counted as it arrives
        for i in range(0, len(body), size):
            yield body[i:i + size]

    assert http.post("/v1/completions", content=chunks(padded), headers=JSON).status_code == 200
    assert_error(http.post("/v1/completions", content=chunks(over), headers=JSON), 413, "RequestTooLargeError")
    assert_error(http.post("/tokenize", content=chunks(b"[" * (2 * limit)), headers=JSON), 413)
    client = openai.OpenAI(base_url=f"{served.base}/v1", api_key=KEY, max_retries=0, timeout=60)
    with pytest.raises(openai.APIStatusError) as caught:
        client.completions.create(model=PRESET, prompt="x" * (limit + 1), max_tokens=1)
    assert caught.value.status_code == 413
    wait_idle(served.base)


def test_the_body_limit_is_configurable(guarded):
    with keyed(guarded.base) as h:
        body = {"prompt": "Hi " * (GUARDED_MAX_BYTES // 3), "max_tokens": 1}
        error = assert_error(h.post("/v1/completions", json=body), 413, "RequestTooLargeError")
        assert str(GUARDED_MAX_BYTES) in error["message"]
        assert_error(h.post("/v1/completions", content=iter([json.dumps(body).encode()]), headers=JSON), 413)
        assert h.post("/v1/completions", json={"prompt": "Hi " * 100, "max_tokens": 1}).status_code == 200


def test_max_tokens_over_the_limit_is_400(http, guarded):
    error = assert_error(http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": MAX_MODEL_LEN + 1}),
                         400, "BadRequestError", "max_tokens")
    assert str(MAX_MODEL_LEN) in error["message"]
    with keyed(guarded.base) as h:
        limit = GUARDED_MAX_TOKENS
        for path, body, param in [
            ("/v1/completions", {"prompt": "Hi", "max_tokens": limit + 1}, "max_tokens"),
            ("/v1/chat/completions", {"messages": CHAT, "max_tokens": limit + 1}, "max_tokens"),
            ("/v1/chat/completions", {"messages": CHAT, "max_completion_tokens": 10**30}, "max_completion_tokens"),
        ]:
            error = assert_error(h.post(path, json=body), 400, "BadRequestError", param)
            assert str(limit) in error["message"], error
        # chat's default max_tokens (the room left) is capped by the limit too
        out = h.post("/v1/chat/completions", json={"messages": CHAT, "ignore_eos": True, "temperature": 0}).json()
        assert out["choices"][0]["finish_reason"] == "length" and out["usage"]["completion_tokens"] == limit


def test_cors_only_when_origins_are_given(served, guarded):
    preflight = {"Origin": GUARDED_ORIGIN, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    r = httpx.options(f"{served.base}/v1/completions", headers=preflight)
    assert r.status_code == 405 and "access-control-allow-origin" not in r.headers
    r = httpx.get(f"{served.base}/health", headers={"Origin": GUARDED_ORIGIN})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers

    r = httpx.options(f"{guarded.base}/v1/completions", headers=preflight)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == GUARDED_ORIGIN
    r = httpx.options(f"{guarded.base}/v1/completions", headers={**preflight, "Origin": "https://evil.example"})
    assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
    r = httpx.get(f"{guarded.base}/v1/models", headers={"Origin": GUARDED_ORIGIN})  # no key: 401, still CORS
    assert_error(r, 401)
    assert r.headers["access-control-allow-origin"] == GUARDED_ORIGIN


def test_no_remote_code_unless_asked(monkeypatch, tmp_path):
    """Both places that load from transformers pass trust_remote_code=False unless --trust-remote-code."""
    import transformers

    from rheads import models

    calls = []

    class Stop(Exception):
        pass

    def spy(*args, **kwargs):
        calls.append(kwargs)
        raise Stop

    for auto in (transformers.AutoTokenizer, transformers.AutoModelForCausalLM):
        monkeypatch.setattr(auto, "from_pretrained", spy)
    for call in (lambda: models.load_model(models.ModelSource("x/y", str(tmp_path))),
                 lambda: models._convert_gguf(tmp_path / "m.gguf", tmp_path / "out")):
        with pytest.raises(Stop):
            call()
    with pytest.raises(Stop):
        models.load_model(models.ModelSource("x/y", str(tmp_path)), trust_remote_code=True)
    assert [c["trust_remote_code"] for c in calls] == [False, False, True]
    sources = [p for d in ("rheads", "server") for p in (REPO / d).rglob("*.py")]
    assert not [p for p in sources if "trust_remote_code=True" in p.read_text()]


# --- hostile input ----------------------------------------------------------------------------------

def nested(depth: int) -> bytes:
    return b"[" * depth + b"1" + b"]" * depth


HOSTILE = [  # (raw body, status): one of each for both endpoints; `{}` stands for the endpoint's valid body
    (b'{"prompt": "\xff\xfe", "messages": [{"role": "user", "content": "\xc3\x28"}]}', 400),  # invalid UTF-8
    (b'{} "temperature": NaN}', 400),
    (b'{} "temperature": Infinity}', 400),
    (b'{} "top_p": -Infinity}', 400),
    (b'{} "unknown_field": NaN}', 400),  # not JSON at all, even where it would be ignored
    (b'{"prompt": ' + nested(10_000) + b', "messages": ' + nested(10_000) + b"}", 400),
    (b'{"prompt": ' + nested(500) + b', "messages": ' + nested(500) + b"}", 400),
    (b'{} "x": ' + b'{"a": ' * 5000 + b"1" + b"}" * 5000 + b"}", 400),
    (b'{} "model": "\\ud800"}', 400),  # a lone surrogate cannot even be written back in an error
    (b'{"prompt": "\\udc00 hi", "messages": [{"role": "user", "content": "\\udfff"}]}', 400),
    (b'{} "max_tokens": 1000000000000000000000000000000}', 400),
    (b'{} "n": 1000000000}', 400),
    (b'{} "seed": 1e400}', 400),  # a float overflowing to infinity
    (b"null", 400), (b"42", 400), (b"true", 400), (b'"a string"', 400), (b"[]", 400), (b"[{}]", 400),
    (b"", 400), (b"{", 400), (b"\x00\x01\x02", 400),
]
VALID = {"/v1/completions": b'{"prompt": "Hi", "max_tokens": 2,',
         "/v1/chat/completions": b'{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,'}


@pytest.mark.parametrize("path", list(VALID))
def test_hostile_bodies_are_4xx_in_openai_shape(http, served, path):
    for raw, status in HOSTILE:
        body = VALID[path] + raw[2:] if raw.startswith(b"{}") else raw
        assert_error(http.post(path, content=body, headers=JSON), status, "BadRequestError")
    # invalid but valid JSON: token ids out of range or negative, empty conversations, too many choices
    for body in ({"prompt": [-1], "max_tokens": 2}, {"prompt": [[5], [2**70]]}, {"prompt": [[]]},
                 {"prompt": ["a"] * 17, "n": 16}, {"messages": []}, {"messages": [[]]}, {"messages": {}},
                 {"messages": [{"role": "user"}] * 3, "n": 10**6}):
        assert_error(http.post(path, json=body), 400, "BadRequestError")
    wait_idle(served.base)


def test_a_chat_template_that_refuses_is_400(http, engine, monkeypatch):
    def refuse(*args, **kwargs):
        raise jinja2.TemplateError("Conversation roles must alternate user/assistant/user/assistant/...")

    monkeypatch.setattr(type(engine.tokenizer), "apply_chat_template", refuse)  # the server's copies too
    error = assert_error(http.post("/v1/chat/completions", json={"messages": CHAT * 2}), 400, "BadRequestError",
                         "messages")
    assert "alternate" in error["message"]


# hypothesis: bodies shaped like the pydantic request models (plausible values first), with junk mixed in
INTS = st.one_of(st.integers(1, 40), st.integers(-2, 0), st.integers(),
                 st.sampled_from([2**63, -(2**63), 49151, 49152, 10**30]))
FLOATS = st.one_of(st.floats(0, 1), st.floats(allow_nan=False, allow_infinity=False),
                   st.sampled_from([0.0, 1e-40, 1e-5, 2.0, 2.1, 1e300]))
TEXT = st.one_of(st.text(max_size=12), st.sampled_from(["", "\x00", "😀 naïve", "a" * 300]))
JUNK = st.one_of(st.none(), st.booleans(), INTS, FLOATS, TEXT, st.sampled_from(["\ud800", "\udfff x"]),
                 st.lists(INTS, max_size=3),
                 st.dictionaries(TEXT, INTS, max_size=2), st.lists(st.lists(INTS, max_size=2), max_size=2))


def mix(*options: st.SearchStrategy) -> st.SearchStrategy:
    """One of the options, each as likely (st.one_of would flatten nested one_ofs and weigh their parts)."""
    return st.sampled_from(options).flatmap(lambda option: option)


# JSON schemas (response_format, guided_json, tools' parameters): enforceable ones, and some that are not
SCHEMA_LEAVES = st.sampled_from([{"type": "object"}, {"type": "string", "maxLength": 3}, {"enum": ["a", 1]},
                                 {"type": "integer", "minimum": 0, "maximum": 9}, {"type": "objectx"},
                                 {"$ref": "#/nope"}, {"type": "string", "pattern": "a("}, {"type": "boolean"}])
SCHEMAS = st.recursive(SCHEMA_LEAVES, lambda inner: mix(
    st.fixed_dictionaries({"type": st.just("object"), "properties": st.dictionaries(st.text(max_size=3), inner,
                                                                                     max_size=2)},
                          optional={"required": st.lists(st.text(max_size=3), max_size=2)}),
    st.fixed_dictionaries({"type": st.just("array"), "items": inner}, optional={"maxItems": st.integers(-1, 3)})),
    max_leaves=4)


def shaped(annotation, junk: bool) -> st.SearchStrategy:
    """Values of a pydantic field's type, recursively; with `junk`, any level may be junk instead."""
    origin, args = get_origin(annotation), get_args(annotation)
    if annotation is type(None):
        values = st.none()
    elif origin in (Union, UnionType):
        values = st.one_of(*[shaped(a, junk) for a in args])
    elif origin is Annotated:
        values = shaped(args[0], junk)
    elif origin is Literal:
        values = st.sampled_from(args)
    elif origin is list:
        values = st.lists(shaped(args[0], junk), min_size=1, max_size=3)
    elif origin is dict and args[1] is Any:  # the API's free-form objects are JSON schemas
        values = SCHEMAS
    elif origin is dict:
        values = st.dictionaries(shaped(args[0], False), shaped(args[1], junk), max_size=3)  # JSON keys: strings
    elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
        values = model_bodies(annotation, junk)
    else:
        values = {int: INTS, float: FLOATS, str: TEXT, bool: st.booleans(), Any: JUNK}[annotation]
    return mix(values, values, values, JUNK) if junk else values


def model_bodies(model: type[BaseModel], junk: bool) -> st.SearchStrategy:
    fields = {name: shaped(f.annotation, junk) for name, f in model.model_fields.items()}
    required = {name: fields.pop(name) for name, f in model.model_fields.items() if f.is_required()}
    return st.fixed_dictionaries(required, optional={**fields, **({"junk_field": JUNK} if junk else {})})


BODIES = {path: mix(model_bodies(model, junk=False), model_bodies(model, junk=False), model_bodies(model, junk=True),
                    JUNK)
          for path, model in (("/v1/completions", CompletionRequest), ("/v1/chat/completions", ChatCompletionRequest))}


def bounded(body) -> dict:
    """Keep generation short: ask for at most 2 tokens and 2 choices where a request would be served."""
    if isinstance(body, dict):
        for name in ("max_tokens", "max_completion_tokens"):
            if isinstance(body.get(name), int) and 2 < body[name] <= MAX_MODEL_LEN:
                body[name] = 2
        if isinstance(body.get("n"), int) and 2 < body["n"] <= 16:
            body["n"] = 2
        if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
            body["max_tokens"] = 2
    return body


@pytest.mark.parametrize("path", list(BODIES))
def test_fuzzed_bodies_never_500(http, served, path):
    @hypothesis_settings(max_examples=100, deadline=None, derandomize=True, database=None,
                         suppress_health_check=list(HealthCheck))
    @given(body=BODIES[path].map(bounded))
    def one(body):
        r = http.post(path, content=json.dumps(body).encode(), headers=JSON)  # lone surrogates escaped
        assert r.status_code < 500, (body, r.text)
        if r.status_code != 200:
            assert_error(r, r.status_code)

    one()
    wait_idle(served.base)


# --- faults -----------------------------------------------------------------------------------------

POISON = 31337  # a seed that makes our patched sampler raise


def stream_tokens(base: str, path: str, body: dict, events: list, first: threading.Event | None = None) -> None:
    """Stream one request to its end, appending each SSE payload to `events`."""
    with keyed(base) as h, h.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200
        for event in sse_events(r):
            events.append(event)
            if first is not None and event.get("choices") and any(
                    c.get("text") or (c.get("delta") or {}).get("content") for c in event["choices"]):
                first.set()


def test_a_sampling_failure_fails_its_request_alone(http, served, monkeypatch):
    real = engine_runner.sample_batch

    def poisoned(logits, params, generators, raw=None):
        if any(p.seed == POISON for p in params):
            raise RuntimeError("poisoned sampler")
        return real(logits, params, generators, raw)

    monkeypatch.setattr(engine_runner, "sample_batch", poisoned)
    body = {"max_tokens": 48, "ignore_eos": True, "temperature": 0}
    streams = [[] for _ in range(3)]
    started = [threading.Event() for _ in streams]
    threads = [threading.Thread(target=stream_tokens, args=(served.base, path, {**body, "prompt": "Once upon a time",
                                                                                 "messages": CHAT}, events, first))
               for path, events, first in zip(["/v1/completions", "/v1/chat/completions", "/v1/completions"],
                                              streams, started)]
    for t in threads:
        t.start()
    for first in started:
        assert first.wait(60)
    # joins the running batch: fails at its first token, while the others are mid-stream
    bad = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 4, "seed": POISON})
    error = assert_error(bad, 500, "InternalServerError")
    assert "poisoned sampler" in error["message"]
    bad_stream = []
    stream_tokens(served.base, "/v1/chat/completions", {"messages": CHAT, "seed": POISON, "max_tokens": 4}, bad_stream)
    assert "poisoned sampler" in bad_stream[-1]["error"]["message"]
    for t in threads:
        t.join(60)
    for events in streams:  # the others never saw the failure
        assert not [e for e in events if "error" in e], events[-1]
        assert [c["finish_reason"] for e in events for c in e["choices"] if c.get("finish_reason")] == ["length"]
    m = wait_idle(served.base)
    assert m["rheads:kv_cache_bytes_used"] == 0


def test_a_forward_failure_fails_the_batch_and_frees_everything(engine, served, monkeypatch):
    real, armed = engine.runner.run, threading.Event()

    def run(chunks, *args):
        if armed.is_set():
            armed.clear()
            raise RuntimeError("the device fell over")
        return real(chunks, *args)

    monkeypatch.setattr(engine.runner, "run", run)
    streams = [[] for _ in range(2)]
    started = [threading.Event() for _ in streams]
    body = {"prompt": "Once upon a time", "messages": CHAT, "max_tokens": 1000, "ignore_eos": True}
    threads = [threading.Thread(target=stream_tokens, args=(served.base, path, body, events, first))
               for path, events, first in zip(["/v1/completions", "/v1/chat/completions"], streams, started)]
    for t in threads:
        t.start()
    for first in started:
        assert first.wait(60)
    assert scrape(served.base)["rheads:kv_cache_bytes_used"] > 0
    armed.set()
    for t in threads:
        t.join(60)
        assert not t.is_alive()
    for events in streams:
        assert "the device fell over" in events[-1]["error"]["message"]
    assert wait_idle(served.base)["rheads:kv_cache_bytes_used"] == 0
    with keyed(served.base) as h:  # and the engine serves again
        assert h.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2}).status_code == 200


@pytest.fixture()
def short_steps(one_thread_module):
    """An engine that prefills 64 tokens a step, served: a prompt stays part-prefilled for many short steps, so a
    client can be seen to leave mid-prompt without waiting out long ones."""
    eng = build_engine(max_num_batched_tokens=64)
    srv = Served(create_app(eng, ServerSettings(served_model_names=NAMES, api_key=KEY)))
    yield srv, eng
    srv.stop()


def test_many_disconnects_leak_nothing(short_steps):
    """60 clients leave: mid-prompt (streaming), mid-stream, and while waiting for a whole response."""
    served, engine = short_steps
    rng = random.Random(0)
    long_prompt = (engine.tokenizer("The history of the world, told slowly. " * 40)["input_ids"] * 4)[:800]
    mid_ids = long_prompt[1:] + long_prompt[:1]  # its own prompt: how its sequence is told from not_streaming's

    def prefilled() -> int | None:
        """How many prompt tokens of the mid-prompt request are cached; None before it is admitted (read
        beside the engine thread: the dict is copied in one go, each field read once)."""
        for seq in engine.sequences.copy().values():
            if seq.prompt_ids == mid_ids and seq.slot is not None:
                return len(mid_ids) if seq.output_ids else seq.num_cached
        return None

    def mid_prompt() -> None:  # an 800-token prompt prefills in thirteen 64-token steps at best
        with keyed(served.base) as h, h.stream("POST", "/v1/completions", json={
                "prompt": mid_ids, "max_tokens": 300, "ignore_eos": True, "stream": True}) as r:
            assert r.status_code == 200
            deadline = time.monotonic() + 30
            while not (cached := prefilled()):  # leave once some, not all, of the prompt is in the cache
                assert time.monotonic() < deadline, "the prompt never started prefilling"
                time.sleep(0.02)
            assert cached < len(mid_ids), "the prompt was prefilled before the client could leave mid-prompt"

    def mid_stream() -> None:
        with keyed(served.base) as h, h.stream("POST", "/v1/chat/completions", json={
                "messages": CHAT, "max_tokens": 300, "ignore_eos": True, "stream": True}) as r:
            events = sse_events(r)
            for _ in range(rng.randint(2, 4)):
                next(events)

    def not_streaming() -> None:
        with keyed(served.base, timeout=httpx.Timeout(60, read=rng.uniform(0.1, 0.6))) as h:
            with pytest.raises(httpx.ReadTimeout):
                h.post("/v1/completions", json={"prompt": long_prompt, "max_tokens": 300, "ignore_eos": True})

    with ThreadPoolExecutor(3) as pool:
        for _ in range(20):
            for future in [pool.submit(f) for f in (mid_prompt, mid_stream, not_streaming)]:
                future.result(timeout=120)
            wait_idle(served.base, timeout=5)  # each round's requests are gone within a step or two
    m = wait_idle(served.base, timeout=30)
    assert m["rheads:kv_cache_bytes_used"] == 0 and m["rheads:kv_cache_usage_perc"] == 0
    assert m["rheads:num_requests_running"] == 0 and m["rheads:num_requests_waiting"] == 0
    assert served.app.state.client.num_unfinished == 0 and not engine.sequences


def test_sigterm_drains_in_flight_requests_and_exits_0():
    """A short stream finishes after SIGTERM; a long one is cut at the grace period; the exit status is 0."""
    grace, port = 8, free_port()
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "rheads.cli", "serve", PRESET, "--kv-cache-memory", "64MiB", "--max-model-len", "1024",
         "--threads", "1", "--host", "127.0.0.1", "--port", str(port), "--shutdown-grace-seconds", str(grace),
         "--log-level", "warning"],
        cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "rheads serve did not come up"
            time.sleep(0.2)

        outcome: dict[str, object] = {}

        def stream(name: str, max_tokens: int, first: threading.Event) -> None:
            events = []
            try:
                with httpx.stream("POST", f"{base}/v1/completions", timeout=60, json={
                        "prompt": "Once upon a time", "max_tokens": max_tokens, "ignore_eos": True,
                        "temperature": 0, "stream": True}) as r:
                    for line in r.iter_lines():
                        events.append(line)
                        first.set()
            except httpx.HTTPError as error:
                outcome[name + " error"] = error
            outcome[name] = events

        started = {"short": threading.Event(), "long": threading.Event()}
        threads = [threading.Thread(target=stream, args=(name, n, started[name]))
                   for name, n in (("short", 24), ("long", 1000))]
        for t in threads:
            t.start()
        assert all(e.wait(60) for e in started.values())
        proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        refused = False
        while not refused and time.monotonic() - sent < 5:  # new connections are refused at once
            try:
                httpx.get(f"{base}/health", timeout=1)
                time.sleep(0.05)
            except httpx.ConnectError:
                refused = True
        assert refused
        code = proc.wait(grace + 20)
        took = time.monotonic() - sent
        for t in threads:
            t.join(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    log = proc.stdout.read()
    assert code == 0, log[-3000:]
    assert took < grace + 10, took
    short = [line for line in outcome["short"] if line.startswith("data: ")]
    assert short[-1] == "data: [DONE]" and "short error" not in outcome
    assert sum(1 for line in short[:-1] if json.loads(line[6:])["choices"]) == 24  # every token arrived
    assert "long error" in outcome and "data: [DONE]" not in outcome["long"]  # cut at the grace period


class _StubEngine:
    """Just what the engine thread touches when idle; `prepare_thread` records where it ran, or fails."""

    num_waiting = 0

    def __init__(self, failure: Exception | None = None):
        self.failure, self.prepared_in = failure, None

    def prepare_thread(self) -> None:
        self.prepared_in = threading.current_thread().name
        if self.failure is not None:
            raise self.failure

    def has_unfinished(self) -> bool:
        return False


class _NoMetrics:
    def observe_engine(self, engine) -> None:
        pass


def test_the_engine_thread_prepares_itself_before_the_client_starts():
    """PyTorch keeps cuDNN's plans per thread: the thread that steps the engine builds them, and the client
    (so the app's lifespan, so the server) has started only once it has; a failure there fails the start-up."""
    engine = _StubEngine()
    client = EngineClient(engine, _NoMetrics())
    asyncio.run(client.start(timeout=30))
    assert engine.prepared_in == "rheads-engine"
    client.shutdown()
    with pytest.raises(RuntimeError, match="no plans"):
        asyncio.run(EngineClient(_StubEngine(RuntimeError("no plans")), _NoMetrics()).start(timeout=30))
