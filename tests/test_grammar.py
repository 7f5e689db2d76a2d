"""Grammar rows in the engine's batches (CPU, the SmolLM2 preset): a grammar row follows its grammar and
ends when it is complete, and the rows beside it come out as they would without it."""

from __future__ import annotations

import contextlib
import json
import logging

import llguidance
import pytest
import torch

from rheads.engine import RequestError, SamplingParams
from rheads.engine.grammar import mask_rows
from rheads.engine.messages import Chunk, PendingOutput, SchedulerOutput
from rheads.engine.sequence import Sequence, Status

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


@contextlib.contextmanager
def async_decode(engine, on: bool):
    before, engine.async_decode = engine.async_decode, on
    try:
        yield
    finally:
        engine.async_decode = before


def stepped(engine, requests: dict[str, tuple[list[int], SamplingParams]], on: bool,
            abort: tuple[str, int] | None = None) -> tuple[dict[str, tuple[list[int], str, str]], dict[str, int]]:
    """`run` with async decode on or off, and for each request the number of steps after which its next
    step was in flight (launched, its token left on the device). `abort`: (request id, n) aborts that
    request once n of its tokens are out."""
    got, in_flight = {request_id: ([], "", None) for request_id in requests}, dict.fromkeys(requests, 0)
    with async_decode(engine, on):
        for request_id, (ids, params) in requests.items():
            engine.add_request(request_id, ids, params)
        while engine.has_unfinished() or engine.pipeline.in_flight is not None:
            for out in engine.step():
                ids, text, _ = got[out.request_id]
                got[out.request_id] = (ids + out.new_token_ids, text + out.new_text, out.finish_reason)
            flying = engine.pipeline.in_flight
            for seq in flying.seqs if flying is not None else ():
                in_flight[seq.request_id] += 1
            if abort is not None and len(got[abort[0]][0]) == abort[1] and engine.abort(abort[0]):
                got[abort[0]] = (*got[abort[0]][:2], "abort")
    assert engine.usage().bytes_used == 0 and engine.pipeline.in_flight is None
    return got, in_flight


def mixed_batch(engine) -> dict[str, tuple[list[int], SamplingParams]]:
    ask = prompt(engine, "Is the sky blue? Answer in JSON.")
    return {"plain": (prompt(engine, "Name three colours."), SamplingParams(max_tokens=24, temperature=0.0)),
            "json": (ask, SamplingParams(max_tokens=24, temperature=0.0, grammar=json_grammar(SCHEMA)))}


def test_grammar_rows_stay_pipelined_beside_plain_rows(engine) -> None:
    """With async decode, a batch with grammar rows keeps its steps in flight, and every row's tokens are
    those of async decode off: a grammar completing mid-batch, and one ended by its stop string (compact
    JSON of two keys has a comma) before its grammar completes."""
    requests = mixed_batch(engine)
    requests["stopped"] = (requests["json"][0], SamplingParams(max_tokens=24, temperature=0.0, stop=[","],
                                                               grammar=json_grammar(SCHEMA)))
    eager, none_flying = stepped(engine, requests, on=False)
    piped, flying = stepped(engine, requests, on=True)
    assert piped == eager and not any(none_flying.values())
    (_, json_text, json_finish), (_, stopped_text, stopped_finish) = piped["json"], piped["stopped"]
    assert json_finish == "stop" and json.loads(json_text)["answer"] in ("yes", "no")
    assert stopped_finish == "stop" and stopped_text and "," not in stopped_text and stopped_text in json_text
    assert len(piped["plain"][0]) > len(piped["json"][0])  # the grammar completed mid-batch
    for request_id, (ids, _, _) in piped.items():
        # in flight after every step but its prefill's, its last token's and the one after a row ends
        assert flying[request_id] >= len(ids) - 2, (request_id, flying)


def test_a_grammar_row_aborted_in_flight(engine) -> None:
    """Aborted with its next step in flight: it gives no more tokens, its row beside it goes on as without
    async decode, and the pools come back empty."""
    requests = mixed_batch(engine)
    eager, _ = stepped(engine, requests, on=False, abort=("json", 3))
    piped, flying = stepped(engine, requests, on=True, abort=("json", 3))
    assert piped == eager and piped["json"][2] == "abort" and len(piped["json"][0]) == 3
    assert flying["json"] >= 2 and flying["plain"] >= len(piped["plain"][0]) - 3


class _ForbidsAll:
    """A matcher whose mask allows none of `VOCAB` tokens (as one past its end may)."""

    VOCAB = 64

    def compute_bitmask(self) -> bytes:
        return bytes(4 * self.VOCAB // 32)


def test_a_row_whose_sequence_ended_is_drawn_unmasked(engine, caplog) -> None:
    """A pipelined step's row whose sequence ended on the token before (its grammar complete, or aborted)
    keeps its logits: its matcher's mask could leave nothing to draw, which stops a CUDA device. On the
    CPU such a draw fails, and the step would fall back to the host."""
    drawn = SamplingParams(temperature=1.0)
    ended = Sequence("ended", [1, 2], drawn, status=Status.FINISHED, matcher=_ForbidsAll())
    going = Sequence("going", [1, 2], drawn, status=Status.RUNNING)
    output = SchedulerOutput([Chunk(ended, 1, samples=True), Chunk(going, 1, samples=True)])
    with caplog.at_level(logging.WARNING):
        result = engine.runner.sample(output, torch.randn(2, _ForbidsAll.VOCAB), defer=True)
    assert isinstance(result, PendingOutput) and not caplog.records
    assert ((result.tokens >= 0) & (result.tokens < _ForbidsAll.VOCAB)).all()
