"""Structured outputs and tool calls, end to end: the official `openai` client against a real uvicorn serving
the SmolLM2 preset with rheads' Hermes tool template (SmolLM2's own template takes no tools).

Greedy decoding throughout; the grammar decides the shape, so a tiny model's answers still always parse.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from serving import NAMES, PRESET, Served, assert_error, build_engine, wait_idle  # tests/serving.py

from rheads.cli import chat_template_text
from server.app import ServerSettings, create_app

SCHEMAS = {
    "required fields": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                         "population": {"type": "integer", "minimum": 0,
                                                                        "maximum": 10**7}},
                        "required": ["city", "population"], "additionalProperties": False},
    "enum": {"type": "object", "properties": {"mood": {"enum": ["happy", "sad", "calm"]}}, "required": ["mood"],
             "additionalProperties": False},
    "array": {"type": "object", "properties": {"colours": {"type": "array", "minItems": 1, "maxItems": 3,
                                                           "items": {"enum": ["red", "green", "blue"]}}},
              "required": ["colours"], "additionalProperties": False},
    "nested": {"type": "object", "properties": {"person": {
        "type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                         "age": {"type": "integer", "minimum": 0, "maximum": 120}},
        "required": ["name", "age"], "additionalProperties": False}},
        "required": ["person"], "additionalProperties": False},
}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string", "maxLength": 16}},
                                                "required": ["city"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "The time in a time zone",
                                         "parameters": {"type": "object", "properties": {
                                             "zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
                                             "additionalProperties": False}}}


@pytest.fixture(scope="module")
def served(one_thread_module):
    engine = build_engine(async_decode=True)
    srv = Served(create_app(engine, ServerSettings(served_model_names=NAMES,
                                                   chat_template=chat_template_text("hermes_tools"))))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"{served.base}/v1", api_key="unused", max_retries=0, timeout=120)


def conforms(value, schema: dict) -> bool:
    """A small JSON-schema check for the keywords these tests use (jsonschema is not a dependency)."""
    if "enum" in schema:
        return value in schema["enum"]
    kind = schema.get("type")
    if kind == "object":
        props = schema.get("properties", {})
        return (isinstance(value, dict) and set(schema.get("required", [])) <= set(value)
                and (schema.get("additionalProperties", True) or set(value) <= set(props))
                and all(conforms(v, props[k]) for k, v in value.items() if k in props))
    if kind == "array":
        return (isinstance(value, list) and schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", 1e9)
                and all(conforms(v, schema["items"]) for v in value))
    if kind == "string":
        return isinstance(value, str) and len(value) <= schema.get("maxLength", 1e9)
    if kind == "integer":
        return isinstance(value, int) and schema.get("minimum", -1e18) <= value <= schema.get("maximum", 1e18)
    return True


def ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def schema_answer(client, name: str, stream: bool) -> tuple[str, str]:
    """(content, finish_reason) of a greedy chat answer in SCHEMAS[name]'s shape."""
    response_format = {"type": "json_schema", "json_schema": {"name": name.replace(" ", "_"), "strict": True,
                                                              "schema": SCHEMAS[name]}}
    answer = client.chat.completions.create(model=PRESET, messages=ask(f"Describe something ({name}) in JSON."),
                                            max_tokens=48, temperature=0, response_format=response_format,
                                            stream=stream)
    if not stream:
        return answer.choices[0].message.content, answer.choices[0].finish_reason
    chunks = list(answer)
    return "".join(c.choices[0].delta.content or "" for c in chunks), chunks[-1].choices[0].finish_reason


def test_json_schema_answers_parse_and_validate(client):
    """Every schema, streamed and not, in one batch (the engine serves them together)."""
    asks = [(name, stream) for name in SCHEMAS for stream in (False, True)]
    with ThreadPoolExecutor(len(asks)) as pool:
        answers = dict(zip(asks, pool.map(lambda a: schema_answer(client, *a), asks)))
    for (name, stream), (content, finish) in answers.items():
        assert finish == "stop", (name, content)
        assert conforms(json.loads(content), SCHEMAS[name]), (name, content)
        assert content == answers[name, False][0]  # greedy: streamed as answered whole


def test_json_object_mode_and_completions(client):
    answer = client.chat.completions.create(model=PRESET, messages=ask("Give me an empty JSON object."),
                                            max_tokens=32, temperature=0, response_format={"type": "json_object"})
    if answer.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(answer.choices[0].message.content), dict)
    else:  # a free-form object may run past the limit; what came is still an object's start
        assert answer.choices[0].message.content.startswith("{")
    schema = SCHEMAS["enum"]
    completion = client.completions.create(model=PRESET, prompt="My mood today, as JSON:", max_tokens=24,
                                           temperature=0, extra_body={"guided_json": schema})
    assert conforms(json.loads(completion.choices[0].text), schema)


def test_guided_choice_and_regex(client):
    choice = client.chat.completions.create(model=PRESET, messages=ask("Is water wet?"), max_tokens=8, temperature=0,
                                            extra_body={"guided_choice": ["yes", "no", "maybe"]})
    assert choice.choices[0].message.content in ("yes", "no", "maybe")
    assert choice.choices[0].finish_reason == "stop"
    regex = client.completions.create(model=PRESET, prompt="A date: ", max_tokens=16, temperature=0, n=2, seed=3,
                                      extra_body={"guided_regex": r"20[0-9]{2}-[01][0-9]-[0-3][0-9]"})
    for c in regex.choices:
        assert len(c.text) == 10 and c.text.startswith("20") and c.text[4] == "-" and c.finish_reason == "stop"


def tool_arguments(call) -> dict:
    assert call.type == "function" and call.id
    return json.loads(call.function.arguments)


def test_agent_loop_with_a_named_tool(client, served):
    messages = ask("What is the weather in Paris?")
    first = client.chat.completions.create(model=PRESET, messages=messages, max_tokens=48, temperature=0,
                                           tools=[WEATHER, TIME],
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather" and isinstance(tool_arguments(call)["city"], str)
    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature_c": 21})}]
    final = client.chat.completions.create(model=PRESET, messages=messages, max_tokens=24, temperature=0,
                                           tools=[WEATHER, TIME], tool_choice="none")
    assert final.choices[0].finish_reason in ("stop", "length") and final.choices[0].message.content
    assert not final.choices[0].message.tool_calls
    wait_idle(served.base)


def streamed_calls(chunks) -> list[dict]:
    """The tool calls a stream's deltas add up to, checked to be in OpenAI's shape: a call's first delta
    carries its index (0, 1, .. in turn), id, type and name, later ones argument fragments of that index."""
    calls = []
    for delta in (d for c in chunks for d in c.choices[0].delta.tool_calls or []):
        if delta.id is not None:
            assert delta.index == len(calls) and delta.type == "function" and delta.function.name
            calls.append({"id": delta.id, "name": delta.function.name, "arguments": [delta.function.arguments or ""]})
        else:
            assert delta.index == len(calls) - 1 and delta.function.name is None and delta.function.arguments
            calls[-1]["arguments"].append(delta.function.arguments)
    return calls


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_tool_calls_stream_incrementally(client, choice):
    """A forced call streamed beside the same request answered whole (one batch, greedy): the call's
    argument fragments come in several chunks and join to the whole answer's arguments exactly."""
    kwargs = dict(model=PRESET, messages=ask("What is the weather in Paris? And the time in UTC?"), max_tokens=64,
                  temperature=0, tools=[WEATHER, TIME], tool_choice=choice, parallel_tool_calls=False)
    with ThreadPoolExecutor(2) as pool:
        streaming = pool.submit(lambda: list(client.chat.completions.create(**kwargs, stream=True)))
        whole = client.chat.completions.create(**kwargs).choices[0]
        chunks = streaming.result()
    assert whole.finish_reason == "tool_calls" and len(whole.message.tool_calls) == 1
    calls = streamed_calls(chunks)
    assert [(c["name"], "".join(c["arguments"])) for c in calls] == [
        (c.function.name, c.function.arguments) for c in whole.message.tool_calls]
    tool_arguments(whole.message.tool_calls[0])  # forced by the grammar: valid JSON
    assert sum(map(bool, calls[0]["arguments"])) >= 3, calls  # streamed as written, not whole at the end
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert all("<tool_call>" not in (c.choices[0].delta.content or "") for c in chunks)


BAD = [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "bad name!", "schema": {}}}},
     "response_format.json_schema.name"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"guided_regex": "a("}, "guided_regex"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objectx"}}}]},
     "tools.0.function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "no spaces"}}]}, "tools.0.function.name"),
    ({"tools": [{"type": "retrieval"}]}, "tools.0.type"),
    ({"tools": [WEATHER, WEATHER]}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "required", "guided_regex": "a"}, "tool_choice"),
    ({"messages": [{"role": "user", "content": "hi", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]}, "messages.0"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                                                         "function": {"name": "f", "arguments": "[1]"}}]}]},
     "messages.0.tool_calls.0.function.arguments"),
]


@pytest.mark.parametrize("extra, param", BAD, ids=[p for _, p in BAD])
def test_bad_schemas_and_tools_are_400_naming_the_field(served, extra, param):
    body = {"model": PRESET, "messages": ask("hi"), "max_tokens": 4, **extra}
    assert_error(httpx.post(f"{served.base}/v1/chat/completions", json=body, timeout=30), 400, "BadRequestError",
                 param)


ODD = [  # valid but unusual uses of tools, on a template that takes them: served, never a 5xx
    {"tools": [{"type": "function", "function": {"name": "ping"}}], "tool_choice": "required"},  # no parameters
    {"tools": [WEATHER, TIME], "tool_choice": {"type": "function", "function": {"name": "get_time"}}, "n": 2,
     "stream": True},
    {"tools": [WEATHER], "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None,
     "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
     {"role": "tool", "content": [{"type": "text", "text": "sunny"}]}]},  # no tool_call_id
    {"tools": [WEATHER], "tool_choice": "auto", "response_format": {"type": "json_object"}},
    {"tools": [WEATHER], "tool_choice": "none", "guided_choice": ["a", "b"]},
]


@pytest.mark.parametrize("extra", ODD)
def test_odd_tool_requests_are_served(served, extra):
    body = {"model": PRESET, "messages": ask("hi"), "max_tokens": 3, **extra}
    response = httpx.post(f"{served.base}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
