"""Oracles 1 and 2 on the path users are served by, on every device: the engine as `rheads serve` builds it
(sink 64, window 256, pages of 16, prompts in 512-token chunks; on CUDA CUDA graphs, async decode, the
full heads' prefill through cuDNN in bf16, the streaming heads' through FlexAttention, decode through the
Triton kernel) against references that share no code with it, computed in fp32 on the CPU:

1. budget 1.0: transformers `generate` (fp32: its tokens; bf16: the model's own attention in one pass);
2. compressed: the model in one pass with each streaming head masked to sink + window (oracles.py).

In bf16 the engine cannot equal an fp32 reference, so each comparison allows what bf16 alone costs: the
reference itself, run in the engine's dtype on the engine's device, sets the yardstick, and the engine's
log-probabilities must lie within a small multiple of it; greedy tokens must equal the reference's wherever
its top-2 margin is wider than twice that bound. A lost key block or a window off by one moves the
log-probabilities by far more (each test checks that the masks it relies on matter by more than the bound).
"""

from __future__ import annotations

import copy
from functools import lru_cache

import oracles
import pytest
import torch
from oracles import GREEDY, Result, check_within, logprob_errors, precision_bounds, reference_logprobs, run

from rheads.engine import EngineConfig, HeadSplit, LLMEngine, SamplingParams, random_split, select_heads
from rheads.models import UnsupportedModelError, load_model, resolve_model
from rheads.niah import build_prompt, load_needles
from rheads.profiling.profile import Profile, find_profile

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA")
TARGETS = {"cpu-fp32": ("cpu", torch.float32), "cpu-bf16": ("cpu", torch.bfloat16),
           "cuda-fp32": ("cuda", torch.float32), "cuda-bf16": ("cuda", torch.bfloat16)}


def cases(everywhere_on_cuda: list[tuple], on_the_cpu: list[tuple]) -> list:
    """Every case on both CUDA targets; on the CPU (CI) a few, which keep this module's comparisons
    themselves tested there (test_engine.py's tiny oracles cover the CPU path's shapes)."""
    params = [pytest.param(*case, TARGETS[name], id="-".join(map(str, case + (name,))), marks=needs_cuda)
              for name in ("cuda-fp32", "cuda-bf16") for case in everywhere_on_cuda]
    return params + [pytest.param(*case[:-1], TARGETS[case[-1]], id="-".join(map(str, case))) for case in on_the_cpu]

VOCAB = 4096  # below SmolLM2's, so its tokenizer decodes the tiny models' tokens
SHAPE = dict(num_attention_heads=4, num_key_value_heads=2, hidden_size=256, head_dim=64, intermediate_size=512,
             max_position_embeddings=2048, vocab_size=VOCAB)
KINDS = {"llama": ("llama", {}), "mistral": ("mistral", {}), "qwen2": ("qwen2", {}), "qwen3": ("qwen3", {}),
         "gqa7": ("qwen2", {"num_attention_heads": 14}), "mha": ("llama", {"num_key_value_heads": 4})}
SINK, WINDOW, CHUNK = 64, 256, 512
SERVED = dict(sink=SINK, window=WINDOW, page_size=16, max_num_batched_tokens=CHUNK, max_model_len=2048,
              max_num_seqs=8, kv_cache_memory=64 << 20)
# Whole chunks after whole chunks (cuDNN's planned shapes, with history blocks before them), a tail long
# enough to run padded on them, a short tail and a short prompt (flash); two arrive while others decode.
PROMPT_LENGTHS = (1536, 900, 1100, 300)
MAX_TOKENS = 10
FACTOR = 3.0  # the engine's error may be this multiple of its precision's own error on the reference
MOE_FACTOR = 4.0  # with top-k expert routing (test_moe_models_on_the_served_path)
FLOOR = {torch.float32: 1e-4, torch.bfloat16: 1e-3}
MIN_DECIDED = {torch.float32: 0.9, torch.bfloat16: 0.1}  # of the greedy tokens, those clear of the bound


@lru_cache(maxsize=None)
def tiny(kind: str):
    """The kind's small random model in fp32 on the CPU. Its weights are small (larger ones make a random
    model chaotic: bf16's rounding alone would move its log-probabilities by more than most top-2 margins),
    but for q and k: their attention is peaky enough that the window matters."""
    family, overrides = KINDS[kind]
    model = oracles.tiny_model(family, SHAPE, num_layers=3, initializer_range=0.05, **overrides)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                param.mul_(2.0)
    return model


def served_engine(model, tokenizer, split: HeadSplit, device: str, dtype: torch.dtype, **config) -> LLMEngine:
    """The engine over a copy of `model` moved to the device in the dtype, with the server's settings."""
    config = EngineConfig(device=device, dtype=dtype, **{**SERVED, **config})
    return LLMEngine(copy.deepcopy(model).to(device, dtype), tokenizer, split, config)


class PathCounter:
    """How often the served path's parts ran: a test that claims to check them fails if one never did."""

    def __init__(self, engine: LLMEngine, monkeypatch):
        from rheads.engine import attention, cudnn_prefill, decode

        self.counts = dict.fromkeys(["graph replays", "pipelined launches", "cuDNN chunks", "FlexAttention bands",
                                     "Triton decode"], 0)
        self._wrap(monkeypatch, engine.runner, "_replay", "graph replays")
        self._wrap(monkeypatch, engine.pipeline, "step", "pipelined launches", lambda out: bool(out[0]))
        self._wrap(monkeypatch, cudnn_prefill, "chunk_attention", "cuDNN chunks",
                   when=lambda args, kwargs: "attend" not in kwargs)  # the kernel, not a test's plain one
        self._wrap(monkeypatch, attention, "band_attention", "FlexAttention bands")
        self._wrap(monkeypatch, decode, "head_split_decode_triton", "Triton decode")
        # soft-capped scores or learned sinks: prefill takes the plain PyTorch path (scores.py), not cuDNN or Flex
        self.score_mods = any(getattr(m, "sinks", None) is not None or getattr(m, "attn_logit_softcapping", None)
                              for m in engine.model.modules())

    def _wrap(self, monkeypatch, owner, name, counter, counted=lambda out: True, when=lambda args, kwargs: True):
        original = getattr(owner, name)

        def wrapped(*args, **kwargs):
            out = original(*args, **kwargs)
            if when(args, kwargs) and counted(out):
                self.counts[counter] += 1
            return out

        monkeypatch.setattr(owner, name, wrapped)

    def check(self, device: str, dtype: torch.dtype, split: HeadSplit, graphs: bool = True) -> None:
        if device != "cuda":
            return
        expected = ["graph replays"] * graphs + ["pipelined launches", "Triton decode"]
        if dtype is torch.bfloat16 and any(split.num_full) and not self.score_mods:
            expected.append("cuDNN chunks")
        if min(split.num_full) < split.num_kv_heads and not self.score_mods:
            expected.append("FlexAttention bands")
        missing = [name for name in expected if not self.counts[name]]
        assert not missing, f"the served path's {missing} never ran: {self.counts}"


def serve(engine: LLMEngine, prompts: list[list[int]], logprobs: int | None) -> dict[str, Result]:
    """Two prompts at once, the others three steps later (while the first decode); greedy."""
    params = SamplingParams(max_tokens=MAX_TOKENS, logprobs=logprobs, **GREEDY)
    requests = [(f"r{i}", prompt, params) for i, prompt in enumerate(prompts)]
    results = run(engine, {0: requests[:2], 3: requests[2:]})
    assert all(r.finish_reason == "length" and len(r.token_ids) == MAX_TOKENS for r in results.values())
    assert engine.usage().bytes_used == 0 and not engine.sequences
    return results


def check_served(model, tokenizer, split: HeadSplit, prompts: list[list[int]], target, monkeypatch,
                 masked: bool, factor: float = FACTOR, captured: bool = True, **config) -> LLMEngine:
    """Serve the prompts twice (tokens alone, which pipelines on CUDA; then with logprobs, which does not)
    and hold both runs to the fp32 truth: the masked reference when `masked`, else the model's own attention,
    within `factor` times the dtype's own error. The second run finds the first's prompts in the prefix cache
    (with streaming heads, from their window snapshots), so the truth holds the served path from a warm cache
    too. On CUDA the decode must have run in CUDA graphs unless not `captured` (then it may run eagerly)."""
    device, dtype = target
    engine = served_engine(model, tokenizer, split, device, dtype, **config)
    paths = PathCounter(engine, monkeypatch)
    weights = copy.deepcopy(model).to(dtype).float()  # the truth runs on the engine's weights, rounded to its dtype
    reference = dict(split=split, sink=SINK, window=WINDOW) if masked else {}
    decided = total = 0
    mask_moves = 0.0  # the most the mask moves a logprob, in bounds
    memo: dict[tuple, torch.Tensor] = {}

    def logprobs_of(ids: list[int], **how) -> torch.Tensor:  # both runs mostly give the same tokens
        key = (tuple(ids), tuple(sorted(how.items(), key=str)))
        if key not in memo:
            memo[key] = reference_logprobs(weights, ids, **how)
        return memo[key]

    for logprobs in (None, 5):
        hits = engine.blocks.prefix.hits if engine.blocks.prefix else 0
        for rid, res in serve(engine, prompts, logprobs).items():
            ids = res.prompt_ids + res.token_ids
            truth = logprobs_of(ids, **reference)
            yardstick = torch.zeros(len(res.token_ids))  # the truth itself, on the CPU in fp32
            if (device, dtype) != ("cpu", torch.float32):
                yardstick = logprob_errors(truth, logprobs_of(ids, device=device, dtype=dtype, **reference), res)
            bounds = precision_bounds(yardstick, factor, FLOOR[dtype])
            what = f"{rid} ({'logprobs' if logprobs else 'tokens'}; {dtype} on {device})"
            decided += check_within(truth, res, bounds, what)
            total += len(res.token_ids)
            if masked:
                mask_moves = max(mask_moves, float((logprob_errors(truth, logprobs_of(ids), res) / bounds).max()))
        if logprobs and engine.blocks.prefix:  # every prompt's whole pages but its last token's
            assert engine.blocks.prefix.hits - hits == sum((len(p) - 1) // 16 * 16 for p in prompts)
    # the mask must matter by more than the bound, or a wrong one could pass
    assert not masked or mask_moves > 2, f"the mask moves no logprob by twice the bound ({mask_moves:.2f})"
    assert decided >= MIN_DECIDED[dtype] * total, f"only {decided} of {total} tokens were clear enough to check"
    paths.check(device, dtype, engine.split, graphs=captured or engine.runner.use_graphs)  # the engine's split
    return engine


@pytest.mark.parametrize("kind, target", cases([(k,) for k in ("llama", "mistral", "qwen2", "qwen3")],
                                                [("llama", "cpu-bf16"), ("qwen3", "cpu-fp32")]))
def test_full_budget_equals_generate(kind, target, tokenizer, monkeypatch) -> None:
    """Budget 1.0 on the served path: in fp32 every greedy token equals transformers `generate` on the same
    device (up to a near-tie there, past which the sequences may part); in both dtypes the tokens and
    log-probabilities hold to the fp32 truth within the dtype's own error."""
    model = tiny(kind)
    device, dtype = target
    split = HeadSplit.uniform(3, model.config.num_key_value_heads, full=True)
    prompts = [oracles.random_prompt(n, seed=n, vocab=VOCAB) for n in PROMPT_LENGTHS]
    check_served(model, tokenizer, split, prompts, target, monkeypatch, masked=False)
    if dtype is torch.float32:
        engine = served_engine(model, tokenizer, split, device, dtype)
        on_device = copy.deepcopy(model).to(device)
        compared = 0
        for res in serve(engine, prompts, None).values():
            want, margins = oracles.hf_greedy(on_device, res.prompt_ids, MAX_TOKENS)
            for i, (got, expected, margin) in enumerate(zip(res.token_ids, want, margins)):
                if margin < 2 * FLOOR[dtype]:
                    break  # a near-tie in generate itself: past it the two may rightly differ
                assert got == expected, f"position {i}: {res.token_ids} against generate's {want}"
                compared += 1
        assert compared >= 0.7 * len(prompts) * MAX_TOKENS


@pytest.mark.parametrize("kind, split_name, target", cases(
    [(k, s) for k in ("llama", "qwen3", "gqa7", "mha") for s in ("half", "streaming")] + [("mistral", "half")],
    [("llama", "half", "cpu-bf16"), ("mha", "streaming", "cpu-fp32")]))
def test_compressed_equals_masked_reference(kind, split_name, target, tokenizer, monkeypatch) -> None:
    """Half the KV heads full (a random choice, so layers differ), or every head streaming, on the served
    path: greedy tokens and log-probabilities hold to the masked fp32 reference within the dtype's error."""
    model = tiny(kind)
    kv = model.config.num_key_value_heads
    split = random_split(3, kv, 0.5, seed=1) if split_name == "half" else HeadSplit.uniform(3, kv, full=False)
    assert split_name == "streaming" or 0 < sum(split.num_full) < 3 * kv
    prompts = [oracles.random_prompt(n, seed=n + 7, vocab=VOCAB) for n in PROMPT_LENGTHS]
    check_served(model, tokenizer, split, prompts, target, monkeypatch, masked=True)


@pytest.mark.parametrize("target", cases([()], [("cpu-bf16",)]))
def test_questions_over_one_document_on_the_served_path(target, tokenizer, monkeypatch) -> None:
    """Four questions over one document, two arriving while two prefill it: the later ones find the
    document's pages with no snapshot at its end and recompute the streaming heads from them (prefix_cache.py)
    through the served path's prefill (its band on CUDA, the full heads read from the pages), then find
    their own snapshots in the second run; every token holds to the masked reference."""
    from rheads.engine import prefix_cache

    model, jumps = tiny("llama"), []
    lookup = prefix_cache.PrefixCache.lookup

    def counted(self, seq):
        hit = lookup(self, seq)
        jumps.append(hit.jump is not None)
        return hit

    monkeypatch.setattr(prefix_cache.PrefixCache, "lookup", counted)
    split = random_split(3, model.config.num_key_value_heads, 0.5, seed=1)
    doc = oracles.random_prompt(1200, seed=5, vocab=VOCAB)
    prompts = [doc + oracles.random_prompt(n, seed=n, vocab=VOCAB) for n in (40, 300, 100, 9)]
    check_served(model, tokenizer, split, prompts, target, monkeypatch, masked=True)
    assert any(jumps), "no request recomputed the streaming heads"


# hybrid models at the served shape: windowed layers around a full one, a window shorter than the chunks
HYBRID_WINDOW = 128
CPU_ONLY = ("gemma2", "gpt_oss")  # models.check_device_supported: soft-caps and sinks failed this test on the H200
HYBRID = {"mistral_window": ("mistral", {}), "gemma2": ("gemma2", {"attn_logit_softcapping": 5.0}),
          "gemma3": ("gemma3_text", {}), "gpt_oss": ("gpt_oss", {"num_local_experts": 4, "num_experts_per_tok": 2})}


@lru_cache(maxsize=None)
def tiny_hybrid(kind: str):
    """The family's small random model in fp32 on the CPU, weights as `tiny`'s, learned sinks of order one."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, extras = HYBRID[kind]
    layers = {} if model_type == "mistral" else {
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]}
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, num_hidden_layers=3, initializer_range=0.05,
                                  sliding_window=HYBRID_WINDOW, **SHAPE, **layers, **extras)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                param.mul_(2.0)
            elif name.endswith(".sinks"):
                param.normal_(0.0, 1.0)
    return model


@pytest.mark.parametrize("kind, budget, target", cases(
    [(k, b) for k in HYBRID for b in (1.0, 0.5) if (k, b) != ("mistral_window", 0.5)], []))
def test_hybrid_models_on_the_served_path(kind, budget, target, tokenizer, monkeypatch) -> None:
    """Sliding-window layers in the window pool (FlexAttention's band with the model's window and no sink,
    the decode kernel's ring of that geometry, CUDA graphs over both geometries), soft-capped scores and
    sinks (prefill in plain PyTorch, decode in the kernel): at budget 1.0 the model's own attention, at 0.5
    (the full layer's heads split) the masked reference, both within the dtype's error."""
    model = tiny_hybrid(kind)
    if kind in CPU_ONLY and target[0] == "cuda":  # refused there until its GPU path passes the rest of this test
        with pytest.raises(UnsupportedModelError, match="served on the CPU only"):
            served_engine(model, tokenizer, HeadSplit.uniform(3, model.config.num_key_value_heads, full=True),
                          *target)
        monkeypatch.setattr("rheads.engine.llm.check_device_supported", lambda model, device: None)
    kv = model.config.num_key_value_heads
    split = HeadSplit.uniform(3, kv, full=True) if budget == 1.0 else HeadSplit(((), (kv - 1,), ()), kv)
    prompts = [oracles.random_prompt(n, seed=n + 11, vocab=VOCAB) for n in PROMPT_LENGTHS]
    check_served(model, tokenizer, split, prompts, target, monkeypatch,
                 masked=budget < 1.0)


# MoE models at the served shape: their routing runs inside the captured decode graphs (verified on the CPU
# in test_architectures.py; here the served GPU path, CUDA graphs and pipelined decode included)
MOE = {"mixtral": ("mixtral", {"num_local_experts": 4, "num_experts_per_tok": 2}),
       "qwen3_moe": ("qwen3_moe", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 128,
                                   "decoder_sparse_step": 1, "mlp_only_layers": []})}


@lru_cache(maxsize=None)
def tiny_moe(kind: str):
    """The family's small random MoE model in fp32 on the CPU, weights as `tiny`'s."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, extras = MOE[kind]
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, num_hidden_layers=3, initializer_range=0.05, sliding_window=None,
                                  **SHAPE, **extras)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                param.mul_(2.0)
    return model


@pytest.mark.parametrize("kind, budget, target", cases([(k, b) for k in MOE for b in (1.0, 0.5)],
                                                       [("mixtral", 0.5, "cpu-fp32")]))
def test_moe_models_on_the_served_path(kind, budget, target, tokenizer, monkeypatch) -> None:
    """Mixtral and Qwen3-MoE: at budget 1.0 the model's own attention, at 0.5 the masked reference, both
    within the dtype's error, with their expert routing in the pipelined decode steps, graphed in bf16.
    In fp32 transformers routes experts with a host sync, which a CUDA graph cannot capture: the engine
    then decodes eagerly (`ModelRunner.capture_graphs`). Top-k routing is discrete: where bf16 flips an
    expert choice, the engine and the yardstick flip at different tokens, hence a wider factor."""
    model = tiny_moe(kind)
    kv = model.config.num_key_value_heads
    split = HeadSplit.uniform(3, kv, full=True) if budget == 1.0 else random_split(3, kv, 0.5, seed=1)
    prompts = [oracles.random_prompt(n, seed=n + 13, vocab=VOCAB) for n in PROMPT_LENGTHS]
    bf16 = target[1] is torch.bfloat16
    check_served(model, tokenizer, split, prompts, target, monkeypatch, masked=budget < 1.0,
                 factor=MOE_FACTOR, captured=bf16)


# --- the real SmolLM2 -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2():
    return load_model(resolve_model("smollm2-135m-instruct"))


def needle_prompts(tokenizer, count: int, length: int) -> list[list[int]]:
    """Needle-in-a-haystack prompts over the shipped haystack, the kind of prompt retrieval heads serve."""
    needles = load_needles()
    return [build_prompt(tokenizer, needles[i % len(needles)], length - 97 * i, depth=0.3 + 0.2 * i).input_ids
            for i in range(count)]


@pytest.mark.parametrize("budget, target", cases([(1.0,), (0.5,)], [(0.5, "cpu-fp32")]))
def test_real_smollm2(budget, target, smollm2, monkeypatch) -> None:
    """The real model (its GGUF weights) at budget 1.0 and at 0.5 with its shipped profile's heads."""
    model, tokenizer = smollm2
    config = model.config
    if budget == 1.0:
        split = HeadSplit.uniform(config.num_hidden_layers, config.num_key_value_heads, full=True)
    else:
        split = select_heads(Profile.load(find_profile("HuggingFaceTB/SmolLM2-135M-Instruct")), budget=budget)
        assert split.fraction_full == pytest.approx(budget, abs=0.02)
    device, _ = target
    prompts = needle_prompts(tokenizer, count=4, length=1100) if device == "cuda" else \
        needle_prompts(tokenizer, count=2, length=600)
    # room for all four at once, so that prompts prefill while others decode (the eager Triton decode), and
    # window slots for every snapshot the first run keeps beside them (the four prompts' ends and the point
    # where the later two branch off the first): with fewer, the least recently used give theirs up and
    # the second run finds less than every prompt's whole pages
    check_served(model, tokenizer, split, prompts, target, monkeypatch, masked=budget < 1.0,
                 kv_cache_memory=1 << 30, max_num_seqs=16)
