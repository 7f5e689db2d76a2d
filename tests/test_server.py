"""The OpenAI-compatible server, end to end: the real SmolLM2 engine behind uvicorn, driven by the
official `openai` client and by raw httpx.

One engine (budget 0.5, the shipped profile) is built per module and served on a free 127.0.0.1 port
with an API key; a second, one-slot engine without a key (max_waiting=1) serves the 429 test. Every
error is checked for its exact status and OpenAI's shape {"error": {"message", "type", "param", "code"}}.
The serving helpers are in tests/serving.py (shared with tests/test_reliability.py).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from serving import (  # tests/serving.py
    KEY, MAX_MODEL_LEN, NAMES, PRESET, REPO, Served, assert_error, build_engine, free_port, offline_greedy, scrape,
    sse_events, wait_idle,
)

from rheads.niah import haystack_files
from server.app import ServerSettings, create_app
from server.protocol import ChatCompletionRequest, CompletionRequest
from server.serving import OpenAIServingChat, OpenAIServingCompletion

OTHER_PROFILE = REPO / "profiles" / "meta-llama" / "Llama-3.1-8B-Instruct.json"
REF_PROMPT = "The three most important things to pack for a long hike are"
REF_MAX_TOKENS = 16
METRIC_NAMES = [
    "rheads:num_requests_running", "rheads:num_requests_waiting", "rheads:prompt_tokens_total",
    "rheads:generation_tokens_total", "rheads:time_to_first_token_seconds",
    "rheads:inter_token_latency_seconds", "rheads:e2e_request_latency_seconds", "rheads:kv_cache_usage_perc",
    "rheads:kv_cache_bytes_used", "rheads:kv_cache_bytes_full_equivalent",
]


# --- fixtures (one_thread_module: tests/conftest.py) -------------------------------------------------

@pytest.fixture(scope="module")
def engine(one_thread_module):
    # async decode, as on a GPU (tests/test_reliability.py serves the synchronous engine; tests/test_engine.py
    # checks that both give the same tokens)
    return build_engine(async_decode=True)


@pytest.fixture(scope="module")
def reference(engine):
    ids = engine.tokenizer(REF_PROMPT)["input_ids"]
    out_ids, text, finish = offline_greedy(engine, ids, REF_MAX_TOKENS)
    assert engine.usage().bytes_used == 0
    return {"prompt_ids": ids, "ids": out_ids, "text": text, "finish": finish}


@pytest.fixture(scope="module")
def served(engine, reference):
    srv = Served(create_app(engine, ServerSettings(served_model_names=NAMES, api_key=KEY)))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def busy_served(one_thread_module):
    """One window slot, at most one waiting request, no API key: the second queued request gets 429."""
    eng = build_engine(max_num_seqs=1)
    srv = Served(create_app(eng, ServerSettings(served_model_names=NAMES, api_key=None, max_waiting=1,
                                                retry_after_seconds=2)))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(served) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{served.base}/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(served):
    with httpx.Client(base_url=served.base, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as h:
        yield h


@pytest.fixture(scope="module")
def haystack_ids(engine) -> list[int]:
    text = "\n\n".join(p.read_text() for p in haystack_files())
    return engine.tokenizer(text, add_special_tokens=False)["input_ids"]


# --- the API through the official client -----------------------------------------------------------

def test_prefix_cache_through_the_api(served, client, http, haystack_ids):
    """A repeated prompt is served from the prefix cache with the same greedy text, and says so in
    usage.prompt_tokens_details.cached_tokens and the Prometheus counters; a reset empties the cache."""
    assert http.post("/reset_prefix_cache").status_code == 200
    before = scrape(served.base)
    prompt = haystack_ids[:600]
    cold = client.completions.create(model=NAMES[0], prompt=prompt, max_tokens=8, temperature=0)
    assert cold.usage.prompt_tokens_details.cached_tokens == 0
    warm = client.completions.create(model=NAMES[0], prompt=prompt, max_tokens=8, temperature=0)
    assert warm.choices[0].text == cold.choices[0].text
    assert warm.usage.prompt_tokens_details.cached_tokens == 592  # whole pages of 16 before the last token
    stream = client.completions.create(model=NAMES[0], prompt=prompt, max_tokens=8, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == cold.choices[0].text
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == 592
    m = wait_idle(served.base)
    assert m["rheads:prefix_cache_queries_total"] - before.get("rheads:prefix_cache_queries_total", 0) == 3 * 600
    assert m["rheads:prefix_cache_hits_total"] - before.get("rheads:prefix_cache_hits_total", 0) == 2 * 592
    assert m["rheads:prefix_cache_bytes_cached"] > 0
    assert http.post("/reset_prefix_cache").status_code == 200
    assert wait_idle(served.base)["rheads:prefix_cache_bytes_cached"] == 0
    again = client.completions.create(model=NAMES[0], prompt=prompt, max_tokens=8, temperature=0)
    assert again.usage.prompt_tokens_details.cached_tokens == 0 and again.choices[0].text == cold.choices[0].text


def test_models_lists_the_served_names(client, http):
    models = client.models.list()
    assert [m.id for m in models.data] == NAMES
    raw = http.get("/v1/models").json()
    assert raw["object"] == "list" and all(m["max_model_len"] == MAX_MODEL_LEN for m in raw["data"])


def test_greedy_completion_equals_the_engine(client, reference):
    out = client.completions.create(model=NAMES[0], prompt=REF_PROMPT, max_tokens=REF_MAX_TOKENS, temperature=0)
    choice = out.choices[0]
    assert choice.text == reference["text"]
    assert choice.finish_reason == reference["finish"]
    assert out.usage.prompt_tokens == len(reference["prompt_ids"])
    assert out.usage.completion_tokens == len(reference["ids"])
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    assert out.object == "text_completion" and out.model == NAMES[0]
    # the preset name is served too, and token-id prompts give the same result
    again = client.completions.create(model=PRESET, prompt=reference["prompt_ids"], max_tokens=REF_MAX_TOKENS,
                                      temperature=0)
    assert again.choices[0].text == reference["text"]


def test_streaming_completion_with_usage(client, reference):
    stream = client.completions.create(model=PRESET, prompt=REF_PROMPT, max_tokens=REF_MAX_TOKENS, temperature=0,
                                       stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == reference["text"]
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == reference["finish"] and set(finishes[:-1]) == {None}
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.prompt_tokens == len(reference["prompt_ids"])
    assert last.usage.completion_tokens == len(reference["ids"])
    assert all(c.usage is None for c in chunks[:-1])


def test_streaming_without_include_usage_has_no_usage_chunk(client):
    chunks = list(client.completions.create(model=PRESET, prompt="Hello", max_tokens=3, temperature=0,
                                            stream=True))
    assert chunks and all(c.choices and c.usage is None for c in chunks)


def test_max_tokens_gives_length_and_exact_count(client):
    out = client.completions.create(model=PRESET, prompt="Count: one, two, three,", max_tokens=7,
                                    temperature=0, extra_body={"ignore_eos": True})
    assert out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 7
    chat = client.chat.completions.create(model=PRESET, messages=[{"role": "user", "content": "Tell me a story."}],
                                          max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    assert chat.choices[0].finish_reason == "length" and chat.usage.completion_tokens == 5


def test_stop_string_truncates_before_the_stop(client, engine, reference):
    full, ids = reference["text"], reference["ids"]
    # a stop string that straddles a token boundary, so that its first half is produced a step early
    boundary = next(len(engine.tokenizer.decode(ids[:k])) for k in range(2, len(ids))
                    if len(engine.tokenizer.decode(ids[:k])) >= 3)
    stop = full[boundary - 2:boundary + 2]
    assert len(stop) == 4, (full, boundary)
    expected = full[:full.find(stop)]
    out = client.completions.create(model=PRESET, prompt=REF_PROMPT, max_tokens=REF_MAX_TOKENS, temperature=0,
                                    stop=[stop, "a stop that never comes"])
    assert out.choices[0].finish_reason == "stop"
    assert out.choices[0].text == expected
    stream = client.completions.create(model=PRESET, prompt=REF_PROMPT, max_tokens=REF_MAX_TOKENS, temperature=0,
                                       stop=stop, stream=True)
    chunks = [c for c in stream if c.choices]
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def _chat_prompt_tokens(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> int:
    """Tokens of the model's own chat template over these messages, with the assistant's turn opened
    (unless not)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_chat_streaming_and_not(client, engine):
    messages = [{"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": "What colour is the sky?"}]
    out = client.chat.completions.create(model=PRESET, messages=messages, max_tokens=12, temperature=0)
    message = out.choices[0].message
    assert message.role == "assistant" and message.content
    assert out.object == "chat.completion" and out.choices[0].finish_reason in ("stop", "length")
    assert out.usage.prompt_tokens == _chat_prompt_tokens(engine.tokenizer, messages) > 10
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    stream = client.chat.completions.create(model=PRESET, messages=messages, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == out.choices[0].finish_reason
    assert chunks[-1].choices == []
    streamed, plain = chunks[-1].usage.model_dump(), out.usage.model_dump()
    # the same prompt again: it finds the first request's whole pages in the prefix cache
    assert streamed.pop("prompt_tokens_details")["cached_tokens"] >= plain.pop("prompt_tokens_details")["cached_tokens"]
    assert streamed == plain


def test_chat_without_max_tokens_is_served(client):
    """max_tokens defaults to the room left; the cache here holds fewer tokens than max_model_len."""
    out = client.chat.completions.create(model=PRESET, messages=[{"role": "user", "content": "Say hi."}],
                                         temperature=0, stop=["\n", "."])
    assert out.choices[0].finish_reason == "stop"


class _Room:
    """What the serving classes ask the engine client about room: a fixed room per prompt length."""

    def __init__(self, total: int):
        self.total = total

    def output_room(self, num_prompt_tokens: int) -> int:
        return self.total - num_prompt_tokens


def _chat(**body) -> ChatCompletionRequest:
    return ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], **body)


@pytest.mark.parametrize("serving,body,prompt_tokens,limit,expected", [
    (OpenAIServingCompletion, CompletionRequest(prompt="x", max_tokens=7), 10, 50, 7),  # as asked (validation
    (OpenAIServingChat, _chat(max_tokens=7, max_completion_tokens=9), 10, 50, 9),     # refuses what cannot fit)
    (OpenAIServingCompletion, CompletionRequest(prompt="x"), 10, 50, 16),  # OpenAI's default for completions
    (OpenAIServingCompletion, CompletionRequest(prompt="x"), 95, 50, 5),  # ... within the room left
    (OpenAIServingCompletion, CompletionRequest(prompt="x"), 150, 50, 1),  # no room: refused by validation
    (OpenAIServingChat, _chat(), 10, 50, 50),  # chat: the room, within the server's limit
    (OpenAIServingChat, _chat(), 10, 500, 90),
])
def test_one_decision_of_the_output_room(serving, body, prompt_tokens, limit, expected):
    served = serving(client=_Room(100), tokenizer=None, served_model_names=NAMES, max_tokens_limit=limit,
                     max_choices=4, retry_after_seconds=1)
    assert served.max_tokens(body, prompt_tokens) == expected


def test_seeded_sampling_is_reproducible(client):
    args = dict(model=PRESET, prompt="Once upon a time", max_tokens=8, temperature=1.0, seed=1234,
                extra_body={"ignore_eos": True})
    first = client.completions.create(**args)
    second = client.completions.create(**args)
    assert first.choices[0].text == second.choices[0].text
    pair = client.completions.create(**{**args, "n": 2})
    again = client.completions.create(**{**args, "n": 2})
    assert [c.index for c in pair.choices] == [0, 1]
    assert [c.text for c in pair.choices] == [c.text for c in again.choices]
    assert pair.usage.completion_tokens == 16
    chat_args = dict(model=PRESET, messages=[{"role": "user", "content": "Name a fruit."}], max_tokens=6,
                     temperature=1.0, seed=7)
    assert client.chat.completions.create(**chat_args).choices[0].message.content == \
        client.chat.completions.create(**chat_args).choices[0].message.content


def test_completion_logprobs(client, reference):
    out = client.completions.create(model=PRESET, prompt=REF_PROMPT, max_tokens=6, temperature=0, logprobs=2)
    lp = out.choices[0].logprobs
    assert out.choices[0].text == reference["text"][:len(out.choices[0].text)]
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == out.usage.completion_tokens == 6
    assert "".join(lp.tokens) == out.choices[0].text
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(len(lp.tokens))]
    for chosen, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert logprob <= 0 and 1 <= len(top) <= 2
        assert max(top.values()) == pytest.approx(logprob, abs=1e-5)  # greedy takes the best token
    stream = client.completions.create(model=PRESET, prompt=REF_PROMPT, max_tokens=6, temperature=0, logprobs=2,
                                       stream=True)
    chunks = [c.choices[0].logprobs for c in stream]
    assert [t for c in chunks for t in c.tokens] == lp.tokens
    assert [o for c in chunks for o in c.text_offset] == lp.text_offset


def test_chat_logprobs(client):
    out = client.chat.completions.create(model=PRESET, messages=[{"role": "user", "content": "Hi!"}],
                                         max_tokens=5, temperature=0, logprobs=True, top_logprobs=3)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-5)
        assert entry.bytes == list(entry.token.encode())
    plain = client.chat.completions.create(model=PRESET, messages=[{"role": "user", "content": "Hi!"}],
                                           max_tokens=2, temperature=0)
    assert plain.choices[0].logprobs is None


def test_tokenize_detokenize_round_trip(http, engine):
    text = "Retrieval heads keep the whole history; the others keep a window."
    tok = http.post("/tokenize", json={"model": PRESET, "prompt": text, "add_special_tokens": False})
    assert tok.status_code == 200
    body = tok.json()
    assert body["tokens"] == engine.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == MAX_MODEL_LEN
    detok = http.post("/detokenize", json={"tokens": body["tokens"]})
    assert detok.status_code == 200 and detok.json()["prompt"] == text
    messages = [{"role": "user", "content": "hello"}]
    chat = http.post("/tokenize", json={"messages": messages}).json()
    assert chat["count"] == len(chat["tokens"]) == _chat_prompt_tokens(engine.tokenizer, messages) > 3
    unopened = http.post("/tokenize", json={"messages": messages, "add_generation_prompt": False}).json()
    assert unopened["count"] == _chat_prompt_tokens(engine.tokenizer, messages, False) < chat["count"]
    assert chat["tokens"][:unopened["count"]] == unopened["tokens"]  # the same, less the assistant's opening


def test_add_generation_prompt_is_honoured(client, engine):
    """As in vLLM: false leaves the assistant's turn unopened, so the prompt is the template without it."""
    messages = [{"role": "user", "content": "Name a colour."}]
    usage = {flag: client.chat.completions.create(model=PRESET, messages=messages, max_tokens=2, temperature=0,
                                                  extra_body={"add_generation_prompt": flag}).usage.prompt_tokens
             for flag in (True, False)}
    assert usage == {flag: _chat_prompt_tokens(engine.tokenizer, messages, flag) for flag in (True, False)}
    assert usage[False] < usage[True]


def test_a_long_tokenization_stalls_no_other_request(served, engine, monkeypatch):
    """Tokenizing runs beside the event loop: while one text prompt is being encoded (held here until
    released), /health answers and a token-id prompt is served to the end."""
    held_prompt = "a prompt whose encoding takes as long as the test says"
    entered, release = threading.Event(), threading.Event()
    encode = type(engine.tokenizer).__call__

    def slow_encode(self, text, *args, **kwargs):
        if text == held_prompt:
            entered.set()
            release.wait(30)
        return encode(self, text, *args, **kwargs)

    monkeypatch.setattr(type(engine.tokenizer), "__call__", slow_encode)
    headers = {"Authorization": f"Bearer {KEY}"}
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(httpx.post, f"{served.base}/v1/completions", headers=headers, timeout=60,
                           json={"prompt": held_prompt, "max_tokens": 2, "temperature": 0})
        assert entered.wait(30)
        try:
            assert httpx.get(f"{served.base}/health", timeout=5).status_code == 200
            other = httpx.post(f"{served.base}/v1/completions", headers=headers, timeout=5,
                               json={"prompt": [504, 3458, 314], "max_tokens": 2, "temperature": 0})
            assert other.status_code == 200 and other.json()["usage"]["completion_tokens"] == 2
            assert not slow.done()
        finally:
            release.set()
        assert slow.result().status_code == 200


def test_unknown_fields_are_ignored(http, client):
    """Served, and answered (greedily) as the same request without them is."""
    plain = {"prompt": "Hi", "max_tokens": 2, "temperature": 0}
    r = http.post("/v1/completions", json={**plain, "best_of_the_best": 3, "logit_bias_of_sorts": {"1": 5},
                                           "nonsense": {"a": [1]}})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1
    expected = http.post("/v1/completions", json=plain).json()
    assert r.json()["choices"] == expected["choices"] and r.json()["usage"] == expected["usage"]
    plain_chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "temperature": 0}
    r = http.post("/v1/chat/completions", json={**plain_chat, "tools_or_not": True,
                                                "messages": [{"role": "user", "content": "Hi", "name": "bob"}]})
    assert r.status_code == 200, r.text
    assert r.json()["choices"] == http.post("/v1/chat/completions", json=plain_chat).json()["choices"]
    out = client.completions.create(model=PRESET, prompt="Hi", max_tokens=2, temperature=0,
                                    extra_body={"whatever": 1})
    assert out.choices and out.choices[0].text == expected["choices"][0]["text"]


def test_penalties_bias_and_min_tokens_are_served(http, client):
    """The official client's logit_bias, penalties and (vLLM's) min_tokens reach the sampler."""
    forced = client.completions.create(model=PRESET, prompt="Hi", max_tokens=3, temperature=0,
                                       logit_bias={"504": 100})
    assert forced.choices[0].text == http.post("/detokenize", json={"tokens": [504] * 3}).json()["prompt"]
    eos = http.post("/tokenize", json={"prompt": "<|im_end|>", "add_special_tokens": False}).json()["tokens"]
    held = client.completions.create(model=PRESET, prompt="Hi", max_tokens=8, temperature=0,
                                     logit_bias={str(eos[0]): 100}, extra_body={"min_tokens": 3})
    assert held.choices[0].finish_reason == "stop" and held.usage.completion_tokens == 4
    penalized = client.chat.completions.create(model=PRESET, messages=[{"role": "user", "content": "Count to 30"}],
                                               max_tokens=12, temperature=0, presence_penalty=2, frequency_penalty=2,
                                               extra_body={"repetition_penalty": 1.5})
    assert penalized.choices[0].finish_reason in ("stop", "length") and penalized.usage.completion_tokens >= 1


def test_tools_for_a_template_without_them_are_400(http):
    """SmolLM2's own chat template takes no tools (tests/test_structured.py serves it with one that does)."""
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "tools": [tool]}
    error = assert_error(http.post("/v1/chat/completions", json=body), 400, "BadRequestError", "tools")
    assert "chat template" in error["message"]
    assert http.post("/v1/chat/completions", json={**body, "tool_choice": "none"}).status_code == 200


def test_the_openapi_schema_documents_what_the_server_answers(http):
    """Errors in OpenAI's shape under their real statuses (no FastAPI 422), /metrics as Prometheus text,
    /health and /reset_prefix_cache with empty bodies."""
    schema = http.get("/openapi.json").json()
    paths, error_ref = schema["paths"], "#/components/schemas/ErrorResponse"
    for path in ("/v1/completions", "/v1/chat/completions"):
        responses = paths[path]["post"]["responses"]
        assert "422" not in responses
        for status in ("400", "401", "404", "413", "429", "503"):
            assert responses[status]["content"]["application/json"]["schema"]["$ref"] == error_ref, (path, status)
        assert set(responses["200"]["content"]) == {"application/json", "text/event-stream"}
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    assert set(paths["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
    for path, method in (("/health", "get"), ("/reset_prefix_cache", "post")):
        assert not paths[path][method]["responses"]["200"].get("content"), path
    bad = http.post("/v1/completions", json={"prompt": "Hi", "temperature": -1})
    error_model = schema["components"]["schemas"]["ErrorResponse"]
    assert bad.status_code == 400 and set(bad.json()) == set(error_model["properties"])


# --- errors ------------------------------------------------------------------------------------------

INVALID = [
    ("/v1/completions", {"prompt": "Hi", "temperature": -1}, "temperature"),
    ("/v1/completions", {"prompt": "Hi", "temperature": 3}, "temperature"),
    ("/v1/completions", {"prompt": "Hi", "temperature": "hot"}, "temperature"),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": "ten"}, "max_tokens"),
    ("/v1/completions", {"prompt": "Hi", "top_p": 2}, "top_p"),
    ("/v1/completions", {"prompt": "Hi", "top_p": 0}, "top_p"),
    ("/v1/completions", {"prompt": "Hi", "n": 0}, "n"),
    ("/v1/completions", {"prompt": "Hi", "n": 1000}, "n"),
    ("/v1/completions", {"prompt": "Hi", "stream": "maybe"}, "stream"),
    ("/v1/completions", {"prompt": "Hi", "seed": -1}, "seed"),
    ("/v1/completions", {"prompt": "Hi", "logprobs": 21}, "logprobs"),
    ("/v1/completions", {"prompt": "Hi", "stop": [""]}, "stop"),
    ("/v1/completions", {"prompt": "Hi", "presence_penalty": 2.5}, "presence_penalty"),
    ("/v1/completions", {"prompt": "Hi", "frequency_penalty": -3}, "frequency_penalty"),
    ("/v1/completions", {"prompt": "Hi", "repetition_penalty": 0}, "repetition_penalty"),
    ("/v1/completions", {"prompt": "Hi", "repetition_penalty": 5e-324}, "repetition_penalty"),  # would overflow
    ("/v1/completions", {"prompt": "Hi", "min_tokens": -1}, "min_tokens"),
    ("/v1/completions", {"prompt": "Hi", "min_tokens": 5, "max_tokens": 2}, None),  # None: a check across fields
    ("/v1/completions", {"prompt": "Hi", "logit_bias": {"x": 1}}, "logit_bias"),
    ("/v1/completions", {"prompt": "Hi", "logit_bias": {"5": 101}}, "logit_bias"),
    ("/v1/completions", {"prompt": "Hi", "logit_bias": {"99999999": 1}}, "logit_bias"),
    ("/v1/completions", {"prompt": "Hi", "echo": True, "logprobs": 1}, "echo"),
    ("/v1/completions", {"prompt": "Hi", "suffix": "end"}, "suffix"),
    ("/v1/completions", {"prompt": 5}, "prompt"),
    ("/v1/completions", {"prompt": [1, "a"]}, "prompt"),
    ("/v1/completions", {"prompt": []}, "prompt"),
    ("/v1/completions", {"prompt": ""}, "prompt"),
    ("/v1/completions", {"prompt": [[]]}, "prompt"),
    ("/v1/completions", {"prompt": [10**9]}, "prompt"),
    ("/v1/completions", {"prompt": [-3, 5]}, "prompt"),
    ("/v1/completions", {"max_tokens": 5}, "prompt"),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 10**6}, "max_tokens"),
    ("/v1/chat/completions", {"max_tokens": 5}, "messages"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": "hello"}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ("/v1/chat/completions", {"messages": [{"content": "hi"}]}, "messages.0.role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, "temperature"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 21}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0},
     "max_completion_tokens"),
    ("/tokenize", {}, None),
    ("/tokenize", {"messages": []}, "messages"),
    ("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, None),
    ("/detokenize", {"tokens": [-1]}, "tokens"),
    ("/detokenize", {"tokens": [10**9]}, "tokens"),
    ("/detokenize", {"tokens": "abc"}, "tokens"),
]


@pytest.mark.parametrize("path,body,param", INVALID, ids=[f"{p}:{json.dumps(b)[:60]}" for p, b, _ in INVALID])
def test_invalid_fields_are_400(http, path, body, param):
    error = assert_error(http.post(path, json=body), 400, "BadRequestError")
    assert error["param"] == param or (param is not None and str(error["param"]).startswith(param + ".")), error


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/tokenize"])
@pytest.mark.parametrize("raw", [b'{"prompt": "Hi", ', b"not json at all", b"[1, 2, 3]", b'"just a string"', b""])
def test_malformed_bodies_are_400(http, path, raw):
    assert_error(http.post(path, content=raw, headers={"Content-Type": "application/json"}), 400,
                 "BadRequestError")


def test_invalid_through_the_client(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=PRESET, prompt="Hi", temperature=-1)
    assert caught.value.status_code == 400 and caught.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=PRESET, messages=[{"role": "user", "content": "x"}], n=0)


def test_prompt_longer_than_max_model_len_is_400(http, client, haystack_ids):
    n = MAX_MODEL_LEN + 52
    prompt = (haystack_ids * 2)[:n]
    error = assert_error(http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 4}), 400,
                         "BadRequestError", "prompt")
    assert str(MAX_MODEL_LEN) in error["message"] and str(n) in error["message"], error
    text = http.post("/detokenize", json={"tokens": prompt}).json()["prompt"]
    size = http.post("/tokenize", json={"messages": [{"role": "user", "content": text}]}).json()["count"]
    assert size > MAX_MODEL_LEN
    error = assert_error(http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": text}]}),
                         400, "BadRequestError", "messages")
    assert str(MAX_MODEL_LEN) in error["message"] and str(size) in error["message"], error
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=PRESET, prompt=prompt, max_tokens=4)
    assert str(MAX_MODEL_LEN) in caught.value.body["message"]
    # a short prompt whose max_tokens overflows the context is refused the same way
    error = assert_error(http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": MAX_MODEL_LEN}), 400)
    assert str(MAX_MODEL_LEN) in error["message"]


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                                     {"Authorization": f"Basic {KEY}"}])
@pytest.mark.parametrize("method,path", [("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
                                         ("GET", "/v1/models"), ("POST", "/tokenize"), ("POST", "/detokenize")])
def test_missing_or_wrong_key_is_401(served, headers, method, path):
    body = {"prompt": "Hi", "messages": [{"role": "user", "content": "hi"}], "tokens": [1], "max_tokens": 1}
    r = httpx.request(method, served.base + path, json=body if method == "POST" else None, headers=headers,
                      timeout=30)
    assert_error(r, 401, "AuthenticationError")


def test_wrong_key_through_the_client_and_open_endpoints(served):
    bad = openai.OpenAI(base_url=f"{served.base}/v1", api_key="nope", max_retries=0, timeout=60)
    with pytest.raises(openai.AuthenticationError) as caught:
        bad.completions.create(model=PRESET, prompt="Hi", max_tokens=1)
    assert caught.value.status_code == 401
    assert httpx.get(f"{served.base}/health").status_code == 200
    assert httpx.get(f"{served.base}/metrics").status_code == 200


def test_unknown_model_is_404(client, http):
    with pytest.raises(openai.NotFoundError) as caught:
        client.completions.create(model="gpt-17", prompt="Hi", max_tokens=1)
    assert caught.value.status_code == 404 and "gpt-17" in caught.value.body["message"]
    for path, body in [("/v1/completions", {"model": "gpt-17", "prompt": "Hi"}),
                       ("/v1/chat/completions", {"model": "gpt-17", "messages": [{"role": "user", "content": "x"}]}),
                       ("/tokenize", {"model": "gpt-17", "prompt": "x"})]:
        assert_error(http.post(path, json=body), 404, "NotFoundError", "model")
    assert_error(http.get("/v1/no-such-route"), 404, "NotFoundError")
    assert_error(http.get("/v1/completions"), 405)


ODD_BUT_VALID = [
    {"prompt": "Hi", "temperature": 1e-40},  # tiny temperatures used to overflow to nan and fail the batch
    {"prompt": "Hi", "temperature": 2.0, "top_p": 1e-300, "top_k": 1},
    {"prompt": "Hi", "top_k": 10**6},
    {"prompt": "Hi", "top_k": 0},
    {"prompt": "Hi", "stop_token_ids": [10**30, -5]},
    {"prompt": "Hi", "seed": 2**63 - 1, "n": 2},
    {"prompt": "Hi", "seed": 0, "logprobs": 20, "n": 2},
    {"prompt": "Hi", "logprobs": 0},
    {"prompt": [[1, 2], [3]], "n": 2},
    {"prompt": ["a", "b"]},
    {"prompt": "Hi", "echo": True},
    {"prompt": "😀 naïve café " * 3},
    {"prompt": "Hi", "stop": "x" * 256},
    {"prompt": "Hi", "stream_options": {"include_usage": True}},
    {"prompt": "Hi", "user": "someone", "model": None},
]


@pytest.mark.parametrize("body", ODD_BUT_VALID, ids=[json.dumps(b)[:60] for b in ODD_BUT_VALID])
def test_odd_but_valid_inputs_are_served(http, body):
    r = http.post("/v1/completions", json={"max_tokens": 2, **body})
    assert r.status_code == 200, r.text
    prompts = len(body["prompt"]) if isinstance(body["prompt"], list) else 1
    assert len(r.json()["choices"]) == prompts * body.get("n", 1)


ODD_CHAT = [
    [{"role": "assistant", "content": "I start."}],
    [{"role": "tool", "content": "42"}, {"role": "user", "content": None}],
    [{"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}],
    [{"role": "developer", "content": "Be terse."}, {"role": "user", "content": ""}],
]


@pytest.mark.parametrize("messages", ODD_CHAT, ids=[json.dumps(m)[:60] for m in ODD_CHAT])
def test_odd_chats_are_served(http, messages):
    r = http.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200, r.text


FUZZ_VALUES = [None, 0, 1, -1, 2, 0.5, 1e-300, 1e300, -1e-300, 2**63, 2**64, -2**63, 10**30, "", "x", "😀", [], [0],
               [-1], [""], ["a"], {}, {"include_usage": True}, {"a": 1}, True, False, [[1]], [[]], [1, 2**40], "\x00",
               49151, 49152, float(2**31), [{"role": "user"}], [{"role": "user", "content": [{"type": "image"}]}]]
FUZZ_FIELDS = ["prompt", "max_tokens", "temperature", "top_p", "top_k", "n", "stop", "stop_token_ids", "seed", "stream",
               "stream_options", "ignore_eos", "logprobs", "echo", "suffix", "model", "user", "presence_penalty",
               "frequency_penalty", "repetition_penalty", "min_tokens", "logit_bias",
               "messages", "max_completion_tokens", "top_logprobs", "tokens", "add_special_tokens"]


def test_random_inputs_never_500(http):
    """A seeded sweep of odd field values over every POST endpoint: 200 or a 4xx in OpenAI's shape."""
    rng = random.Random(0)
    for _ in range(150):
        path = rng.choice(["/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"])
        body = {"prompt": "Hi", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "tokens": [1, 2]}
        for name in rng.sample(FUZZ_FIELDS, rng.randint(1, 4)):
            body[name] = rng.choice(FUZZ_VALUES)
        for name in ("max_tokens", "max_completion_tokens"):  # keep the generations short
            if isinstance(body.get(name), int) and body[name] > 2:
                body[name] = 2
        if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
            body["max_completion_tokens"] = 2  # chat's default would be the whole room left
        r = http.post(path, json=body)
        assert r.status_code < 500, (path, body, r.text)
        if r.status_code != 200:
            assert_error(r, r.status_code)


def test_queue_full_is_429_with_retry_after(busy_served):
    base = busy_served.base
    long = {"prompt": "Once upon a time", "max_tokens": 1500, "ignore_eos": True, "temperature": 0, "stream": True}
    with httpx.Client(base_url=base, timeout=60) as h:
        with h.stream("POST", "/v1/completions", json=long) as running:
            assert running.status_code == 200
            events = sse_events(running)  # kept: a dropped generator would close the connection
            next(events)  # the first token: this request holds the only window slot
            with h.stream("POST", "/v1/completions", json=long) as queued:
                assert queued.status_code == 200  # accepted, waiting for the slot
                deadline = time.monotonic() + 10  # the gauges follow the engine's next step
                while (m := scrape(base))["rheads:num_requests_waiting"] != 1 and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert m["rheads:num_requests_running"] == 1 and m["rheads:num_requests_waiting"] == 1
                refused = h.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1})
                assert_error(refused, 429, "RateLimitError")
                assert refused.headers["retry-after"] == "2"
                chat = h.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                            "stream": True})
                assert_error(chat, 429, "RateLimitError")
                c = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)
                with pytest.raises(openai.RateLimitError) as caught:
                    c.completions.create(model=PRESET, prompt="Hi", max_tokens=1)
                assert caught.value.response.headers["retry-after"] == "2"
    wait_idle(base)  # both disconnected requests (running and waiting) were aborted
    ok = httpx.post(f"{base}/v1/completions", json={"prompt": "Hi", "max_tokens": 1}, timeout=60)
    assert ok.status_code == 200  # no key on this server, and room again


# --- disconnects, metrics ------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_disconnect_mid_stream_frees_the_request(served, path):
    body = {"max_tokens": 1500, "ignore_eos": True, "temperature": 0, "stream": True,
            "prompt": "Write a very long story.", "messages": [{"role": "user", "content": "A long story."}]}
    with httpx.Client(base_url=served.base, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as h:
        with h.stream("POST", path, json=body) as r:
            assert r.status_code == 200
            events = sse_events(r)
            for _ in range(3):
                next(events)
            m = scrape(served.base)
            assert m["rheads:num_requests_running"] == 1 and m["rheads:kv_cache_bytes_used"] > 0
    m = wait_idle(served.base)
    assert m["rheads:kv_cache_usage_perc"] == 0


def test_metrics_and_the_kv_saving_while_running(served, client, haystack_ids):
    client.completions.create(model=PRESET, prompt="Hi", max_tokens=3, temperature=0)
    m = scrape(served.base)
    for name in METRIC_NAMES:
        assert name in m, name
    assert m["rheads:prompt_tokens_total"] > 0 and m["rheads:generation_tokens_total"] >= 3
    for histogram in ("time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds"):
        assert m[f"rheads:{histogram}_count"] > 0 and m[f"rheads:{histogram}_sum"] > 0
    assert m["rheads:kv_cache_bytes_used"] == 0
    prompt = haystack_ids[:600]  # longer than sink + window (64 + 256): the streaming heads are capped
    body = {"prompt": prompt, "max_tokens": 1000, "ignore_eos": True, "temperature": 0, "stream": True}
    with httpx.Client(base_url=served.base, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as h:
        with h.stream("POST", "/v1/completions", json=body) as r:
            events = sse_events(r)
            for _ in range(2):
                next(events)
            running = scrape(served.base)
    assert running["rheads:num_requests_running"] == 1 and running["rheads:num_requests_waiting"] == 0
    used, full = running["rheads:kv_cache_bytes_used"], running["rheads:kv_cache_bytes_full_equivalent"]
    assert 0 < used < full, (used, full)
    assert 0 < running["rheads:kv_cache_usage_perc"] < 1
    after = wait_idle(served.base)
    assert after["rheads:kv_cache_bytes_full_equivalent"] == 0
    assert after["rheads:prompt_tokens_total"] == m["rheads:prompt_tokens_total"] + 600  # nothing else ran between
    steps = {(s.name, s.labels["kind"]): s.value
             for f in text_string_to_metric_families(httpx.get(f"{served.base}/metrics", timeout=10).text)
             for s in f.samples if s.name.startswith("rheads:engine_step_") and "le" not in s.labels}
    # the 600-token prompt's prefill steps, then one decode step per further token, each timed
    assert steps["rheads:engine_step_seconds_count", "mixed"] >= 1
    assert steps["rheads:engine_step_seconds_count", "decode"] >= 2
    assert steps["rheads:engine_step_seconds_sum", "decode"] > 0
    assert steps["rheads:engine_step_sequences_total", "decode"] >= 2
    assert steps["rheads:engine_step_kv_bytes_total", "decode"] > 0


# --- the command line --------------------------------------------------------------------------------

def test_cli_serve_help():
    r = subprocess.run([sys.executable, "-m", "rheads.cli", "serve", "--help"], capture_output=True, text=True,
                       timeout=120, cwd=REPO)
    assert r.returncode == 0, r.stderr
    for flag in ("--budget", "--profile", "--api-key", "--kv-cache-memory", "--max-waiting"):
        assert flag in r.stdout


def test_cli_serve_refuses_a_memory_fraction_on_a_cpu():
    r = subprocess.run([sys.executable, "-m", "rheads.cli", "serve", PRESET, "--device", "cpu", "--kv-cache-memory",
                        "0.5", "--port", str(free_port())], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode != 0 and "needs a GPU" in r.stderr, r.stderr[-2000:]


def _serve_with_profile(profile: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "rheads.cli", "serve", PRESET, "--profile", str(profile),
                           "--port", str(free_port()), "--kv-cache-memory", "64MiB", "--device", "cpu"],
                          capture_output=True, text=True, timeout=240, cwd=REPO, env=env)


def test_cli_serve_refuses_another_models_profile():
    r = _serve_with_profile(OTHER_PROFILE)
    assert r.returncode != 0
    assert "rheads profile" in r.stderr and "num_attention_heads" in r.stderr, r.stderr[-2000:]
    assert "Uvicorn running" not in r.stderr


@pytest.mark.parametrize("content", ['{"format_version": 1, "model": ', "not json at all", '{"format_version": 9}'])
def test_cli_serve_refuses_a_corrupt_profile(tmp_path, content):
    broken = tmp_path / "broken.json"
    broken.write_text(content)
    r = _serve_with_profile(broken)
    assert r.returncode != 0
    assert "not a valid rheads profile" in r.stderr and "rheads profile" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and "Uvicorn running" not in r.stderr
