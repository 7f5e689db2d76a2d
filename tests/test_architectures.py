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
from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM

from rheads.engine import EngineConfig, HeadSplit, LLMEngine, SamplingParams, attention
from rheads.engine.decode import kernels_on
from rheads.models import KNOWN_GAPS, VERIFIED_ARCHITECTURES, UnsupportedModelError, resolve_model
from rheads.profiling.profile import layer_windows

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
    "stablelm": {"qk_layernorm": True, "use_parallel_residual": True, "partial_rotary_factor": 0.25,
                 "use_qkv_bias": True},
    "qwen2_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                  "shared_expert_intermediate_size": 64, "sliding_window": 64, "use_sliding_window": False},
}
# Hybrid and sliding-window models, each with a window shorter than the prompts and than the chunks it is
# prefilled across (so the ring wraps within a chunk and between chunks): name -> (model_type, extras)
MODEL_WINDOW = 6
ALTERNATING = {"sliding_window": MODEL_WINDOW, "layer_types": ["sliding_attention", "full_attention"]}
HYBRID = {
    "mistral_window": ("mistral", {"sliding_window": MODEL_WINDOW}),
    "mixtral_window": ("mixtral", {"sliding_window": MODEL_WINDOW, "num_local_experts": 4, "num_experts_per_tok": 2}),
    "phi3_window": ("phi3", {"sliding_window": MODEL_WINDOW, "partial_rotary_factor": 0.75}),
    "starcoder2_window": ("starcoder2", {"sliding_window": MODEL_WINDOW}),
    "qwen2_window": ("qwen2", {"sliding_window": MODEL_WINDOW, "use_sliding_window": True, "max_window_layers": 1}),
    "gemma2": ("gemma2", {**ALTERNATING, "head_dim": 16, "attn_logit_softcapping": 2.0, "final_logit_softcapping": 3.0,
                          "query_pre_attn_scalar": 20}),
    "gemma3_text": ("gemma3_text", {**ALTERNATING, "head_dim": 16, "query_pre_attn_scalar": 20}),
    "gpt_oss": ("gpt_oss", {**ALTERNATING, "head_dim": 16, "num_local_experts": 4, "num_experts_per_tok": 2}),
    "cohere2": ("cohere2", {**ALTERNATING, "logit_scale": 0.25}),
    "olmo3": ("olmo3", {**ALTERNATING}),
    "exaone4": ("exaone4", {**ALTERNATING}),
}
REFUSED = {"helium": {}, "gpt_neox": {}}


def tiny(model_type: str, **extras):
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **{**SHAPE, **extras})
    return perturbed(AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval())


@torch.no_grad()
def perturbed(model):
    """Peaky attention (so the window matters), norm weights away from one, non-zero biases and sinks."""
    for name, param in model.named_parameters():
        if name.endswith(("q_proj.weight", "k_proj.weight", "qkv_proj.weight")):
            param.mul_(3.0)
        elif "norm" in name and name.endswith("weight"):
            param.uniform_(0.5, 1.5)
        elif name.endswith(".bias"):
            param.normal_(0.0, 0.5)
        elif name.endswith(".sinks"):  # GPT-OSS's learned sinks: a logit per query head, large enough to matter
            param.normal_(0.0, 2.0)
    return model


def serve(model, tokenizer, split: HeadSplit, chunk: int = 7) -> dict:
    config = EngineConfig(sink=SINK, window=WINDOW, page_size=4, max_num_batched_tokens=chunk,
                          kv_cache_memory=8 << 20, enable_prefix_caching=False)
    params = SamplingParams(max_tokens=5, logprobs=3, **GREEDY)
    with LLMEngine(copy.deepcopy(model), tokenizer, split, config) as engine:
        results = run(engine, {0: [("a", random_prompt(30, 1, VOCAB), params)],
                               2: [("b", random_prompt(23, 2, VOCAB), params)]})
        assert engine.usage().bytes_used == 0 and not engine.sequences
    return results


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_each_verified_family_passes_both_oracles(model_type, tokenizer) -> None:
    check_both_oracles(tiny(model_type, **FAMILIES[model_type]), tokenizer)


@pytest.mark.parametrize("name", list(HYBRID))
def test_each_hybrid_family_passes_both_oracles(name, tokenizer) -> None:
    """Sliding-window layers in the window pool with the model's window, the split over the full layers
    only; soft-capped scores (Gemma 2) and learned sinks (GPT-OSS) in prefill and decode alike."""
    model_type, extras = HYBRID[name]
    model = tiny(model_type, **extras)
    windows = layer_windows(model.config)
    assert MODEL_WINDOW in windows and set(windows) <= {MODEL_WINDOW, None}
    check_both_oracles(model, tokenizer)


@pytest.mark.triton
@pytest.mark.skipif(not kernels_on(torch.empty(0)) and not torch.cuda.is_available(),
                    reason="needs Triton on CUDA (or TRITON_INTERPRET=1)")
@pytest.mark.parametrize("name", ["gemma2", "gpt_oss"])
def test_soft_caps_and_sinks_through_the_decode_kernel(name, tokenizer) -> None:
    """The same oracles with the decode steps in the Triton kernel (Triton's interpreter on a CPU): the
    sliding layer's ring row of the batch, soft-capped scores and learned sinks as the kernel applies them."""
    model_type, extras = HYBRID[name]
    check_both_oracles(tiny(model_type, **extras), tokenizer)


@pytest.mark.parametrize("name", ["mistral_window", "gemma2", "gpt_oss"])
def test_long_chunks_through_the_banded_and_blocked_paths(name, tokenizer, monkeypatch) -> None:
    """Chunks longer than the band block (a sliding layer's ring without sinks in `attend_band`) and score
    changes over several blocks of queries (`_attend`'s blocks), against the same oracles."""
    monkeypatch.setattr(attention, "BAND_BLOCK", 4)
    monkeypatch.setattr(attention, "DENSE_SCORES", 4 * 30 * 5)  # blocks of 5 queries or fewer
    model_type, extras = HYBRID[name]
    check_both_oracles(tiny(model_type, **extras), tokenizer, chunk=16)


def test_a_window_longer_than_any_sequence_takes_a_ring_of_the_longest(tokenizer) -> None:
    """Mistral-7B-v0.1's 4096-token window served at a shorter max_model_len: every key a query there can
    see fits a ring of max_model_len entries, so that is what the layer gets (and both oracles hold)."""
    model = tiny("mistral", sliding_window=4096)
    config = EngineConfig(sink=SINK, window=WINDOW, kv_cache_memory=1 << 20, max_model_len=40)
    with LLMEngine(copy.deepcopy(model), tokenizer, HeadSplit.uniform(2, 2, full=True), config) as engine:
        assert engine.cache.geometries == [(0, 40)] and engine.split.windows == (40, 40)
    check_both_oracles(model, tokenizer)


def test_hybrid_pools_hold_the_formulas_bytes(tokenizer) -> None:
    """Gemma 3's sliding layer lives in the window slot with the model's window and no sink, its full layer's
    streaming heads with the engine's sink + window: the tensors hold what the formula counts, and what a
    sequence holds at each step is its pages and its slot."""
    model_type, extras = HYBRID["gemma3_text"]
    model, kv, dim = tiny(model_type, **extras), 2, 16
    split = HeadSplit(((), (kv - 1,)), kv)
    config = EngineConfig(sink=SINK, window=WINDOW, page_size=4, max_num_batched_tokens=7,
                          kv_cache_memory=1 << 20, enable_prefix_caching=False)
    per_page = 4 * 1 * 2 * dim * 4  # one full head, K and V, fp32
    per_slot = (MODEL_WINDOW * kv + (SINK + WINDOW) * (kv - 1)) * 2 * dim * 4
    seen = []
    with LLMEngine(copy.deepcopy(model), tokenizer, split, config) as engine:
        cache = engine.cache
        assert (cache.bytes_per_page, cache.bytes_per_slot) == (per_page, per_slot)
        assert cache.geometry(0) == (0, MODEL_WINDOW) and cache.geometry(1) == (SINK, WINDOW)
        held = sum(t.numel() * t.element_size() for pool in (cache.full_k, cache.full_v, cache.ring_k, cache.ring_v)
                   for t in pool if t is not None)
        assert held == (cache.num_pages + 1) * per_page + (cache.num_slots + 1) * per_slot
        assert cache.num_pages * per_page + cache.num_slots * per_slot <= 1 << 20

        def after_step(engine, step):
            pages = sum(-(-seq.num_cached // 4) for seq in engine.scheduler.running)
            usage, running = engine.usage(), engine.scheduler.running
            seen.append(usage.bytes_used)
            assert seen[-1] == pages * per_page + len(running) * per_slot
            # a full cache of this model: its full layer's every head per token, its sliding layer's window
            full = sum(-(-seq.num_cached // 4) * 4 for seq in running) * kv * 2 * dim * 4
            assert usage.bytes_full_equivalent == full + len(running) * MODEL_WINDOW * kv * 2 * dim * 4

        params = SamplingParams(max_tokens=5, **GREEDY)
        run(engine, {0: [("a", random_prompt(30, 1, VOCAB), params)], 1: [("b", random_prompt(9, 2, VOCAB), params)]},
            after_step)
        assert max(seen) > 0 and engine.usage().bytes_used == 0


def check_both_oracles(model, tokenizer, chunk: int = 7) -> None:
    assert type(model).__name__ in VERIFIED_ARCHITECTURES
    kv = model.config.num_key_value_heads
    choosable = None in layer_windows(model.config)  # a full-attention layer, whose heads the split divides
    # budget 1.0 equals the model's own forward; then layer 0 keeps its first KV head, layer 1 its last
    # (the permutation moves it first, with its query heads and any norm weights of theirs)
    for split in (HeadSplit.uniform(2, kv, full=True), HeadSplit(((0,), (kv - 1,)), kv)):
        masked = split if sum(split.num_full) < 2 * kv else None
        moved = 0.0
        for res in serve(model, tokenizer, split, chunk).values():
            ids = res.prompt_ids + res.token_ids
            reference = reference_logprobs(model, ids, masked, SINK, WINDOW)
            n = len(res.prompt_ids)
            assert res.token_ids == reference[n - 1:-1].argmax(-1).tolist()
            check_logprobs_against(reference, res, k=3)
            if masked is not None:
                moved = max(moved, float((reference_logprobs(model, ids) - reference)[n - 1:-1].abs().max()))
        # well beyond the logprob tolerance (1e-4): a wrong mask would fail the comparison above
        assert masked is None or not choosable or moved > 1e-3, "the window changes nothing: a wrong mask would pass"


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


WRAPPERS = {  # model_type -> (its text config, its vision config, the text decoder's class)
    "mistral3": ({**FAMILIES["mistral"], "model_type": "mistral", "head_dim": 16},
                 dict(model_type="pixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, image_size=32, patch_size=8, head_dim=16), "MistralForCausalLM"),
    "gemma3": ({**HYBRID["gemma3_text"][1], "model_type": "gemma3_text"},
               dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=2, image_size=32, patch_size=8), "Gemma3ForCausalLM"),
}


@pytest.mark.parametrize("wrapper_type", list(WRAPPERS))
def test_a_multimodal_wrappers_text_decoder_is_served(wrapper_type, tmp_path, tokenizer) -> None:
    """Mistral-Small-3.1's kind of checkpoint (Mistral3ForConditionalGeneration, whose config has no causal LM
    of its own) and Gemma 3's (Gemma3ForConditionalGeneration, which transformers also lists as its causal
    LM): the text decoder loads as the family it is, equals the wrapper on text, and passes both oracles."""
    from transformers import AutoModelForImageTextToText

    from rheads.models import load_model

    text, vision, decoder = WRAPPERS[wrapper_type]
    torch.manual_seed(0)
    extra = {"mm_tokens_per_image": 4} if wrapper_type == "gemma3" else {}
    wrapper = perturbed(AutoModelForImageTextToText.from_config(AutoConfig.for_model(
        wrapper_type, text_config={**SHAPE, **text}, vision_config=vision, **extra)).eval())
    wrapper.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model, _ = load_model(resolve_model(str(tmp_path)))
    assert type(model).__name__ == decoder
    ids = torch.tensor([random_prompt(20, 3, VOCAB)])
    with torch.inference_mode():
        assert torch.allclose(model(ids).logits, wrapper(input_ids=ids).logits, atol=1e-5)
    check_both_oracles(model, tokenizer)


@pytest.mark.parametrize("name, refused", [("gemma2", True), ("gpt_oss", True), ("gemma3_text", False),
                                           ("mistral_window", False)])
def test_soft_caps_and_sinks_are_refused_on_cuda_until_their_gpu_path_passes(name, refused) -> None:
    """Soft-capped and sink attention passed the oracles here but not on the H200: CUDA refuses them at load
    with what to do; the CPU serves them, and the other hybrid families are served on both."""
    from rheads.models import UnsupportedModelError, check_device_supported

    model_type, extras = HYBRID[name]
    model = tiny(model_type, **extras)
    check_device_supported(model, "cpu")
    if refused:
        with pytest.raises(UnsupportedModelError, match="served on the CPU only for now.*--device cpu"):
            check_device_supported(model, "cuda")
    else:
        check_device_supported(model, "cuda:0")
