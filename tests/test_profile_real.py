"""A short real profile of SmolLM2 through the CLI (about a minute on 2 CPU cores).

Uses $RHEADS_CACHE when set, else the default cache; on a fresh machine the preset is converted on
first use (about 20 s more).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rheads.cli import main
from rheads.profiling.profile import Profile
from rheads.profiling.report import sparsity


@pytest.mark.slow
def test_profile_smollm2_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "p.json"
    threads = torch.get_num_threads()
    try:  # one thread: several times faster than the default when the cores are shared
        assert main(["profile", "smollm2-135m-instruct", "--lengths", "600,1000", "--depths", "0.5",
                     "--threads", "1", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    profile = Profile.load(out)
    assert profile.model.name == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert profile.samples_total == 6 and len(profile.samples) == 6  # 2 lengths x 1 depth x 3 needles
    assert profile.samples_kept >= 1
    assert all(s.prompt_tokens == s.context_length for s in profile.samples)
    scores = [x for row in profile.query_head_scores for x in row]
    assert max(scores) > 0.1
    assert sum(x == 0 for x in scores) > len(scores) / 2

    capsys.readouterr()
    png = tmp_path / "heads.png"
    assert main(["profile", "show", str(out), "--heatmap", str(png)]) == 0
    text = capsys.readouterr().out
    figures = sparsity(profile)
    for label in ("query", "kv"):
        line = next(line for line in text.splitlines() if line.startswith(label))
        assert f"{figures[label]['count_zero']} ({figures[label]['share_zero']:.1%})" in line
    assert "top 10 query heads" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
