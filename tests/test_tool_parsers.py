"""The tool-call parsers on literal model outputs of each family, whole and streamed piece by piece, the
families' detection from chat templates, and their forcing grammars."""

from __future__ import annotations

import json

import llguidance.hf
import pytest
from transformers import AutoTokenizer

from rheads.models import resolve_model

from server.structured import lark_grammar
from server.tools import FAMILIES, ToolFamily, ToolStream, family_name

HERMES = ToolFamily("hermes", *FAMILIES["hermes"])
LLAMA = ToolFamily("llama3_json", *FAMILIES["llama3_json"])
MISTRAL = ToolFamily("mistral", *FAMILIES["mistral"])
MISTRAL_SPECIAL = ToolFamily("mistral", *FAMILIES["mistral"], start_token=9)  # the start skipped in decoding

CASES = [  # family, the model's text, the content, the calls as (name, arguments)
    (HERMES, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>', "",
     [("get_weather", {"city": "Paris"})]),
    (HERMES, 'Let me check.\n<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>\n<tool_call>\n'
             '{"name": "b", "arguments": {"x": [1, 2]}}\n</tool_call>', "Let me check.\n",
     [("a", {}), ("b", {"x": [1, 2]})]),
    (HERMES, '<tool_call>\n{"name": "a", "arguments": {"q": "</tool"}}', "", [("a", {"q": "</tool"})]),  # unclosed
    (HERMES, "Just an answer, no <b>tags</b>.", "Just an answer, no <b>tags</b>.", []),
    (HERMES, '<tool_call>\n{"name": "a", "arguments": {broken\n</tool_call>',
     '<tool_call>\n{"name": "a", "arguments": {broken\n</tool_call>', []),  # a broken call stays content
    (LLAMA, '{"name": "get_weather", "parameters": {"city": "Paris"}}', "", [("get_weather", {"city": "Paris"})]),
    (LLAMA, '<|python_tag|>{"name": "a", "parameters": {"x": 1}}; {"name": "b", "parameters": {"y": "; "}}', "",
     [("a", {"x": 1}), ("b", {"y": "; "})]),
    (LLAMA, '{"answer": 42}', '{"answer": 42}', []),  # JSON that is no call is content
    (LLAMA, "The weather is fine.", "The weather is fine.", []),
    (MISTRAL, '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]', "",
     [("get_weather", {"city": "Paris"})]),
    (MISTRAL, 'Sure. [TOOL_CALLS][{"name": "a", "arguments": {}}, {"name": "b", "arguments": {"k": true}}]',
     "Sure. ", [("a", {}), ("b", {"k": True})]),
    (MISTRAL_SPECIAL, '[{"name": "a", "arguments": {"k": 1}}]', "", [("a", {"k": 1})]),
    (MISTRAL, "No tools needed.", "No tools needed.", []),
]


def calls_of(calls: list[dict]) -> list[tuple[str, dict]]:
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


@pytest.mark.parametrize("family, text, content, calls", CASES)
def test_parse_whole(family, text, content, calls):
    got_content, got_calls = family.parse(text)
    assert got_content == content and calls_of(got_calls) == calls


@pytest.mark.parametrize("family, text, content, calls", CASES)
@pytest.mark.parametrize("piece", [1, 3, 7])
def test_parse_streamed(family, text, content, calls, piece):
    """Content comes as it is sure to be content, never a call's text; the calls come at the end."""
    stream = ToolStream(family)
    sent = "".join(stream.feed(text[i:i + piece]) for i in range(0, len(text), piece))
    rest, got_calls = stream.finish()
    assert sent + rest == content and calls_of(got_calls) == calls
    if calls:
        assert family.start not in sent or not family.start


@pytest.mark.parametrize("template, family", [
    ("{% for tool in tools %}<tool_call>{% endfor %}", "hermes"),  # Qwen2.5/3, Hermes
    ("{%- if tools %}<|start_header_id|>ipython{% endif %}<|python_tag|>", "llama3_json"),  # Llama 3.1+
    ("[AVAILABLE_TOOLS]{{ tools }}[/AVAILABLE_TOOLS][TOOL_CALLS]", "mistral"),
    ("{{ '<|im_start|>' + message['content'] }}", None),  # SmolLM2's: no tools
    (None, None),
])
def test_family_from_the_chat_template(template, family):
    assert family_name(template) == family


@pytest.fixture(scope="module")
def ll_tokenizer():
    return llguidance.hf.from_tokenizer(AutoTokenizer.from_pretrained(resolve_model("smollm2-135m-instruct").path))


TOOLS = [("get_weather", {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}),
         ("ping", None)]


@pytest.mark.parametrize("family, text, ok", [
    (HERMES, '<tool_call>\n{"name":"get_weather","arguments":{"city":"Oslo"}}\n</tool_call>', True),
    (HERMES, '<tool_call>\n{"name":"nope","arguments":{}}\n</tool_call>', False),
    (HERMES, 'Hello', False),
    (LLAMA, '{"name":"ping","parameters":{}}', True),
    (LLAMA, '{"name":"get_weather","parameters":{}}', False),  # city is required
    (MISTRAL, '[TOOL_CALLS][{"name":"ping","arguments":{}}]', True),
])
def test_forcing_grammars_accept_calls_alone(family, text, ok, ll_tokenizer):
    """The forcing grammar takes a whole call of one of the tools and nothing else."""
    grammar = lark_grammar(family.grammar(TOOLS, one=True))
    matcher = llguidance.LLMatcher(ll_tokenizer, grammar, log_level=0)
    accepted = matcher.consume_tokens(ll_tokenizer.tokenize_str(text)) and matcher.is_accepting()
    assert accepted == ok
    assert family.parse(text)[1] or not ok
