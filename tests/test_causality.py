"""The causality test (`rheads eval causality`): uniform-attention masking, head selection, resume.

Tiny random Llama models only (2 layers, 4 query heads, 2 KV heads); the real SmolLM2 run is in
benchmarks/RESULTS.md, not here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import rheads.evaluation.causality as causality
from rheads.evaluation.causality import (
    ATTENTION_NAME, MASKED_ATTR, CausalityConfig, heads_masked, mask_settings, masked_sdpa_attention,
    random_non_retrieval_heads, run_causality, top_retrieval_heads,
)
from rheads.evaluation.grid import Cell, Answer, load_cells
from rheads.profiling.profile import ModelIdentity, Profile, ProfileMethod

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=64, head_dim=16,
            intermediate_size=128, max_position_embeddings=512, initializer_range=0.2)


def _tiny_model(vocab_size: int = 256):
    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", vocab_size=vocab_size, **TINY)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32).eval()


@pytest.fixture()
def model():
    return _tiny_model()


def _profile(model_config, query_scores: list[list[float]]) -> Profile:
    kv = [[max(row[0:2]), max(row[2:4])] for row in query_scores]
    return Profile(model=ModelIdentity.from_config(model_config, "tiny-llama"),
                   method=ProfileMethod(name="retrieval_head_niah"), samples_total=0, samples_kept=0,
                   query_head_scores=query_scores, kv_head_scores=kv)


class _Attn(torch.nn.Module):
    """The attributes transformers' attention functions read from the module."""

    def __init__(self, groups: int, masked: list[int]):
        super().__init__()
        self.layer_idx, self.num_key_value_groups, self.is_causal = 0, groups, True
        setattr(self, MASKED_ATTR, torch.tensor(masked, dtype=torch.long))


def _reference(query, key, value, masked: list[int]):
    """By hand: softmax attention with the query at position kv_len - q_len + i seeing keys 0..that position,
    except masked heads, whose output is the mean of V over those keys (the causal cumulative mean)."""
    batch, heads, q_len, dim = query.shape
    kv_len, groups = key.shape[2], heads // key.shape[1]
    out = torch.empty(batch, q_len, heads, dim, dtype=torch.float64)
    for h in range(heads):
        k, v = key[:, h // groups].double(), value[:, h // groups].double()
        for i in range(q_len):
            visible = kv_len - q_len + i + 1
            if h in masked:
                out[:, i, h] = v[:, :visible].mean(dim=1)
            else:
                logits = torch.einsum("bd,btd->bt", query[:, h, i].double(), k[:, :visible]) / dim ** 0.5
                out[:, i, h] = torch.einsum("bt,btd->bd", logits.softmax(-1), v[:, :visible])
    return out


# --- (a) nothing masked = the model's own SDPA ---------------------------------------------------------

def test_no_heads_masked_is_sdpa(model) -> None:
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids).logits
        with heads_masked(model, []):
            assert model.config._attn_implementation == ATTENTION_NAME
            got = model(ids).logits
        generated = model.generate(ids[:1], do_sample=False, max_new_tokens=6, pad_token_id=0)
        with heads_masked(model, []):
            generated_ours = model.generate(ids[:1], do_sample=False, max_new_tokens=6, pad_token_id=0)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(generated, generated_ours)
    assert model.config._attn_implementation == "sdpa"  # restored
    assert not any(hasattr(layer.self_attn, MASKED_ATTR) for layer in model.model.layers)


# --- (b) a masked head is the causal mean of V -----------------------------------------------------------

@pytest.mark.parametrize("q_len,kv_len", [(7, 7), (1, 9), (3, 10)], ids=["prefill", "decode", "chunk-after-cache"])
def test_masked_head_is_cumulative_mean_of_values(q_len: int, kv_len: int) -> None:
    gen = torch.Generator().manual_seed(q_len * 100 + kv_len)
    query = torch.randn(2, 4, q_len, 16, generator=gen)
    key = torch.randn(2, 2, kv_len, 16, generator=gen)
    value = torch.randn(2, 2, kv_len, 16, generator=gen)
    masked = [1, 2]  # one query head of each KV group
    out, weights = masked_sdpa_attention(_Attn(2, masked), query, key, value, None, scaling=16 ** -0.5)
    assert weights is None and out.shape == (2, q_len, 4, 16)
    torch.testing.assert_close(out.double(), _reference(query, key, value, masked), atol=1e-5, rtol=1e-5)
    # and the unmasked function is plain attention for every head, so the masked heads really changed
    plain, _ = masked_sdpa_attention(_Attn(2, []), query, key, value, None, scaling=16 ** -0.5)
    torch.testing.assert_close(plain.double(), _reference(query, key, value, []), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(plain[:, :, masked], out[:, :, masked], atol=1e-3)


def test_masked_decode_with_cache_matches_full_forward(model) -> None:
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(2))
    masked = [(0, 0), (0, 3), (1, 2)]
    with torch.no_grad():
        plain = model(ids).logits
        with heads_masked(model, masked):
            result = model.generate(ids, do_sample=False, max_new_tokens=5, use_cache=True, pad_token_id=0,
                                    output_logits=True, return_dict_in_generate=True)
            full = model(result.sequences, use_cache=False).logits
    assert not torch.allclose(full[:, :16], plain, atol=1e-3)  # masking changes the model
    for step, logits in enumerate(result.logits):  # each cached decode step = the full forward at that position
        torch.testing.assert_close(logits, full[:, 15 + step], atol=1e-5, rtol=1e-5)


def test_heads_masked_rejects_unknown_heads_and_restores(model) -> None:
    with pytest.raises(ValueError, match="outside"):
        with heads_masked(model, [(2, 0)]):
            pass
    with pytest.raises(RuntimeError):
        with heads_masked(model, [(0, 1)]):
            raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"
    assert not hasattr(model.model.layers[0].self_attn, MASKED_ATTR)


# --- (c) which heads ---------------------------------------------------------------------------------------

SCORES = [[0.9, 0.0, 0.05, 0.3], [0.02, 0.6, 0.0, 0.09]]  # 8 query heads, 5 of them below 0.1


def test_top_heads_are_the_highest_scores(model) -> None:
    profile = _profile(model.config, SCORES)
    assert top_retrieval_heads(profile, 3) == [(0, 0), (1, 1), (0, 3)]
    assert top_retrieval_heads(profile, 0) == []
    top5 = top_retrieval_heads(profile, 5)
    flat = sorted((s for row in SCORES for s in row), reverse=True)
    assert sorted((SCORES[layer][head] for layer, head in top5), reverse=True) == flat[:5]
    with pytest.raises(ValueError):
        top_retrieval_heads(profile, 9)


def test_random_heads_score_below_threshold_and_depend_on_seed(model) -> None:
    profile = _profile(model.config, SCORES)
    draws = {seed: random_non_retrieval_heads(profile, 3, seed) for seed in range(6)}
    for heads in draws.values():
        assert len(set(heads)) == 3 and all(SCORES[layer][head] < 0.1 for layer, head in heads)
    assert len({tuple(h) for h in draws.values()}) > 1
    assert random_non_retrieval_heads(profile, 3, 4) == draws[4]  # seeded
    assert set(random_non_retrieval_heads(profile, 2, 4)) <= set(draws[4])  # nested over K
    with pytest.raises(ValueError, match="only 5"):
        random_non_retrieval_heads(profile, 6, 0)


def test_mask_settings() -> None:
    names = [s.name for s in mask_settings([10, 0, 5], [0, 1])]
    assert names == ["none", "retrieval-k5", "random-k5-s0", "random-k5-s1", "retrieval-k10", "random-k10-s0",
                     "random-k10-s1"]


# --- (d) the run and resume ---------------------------------------------------------------------------------

def test_run_writes_outputs_and_resume_generates_nothing(tokenizer, tmp_path: Path, monkeypatch) -> None:
    model = _tiny_model(vocab_size=49152)
    profile = _profile(model.config, SCORES)
    calls: list[dict] = []

    def fake(model, tokenizer, input_ids, max_new_tokens):
        heads = {(i, h) for i, layer in enumerate(model.model.layers)
                 for h in getattr(layer.self_attn, MASKED_ATTR).tolist()}
        calls.append({"heads": heads, "max_new_tokens": max_new_tokens, "impl": model.config._attn_implementation})
        # the unmasked model answers right, every masking wrong
        return Answer("a brass thimble and a dried sprig of juniper" if not heads else "no idea", "stop", 5)

    monkeypatch.setattr(causality, "generate_answer", fake)
    config = CausalityConfig(lengths=[200], depths=[0.5], needles_file=None, num_needles=3, ks=[0, 2],
                             random_seeds=[0, 1])
    first = run_causality(model, tokenizer, "tiny-llama", profile, config, tmp_path, progress=False)
    assert first.evaluated == len(calls) == 4 * 3  # none, retrieval-k2, random-k2-s0, random-k2-s1 x 3 needles
    assert all(c["impl"] == ATTENTION_NAME for c in calls)
    assert {frozenset(c["heads"]) for c in calls} >= {frozenset(), frozenset({(0, 0), (1, 1)})}
    assert model.config._attn_implementation == "sdpa"
    for name in ("cells.jsonl", "summary.json", "meta.json", causality.PLOT_NAME):
        assert (tmp_path / name).is_file()
    cells = load_cells(tmp_path)
    assert len(cells) == 12 and {c["config"] for c in cells} == {"none", "retrieval-k2", "random-k2-s0",
                                                                  "random-k2-s1"}
    # needle 2 is the thimble one: right when unmasked only
    assert [c["correct"] for c in cells if c["config"] == "none"] == [False, False, True]
    summary = json.loads((tmp_path / "summary.json").read_text())
    retrieval = {p["k"]: p for p in summary["curves"]["retrieval"]}
    assert retrieval[0]["accuracy"] == pytest.approx(1 / 3) and retrieval[2]["accuracy"] == 0.0
    assert summary["curves"]["random"][1]["seeds"] == [0, 1]
    assert "K masked" in first.table

    calls.clear()
    second = run_causality(model, tokenizer, "tiny-llama", profile, config, tmp_path, progress=False)
    assert second.evaluated == 0 and calls == []
    assert len(load_cells(tmp_path)) == 12

    more = CausalityConfig(**{**config.__dict__, "random_seeds": [0, 1, 2]})
    third = run_causality(model, tokenizer, "tiny-llama", profile, more, tmp_path, progress=False)
    assert third.evaluated == len(calls) == 3  # only random-k2-s2
    with pytest.raises(ValueError, match="non_retrieval_below"):
        run_causality(model, tokenizer, "tiny-llama", profile, CausalityConfig(**{**more.__dict__,
                      "non_retrieval_below": 0.2}), tmp_path, progress=False)


def test_summary_of_an_interrupted_run(model) -> None:
    profile = _profile(model.config, SCORES)
    settings = mask_settings([0, 2], [0, 1])
    heads = {s.name: causality.heads_for(s, profile) for s in settings}
    cells_grid = [Cell(100, 0.5, 0)]
    cells = [{"config": name, "length": 100, "depth": 0.5, "needle": 0, "correct": ok, "recall": float(ok)}
             for name, ok in (("none", True), ("retrieval-k2", False), ("random-k2-s0", True))]  # s1 not run yet
    summary = causality.causality_summary(cells, settings, heads, cells_grid, profile)
    retrieval, rnd = summary["curves"]["retrieval"], summary["curves"]["random"]
    assert [(p["k"], p["accuracy"]) for p in retrieval] == [(0, 1.0), (2, 0.0)]
    assert rnd[1]["seeds"] == [0] and rnd[1]["accuracy"] == 1.0
    assert retrieval[1]["mean_head_score"] == pytest.approx(0.75)  # heads scoring 0.9 and 0.6
    table = causality.format_summary(summary)
    assert table.splitlines()[3].split()[:3] == ["2", "0.00", "1.00"]
