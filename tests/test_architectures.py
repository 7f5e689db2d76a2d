"""The architecture matrix: every family the engine serves passes both oracles on a tiny random model, and
every other is refused at load with a message that says why.

Each model has random norm weights (a norm whose weights span the heads must move with them in the head
permutation; with weights of one it could not be seen) and the family's own extras set away from their
neutral values (Granite's multipliers and logit scaling, Cohere's logit scale and q/k norms), so a
post-processing the engine skipped would show. The engine runs on the CPU in fp32 with a tiny sink and
window, so a prompt of 30 tokens already leaves most of its keys outside the streaming heads' reach.
"""

from __future__ import annotations

import copy

import pytest
import torch
from oracles import GREEDY, check_logprobs_against, random_prompt, reference_logprobs, run
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from rheads.engine import EngineConfig, HeadSplit, LLMEngine, SamplingParams
from rheads.models import KNOWN_GAPS, VERIFIED_ARCHITECTURES, UnsupportedModelError, resolve_model

VOCAB, SINK, WINDOW = 512, 4, 8
SHAPE = dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=64,
             intermediate_size=128, max_position_embeddings=512, vocab_size=VOCAB, pad_token_id=0,
             bos_token_id=1, eos_token_id=2)
FAMILIES = {  # model_type -> the config's extras
    "llama": {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 128}},
    "mistral": {"sliding_window": None},
    "mixtral": {"sliding_window": None, "num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2": {},
    "qwen3": {},
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32},
    "gemma": {"head_dim": 16},
    "granite": {"attention_multiplier": 0.2, "residual_multiplier": 0.5, "embedding_multiplier": 3.0,
                "logits_scaling": 4.0},
    "granitemoe": {"attention_multiplier": 0.2, "residual_multiplier": 0.5, "embedding_multiplier": 3.0,
                   "logits_scaling": 4.0, "num_local_experts": 4, "num_experts_per_tok": 2},
    "cohere": {"logit_scale": 0.25, "use_qk_norm": True},
    "olmo": {},
    "olmo2": {},
    "starcoder2": {"sliding_window": None},
    "phi3": {"sliding_window": None, "partial_rotary_factor": 0.75},
    "smollm3": {"no_rope_layer_interval": 2},
    "glm4": {"partial_rotary_factor": 0.5},
    "qwen2_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                  "shared_expert_intermediate_size": 64, "sliding_window": 64, "use_sliding_window": False},
}
REFUSED = {"stablelm": {}, "helium": {}, "gpt_neox": {}}


def tiny(model_type: str, **extras):
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **{**SHAPE, **extras})
    return perturbed(AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval())


@torch.no_grad()
def perturbed(model):
    """Peaky attention (so the window matters), norm weights away from one, non-zero biases."""
    for name, param in model.named_parameters():
        if name.endswith(("q_proj.weight", "k_proj.weight", "qkv_proj.weight")):
            param.mul_(3.0)
        elif "norm" in name and name.endswith("weight"):
            param.uniform_(0.5, 1.5)
        elif name.endswith(".bias"):
            param.normal_(0.0, 0.5)
    return model


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_model("smollm2-135m-instruct").path)


def serve(model, tokenizer, split: HeadSplit) -> dict:
    config = EngineConfig(sink=SINK, window=WINDOW, page_size=4, max_num_batched_tokens=7,
                          kv_cache_memory=8 << 20, enable_prefix_caching=False)
    params = SamplingParams(max_tokens=5, logprobs=3, **GREEDY)
    with LLMEngine(copy.deepcopy(model), tokenizer, split, config) as engine:
        results = run(engine, {0: [("a", random_prompt(30, 1, VOCAB), params)],
                               2: [("b", random_prompt(23, 2, VOCAB), params)]})
        assert engine.usage().bytes_used == 0 and not engine.sequences
    return results


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_each_verified_family_passes_both_oracles(model_type, tokenizer) -> None:
    model = tiny(model_type, **FAMILIES[model_type])
    assert type(model).__name__ in VERIFIED_ARCHITECTURES
    kv = model.config.num_key_value_heads
    # budget 1.0 equals the model's own forward; then layer 0 keeps its first KV head, layer 1 its last
    # (the permutation moves it first, with its query heads and any norm weights of theirs)
    for split in (HeadSplit.uniform(2, kv, full=True), HeadSplit(((0,), (kv - 1,)), kv)):
        masked = split if sum(split.num_full) < 2 * kv else None
        moved = 0.0
        for res in serve(model, tokenizer, split).values():
            ids = res.prompt_ids + res.token_ids
            reference = reference_logprobs(model, ids, masked, SINK, WINDOW)
            n = len(res.prompt_ids)
            assert res.token_ids == reference[n - 1:-1].argmax(-1).tolist()
            check_logprobs_against(reference, res, k=3)
            if masked is not None:
                moved = max(moved, float((reference_logprobs(model, ids) - reference)[n - 1:-1].abs().max()))
        # well beyond the logprob tolerance (1e-4): a wrong mask would fail the comparison above
        assert masked is None or moved > 1e-3, "the window changes nothing here: a wrong mask would pass"


@pytest.mark.parametrize("model_type", list(REFUSED))
def test_other_families_are_refused_with_the_reason(model_type, tokenizer) -> None:
    model = tiny(model_type, **REFUSED[model_type])
    name = type(model).__name__
    with pytest.raises(UnsupportedModelError, match=name) as refused:
        LLMEngine(model, tokenizer, HeadSplit.uniform(2, model.config.num_key_value_heads, full=True),
                  EngineConfig(kv_cache_memory=8 << 20))
    assert KNOWN_GAPS.get(name, "not been verified") in str(refused.value)
    assert "LlamaForCausalLM" in str(refused.value)  # it names what is served


def test_remote_code_under_a_verified_name_is_refused(tokenizer) -> None:
    class LlamaForCausalLMRemote(LlamaForCausalLM):
        pass

    LlamaForCausalLMRemote.__name__ = "LlamaForCausalLM"  # as a Hub repo's own modeling file may call it
    model = LlamaForCausalLMRemote(tiny("llama").config).eval()
    with pytest.raises(UnsupportedModelError, match="not been verified"):
        LLMEngine(model, tokenizer, HeadSplit.uniform(2, 2, full=True), EngineConfig(kv_cache_memory=8 << 20))


def test_a_multimodal_wrappers_text_decoder_is_served(tmp_path, tokenizer) -> None:
    """Mistral-Small-3.1's kind of checkpoint (Mistral3ForConditionalGeneration): its text decoder loads as
    the Mistral it is, equals the wrapper on text, and passes both oracles."""
    from transformers import AutoModelForImageTextToText

    from rheads.models import load_model

    text = {**SHAPE, **FAMILIES["mistral"], "model_type": "mistral", "head_dim": 16}
    vision = dict(model_type="pixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, image_size=32, patch_size=8, head_dim=16)
    torch.manual_seed(0)
    wrapper = perturbed(AutoModelForImageTextToText.from_config(AutoConfig.for_model(
        "mistral3", text_config=text, vision_config=vision)).eval())
    wrapper.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model, _ = load_model(resolve_model(str(tmp_path)))
    assert type(model).__name__ == "MistralForCausalLM"
    ids = torch.tensor([random_prompt(20, 3, VOCAB)])
    with torch.inference_mode():
        assert torch.allclose(model(ids).logits, wrapper(input_ids=ids).logits, atol=1e-5)
    kv = model.config.num_key_value_heads
    for split in (HeadSplit.uniform(2, kv, full=True), HeadSplit(((0,), (kv - 1,)), kv)):
        masked = split if sum(split.num_full) < 2 * kv else None
        for res in serve(model, tokenizer, split).values():
            reference = reference_logprobs(model, res.prompt_ids + res.token_ids, masked, SINK, WINDOW)
            check_logprobs_against(reference, res, k=3)
