"""Importers on the published reference files: shapes, known top heads, round trip, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rheads.profiling.importers import (
    KNOWN_MODELS, default_profile_path, find_known, import_duo_attention, import_retrieval_head,
)
from rheads.profiling.profile import ModelIdentity, Profile, ProfileError

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
HEAD_SCORE = REFERENCE / "retrieval_head" / "head_score"
DUO = REFERENCE / "duo_attention"
needs_reference = pytest.mark.skipif(not REFERENCE.is_dir(), reason=f"reference data not at {REFERENCE}")


@needs_reference
def test_retrieval_head_llama2_top_heads() -> None:
    profile = import_retrieval_head(HEAD_SCORE / "llama-2-7b-80k.json")
    assert profile.model.name == "yaofu/llama-2-7b-80k"
    assert (profile.model.num_layers, profile.model.num_attention_heads) == (32, 32)
    assert profile.samples_total == profile.samples_kept == 586
    assert profile.method.name == "import_retrieval_head"
    assert profile.method.params["upstream"] == "nightdessert/Retrieval_Head"
    cells = sorted(((s, layer, head) for layer, row in enumerate(profile.query_head_scores)
                    for head, s in enumerate(row)), reverse=True)[:3]
    assert [(layer, head, round(s, 2)) for s, layer, head in cells] == [(16, 19, 0.94), (11, 15, 0.92), (8, 26, 0.80)]


@needs_reference
@pytest.mark.parametrize("name", sorted(p.stem for p in HEAD_SCORE.glob("*.json")) if HEAD_SCORE.is_dir() else [])
def test_retrieval_head_every_file(name: str) -> None:
    profile = import_retrieval_head(HEAD_SCORE / f"{name}.json")
    known = KNOWN_MODELS[name]
    assert profile.model.name == known.hf_id
    assert len(profile.kv_head_scores[0]) == known.num_key_value_heads
    group = known.num_attention_heads // known.num_key_value_heads
    for q_row, kv_row in zip(profile.query_head_scores, profile.kv_head_scores):  # KV score = max of its group
        assert kv_row == [max(q_row[k * group:(k + 1) * group]) for k in range(len(kv_row))]


@needs_reference
def test_round_trip(tmp_path: Path) -> None:
    profile = import_retrieval_head(HEAD_SCORE / "Yi-6B-200K.json")
    profile.save(tmp_path / "p.json")
    assert Profile.load(tmp_path / "p.json") == profile
    duo = import_duo_attention(DUO / "Meta-Llama-3.1-8B-Instruct" / "full_attention_heads.tsv")
    duo.save(tmp_path / "d.json")
    assert Profile.load(tmp_path / "d.json") == duo


@needs_reference
@pytest.mark.parametrize("name", sorted(p.name for p in DUO.iterdir()) if DUO.is_dir() else [])
def test_duo_attention_equals_tsv(name: str) -> None:
    tsv = DUO / name / "full_attention_heads.tsv"
    profile = import_duo_attention(tsv)
    gates = [[float(x) for x in line.split()] for line in tsv.read_text().splitlines()]
    assert profile.model.name == KNOWN_MODELS[name].hf_id
    assert profile.samples_total == profile.samples_kept == 0
    # rounded to 4 decimals and clipped to [0, 1] (the files hold float noise down to -0.0015)
    assert profile.kv_head_scores == [[pytest.approx(min(max(g, 0.0), 1.0), abs=5e-5) for g in row] for row in gates]
    group = profile.model.group_size
    assert profile.query_head_scores == [[g for g in row for _ in range(group)] for row in profile.kv_head_scores]
    config = profile.method.params["training_config"]
    assert (config["sink_size"], config["recent_size"]) == (128, 256)


def test_wrong_shape_raises(tmp_path: Path) -> None:
    head_score = tmp_path / "llama-2-7b-80k.json"  # a known name, but 2 layers x 3 heads
    head_score.write_text(json.dumps({f"{layer}-{head}": [0.5, 0] for layer in range(2) for head in range(3)}))
    with pytest.raises(ProfileError, match="num_layers: file has 2"):
        import_retrieval_head(head_score)
    tsv = tmp_path / "Meta-Llama-3.1-8B-Instruct" / "full_attention_heads.tsv"
    tsv.parent.mkdir()
    tsv.write_text("\n".join("\t".join(["0.5"] * 4) for _ in range(32)) + "\n")
    with pytest.raises(ProfileError, match="num_key_value_heads: file has 4"):
        import_duo_attention(tsv)
    ragged = tmp_path / "x.json"
    ragged.write_text(json.dumps({"0-0": [1, 0], "0-1": [1]}))
    with pytest.raises(ProfileError, match="sample counts"):
        import_retrieval_head(ragged, model_name="org/x")


def test_unknown_model(tmp_path: Path) -> None:
    head_score = tmp_path / "my-model.json"
    head_score.write_text(json.dumps({f"{layer}-{head}": [0.25, 0.75] for layer in range(2) for head in range(3)}))
    with pytest.raises(ProfileError, match="--model"):
        import_retrieval_head(head_score)
    profile = import_retrieval_head(head_score, model_name="org/my-model")
    assert (profile.model.name, profile.model.num_layers, profile.model.num_attention_heads) == ("org/my-model", 2, 3)
    assert profile.query_head_scores == [[0.5] * 3] * 2


def test_lookup_and_default_path() -> None:
    assert find_known("meta-llama/llama-3.1-8b-instruct") is KNOWN_MODELS["Meta-Llama-3.1-8B-Instruct"]
    assert default_profile_path("meta-llama/Llama-3.1-8B-Instruct") == \
        Path("profiles/meta-llama/Llama-3.1-8B-Instruct.json")


def test_check_fits_names_field() -> None:
    shape = dict(architecture="LlamaForCausalLM", num_layers=2, num_attention_heads=4, head_dim=8)
    profile = Profile(
        model=ModelIdentity(name="a", num_key_value_heads=4, **shape),
        method={"name": "import_duo_attention"}, samples_total=0, samples_kept=0,
        query_head_scores=[[0.0] * 4] * 2, kv_head_scores=[[0.0] * 4] * 2)
    with pytest.raises(ProfileError) as error:
        profile.check_fits(ModelIdentity(name="b", num_key_value_heads=2, **shape))
    assert "num_key_value_heads" in str(error.value) and "rheads profile" in str(error.value)
