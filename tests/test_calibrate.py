"""`rheads calibrate`: the choice rule, profiling at the served length, the record in the profile, and the served
defaults it sets; on a tiny random model (mechanics) and on SmolLM2 (the command, on a small grid)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from rheads.cli import main
from rheads.engine import EngineConfig, LLMEngine
from rheads.evaluation.calibrate import CalibrationConfig, calibrate, choose
from rheads.evaluation.niah_eval import EvalConfig
from rheads.models import resolve_model
from rheads.niah import load_needles
from rheads.profiling.profile import Profile
from rheads.profiling.profiler import ProfileConfig, profile_model

REPO = Path(__file__).resolve().parents[1]
SHIPPED_SMOLLM2 = REPO / "profiles" / "SmolLM2-135M-Instruct.json"
QWEN_RUNS = REPO / "benchmarks" / "results" / "eval_qwen_h200"
pytestmark = pytest.mark.usefixtures("one_thread")


def _row(selection, budget, window, accuracy, kv):
    return {"selection": selection, "budget": budget, "window": window, "accuracy": accuracy, "cells": 10,
            "kv_bytes_per_seq": kv, "kv_fraction_of_full": kv / 100}


def test_the_fewest_kv_bytes_within_the_tolerance_of_the_full_cache() -> None:
    full = _row("full", 1.0, 256, 0.9, 100)
    rows = [full, _row("retrieval", 0.5, 256, 0.85, 52), _row("retrieval", 0.5, 1024, 0.89, 54),
            _row("retrieval", 0.75, 256, 0.9, 76), _row("window", 0.0, 256, 0.1, 3)]
    assert choose(rows, 0.02) == rows[2]  # 0.85 loses too much; 0.89 is within 0.02 at 54%
    assert choose(rows, 0.05) == rows[1]
    assert choose(rows, 0.0) == rows[3]  # exactly the full cache's accuracy counts
    assert choose([full, _row("retrieval", 0.5, 256, 0.5, 52)], 0.02) == full  # none fits: the full cache


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama with the SmolLM2 tokenizer, saved as a model directory."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m-instruct").path)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         hidden_size=64, intermediate_size=128, max_position_embeddings=4096, initializer_range=0.2,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    path = tmp_path_factory.mktemp("models") / "tiny-llama"
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_calibrate_profiles_at_the_served_length_and_writes_its_choice(tiny_model_dir: Path, tmp_path: Path) -> None:
    needles = tmp_path / "needles.jsonl"
    needles.write_text(json.dumps(load_needles()[1].__dict__) + "\n")
    profile_path = tmp_path / "tiny.json"
    profile_model(str(tiny_model_dir), ProfileConfig(lengths=[150], depths=[0.5], needles_file=needles), profile_path)
    assert Profile.load(profile_path).longest_context == 150
    grid = EvalConfig(depths=[0.5], num_needles=1, budgets=[0.5], sink=4)
    config = CalibrationConfig(max_model_len=396, windows=[16, 64], eval=grid)  # served prompts of 300 tokens
    profile, record = calibrate(str(tiny_model_dir), profile_path, config, tmp_path / "calibration")

    assert profile.longest_context == 300 and len(profile.samples) == 2  # profiled at the served length too
    assert Profile.load(profile_path) == profile and profile.calibration == record
    assert record["lengths"] == [300] and record["cells_per_config"] == 1 and record["tolerance"] == 0.02
    kinds = sorted((r["selection"], r["window"]) for r in record["rows"])
    assert [k for k, _ in kinds].count("full") == 1 and len(kinds) == 5  # full once; retrieval, window per window
    chosen = record["chosen"]
    assert chosen == choose(record["rows"], 0.02)
    assert (profile.default_budget, profile.default_window) == (chosen["budget"], chosen["window"])
    for window in (16, 64):
        assert (tmp_path / "calibration" / f"window-{window}" / "summary.json").is_file()

    engine = LLMEngine.from_model(str(tiny_model_dir), profile_path, EngineConfig(max_model_len=396))
    with engine:  # the calibrated budget and window are what it serves by default
        assert engine.config.window == profile.default_window
        assert engine.split.fraction_full == pytest.approx(profile.default_budget, abs=0.13)
    with LLMEngine.from_model(str(tiny_model_dir), profile_path, EngineConfig(window=32, budget=1.0)) as engine:
        assert engine.config.window == 32 and engine.split.fraction_full == 1.0  # flags still win


@pytest.mark.slow
def test_calibrate_smollm2_cli(tmp_path: Path, capsys) -> None:
    """The command on the real model, on a small grid inside the shipped profile's lengths (no profiling)."""
    profile_path = tmp_path / "SmolLM2-135M-Instruct.json"
    shutil.copy(SHIPPED_SMOLLM2, profile_path)
    assert main(["calibrate", "smollm2-135m-instruct", "--max-model-len", "1000", "--profile", str(profile_path),
                 "--depths", "0.5", "--num-needles", "2", "--budgets", "0.5", "--windows", "64,256",
                 "--threads", "1", "--out", str(tmp_path / "out")]) == 0
    text = capsys.readouterr().out
    profile = Profile.load(profile_path)
    assert profile.calibration["lengths"] == [1000 - 32 - 64] and profile.calibration["cells_per_config"] == 2
    assert profile.samples == Profile.load(SHIPPED_SMOLLM2).samples  # covered already: not profiled again
    assert profile.calibration["full_accuracy"] == 1.0  # SmolLM2 finds both needles with the full cache
    assert "<- chosen" in text and f"default_budget {profile.default_budget:g}" in text


def test_the_shipped_qwen_defaults_follow_from_its_recorded_runs(tmp_path: Path, capsys) -> None:
    """The shipped Qwen profile's default budget and window are what `calibrate --from-runs` chooses from the
    H200 runs its record names; runs made with other head scores are refused."""
    shipped = REPO / "profiles" / "Qwen2.5-Coder-0.5B-Instruct.json"
    record = Profile.load(shipped).calibration
    profile_path = tmp_path / "qwen.json"
    shutil.copy(shipped, profile_path)
    main(["calibrate", "qwen2.5-coder-0.5b-instruct", "--max-model-len", str(record["max_model_len"]), "--out",
          str(tmp_path / "unused"), "--profile", str(profile_path), "--from-runs",
          *[str(REPO / run) for run in record["runs"]]])
    again = Profile.load(profile_path)
    assert (again.default_budget, again.default_window) == (record["chosen"]["budget"], record["chosen"]["window"])
    assert again.calibration["rows"] == record["rows"] and record["cells_per_config"] >= 100
    assert main(["calibrate", "qwen2.5-coder-0.5b-instruct", "--max-model-len", "32768", "--out", str(tmp_path / "x"),
                 "--profile", str(profile_path), "--from-runs", str(QWEN_RUNS / "31k-long-copy-max")]) != 0
    assert "evaluated with other head scores" in capsys.readouterr().err
