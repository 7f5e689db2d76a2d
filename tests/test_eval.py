"""The needle-in-a-haystack evaluation and `rheads eval`: configurations, scoring, restore, resume, summary.

A tiny random Llama (SmolLM2's vocabulary, so its tokenizer works) saved to a temporary directory
stands in for the model wherever the answers do not matter; its answers are garbage, so scoring is
tested with hand-made responses. One slow test runs the real SmolLM2 preset through the CLI.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import rheads.evaluation.niah_eval as ev
from rheads.cli import main
from rheads.engine import HeadSplit, SamplingParams, random_split, select_heads
from rheads.engine.llm import EngineConfig, LLMEngine
from rheads.evaluation.grid import Answer, load_cells, score
from rheads.evaluation.niah_eval import (
    CacheSetting, EvalConfig, cache_settings, format_summary, kv_bytes_per_sequence, profile_properties,
    run_niah_eval, split_for, eval_summary,
)
from rheads.niah import Needle, build_prompt, load_needles, unigram_recall
from rheads.profiling.profile import ModelIdentity, Profile, ProfileMethod, SampleRecord
from rheads.profiling.report import sparsity

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 49152
TINY = dict(num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, hidden_size=64, head_dim=16,
            intermediate_size=128, max_position_embeddings=1024, vocab_size=VOCAB)
KV_SCORES = [[0.9, 0.0], [0.2, 0.6], [0.0, 0.05], [0.3, 0.1]]  # 8 KV heads, distinct ranking


def _tiny_model():
    torch.manual_seed(0)
    config = LlamaConfig(initializer_range=0.2, **TINY)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


@pytest.fixture()
def model():
    return _tiny_model()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer) -> Path:
    path = tmp_path_factory.mktemp("models") / "tiny-llama"
    _tiny_model().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _profile(model_config, samples: list[SampleRecord] | None = None, kv=KV_SCORES) -> Profile:
    identity = ModelIdentity.from_config(model_config, "tiny-llama")
    query = [[x for x in row for _ in range(2)] for row in kv]  # 2 query heads per KV head
    samples = samples or []
    return Profile(model=identity, method=ProfileMethod(name="retrieval_head_niah"),
                   samples_total=len(samples), samples_kept=sum(s.kept for s in samples),
                   query_head_scores=query, kv_head_scores=kv, samples=samples)


def _config(**overrides) -> EvalConfig:
    base = dict(lengths=[200], depths=[0.5], num_needles=1, budgets=[0.5, 0.25], random_seeds=[0, 1],
                sink=4, window=8, page_size=4, kv_cache_memory=4 << 20, extra_tokens=4)
    return EvalConfig(**{**base, **overrides})


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _fake_generate(responses, calls: list):
    """A stand-in for evaluate.generate: records the engine's split and answers from `responses`."""
    def fake(engine, prompts, max_tokens, on_finish=None):
        calls.append({"split": engine.split, "prompts": prompts, "max_tokens": max_tokens})
        out = []
        for i, _ in enumerate(prompts):
            if on_finish:
                on_finish(i)
            out.append(Answer(responses(len(calls) - 1, i), "stop", 3))
        return out
    return fake


# --- configurations ---------------------------------------------------------------------------------

def test_cache_settings_list() -> None:
    settings = cache_settings([0.25, 0.5, 0.1], [0, 1, 2])
    names = [s.name for s in settings]
    assert names == ["full", "retrieval-0.5", "retrieval-0.25", "retrieval-0.1",
                     "random-0.5-s0", "random-0.5-s1", "random-0.5-s2", "random-0.25-s0", "random-0.25-s1",
                     "random-0.25-s2", "random-0.1-s0", "random-0.1-s1", "random-0.1-s2", "window"]
    assert [s.selection for s in settings].count("random") == 9
    assert settings[0] == CacheSetting("full", "full", 1.0) and settings[-1] == CacheSetting("window", "window", 0.0)
    assert {s.group for s in settings if s.selection == "random"} == {"random-0.5", "random-0.25", "random-0.1"}
    assert [s.name for s in cache_settings([], [0])] == ["full", "window"]
    assert [s.name for s in cache_settings([0.5], [])] == ["full", "retrieval-0.5", "window"]
    with pytest.raises(ValueError, match="strictly between"):
        cache_settings([1.0], [0])


def test_splits_are_select_heads_and_random_split(model) -> None:
    profile = _profile(model.config)
    for budget in (0.5, 0.25, 0.1):
        retrieval = split_for(CacheSetting("r", "retrieval", budget), profile, 4, 2)
        assert retrieval == select_heads(profile, budget=budget)
        for seed in (0, 1):
            split = split_for(CacheSetting("x", "random", budget, seed), profile, 4, 2)
            assert split == random_split(4, 2, budget, seed)
    assert split_for(CacheSetting("r", "retrieval", 0.25), profile, 4, 2).full == ((0,), (1,), (), ())
    assert split_for(CacheSetting("full", "full", 1.0), None, 4, 2) == HeadSplit.uniform(4, 2, True)
    assert split_for(CacheSetting("window", "window", 0.0), None, 4, 2) == HeadSplit.uniform(4, 2, False)


def test_run_uses_each_configurations_split(model, tokenizer, tmp_path: Path, monkeypatch) -> None:
    calls: list = []
    monkeypatch.setattr(ev, "generate", _fake_generate(lambda c, i: "nothing", calls))
    profile = _profile(model.config)
    config = _config()
    run_niah_eval(model, tokenizer, "tiny-llama", profile, config, tmp_path, progress=False)
    settings = cache_settings(config.budgets, config.random_seeds)
    assert [c["split"] for c in calls] == [split_for(s, profile, 4, 2) for s in settings]
    assert calls[1]["split"] == select_heads(profile, budget=0.5)
    assert calls[3]["split"] == random_split(4, 2, 0.5, 0)


# --- scoring ----------------------------------------------------------------------------------------

def test_score_threshold() -> None:
    needle = Needle("The code is red blue green gold.", "What is the code?", "red blue green gold")
    assert score(needle, "red blue green gold") == (1.0, True)
    assert score(needle, "red blue green") == (0.75, True)
    assert score(needle, "red blue") == (0.5, False)  # exactly 0.5 is not correct
    assert score(needle, "nothing") == (0.0, False)


def test_cells_scored_from_responses(model, tokenizer, tmp_path: Path, monkeypatch) -> None:
    needles = load_needles(EvalConfig().needles_path())[:2]
    words = [n.real_needle.split() for n in needles]
    # per pair of prompts (grid order: length, needle, depth): the whole answer, just over half, exactly half, nothing
    picks = [lambda w: " ".join(w), lambda w: " ".join(w[:len(w) // 2 + 1]),
             lambda w: " ".join(w[:len(w) // 2]), lambda w: "no idea"]  # needle 0 has 12 words: 6/12 = 0.5
    config = _config(lengths=[200, 240], depths=[0.0, 1.0], num_needles=2, budgets=[0.5], random_seeds=[0])
    cells_grid = ev.grid(config, 2)
    calls: list = []
    respond = lambda c, i: picks[i // 2 % 4](words[cells_grid[i].needle])  # noqa: E731
    monkeypatch.setattr(ev, "generate", _fake_generate(respond, calls))
    result = run_niah_eval(model, tokenizer, "tiny-llama", _profile(model.config), config, tmp_path, progress=False)
    cells = load_cells(tmp_path)
    assert len(cells) == 4 * len(cells_grid) and result.evaluated == len(cells)
    for c in cells:
        expected = unigram_recall(needles[c["needle"]].real_needle, c["response"])
        assert c["recall"] == pytest.approx(expected, abs=1e-4)
        assert c["correct"] == (expected > 0.5)
    assert {c["correct"] for c in cells} == {True, False}
    assert any(c["recall"] == 0.5 and not c["correct"] for c in cells)
    # max_tokens = answer tokens + extra_tokens
    for i, cell in enumerate(cells_grid):
        prompt = build_prompt(tokenizer, needles[cell.needle], cell.length, cell.depth)
        assert calls[0]["prompts"][i] == prompt.input_ids
        assert calls[0]["max_tokens"][i] == prompt.answer_span[1] - prompt.answer_span[0] + config.extra_tokens
    # every configuration got the same responses, so the same accuracy: of the four picks, the whole answer and
    # just over half of it are right, half or less and nothing are not
    accuracies = {c["name"]: c["accuracy"] for c in result.summary["configs"]}
    assert set(accuracies.values()) == {0.5}


# --- the real engine on the tiny model: restore, outputs, resume ------------------------------------

def test_weights_restored_and_outputs_written(model, tokenizer, tmp_path: Path) -> None:
    before = _state(model)
    config = _config(lengths=[200, 240], depths=[0.0, 1.0])
    result = run_niah_eval(model, tokenizer, "tiny-llama", _profile(model.config), config, tmp_path, progress=False)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    cells = load_cells(tmp_path)
    assert len(cells) == 8 * 4 and result.evaluated == 32  # full, 2 retrieval, 2 budgets x 2 seeds random, window
    assert {c["config"] for c in cells} == {s.name for s in cache_settings([0.5, 0.25], [0, 1])}
    assert all(c["answer_hidden"] for c in cells)  # sink 4 + window 8: no 200-token answer is in the window
    for name in ("summary.json", "meta.json", "heatmaps.png", "accuracy_vs_memory.png"):
        assert (tmp_path / name).is_file()
    assert (tmp_path / "heatmaps.png").read_bytes()[:4] == b"\x89PNG"
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [g["name"] for g in summary["groups"]] == ["full", "retrieval-0.5", "retrieval-0.25", "random-0.5",
                                                      "random-0.25", "window"]
    meta = summary["meta"]
    assert meta["needles_file"].endswith("eval_needles.jsonl") and meta["sink"] == 4
    assert all("rheads/data/haystack" in h for h in meta["haystack"])
    # the full-cache configuration through the engine equals transformers' greedy decoding of the same prompt
    needle = load_needles(config.needles_path())[0]
    prompt = build_prompt(tokenizer, needle, 200, 0.0)
    full = next(c for c in cells if c["config"] == "full" and c["length"] == 200 and c["depth"] == 0.0)
    model.config._attn_implementation = "sdpa"
    with torch.inference_mode():
        ids = torch.tensor([prompt.input_ids])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=full["output_tokens"], pad_token_id=0)
    assert tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True) == full["response"]


def test_kv_bytes_match_the_engines_cache(model, tokenizer) -> None:
    """kv_bytes_per_sequence against what the engine's cache really holds for a sequence it admits (the
    bytes of the pool tensors' rows at the sequence's pages and slot), and against sums done by hand."""
    # By hand, in fp32: one token of one KV head is K and V of 16 values, 128 bytes. A page holds 4 tokens of
    # each of the f full heads (512 f bytes); a slot holds 4 sinks + 8 window entries of each of the 8 - f
    # streaming heads (1536 (8 - f) bytes). 5 tokens take 2 pages and 200 take 50, so, by f:
    by_hand = {8: {5: 2 * 4096, 200: 50 * 4096},
               4: {5: 2 * 2048 + 6144, 200: 50 * 2048 + 6144},
               2: {5: 2 * 1024 + 9216, 200: 50 * 1024 + 9216},
               0: {5: 12288, 200: 12288}}
    profile = _profile(model.config)
    for setting in cache_settings([0.5, 0.25], [3]):
        split = split_for(setting, profile, 4, 2)
        full = sum(split.num_full)
        for dtype, element_size in ((torch.float32, 4), (torch.bfloat16, 2)):
            # prefix caching off: its snapshot point would split the prompt's chunk, and this counts one
            engine = LLMEngine(model, tokenizer, split, EngineConfig(sink=4, window=8, page_size=4,
                                                                     kv_cache_memory=1 << 20, dtype=dtype,
                                                                     enable_prefix_caching=False))
            cache = engine.cache
            try:
                for n in (1, 4, 5, 200):
                    engine.add_request(f"n{n}", list(range(n)), SamplingParams(max_tokens=1))
                    [chunk] = engine.scheduler.schedule().chunks  # admitted, its whole prompt in one chunk
                    seq = chunk.seq
                    assert chunk.num_tokens == n and len(set(seq.pages)) == len(seq.pages)
                    # the truth itself: the fewest pages that hold n tokens, none without full heads
                    assert len(seq.pages) == (-(-n // 4) if full else 0)
                    held = sum(t[p].nbytes for t in cache.full_k + cache.full_v if t is not None for p in seq.pages)
                    held += sum(t[seq.slot].nbytes for t in cache.ring_k + cache.ring_v if t is not None)
                    got = kv_bytes_per_sequence(split, 16, element_size, 4, 4, 8, n)
                    assert got == held, (setting.name, dtype, n)
                    if n in by_hand[full]:
                        assert got == by_hand[full][n] * element_size // 4, (setting.name, dtype, n)
                    engine.abort(f"n{n}")
                assert engine.blocks.bytes_used() == 0
            finally:
                engine.close()


def test_resume_adds_only_new_cells(model, tokenizer, tmp_path: Path, monkeypatch) -> None:
    profile = _profile(model.config)
    first = run_niah_eval(model, tokenizer, "tiny-llama", profile, _config(depths=[0.5]), tmp_path, progress=False)
    assert first.evaluated == 8  # 8 configurations x 1 cell
    saved = (tmp_path / "cells.jsonl").read_text()

    calls: list = []
    real = ev.generate
    monkeypatch.setattr(ev, "generate", lambda *a, **k: calls.append(len(a[1])) or real(*a, **k))
    second = run_niah_eval(model, tokenizer, "tiny-llama", profile, _config(depths=[0.5, 1.0]), tmp_path,
                           progress=False)
    assert second.evaluated == 8 and calls == [1] * 8  # one new cell per configuration
    text = (tmp_path / "cells.jsonl").read_text()
    assert text.startswith(saved)
    assert sorted({c["depth"] for c in load_cells(tmp_path)}) == [0.5, 1.0]
    assert all(c["cells"] == 2 for c in second.summary["configs"])

    calls.clear()
    third = run_niah_eval(model, tokenizer, "tiny-llama", profile, _config(depths=[0.5, 1.0]), tmp_path,
                          progress=False)
    assert third.evaluated == 0 and calls == [] and (tmp_path / "cells.jsonl").read_text() == text

    with pytest.raises(ValueError, match="window"):
        run_niah_eval(model, tokenizer, "tiny-llama", profile, _config(window=16), tmp_path, progress=False)
    assert (tmp_path / "cells.jsonl").read_text() == text


def test_configurations_in_two_calls(model, tokenizer, tmp_path: Path) -> None:
    profile = _profile(model.config)
    first = run_niah_eval(model, tokenizer, "tiny-llama", profile, _config(random_seeds=[]), tmp_path, progress=False)
    assert first.evaluated == 4  # full, retrieval-0.5, retrieval-0.25, window
    saved = load_cells(tmp_path)
    second = run_niah_eval(model, tokenizer, "tiny-llama", profile, _config(random_seeds=[0]), tmp_path,
                           progress=False)
    assert second.evaluated == 2  # only random-0.5-s0 and random-0.25-s0
    cells = load_cells(tmp_path)
    assert cells[:4] == saved and {c["config"] for c in cells[4:]} == {"random-0.5-s0", "random-0.25-s0"}


def test_killed_between_configurations_loses_nothing(model, tokenizer, tmp_path: Path, monkeypatch) -> None:
    before = _state(model)
    profile = _profile(model.config)
    real = ev.generate
    calls: list = []

    def dies_on_third(engine, *args, **kwargs):
        calls.append(engine.split)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(engine, *args, **kwargs)

    monkeypatch.setattr(ev, "generate", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        run_niah_eval(model, tokenizer, "tiny-llama", profile, _config(), tmp_path, progress=False)
    assert [c["config"] for c in load_cells(tmp_path)] == ["full", "retrieval-0.5"]
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # restored even when a config fails

    monkeypatch.setattr(ev, "generate", real)
    resumed = run_niah_eval(model, tokenizer, "tiny-llama", profile, _config(), tmp_path, progress=False)
    assert resumed.evaluated == 6  # the 8 configurations less the 2 saved
    assert [c["config"] for c in load_cells(tmp_path)] == [s.name for s in cache_settings([0.5, 0.25], [0, 1])]


def test_cli_on_tiny_model(tiny_dir: Path, tmp_path: Path, capsys) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    profile_path = tmp_path / "tiny.json"
    _profile(model.config).save(profile_path)
    out = tmp_path / "out"
    args = ["eval", "niah", str(tiny_dir), "--profile", str(profile_path), "--lengths", "200", "--depths", "0.5",
            "--num-needles", "1", "--budgets", "0.5", "--random-seeds", "0", "--sink", "4", "--window", "8",
            "--page-size", "4", "--kv-cache-memory", "4MiB", "--out", str(out)]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "retrieval-0.5" in text and "random-0.5" in text and "acc@200" in text and "4 cells evaluated now" in text
    assert len(load_cells(out)) == 4
    assert main(args) == 0 and "0 cells evaluated now" in capsys.readouterr().out


# --- summary -----------------------------------------------------------------------------------------

def test_summary_random_seeds_mean_std() -> None:
    settings = cache_settings([0.5], [0, 1, 2])
    grid = [ev.Cell(100, 0.5, 0), ev.Cell(100, 0.5, 1), ev.Cell(200, 0.5, 0), ev.Cell(200, 0.5, 1)]
    right = {"full": 4, "retrieval-0.5": 3, "random-0.5-s0": 4, "random-0.5-s1": 2, "random-0.5-s2": 0, "window": 1}
    cells = []
    for s in settings:
        for i, cell in enumerate(grid):
            correct = i < right[s.name]
            cells.append({"config": s.name, "length": cell.length, "depth": cell.depth, "needle": cell.needle,
                          "correct": correct, "recall": 1.0 if correct else 0.25})
    cells.append({"config": "full", "length": 300, "depth": 0.5, "needle": 0, "correct": False, "recall": 0.0})
    splits = {s.name: HeadSplit.uniform(2, 2, s.selection != "window") for s in settings}
    kv = {s.name: 1 << 20 for s in settings}
    summary = eval_summary(cells, settings, splits, kv, grid, 4)
    groups = {g["name"]: g for g in summary["groups"]}
    assert list(groups) == ["full", "retrieval-0.5", "random-0.5", "window"]
    assert groups["full"]["accuracy"] == 1.0  # the cell outside the grid does not count
    assert groups["retrieval-0.5"]["accuracy"] == 0.75 and groups["retrieval-0.5"]["accuracy_std"] == 0.0
    rnd = groups["random-0.5"]
    assert rnd["seeds"] == [0, 1, 2]
    assert rnd["accuracy"] == pytest.approx(0.5) and rnd["accuracy_std"] == pytest.approx(0.5)  # 1, .5, 0
    # per length: seed 0 -> 1, 1; seed 1 -> 1, 0; seed 2 -> 0, 0
    assert rnd["accuracy_by_length"]["100"] == pytest.approx(2 / 3)
    assert rnd["accuracy_by_length_std"]["100"] == pytest.approx(0.57735, abs=1e-4)
    assert rnd["accuracy_by_length"]["200"] == pytest.approx(1 / 3)
    assert rnd["recall"] == pytest.approx((1.0 + 0.625 + 0.25) / 3)
    table = format_summary(summary)
    row = next(line for line in table.splitlines() if line.startswith("random-0.5"))
    assert "(3 seeds)" in row and "0.50±0.50" in row and "0.67±0.58" in row
    full_row = next(line for line in table.splitlines() if line.startswith("full"))
    assert "±" not in full_row and "1.00" in full_row


# --- profile properties ----------------------------------------------------------------------------

def _sample(kept: bool, scores: dict[str, float]) -> SampleRecord:
    return SampleRecord(needle_index=0, context_length=100, depth=0.5, prompt_tokens=100, response="x",
                        recall=1.0 if kept else 0.0, kept=kept, head_scores=scores)


def test_properties_on_hand_made_profile(model, tmp_path: Path, capsys) -> None:
    # 4 layers x 4 query heads = 16 query heads; 4 kept samples + 1 dropped
    samples = [
        _sample(True, {"0-0": 0.5, "1-2": 0.3, "3-1": 0.2}),
        _sample(True, {"0-0": 0.8, "1-2": 0.1}),
        _sample(True, {"0-0": 1.0, "2-3": 0.4}),
        _sample(True, {"0-0": 0.6, "1-2": 0.2, "3-1": 0.1}),
        _sample(False, {"0-0": 1.0, "0-1": 1.0, "3-3": 1.0}),  # dropped: does not count
    ]
    profile = _profile(model.config, samples)
    props = profile_properties(profile)
    act = props["activation"]
    assert props["samples_kept"] == 4 and props["sparsity"] == sparsity(profile)
    assert (act["always"], act["sometimes"], act["never"], act["total"]) == (1, 3, 12, 16)
    assert act["always_heads"] == ["0-0"]
    assert act["frequency"] == {"0-0": 1.0, "1-2": 0.75, "2-3": 0.25, "3-1": 0.5}
    assert act["histogram"] == {"0%": 12, "<=10%": 0, "<=25%": 1, "<=50%": 1, "<=75%": 1, "<100%": 0, "100%": 1}

    path = tmp_path / "p.json"
    profile.save(path)
    imported = _profile(model.config)
    imported.method.name = "import_retrieval_head"
    imported.save(tmp_path / "imported.json")
    capsys.readouterr()
    assert main(["eval", "properties", str(path), str(tmp_path / "imported.json"), "--json",
                 str(tmp_path / "props.json")]) == 0
    text = capsys.readouterr().out
    fig = sparsity(profile)["kv"]
    assert f"> 0.1: {fig['count_gt_0.1']} ({fig['share_gt_0.1']:.1%})" in text
    assert "active in every sample: 1   in some: 3   never: 12" in text
    assert "n/a (imported scores, no per-sample records)" in text
    assert len(json.loads((tmp_path / "props.json").read_text())) == 2


@pytest.mark.parametrize("command,options", [
    ("niah", ("--profile", "--lengths", "--depths", "--needles", "--num-needles", "--haystack", "--budgets",
              "--random-seeds", "--sink", "--window", "--out", "--threads")),
    ("causality", ("--out", "--ks", "--lengths", "--depths", "--num-needles", "--random-seeds", "--profile",
                   "--threads", "--dtype")),
])
def test_eval_help(capsys, command, options) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in options:
        assert option in text
    assert main(["eval"]) == 2


# --- the real model ------------------------------------------------------------------------------

@pytest.mark.slow
def test_eval_smollm2_cli(tmp_path: Path, capsys) -> None:
    out = tmp_path / "eval"
    assert main(["eval", "niah", "smollm2-135m-instruct", "--lengths", "600", "--depths", "0.5", "--num-needles", "1",
                 "--budgets", "0.5", "--random-seeds", "0", "--threads", "1", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    for name in ("cells.jsonl", "summary.json", "meta.json", "heatmaps.png", "accuracy_vs_memory.png"):
        assert (out / name).is_file()
    cells = {c["config"]: c for c in load_cells(out)}
    assert set(cells) == {"full", "retrieval-0.5", "random-0.5-s0", "window"}
    assert cells["full"]["correct"] and cells["full"]["recall"] > 0.5
    summary = json.loads((out / "summary.json").read_text())
    assert summary["meta"]["profile"].endswith("SmolLM2-135M-Instruct.json")
    assert len(summary["meta"]["profile_needles"]) == 3  # the profile was built with the 3 published needles
    assert "full" in text and "window" in text


def test_meta_records_profile_data_and_warns_on_overlap(model, tokenizer, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(ev, "generate", _fake_generate(lambda c, i: "x", []))
    profile = _profile(model.config)
    needle = load_needles(EvalConfig().needles_path())[0]
    profile.method.params = {"needles": [{"needle": needle.needle, "question": needle.question,
                                          "real_needle": needle.real_needle}], "haystack": ["essay.txt"]}
    run_niah_eval(model, tokenizer, "tiny-llama", profile, _config(budgets=[0.5], random_seeds=[]), tmp_path,
                  profile_path="p.json", progress=False)
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["profile"] == "p.json" and meta["profile_needles"] == [needle.needle]
    assert meta["profile_haystack"] == ["essay.txt"] and meta["haystack_seen_by_profile"] == []
    assert meta["needles_seen_by_profile"] == 1 and len(meta["needles"]) == 12
    assert "the profile was made with 1 of these needles" in capsys.readouterr().err


def test_answer_hidden() -> None:
    # sink 4, window 8, 40 prompt tokens: streaming heads hold positions 0-3 and 32-39 at the first answer token
    assert ev.answer_hidden((10, 20), 40, 4, 8) and ev.answer_hidden((4, 32), 40, 4, 8)
    assert not ev.answer_hidden((0, 4), 40, 4, 8) and not ev.answer_hidden((32, 40), 40, 4, 8)
    assert not ev.answer_hidden((2, 6), 40, 4, 8) and not ev.answer_hidden((31, 35), 40, 4, 8)  # partly visible


def test_summary_accuracy_on_hidden_answers() -> None:
    settings = cache_settings([], [])
    grid = [ev.Cell(100, 0.0, 0), ev.Cell(100, 0.5, 0), ev.Cell(100, 1.0, 0)]
    cells = [{"config": s.name, "length": 100, "depth": d, "needle": 0, "correct": s.name == "full" or d != 0.5,
              "recall": 1.0} for s in settings for d in (0.0, 0.5, 1.0)]
    hidden = {(100, 0.0, 0): False, (100, 0.5, 0): True, (100, 1.0, 0): False}
    splits = {s.name: HeadSplit.uniform(1, 1, s.name == "full") for s in settings}
    summary = eval_summary(cells, settings, splits, {"full": 2, "window": 1}, grid, 1, hidden)
    window = summary["groups"][1]
    assert window["accuracy"] == pytest.approx(2 / 3) and window["accuracy_hidden"] == 0.0
    assert summary["groups"][0]["accuracy_hidden"] == 1.0 and window["cells_hidden"] == 1
    assert "acc hidden" in format_summary(summary)


def test_std_over_seeds_with_a_missing_seed_is_nan():
    """A partial run (one seed's configuration not evaluated yet) summarises instead of crashing."""
    import math

    from rheads.evaluation.grid import mean, std

    assert std([0.5, 0.7]) == pytest.approx(math.sqrt(0.02)) and std([0.5]) == 0.0  # sample std: 0.1^2 * 2 / (2 - 1)
    assert math.isnan(std([0.5, mean([])]))


# --- harder tasks (RULER's kinds) ---------------------------------------------------------------------

@pytest.mark.parametrize("task", ["multikey", "multivalue", "vartrack"])
def test_task_prompts_hold_every_answer_where_they_say(tokenizer, task: str) -> None:
    """A task instance is the same on every call; its prompt has exactly the length asked, and every answer
    sits at the span the prompt reports, the one the cell's depth places first among them."""
    from rheads.evaluation.grid import answer_tokens
    from rheads.evaluation.tasks import instance
    from rheads.niah import build_inserted_prompt

    needle = instance(task, 3)
    assert needle == instance(task, 3) and needle != instance(task, 4)
    for depth in (0.0, 0.5, 1.0):
        prompt = build_inserted_prompt(tokenizer, needle.placed(depth), needle.question, 900)
        assert len(prompt.input_ids) == 900
        found = [tokenizer.decode(prompt.input_ids[a:b]).strip() for a, b in prompt.answer_spans]
        assert sorted(found) == sorted(needle.expected)
        assert tokenizer.decode(prompt.input_ids[slice(*prompt.answer_span)]).strip() == needle.expected[0]
        assert answer_tokens(prompt) >= sum(b - a for a, b in prompt.answer_spans)
    assert score(needle, " and ".join(needle.expected).upper()) == (1.0, True)
    if len(needle.expected) > 1:  # all are asked: one of several is a miss
        assert score(needle, needle.expected[0]) == (1 / len(needle.expected), False)


def test_a_task_runs_through_the_engine_grid(model, tokenizer, tmp_path: Path, monkeypatch) -> None:
    """`--task multivalue`: the cells are the task's instances, graded on all their answers; max_tokens
    leaves room for every answer."""
    from rheads.evaluation.tasks import instance

    expected = instance("multivalue", 0).expected
    calls: list = []
    monkeypatch.setattr(ev, "generate", _fake_generate(lambda c, i: ", ".join(expected[: 4 - c % 2]), calls))
    result = run_niah_eval(model, tokenizer, "tiny-llama", _profile(model.config),
                           _config(task="multivalue", budgets=[0.5], random_seeds=[], lengths=[300]), tmp_path,
                           progress=False)
    cells = {c["config"]: c for c in load_cells(tmp_path)}
    assert cells["full"]["correct"] and not cells["retrieval-0.5"]["correct"]  # 3 of 4 values is a miss
    assert cells["retrieval-0.5"]["recall"] == 0.75 and result.summary["meta"]["task"] == "multivalue"
    assert calls[0]["max_tokens"][0] >= 4 * 7 + 4  # four seven-digit values and the extra tokens
