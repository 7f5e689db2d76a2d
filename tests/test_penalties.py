"""Penalties, logit bias and min_tokens: the tokens the engine picks are the argmax of the model's own logits
adjusted as vLLM defines each option, written out here token by token (sharing no code with the sampler),
and the logprobs it reports stay the model's."""

from __future__ import annotations

import copy

import oracles
import pytest
import torch
from oracles import GREEDY, random_prompt, run
from transformers import AutoTokenizer

from rheads.engine import EngineConfig, HeadSplit, LLMEngine, SamplingParams
from rheads.engine.sampler import adjust_logits
from rheads.engine.sequence import Sequence
from rheads.models import resolve_model

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 512
SHAPE = dict(num_attention_heads=4, num_key_value_heads=2, hidden_size=64, head_dim=16, intermediate_size=128,
             max_position_embeddings=512, vocab_size=VOCAB)
EOS = 2


def adjusted_by_hand(logits: list[float], prompt: list[int], output: list[int], p: SamplingParams,
                     eos: set[int]) -> list[float]:
    out = list(logits)
    if len(output) < p.min_tokens:
        for t in set(p.stop_token_ids) | (set() if p.ignore_eos else eos):
            out[t] = float("-inf")
    for t, bias in p.logit_bias.items():
        out[t] += bias
    for t in set(prompt) | set(output):
        out[t] = out[t] / p.repetition_penalty if out[t] > 0 else out[t] * p.repetition_penalty
    for t in set(output):
        out[t] -= p.frequency_penalty * output.count(t) + p.presence_penalty
    return out


OPTIONS = {
    "presence": dict(presence_penalty=2.0, logit_bias={17: 1.5}),  # the bias makes 17 repeat, the penalty stops it
    "frequency": dict(frequency_penalty=0.7, logit_bias={17: 2.0}),
    "negative": dict(presence_penalty=-0.5, frequency_penalty=-0.3),
    "repetition": dict(repetition_penalty=2.0, logit_bias={17: 0.6}),
    "bias": dict(logit_bias={5: 3.0, 7: -100.0, 11: 50.0}),
    "min_tokens": dict(min_tokens=4, stop_token_ids=[9]),
    "all": dict(presence_penalty=0.4, frequency_penalty=0.2, repetition_penalty=1.3, logit_bias={3: 2.0},
                min_tokens=2),
}


@pytest.mark.parametrize("name", list(OPTIONS))
def test_adjust_logits_as_defined(name) -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 32) * 4
    seqs = [Sequence("a", [1, 4, 4, 6], SamplingParams(max_tokens=8, **OPTIONS[name])),
            Sequence("b", [3, 5], SamplingParams(max_tokens=8)),  # nothing asked: left as it is
            Sequence("c", [8], SamplingParams(max_tokens=8, **OPTIONS[name]))]
    seqs[0].output_ids, seqs[2].output_ids = [5, 2, 5, 9, 12], [2]
    got = adjust_logits(logits, seqs, {EOS})
    for row, seq in enumerate(seqs):
        want = adjusted_by_hand(logits[row].tolist(), seq.prompt_ids, seq.output_ids, seq.params, {EOS})
        assert got[row].tolist() == pytest.approx(want, abs=1e-5)
    assert torch.equal(logits, logits.clone()) and got is not logits  # the model's logits are left alone


def test_nothing_asked_returns_the_logits_themselves() -> None:
    logits = torch.randn(2, 8)
    assert adjust_logits(logits, [Sequence("a", [1], SamplingParams())] * 2, {EOS}) is logits


@pytest.fixture(scope="module")
def engine_parts():
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m-instruct").path)
    model = oracles.tiny_model("llama", SHAPE, 2, eos_token_id=EOS)
    with torch.no_grad():  # logits within a few units of each other, so that every option moves tokens
        model.lm_head.weight.mul_(0.1)
    return model, tokenizer


def serve(engine_parts, params: dict[str, SamplingParams], split: HeadSplit | None = None, **config) -> dict:
    """Every request over the same prompt, all at once."""
    model, tokenizer = engine_parts
    split = split or HeadSplit.uniform(2, 2, full=True)
    config = EngineConfig(sink=4, window=8, page_size=4, max_num_batched_tokens=9, kv_cache_memory=8 << 20, **config)
    with LLMEngine(copy.deepcopy(model), tokenizer, split, config) as engine:
        return run(engine, {0: [(rid, random_prompt(23, 0, VOCAB), p) for rid, p in params.items()]})


@pytest.mark.parametrize("logprobs", [2, None])  # sampled row by row, or with the batch on the device
@pytest.mark.parametrize("name", [n for n in OPTIONS if n != "min_tokens"])
def test_greedy_tokens_follow_the_adjusted_logits_and_logprobs_stay_the_models(name, logprobs, engine_parts) -> None:
    model = engine_parts[0]
    option = OPTIONS[name]
    # the same request without the option (with its logit bias, where that is only there to make a token repeat)
    control = {k: v for k, v in option.items() if k == "logit_bias" and len(option) > 1}
    params = {"asked": SamplingParams(max_tokens=8, logprobs=logprobs, **GREEDY, **option),
              "control": SamplingParams(max_tokens=8, logprobs=logprobs, **GREEDY, **control)}
    results = serve(engine_parts, params)
    for rid, res in results.items():
        with torch.inference_mode():
            logits = model(torch.tensor([res.prompt_ids + res.token_ids])).logits[0].float()
        n = len(res.prompt_ids)
        for i, token in enumerate(res.token_ids):
            want = adjusted_by_hand(logits[n - 1 + i].tolist(), res.prompt_ids, res.token_ids[:i], params[rid], {EOS})
            assert token == max(range(VOCAB), key=want.__getitem__), f"{rid} position {i}"
            if logprobs:
                assert res.logprobs[i].logprob == pytest.approx(float(logits[n - 1 + i].log_softmax(-1)[token]),
                                                                abs=1e-4)
    assert results["asked"].token_ids != results["control"].token_ids, "the option changed no token here"


def test_min_tokens_holds_back_eos_and_stop_ids(engine_parts) -> None:
    # EOS made the greedy choice at every step: it comes only once min_tokens are out
    forced = SamplingParams(max_tokens=10, min_tokens=4, logit_bias={EOS: 100.0}, **{**GREEDY, "ignore_eos": False})
    stop_id = SamplingParams(max_tokens=10, min_tokens=3, stop_token_ids=[9], logit_bias={9: 100.0}, **GREEDY)
    results = serve(engine_parts, {"eos": forced, "stop": stop_id})
    assert results["eos"].token_ids[4:] == [EOS] and EOS not in results["eos"].token_ids[:4]
    assert results["eos"].finish_reason == "stop"
    assert results["stop"].token_ids[3:] == [9] and results["stop"].finish_reason == "stop"


def test_adjusted_rows_on_a_head_split_and_the_pools_empty_after(engine_parts) -> None:
    params = {"asked": SamplingParams(max_tokens=6, repetition_penalty=1.5, presence_penalty=1.0, **GREEDY)}
    res = serve(engine_parts, params, HeadSplit(((0,), (1,)), 2))["asked"]
    assert len(res.token_ids) == 6


@pytest.mark.parametrize("bad, message", [
    (dict(presence_penalty=2.5), "presence_penalty"), (dict(frequency_penalty=-3), "frequency_penalty"),
    (dict(repetition_penalty=0), "repetition_penalty"), (dict(logit_bias={1: 101}), "logit_bias"),
    (dict(min_tokens=20, max_tokens=10), "min_tokens")])
def test_out_of_range_options_are_refused(bad, message) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(**bad)


def test_pipelined_decode_leaves_out_the_steps_that_need_their_tokens(engine_parts) -> None:
    """With async decode, plain rows' tokens stay on the device between steps; a penalized row needs its
    last token on the host, so steps with it are not pipelined, and every row's tokens come out the same."""
    params = {"plain": SamplingParams(max_tokens=8, **GREEDY),
              "asked": SamplingParams(max_tokens=8, **GREEDY, **OPTIONS["frequency"])}
    eager = serve(engine_parts, params, async_decode=False)
    piped = serve(engine_parts, params, async_decode=True)
    assert {r: x.token_ids for r, x in piped.items()} == {r: x.token_ids for r, x in eager.items()}
    alone = serve(engine_parts, {"plain": params["plain"]}, async_decode=True)["plain"]
    assert alone.token_ids == eager["plain"].token_ids
