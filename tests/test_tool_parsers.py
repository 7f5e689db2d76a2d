"""The tool-call parsers on literal model outputs of each family: whole, streamed over every split into
pieces (hypothesis picks the cuts; token-sized pieces and single characters always), the stream's deltas
in OpenAI's shape; the families' detection from chat templates, and their forcing grammars."""

from __future__ import annotations

import copy

import llguidance.hf
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from rheads.engine import SamplingParams
from rheads.engine.output import detokenize
from rheads.engine.sequence import Sequence
from rheads.models import resolve_model

from server.structured import lark_grammar
from server.tools import FAMILIES, ToolFamily, ToolStream, family_name, family_of


def family(name: str, **kwargs) -> ToolFamily:
    start, arguments_key, _ = FAMILIES[name]
    return ToolFamily(name, start, arguments_key, **kwargs)


HERMES, LLAMA, MISTRAL = family("hermes"), family("llama3_json"), family("mistral")
WEATHER = '{"city": "Paris", "days": [1, 2.5e1, -3], "ok": true, "note": "a \\"q\\" </tool_call> [ARGS] ; }"}'

CASES = [  # family, the model's text, the content, the calls as (name, arguments as written)
    (HERMES, f'<tool_call>\n{{"name": "get_weather", "arguments": {WEATHER}}}\n</tool_call>', "",
     [("get_weather", WEATHER)]),
    (HERMES, 'Let me check.\n<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>\n<tool_call>\n'
             '{"arguments": {"x": [1, 2]}, "name": "b"}\n</tool_call>', "Let me check.\n",
     [("a", "{}"), ("b", '{"x": [1, 2]}')]),  # the keys in either order
    (HERMES, '<tool_call>\n{"name": "a", "arguments": {"q": "</tool"}}', "", [("a", '{"q": "</tool"}')]),  # unclosed
    (HERMES, "Just an answer, no <b>tags</b> <tool_ca", "Just an answer, no <b>tags</b> <tool_ca", []),
    (HERMES, '<tool_call>\n{"nome": "a", "arguments": {}}\n</tool_call> ok', '<tool_call>\n{"nome": "a", '
             '"arguments": {}}\n</tool_call> ok', []),  # no call: content as written
    (HERMES, '<tool_call>\n{"name": "a", "arguments": {oops\n</tool_call>\n<tool_call>{"name": "b", '
             '"arguments": {}}</tool_call>', "", [("a", "{"), ("b", "{}")]),  # broken after its start: kept
    (HERMES, '<tool_call>{"name": "a", "arguments": {}}</tool_call>\n\nDone. See you.', "Done. See you.", [("a", "{}")]),
    (LLAMA, '{"name": "get_weather", "parameters": ' + WEATHER + '}', "", [("get_weather", WEATHER)]),
    (LLAMA, '<|python_tag|>{"name": "a", "parameters": {"x": 1}}; {"name": "b", "parameters": {"y": "; "}}', "",
     [("a", '{"x": 1}'), ("b", '{"y": "; "}')]),
    (LLAMA, '{"name": "a", "arguments": 7}', "", [("a", "7")]),  # arguments as written, even a bare scalar
    (LLAMA, ' {"answer": 42}', ' {"answer": 42}', []),  # JSON that is no call is content
    (LLAMA, '{"name": "John", "age": 3}', '{"name": "John", "age": 3}', []),
    (LLAMA, "The weather is fine.", "The weather is fine.", []),
    (MISTRAL, f'[TOOL_CALLS][{{"name": "get_weather", "arguments": {WEATHER}}}]', "", [("get_weather", WEATHER)]),
    (MISTRAL, 'Sure. [TOOL_CALLS][{"name": "a", "arguments": {}}, {"name": "b", "arguments": {"k": true}, '
              '"id": "abc123def"}]', "Sure. ", [("a", "{}"), ("b", '{"k": true}')]),
    (MISTRAL, '[TOOL_CALLS]{"name": "a", "arguments": {"k": 1}}', "", [("a", '{"k": 1}')]),
    (MISTRAL, f"[TOOL_CALLS]get_weather[ARGS]{WEATHER}", "", [("get_weather", WEATHER)]),  # v11+
    (MISTRAL, 'Two. [TOOL_CALLS]a[ARGS]{"x": 1}[TOOL_CALLS]b.c-d[CALL_ID]A1b2C3d4E[ARGS] {}', "Two. ",
     [("a", '{"x": 1}'), ("b.c-d", "{}")]),
    (MISTRAL, "[TOOL_CALLS] no tool [ARGS]", "[TOOL_CALLS] no tool [ARGS]", []),
    (MISTRAL, "No tools needed.", "No tools needed.", []),
]
IDS = [f"{f.name}-{i}" for i, (f, *_) in enumerate(CASES)]


def raw_calls(calls: list[dict]) -> list[tuple[str, str]]:
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)
    assert len({c["id"] for c in calls}) == len(calls)
    return [(c["function"]["name"], c["function"]["arguments"]) for c in calls]


@pytest.mark.parametrize("family, text, content, calls", CASES, ids=IDS)
def test_parse_whole(family, text, content, calls):
    got_content, got_calls = family.parse(text)
    assert got_content == content and raw_calls(got_calls) == calls


def streamed(family: ToolFamily, pieces: list[str]) -> tuple[list[str], list[list[dict]]]:
    """Each piece's content and tool-call deltas, the end's last."""
    stream, contents, deltas = ToolStream(family), [], []
    for piece in pieces:
        content, calls = stream.feed(piece)
        contents.append(content)
        deltas.append(calls)
    content, calls = stream.finish()
    return contents + [content], deltas + [calls]


def assert_streams_as_whole(family: ToolFamily, text: str, pieces: list[str]) -> None:
    """The stream's content joins to the whole answer's, and its deltas are OpenAI's: a call's first delta
    has its index (0, 1, .. in turn), id, type and name; later ones only argument fragments of that index,
    which join to the whole answer's arguments exactly."""
    assert "".join(pieces) == text
    content, whole = family.parse(text)
    contents, deltas = streamed(family, pieces)
    assert "".join(contents) == content
    calls: list[dict] = []
    for delta in (d for ds in deltas for d in ds):
        if "id" in delta:
            assert delta["index"] == len(calls) and delta["type"] == "function" and delta["function"]["name"]
            calls.append({**delta, "function": dict(delta["function"])})
        else:
            assert set(delta) == {"index", "function"} and set(delta["function"]) == {"arguments"}
            assert delta["index"] == len(calls) - 1 and delta["function"]["arguments"]
            calls[-1]["function"]["arguments"] += delta["function"]["arguments"]
    assert raw_calls(calls) == raw_calls(whole)


@pytest.fixture(scope="module")
def hf_tokenizer():
    return AutoTokenizer.from_pretrained(resolve_model("smollm2-135m-instruct").path)


@pytest.mark.parametrize("family, text, content, calls", CASES, ids=IDS)
def test_streamed_by_characters_tokens_and_every_cut(family, text, content, calls, hf_tokenizer):
    assert_streams_as_whole(family, text, list(text))
    ids = hf_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert_streams_as_whole(family, text, [hf_tokenizer.decode([i]) for i in ids])
    for cut in range(len(text) + 1):
        assert_streams_as_whole(family, text, [text[:cut], text[cut:]])


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(case=st.sampled_from(CASES), cuts=st.lists(st.floats(0, 1), max_size=12))
def test_streamed_over_any_pieces(case, cuts):
    family, text = case[0], case[1]
    points = sorted({round(c * len(text)) for c in cuts})
    bounds = [0, *points, len(text)]
    assert_streams_as_whole(family, text, [text[a:b] for a, b in zip(bounds, bounds[1:])])


@pytest.mark.parametrize("family, text", [(f, t) for f, t, _, calls in CASES if calls], ids=[
    i for i, (_, _, _, calls) in zip(IDS, CASES) if calls])
def test_calls_stream_before_the_answer_ends(family, text):
    """Fed a character at a time, each call's start comes before its arguments end, and its arguments come
    in pieces as written: nothing of a call waits for the end of the answer."""
    contents, deltas = streamed(family, list(text))
    first = next(i for i, ds in enumerate(deltas) if ds)
    assert first < len(text) - 1
    fragments = [d for ds in deltas for d in ds if "id" not in d]
    arguments = family.parse(text)[1][0]["function"]["arguments"]
    assert len(fragments) >= len(arguments) - 1


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
def ll_tokenizer(hf_tokenizer):
    return llguidance.hf.from_tokenizer(hf_tokenizer)


TOOLS = [("get_weather", {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}),
         ("ping", None)]


@pytest.mark.parametrize("family, text, ok", [
    (HERMES, '<tool_call>\n{"name":"get_weather","arguments":{"city":"Oslo"}}\n</tool_call>', True),
    (HERMES, '<tool_call>\n{"name":"nope","arguments":{}}\n</tool_call>', False),
    (HERMES, 'Hello', False),
    (LLAMA, '{"name":"ping","parameters":{}}', True),
    (LLAMA, '{"name":"get_weather","parameters":{}}', False),  # city is required
    (MISTRAL, '[TOOL_CALLS][{"name":"ping","arguments":{}}]', True),
    (family("mistral", named=True), '[TOOL_CALLS]get_weather[ARGS]{"city":"Oslo"}', True),
    (family("mistral", named=True), '[TOOL_CALLS]ping[ARGS]{}[TOOL_CALLS]ping[ARGS]{}', False),  # one call
    (family("mistral", named=True), '[TOOL_CALLS]get_weather[ARGS]{}', False),
])
def test_forcing_grammars_accept_calls_alone(family, text, ok, ll_tokenizer):
    """The forcing grammar takes a whole call of one of the tools and nothing else."""
    grammar = lark_grammar(family.grammar(TOOLS, one=True))
    matcher = llguidance.LLMatcher(ll_tokenizer, grammar, log_level=0)
    accepted = matcher.consume_tokens(ll_tokenizer.tokenize_str(text)) and matcher.is_accepting()
    assert accepted == ok
    assert family.parse(text)[1] or not ok


def test_special_token_markers_are_kept_and_read(hf_tokenizer):
    """Mistral's markers are special tokens, which decoding skips: a family over such a tokenizer names
    them, its grammar emits them as tokens, the output processor keeps them (only them) in the text, and
    the calls are read out of it; skipped, the text would be `get_weather{..}ping{}`, which is no call."""
    tokenizer = copy.deepcopy(hf_tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": ["[TOOL_CALLS]", "[ARGS]"]})
    tokenizer.chat_template = "[AVAILABLE_TOOLS]{{ tools }}[/AVAILABLE_TOOLS] [TOOL_CALLS]name[ARGS]arguments"
    mistral = family_of(tokenizer)
    calls, args = tokenizer.convert_tokens_to_ids(["[TOOL_CALLS]", "[ARGS]"])
    assert mistral.name == "mistral" and mistral.named and mistral.special == {"[TOOL_CALLS]": calls, "[ARGS]": args}

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")  # special and not a marker: still skipped
    ids = [*encode("Sure."), calls, *encode("get_weather"), args, *encode('{"city":"Oslo"}'), calls,
           *encode("ping"), args, *encode("{}")]
    matcher = llguidance.LLMatcher(llguidance.hf.from_tokenizer(tokenizer),
                                   lark_grammar(mistral.grammar(TOOLS, one=False)), log_level=0)
    assert matcher.consume_tokens(ids[len(encode("Sure.")):]) and matcher.is_accepting()
    seq = Sequence("r", [1], SamplingParams(keep_special_ids=mistral.kept_ids))
    for token in [*ids, im_end]:
        seq.output_ids.append(token)
        text = detokenize(tokenizer, seq)
    assert text == 'Sure.[TOOL_CALLS]get_weather[ARGS]{"city":"Oslo"}[TOOL_CALLS]ping[ARGS]{}'
    content, got = mistral.parse(text)
    assert content == "Sure." and raw_calls(got) == [("get_weather", '{"city":"Oslo"}'), ("ping", "{}")]
    assert mistral.parse(tokenizer.decode(ids, skip_special_tokens=True))[1] == []
