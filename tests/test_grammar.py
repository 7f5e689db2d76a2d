"""Grammar rows in the engine's batches (CPU, the SmolLM2 preset): a grammar row follows its grammar and
ends when it is complete, and the rows beside it come out as they would without it."""

from __future__ import annotations

import json

import llguidance
import pytest
import torch

from rheads.engine import RequestError, SamplingParams
from rheads.engine.grammar import mask_rows

from serving import build_engine

SCHEMA = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}, "count": {"type": "integer",
          "minimum": 0, "maximum": 99}}, "required": ["answer", "count"], "additionalProperties": False}


def json_grammar(schema: dict) -> str:
    return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})


@pytest.fixture(scope="module")
def engine(one_thread_module):
    engine = build_engine(async_decode=True)  # pipelined decode on the CPU too: grammar rows must leave it
    yield engine
    engine.close()


def run(engine, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, tuple[list[int], str, str]]:
    for request_id, (ids, params) in requests.items():
        engine.add_request(request_id, ids, params)
    got = {request_id: ([], "", None) for request_id in requests}
    while engine.has_unfinished():
        for out in engine.step():
            ids, text, _ = got[out.request_id]
            got[out.request_id] = (ids + out.new_token_ids, text + out.new_text, out.finish_reason)
    return got


def prompt(engine, text: str) -> list[int]:
    chat = engine.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                tokenize=False)
    return engine.tokenizer(chat, add_special_tokens=False)["input_ids"]


def test_grammar_rows_beside_free_rows(engine) -> None:
    """Free rows alone, then beside a greedy and a sampled grammar row: the same tokens; the grammar rows'
    answers parse, follow the schema and end with the grammar."""
    free = {f"free-{i}": (prompt(engine, text), SamplingParams(max_tokens=8, temperature=0.0))
            for i, text in enumerate(["Name three colours.", "Count to five."])}
    alone = run(engine, free)
    ask = prompt(engine, "Is the sky blue? Answer in JSON.")
    constrained = {"greedy": SamplingParams(max_tokens=16, temperature=0.0, grammar=json_grammar(SCHEMA)),
                   "sampled": SamplingParams(max_tokens=16, temperature=1.0, seed=7, grammar=json_grammar(SCHEMA))}
    together = run(engine, {**free, **{name: (ask, params) for name, params in constrained.items()}})
    for request_id in free:
        assert together[request_id] == alone[request_id]
    for name in constrained:
        _, text, finish = together[name]
        assert finish == "stop", text  # the grammar completed (not the length limit)
        answer = json.loads(text)
        assert answer["answer"] in ("yes", "no") and 0 <= answer["count"] <= 99 and set(answer) == {"answer", "count"}
    assert engine.usage().bytes_used == 0


def test_min_tokens_yields_to_a_grammar_that_takes_only_eos(engine) -> None:
    """An empty regex is complete at once: its only token is EOS, which min_tokens would hold back."""
    empty = llguidance.LLMatcher.grammar_from_regex("")
    params = {name: SamplingParams(max_tokens=4, min_tokens=2, temperature=t, grammar=empty)
              for name, t in (("greedy", 0.0), ("drawn", 1.0))}
    got = run(engine, {name: (prompt(engine, "Hi"), p) for name, p in params.items()})
    assert {name: (text, finish) for name, (_, text, finish) in got.items()} == {name: ("", "stop") for name in params}


def test_a_grammar_checked_over_the_tokenizer(engine) -> None:
    """What compiles without a tokenizer may not with it (a token id past the vocabulary)."""
    engine.grammars.check(json_grammar(SCHEMA))
    beyond = llguidance.LLMatcher.grammar_from_lark(f"start: <[{engine.model.config.vocab_size + 5}]>")
    with pytest.raises(RequestError, match="does not compile"):
        engine.grammars.check(beyond)
    with pytest.raises(RequestError, match="does not compile"):
        engine.grammars.matcher(beyond)


def test_mask_rows_leaves_free_rows_alone(engine) -> None:
    matcher = engine.grammars.matcher(llguidance.LLMatcher.grammar_from_regex("ab"))
    logits = torch.randn(3, engine.model.config.vocab_size)
    masked = mask_rows(logits, [None, matcher, None])
    assert torch.equal(masked[0], logits[0]) and torch.equal(masked[2], logits[2])
    allowed = torch.isfinite(masked[1]).nonzero()[:, 0].tolist()
    assert allowed and all(engine.tokenizer.decode([t]) in ("a", "ab") for t in allowed)
