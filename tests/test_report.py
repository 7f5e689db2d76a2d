"""Report figures on a hand-built profile, the heatmap PNG and `rheads profile show`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rheads.cli import main
from rheads.profiling.profile import ModelIdentity, Profile, ProfileMethod, aggregate_kv_scores
from rheads.profiling.report import format_report, sparsity, top_heads, write_heatmap

QUERY = [
    [0.0, 0.0, 0.6, 0.1],  # 0.1 is not > 0.1
    [0.2, 0.0, 0.0, 0.05],
    [0.0, 0.9, 0.0, 0.0],
]


@pytest.fixture
def profile() -> Profile:
    return Profile(
        model=ModelIdentity(name="org/tiny", architecture="LlamaForCausalLM", num_layers=3,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=8),
        method=ProfileMethod(name="retrieval_head_niah"), samples_total=10, samples_kept=7,
        query_head_scores=QUERY, kv_head_scores=aggregate_kv_scores(QUERY, 2))


def test_sparsity_exact(profile: Profile) -> None:
    figures = sparsity(profile)
    assert figures["query"] == {
        "total": 12, "count_gt_0.1": 3, "share_gt_0.1": 3 / 12, "count_gt_0.5": 2, "share_gt_0.5": 2 / 12,
        "count_zero": 7, "share_zero": 7 / 12}
    # KV heads: [0.0, 0.6], [0.2, 0.05], [0.9, 0.0]
    assert figures["kv"] == {
        "total": 6, "count_gt_0.1": 3, "share_gt_0.1": 0.5, "count_gt_0.5": 2, "share_gt_0.5": 2 / 6,
        "count_zero": 2, "share_zero": 2 / 6}


def test_top_heads(profile: Profile) -> None:
    assert top_heads(profile, 3) == [(2, 1, 0.9), (0, 2, 0.6), (1, 0, 0.2)]


def test_format_report(profile: Profile) -> None:
    text = format_report(profile, top=2)
    assert "org/tiny" in text and "retrieval_head_niah" in text and "7 kept of 10" in text
    assert "3 (25.0%)" in text and "7 (58.3%)" in text
    assert "2-1 0.90" in text and "0-2 0.60" in text and "1-0 0.20" not in text


def test_heatmap_is_png(profile: Profile, tmp_path: Path) -> None:
    png = tmp_path / "sub" / "heads.png"
    write_heatmap(profile, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_hybrid_layers_are_told_apart(profile: Profile, tmp_path: Path) -> None:
    """A sliding-window layer is named in the report and drawn apart; a profile written before models had
    them (no `layer_windows`) reads as all full attention."""
    assert "sliding window" not in format_report(profile)
    hybrid = profile.model_copy(update={"model": profile.model.model_copy(update={"layer_windows": [None, 512, None]})})
    text = format_report(Profile.model_validate_json(hybrid.model_dump_json()))
    assert "2 full attention, 1 sliding window (window 512; layers 1)" in text
    write_heatmap(hybrid, tmp_path / "hybrid.png")
    assert (tmp_path / "hybrid.png").read_bytes()[:4] == b"\x89PNG"
    legacy = json.loads(profile.model_dump_json())
    del legacy["model"]["layer_windows"]
    assert Profile.model_validate(legacy).model.windows == [None, None, None]


def test_cli_show(profile: Profile, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    profile.save(tmp_path / "tiny.json")
    assert main(["profile", "show", str(tmp_path / "tiny.json"), "--top", "2"]) == 0
    out = capsys.readouterr().out
    assert "org/tiny" in out and "3 (25.0%)" in out and "2-1 0.90" in out
    assert (tmp_path / "tiny.heads.png").read_bytes()[:4] == b"\x89PNG"
