"""Tool calls streamed over HTTP in each family's format: the official `openai` client against a real uvicorn
serving the SmolLM2 preset with a chat template that asks for Mistral's (JSON list, and v11's
`[TOOL_CALLS]name[ARGS]{..}`) or Llama 3's calls (test_structured.py serves the Hermes one). SmolLM2 knows
none of them, so the calls are forced by the tools' grammar, and the model fills in the arguments.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from serving import NAMES, PRESET, Served, build_engine, wait_idle  # tests/serving.py
from test_structured import TIME, WEATHER, ask, streamed_calls

from server.app import ServerSettings, create_app

CHATML = ("{%- for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + (m['content'] or '') + '<|im_end|>\\n' }}"
          "{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}")
TEMPLATES = {  # each: the tools in the system turn, the format the template's own text shows
    "mistral": "{%- if tools %}{{ '<|im_start|>system\\n[AVAILABLE_TOOLS]' + (tools | tojson) + '[/AVAILABLE_TOOLS]"
               " Answer [TOOL_CALLS][{\"name\": .., \"arguments\": {..}}]<|im_end|>\\n' }}{%- endif %}" + CHATML,
    "mistral_v11": "{%- if tools %}{{ '<|im_start|>system\\n[AVAILABLE_TOOLS]' + (tools | tojson) + "
                   "'[/AVAILABLE_TOOLS] Answer [TOOL_CALLS]name[ARGS]{arguments}<|im_end|>\\n' }}{%- endif %}" + CHATML,
    "llama3_json": "{%- if tools %}{{ '<|im_start|>ipython\\n' + (tools | tojson) + ' Answer <|python_tag|>"
                   "{\"name\": .., \"parameters\": {..}}<|im_end|>\\n' }}{%- endif %}" + CHATML,
}


@pytest.fixture(scope="module", params=list(TEMPLATES))
def served(request, one_thread_module):
    srv = Served(create_app(build_engine(async_decode=True),
                            ServerSettings(served_model_names=NAMES, chat_template=TEMPLATES[request.param])))
    yield request.param, srv
    srv.stop()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"{served[1].base}/v1", api_key="unused", max_retries=0, timeout=120)


MARKERS = ("[TOOL_CALLS]", "[ARGS]", "<|python_tag|>", '"name"')


@pytest.mark.parametrize("choice, parallel", [({"type": "function", "function": {"name": "get_weather"}}, False),
                                              ("required", True)])
def test_forced_calls_stream_in_every_format(served, client, choice, parallel):
    """Streamed beside the same request answered whole (one batch, greedy): the same calls, in OpenAI's
    delta shape, each call's arguments in fragments that join to the whole answer's exactly."""
    kwargs = dict(model=PRESET, messages=ask("What is the weather in Paris, and the time in UTC?"), max_tokens=80,
                  temperature=0, tools=[WEATHER, TIME], tool_choice=choice, parallel_tool_calls=parallel)
    with ThreadPoolExecutor(2) as pool:
        streaming = pool.submit(lambda: list(client.chat.completions.create(**kwargs, stream=True)))
        whole = client.chat.completions.create(**kwargs).choices[0]
        chunks = streaming.result()
    assert whole.finish_reason == "tool_calls" and whole.message.tool_calls, whole
    calls = streamed_calls(chunks)
    assert [(c["name"], "".join(c["arguments"])) for c in calls] == [
        (c.function.name, c.function.arguments) for c in whole.message.tool_calls]
    for call in whole.message.tool_calls:
        assert call.function.name in ("get_weather", "get_time") and call.id.startswith("call_")
        assert isinstance(json.loads(call.function.arguments), dict)  # the grammar's: valid JSON
    if isinstance(choice, dict):
        assert [c.function.name for c in whole.message.tool_calls] == ["get_weather"]
    assert sum(map(bool, calls[0]["arguments"])) >= 3, calls  # streamed as written, not whole at the end
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert not any(marker in content for marker in MARKERS) and not (whole.message.content or "").strip()
    wait_idle(served[1].base)


def test_round_trip_with_the_tool_result(served, client):
    """The streamed call goes back with its result, as an agent loop sends it, and the model answers."""
    messages = ask("What is the weather in Paris?")
    chunks = list(client.chat.completions.create(
        model=PRESET, messages=messages, max_tokens=48, temperature=0, tools=[WEATHER], stream=True,
        tool_choice={"type": "function", "function": {"name": "get_weather"}}))
    (call,) = streamed_calls(chunks)
    messages += [{"role": "assistant", "content": None, "tool_calls": [{
        "id": call["id"], "type": "function",
        "function": {"name": call["name"], "arguments": "".join(call["arguments"])}}]},
        {"role": "tool", "tool_call_id": call["id"], "content": json.dumps({"temperature_c": 21})}]
    final = client.chat.completions.create(model=PRESET, messages=messages, max_tokens=8, temperature=0,
                                           tools=[WEATHER])
    assert final.choices[0].finish_reason in ("stop", "length", "tool_calls")
