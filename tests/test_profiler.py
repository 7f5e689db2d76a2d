"""The profiler on hand-built cases and tiny random models: copy test, attention, prompts, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, Qwen2Config

from rheads.models import resolve_model
from rheads.niah import NiahPrompt, _template_parts, build_prompt, load_needles, unigram_recall
from rheads.profiling.profile import ModelIdentity, Profile, ProfileError, ProfileMethod, SampleRecord
from rheads.profiling.profiler import (ATTENTION_NAME, ProfileConfig, _KVStore, copy_hits, profile_from_samples,
                                       profile_model, rescore, run_sample, run_samples)

SHIPPED_SMOLLM2 = Path(__file__).resolve().parents[1] / "profiles" / "SmolLM2-135M-Instruct.json"
TINY = dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=64,
            intermediate_size=128, max_position_embeddings=4096)
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: tiny models run best on one thread


# --- copy test ---------------------------------------------------------------------------------

def test_copy_hits_hand_built() -> None:
    #                         0   1   2   3   4   5   6   7
    prompt_ids = torch.tensor([12, 11, 12, 13, 14, 12, 16, 17])
    span = (2, 5)  # tokens 12, 13, 14; token 12 also sits outside the span at 0 and 5
    argmax = torch.tensor([
        [2, 3, 5, 9],  # in span + same token; in span, other token; outside (end) + same; a generated position
        [4, 2, 0, 1],  # in span, other token; in span + same; outside (before) + same; outside, other
        [5, 5, 2, 2],  # outside + same twice; in span + same twice
    ])
    expected = torch.tensor([[True, False, False, False],
                             [False, True, False, False],
                             [False, False, True, True]])
    assert torch.equal(copy_hits(argmax, 12, prompt_ids, span), expected)
    assert not copy_hits(argmax, 99, prompt_ids, span).any()


# --- the profiling attention against transformers' attention -----------------------------------

# hybrid models: a sliding-window layer, then a full one; Gemma 2's soft-capped scores, GPT-OSS's sinks
HYBRID = {"sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"], "head_dim": 16}
EXTRAS = {"llama": {}, "qwen2": {}, "gemma2": {**HYBRID, "attn_logit_softcapping": 2.0},
          "gpt_oss": {**HYBRID, "num_local_experts": 2, "num_experts_per_tok": 1}}


def _tiny_model(kind: str, vocab_size: int = 128, seed: int = 0):
    """A tiny random model of the family in fp32, eval mode, with peaky attention (large init)."""
    torch.manual_seed(seed)
    config = AutoConfig.for_model(kind, vocab_size=vocab_size, initializer_range=0.2, **TINY, **EXTRAS[kind])
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".sinks"):
                param.normal_(0.0, 2.0)
    return model


@torch.inference_mode()
def _decode_argmaxes(model, ids: torch.Tensor, tokens: list[int]) -> list[torch.Tensor]:
    """run_sample's decode, teacher-forced with `tokens`, returning every step's [layers, heads] argmax."""
    store = _KVStore(model.config.num_hidden_layers, ids.numel() + len(tokens))
    n = ids.numel()
    model.model(input_ids=ids[None, :-1], position_ids=torch.arange(n - 1)[None], use_cache=False,
                rheads_store=store)
    inputs, out = [int(ids[-1]), *tokens[:-1]], []
    for step, token in enumerate(inputs):
        model.model(input_ids=torch.tensor([[token]]), position_ids=torch.tensor([[n - 1 + step]]),
                    use_cache=False, rheads_store=store)
        out.append(torch.stack(store.argmax)[:, 0].clone())  # [layers, batch of one, heads]
    return out


@pytest.mark.parametrize("kind", list(EXTRAS))
def test_profiling_attention_matches_transformers(kind: str) -> None:
    model = _tiny_model(kind, vocab_size=16)  # a small vocabulary, so that some heads do copy
    torch.manual_seed(1)
    ids = torch.randint(0, 16, (48,))
    n, span = 12, (0, 48)
    greedy = {}
    for impl in ("sdpa", "eager") if kind in ("llama", "qwen2") else ("eager",):  # sdpa takes no sinks or caps
        model.config._attn_implementation = impl
        out = model.generate(ids[None], attention_mask=torch.ones(1, ids.numel(), dtype=torch.long),
                             max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
        greedy[impl] = out[0, ids.numel():].tolist()
    assert greedy.get("sdpa", greedy["eager"]) == greedy["eager"] and len(greedy["eager"]) == n

    model.config._attn_implementation = ATTENTION_NAME
    result = run_sample(model, NiahPrompt(ids.tolist(), span, span), n, set(), span)
    assert result.response_ids == greedy["eager"]
    ours = _decode_argmaxes(model, ids, result.response_ids)

    model.config._attn_implementation = "eager"
    full = torch.cat([ids, torch.tensor(result.response_ids)])
    with torch.inference_mode():
        attentions = model(full[None], output_attentions=True).attentions  # per layer [1, heads, T, T]
    copies, mass = torch.zeros_like(result.copies), torch.zeros_like(result.attention)
    for step in range(n):
        row = ids.numel() - 1 + step
        eager = torch.stack([a[0, :, row, :row + 1].argmax(-1) for a in attentions])
        assert torch.equal(ours[step], eager), f"step {step}"
        copies += copy_hits(eager, result.response_ids[step], ids, span)
        mass += torch.stack([a[0, :, row, span[0]:span[1]].sum(-1) for a in attentions]).double()
    assert torch.equal(result.copies, copies) and copies.sum() > 0
    torch.testing.assert_close(result.attention, mass / n)  # the attention score: mean mass on the span


def test_a_batch_of_samples_equals_each_alone() -> None:
    """Samples of one length run together give each one's own tokens and copy counts: rows that stop early
    (a stop id, a shorter decode) count no copies after their end."""
    model = _tiny_model("llama", vocab_size=16)
    model.config._attn_implementation = ATTENTION_NAME
    torch.manual_seed(2)
    prompts = [NiahPrompt(torch.randint(0, 16, (40,)).tolist(), (5 * i, 5 * i + 20), (0, 40)) for i in range(3)]
    steps = [12, 7, 12]
    free = run_sample(model, prompts[2], 12, set(), prompts[2].answer_span)
    stop = {free.response_ids[4]}  # the third row stops there, the others wherever that token comes up
    alone = [run_sample(model, p, n, stop, p.answer_span) for p, n in zip(prompts, steps)]
    together = run_samples(model, prompts, steps, stop, [p.answer_span for p in prompts])
    assert len(alone[2].response_ids) < 12 and len(alone[1].response_ids) <= 7
    for one, batched in zip(alone, together):
        assert batched.response_ids == one.response_ids
        assert torch.equal(batched.copies, one.copies)
        torch.testing.assert_close(batched.attention, one.attention, rtol=1e-5, atol=1e-5)  # fp32 sums
    with pytest.raises(ValueError, match="one length"):
        run_samples(model, [prompts[0], NiahPrompt(prompts[1].input_ids[:-1], (0, 1), (0, 1))], [2, 2], set(),
                    [(0, 1), (0, 1)])


# --- prompts and scoring -----------------------------------------------------------------------

@pytest.mark.parametrize("reference, response, expected", [
    ("take a walk in Chaoyang Park", "take a walk in Chaoyang Park", 1.0),
    ("take a walk in the park", "I would walk to a lake", 2 / 6),
    ("Take a WALK, in the Park!", "take a walk in the park", 1.0),
    ("can't ride a horse", "cant ride a horse", 0.6),  # "can't" is two words: can, t
    ("the cat and the dog", "the cat", 2 / 5),
    ("the cat and the dog", "the the the dog and cat", 1.0),
    ("the cat", "", 0.0),
    ("", "anything", 0.0),
])
def test_unigram_recall(reference: str, response: str, expected: float) -> None:
    assert unigram_recall(reference, response) == pytest.approx(expected)


@pytest.mark.parametrize("length", [400, 1000])
@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_build_prompt(tokenizer, length: int, depth: float) -> None:
    for needle in load_needles():
        prompt = build_prompt(tokenizer, needle, length, depth)
        ids = prompt.input_ids
        assert len(ids) == length
        a0, a1 = prompt.answer_span
        n0, n1 = prompt.needle_span
        assert n0 <= a0 < a1 <= n1
        answer = tokenizer.decode(ids[a0:a1]).strip().lower()
        real = needle.real_needle.strip().lower()
        assert real in answer and len(answer) <= len(real) + 12
        assert needle.needle in tokenizer.decode(ids[n0:n1])

        before, after = _template_parts(tokenizer, needle.question)
        assert ids[:len(before)] == before and ids[len(ids) - len(after):] == after
        budget = length - len(before) - len(after) - (n1 - n0)
        insert, wanted = n0 - len(before), round(depth * budget)
        assert 0 <= wanted - insert <= 80  # moved back by less than a long sentence
        if 0 < wanted < budget:
            assert "." in tokenizer.decode([ids[n0 - 1]])  # right after a full stop
        else:
            assert insert == wanted  # the very start or end of the context


# --- profile_from_samples ---------------------------------------------------------------------------------

def _identity(name: str = "org/tiny") -> ModelIdentity:
    return ModelIdentity(name=name, architecture="LlamaForCausalLM", num_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16)


def _sample(kept: bool, scores: dict[str, float]) -> SampleRecord:
    return SampleRecord(needle_index=0, context_length=100, depth=0.5, prompt_tokens=100, response="x",
                        recall=1.0 if kept else 0.0, kept=kept, head_scores=scores)


@pytest.mark.parametrize("how, kv", [("max", [[0.375, 0.0], [0.0, 0.5]]),
                                     ("mean", [[0.1875, 0.0], [0.0, 0.25]])])
def test_profile_from_samples(how: str, kv: list[list[float]]) -> None:
    samples = [_sample(True, {"0-1": 0.5, "1-3": 1.0}), _sample(True, {"0-1": 0.25}),
               _sample(False, {"0-0": 1.0, "1-2": 1.0})]  # the dropped sample must not count
    profile = profile_from_samples(_identity(), ProfileMethod(name="retrieval_head_niah", kv_aggregate=how), samples)
    assert (profile.samples_total, profile.samples_kept) == (3, 2)
    assert profile.query_head_scores == [[0.0, 0.375, 0.0, 0.0], [0.0, 0.0, 0.0, 0.5]]
    assert profile.kv_head_scores == kv
    assert profile.samples == samples


def test_summarise_nothing_kept() -> None:
    method = ProfileMethod(name="retrieval_head_niah")
    profile = profile_from_samples(_identity(), method, [_sample(False, {"0-0": 1.0})])
    assert profile.samples_kept == 0 and profile.query_head_scores == [[0.0] * 4] * 2


# --- profile_model: resume and determinism -----------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny random Llama with the SmolLM2 tokenizer (and vocabulary), saved as a model directory."""
    path = tmp_path_factory.mktemp("models") / "tiny-llama"
    model = _tiny_model("llama", vocab_size=len(tokenizer))
    model.config.bos_token_id, model.config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _needles_file(path: Path, index: int) -> Path:
    needle = load_needles()[index]
    path.write_text(json.dumps(needle.__dict__) + "\n")
    return path


def _config(needles: Path, depths: list[float]) -> ProfileConfig:
    return ProfileConfig(lengths=[200, 150], depths=depths, needles_file=needles)


def test_profile_resume(tiny_model_dir: Path, tmp_path: Path) -> None:
    needles = _needles_file(tmp_path / "needles.jsonl", 1)
    out = tmp_path / "p.json"
    first = profile_model(str(tiny_model_dir), _config(needles, [0.0, 1.0]), out)
    assert first.samples_total == 4 and first.model.name == "tiny-llama"
    assert [(s.context_length, s.depth) for s in first.samples] == [(150, 0.0), (150, 1.0), (200, 0.0), (200, 1.0)]
    assert all(s.prompt_tokens == s.context_length for s in first.samples)

    second = profile_model(str(tiny_model_dir), _config(needles, [0.0, 0.5, 1.0]), out)
    assert second.samples_total == 6
    assert second.samples[:4] == first.samples
    assert [(s.context_length, s.depth) for s in second.samples[4:]] == [(150, 0.5), (200, 0.5)]
    assert second.method.params["depths"] == [0.0, 0.5, 1.0]
    assert Profile.load(out) == second

    saved = out.read_text()
    third = profile_model(str(tiny_model_dir), _config(needles, [0.0, 0.5, 1.0]), out)
    assert third.samples == second.samples and out.read_text() == saved

    other = _needles_file(tmp_path / "other.jsonl", 0)
    with pytest.raises(ProfileError, match="needles"):
        profile_model(str(tiny_model_dir), _config(other, [0.0]), out)
    assert out.read_text() == saved


def test_profile_deterministic(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The same config gives the same profile, in batches of samples or one at a time."""
    needles = _needles_file(tmp_path / "needles.jsonl", 1)
    config = _config(needles, [0.0, 0.5, 1.0])
    profile_model(str(tiny_model_dir), config, tmp_path / "a.json")
    profile_model(str(tiny_model_dir), config, tmp_path / "b.json")
    assert (tmp_path / "a.json").read_text() == (tmp_path / "b.json").read_text()
    config.batch_size = 2
    batched = profile_model(str(tiny_model_dir), config, tmp_path / "c.json")
    assert batched == Profile.load(tmp_path / "a.json") and batched.method.params["dtype"] == "float32"


def test_a_hybrid_model_is_profiled_with_its_layer_kinds(tmp_path: Path, tokenizer) -> None:
    """Gemma 2 (a sliding layer with soft-capped scores, then a full one): the profile records which layer is
    which, the split chooses only in the full layer, and a profile of the same shape without the windows
    does not fit it."""
    from rheads.engine import select_heads

    path = tmp_path / "tiny-gemma2"
    model = _tiny_model("gemma2", vocab_size=len(tokenizer))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    needles = _needles_file(tmp_path / "needles.jsonl", 1)
    profile = profile_model(str(path), ProfileConfig(lengths=[150], depths=[0.5], needles_file=needles),
                            tmp_path / "p.json")
    assert profile.samples_total == 1 and Profile.load(tmp_path / "p.json").model.layer_windows == [8, None]
    assert select_heads(profile, budget=1.0).full == ((), (0, 1))
    plain = profile.model.model_copy(update={"layer_windows": None})
    with pytest.raises(ProfileError, match="windows: profile has"):
        Profile.model_validate({**profile.model_dump(), "model": plain.model_dump()}).check_fits(profile.model)


# --- a profile on the wrong model --------------------------------------------------------------

QWEN25_05B = dict(num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, hidden_size=896,
                  intermediate_size=4864, vocab_size=151936, rope_theta=1000000.0,
                  architectures=["Qwen2ForCausalLM"])


def _smollm2_profiles(tmp_path: Path) -> list[Profile]:
    """A profile in the shipped format for the SmolLM2 preset, plus the shipped file when present."""
    config = AutoConfig.from_pretrained(resolve_model("smollm2-135m-instruct").path)
    identity = ModelIdentity.from_config(config, "HuggingFaceTB/SmolLM2-135M-Instruct")
    profile_from_samples(identity, ProfileMethod(name="retrieval_head_niah"), []).save(tmp_path / "smol.json")
    profiles = [Profile.load(tmp_path / "smol.json")]
    if SHIPPED_SMOLLM2.is_file():
        profiles.append(Profile.load(SHIPPED_SMOLLM2))
    return profiles


def test_profile_on_wrong_model_names_num_layers(tmp_path: Path) -> None:
    qwen = ModelIdentity.from_config(Qwen2Config(**QWEN25_05B), "Qwen/Qwen2.5-Coder-0.5B-Instruct")
    for profile in _smollm2_profiles(tmp_path):
        assert profile.model.num_layers == 30
        with pytest.raises(ProfileError, match="num_layers: profile has 30, model has 24"):
            profile.check_fits(qwen)


def test_a_profile_says_which_lengths_it_covers() -> None:
    """A server whose requests run past the profile's longest sample is told so, with what to do."""
    shipped = Profile.load(SHIPPED_SMOLLM2)
    assert shipped.longest_context == max(s.context_length for s in shipped.samples) == 2500
    assert shipped.coverage_warning(2500) is None
    warning = shipped.coverage_warning(8192)
    assert "up to 2500 tokens" in warning and "rheads profile" in warning and "--max-model-len 2500" in warning
    imported = shipped.model_copy(update={"samples": [], "method": ProfileMethod(name="import_duo_attention")})
    assert imported.longest_context is None and imported.coverage_warning(10**6) is None


def test_rescore_ranks_the_same_samples_by_another_score(tiny_model_dir: Path, tmp_path: Path) -> None:
    needles = _needles_file(tmp_path / "needles.jsonl", 1)
    config = _config(needles, [0.0, 1.0])
    config.recall_threshold = -1.0  # keep every sample: a random model recalls nothing
    made = profile_model(str(tiny_model_dir), config, tmp_path / "p.json")
    made.default_budget = 0.5
    assert made.samples_kept == 4 and all(s.head_attention for s in made.samples)
    assert rescore(made) == made  # its own score and aggregate: the same profile, measured budget kept
    by_attention = rescore(made, "attention", "mean")
    assert by_attention.method.params["score"] == "attention" and by_attention.method.kv_aggregate == "mean"
    assert by_attention.default_budget is None and by_attention.samples == made.samples
    kept = [s for s in made.samples if s.kept]
    first = sum(s.head_attention.get("0-0", 0.0) for s in kept) / len(kept)
    assert by_attention.query_head_scores[0][0] == pytest.approx(first, abs=1e-6)
    with pytest.raises(ProfileError, match="profile again"):
        rescore(Profile.load(SHIPPED_SMOLLM2), "attention")  # its samples predate attention scores
