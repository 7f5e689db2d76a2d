"""The oracles' references, and the helpers that drive an engine against them.

Shared by tests/test_engine.py (tiny shapes on the CPU) and tests/test_served_oracles.py (the served path:
CUDA, bf16, graphs, cuDNN, FlexAttention and Triton). No reference here calls the engine's attention,
cache or kernels: transformers runs the model with its own attention (`generate`, or one forward pass),
or with `sink_window_reference`, plain softmax attention that applies the sink + window rule as written
in MISSION.md (a streaming head's query at q sees key k iff k <= q and (k < sink or q - k < window)) and
the model's own attention as its modules describe it to an attention function: a sliding-window layer's
window (`sliding_window`: every head sees k iff k <= q and q - k < window, and no split applies there),
soft-capped scores (`softcap`) and learned sinks (`s_aux`, one logit per query head in the denominator).
Two hooks change what the reference attends to, never how: `kv_round` rounds each layer's keys and values
(an fp8 cache's rounding, worked out here), `mask_edit` hides keys (a bug planted to show a tolerance sees it).
"""

from __future__ import annotations

import copy
from contextvars import ContextVar
from dataclasses import dataclass, field

import pytest
import torch
from transformers import AttentionInterface, AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

from rheads.engine import HeadSplit, LLMEngine, SamplingParams

GREEDY = dict(temperature=0.0, ignore_eos=True)
CONFIGS = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}


def tiny_model(kind: str, shape: dict, num_layers: int = 4, seed: int = 0, initializer_range: float = 0.2,
               **overrides):
    """A small random Llama, Mistral (no sliding window), Qwen2 or Qwen3 (q/k norms) in fp32, eval mode, with
    non-zero biases; `initializer_range` sets how peaky its attention is."""
    torch.manual_seed(seed)
    if kind in ("mistral", "qwen3"):
        overrides = {"sliding_window": None, **overrides}
    config = CONFIGS[kind](num_hidden_layers=num_layers, initializer_range=initializer_range, **{**shape, **overrides})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0.0, 0.5)
    return model


def random_prompt(length: int, seed: int, vocab: int) -> list[int]:
    return torch.randint(0, vocab, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


@dataclass
class Result:
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list = field(default_factory=list)
    finish_reason: str | None = None
    outputs: int = 0


def run(engine: LLMEngine, arrivals: dict[int, list[tuple[str, list[int], SamplingParams]]],
        after_step=None, max_steps: int = 10_000) -> dict[str, Result]:
    """Step the engine to the end, adding requests at the steps given; gather each request's output."""
    results: dict[str, Result] = {}
    step = 0
    while step <= max(arrivals, default=0) or engine.has_unfinished():
        for rid, ids, params in arrivals.get(step, []):
            engine.add_request(rid, ids, params)
            results[rid] = Result(list(ids))
        for out in engine.step():
            res = results[out.request_id]
            assert res.finish_reason is None, "output after the request finished"
            res.token_ids += out.new_token_ids
            res.text += out.new_text
            res.logprobs += out.new_logprobs
            res.outputs += 1
            assert out.num_output_tokens == len(res.token_ids)
            assert out.num_prompt_tokens == len(res.prompt_ids)
            if out.finished:
                res.finish_reason = out.finish_reason
        if after_step is not None:
            after_step(engine, step)
        step += 1
        assert step < max_steps, "the engine does not finish"
    return results


def hf_greedy(model, prompt_ids: list[int], n: int) -> tuple[list[int], list[float]]:
    """transformers' own greedy decoding on the model's device, eos ignored: the tokens, and at each step
    the margin between the best and the second-best log-probability (where a tie could go either way)."""
    ids = torch.tensor([prompt_ids], device=model.device)
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    tokens = out.sequences[0, len(prompt_ids):].tolist()
    assert len(tokens) == n
    return tokens, [top2_margin(scores[0].float().log_softmax(-1)) for scores in out.scores]


def top2_margin(row: torch.Tensor) -> float:
    best = torch.topk(row.float(), 2).values
    return float(best[0] - best[1])


# --- the reference: the original model in one pass, each streaming KV head masked to sink + window -----

REF_ATTENTION = "rheads_test_sink_window_reference"
REF_ATTENTION_CHUNKED = "rheads_test_sink_window_reference_chunked"


def visible_keys(split: HeadSplit, layer: int, num_heads: int, group: int, q_pos: torch.Tensor,
                 k_pos: torch.Tensor, sink: int, window: int, model_window: int | None = None) -> torch.Tensor:
    """[heads, queries, keys]: which keys each query head sees (positions q_pos [queries, 1], k_pos [1, keys]):
    every causal key for a full KV head's query heads, only the sink + window ones for a streaming head's;
    in a layer the model itself windows (`model_window`), the keys of that window for every head."""
    causal = k_pos <= q_pos
    if model_window is not None:
        return (causal & (q_pos - k_pos < model_window)).expand(num_heads, -1, -1)
    streaming = causal & ((k_pos < sink) | (q_pos - k_pos < window))
    full = set(split.full[layer])
    is_full = torch.tensor([head // group in full for head in range(num_heads)], device=q_pos.device)
    return torch.where(is_full[:, None, None], causal, streaming)


def model_softmax(scores: torch.Tensor, mask: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """softmax over the keys of fp32 scores [1, heads, queries, keys] where `mask` allows, as the model's own
    eager attention computes it: soft-capped first (Gemma 2), a learned sink logit per head in the
    denominator (GPT-OSS), whose probability weighs no value."""
    if cap := kwargs.get("softcap"):
        scores = torch.tanh(scores / cap) * cap
    scores = scores.masked_fill(~mask, float("-inf"))
    sinks = kwargs.get("s_aux")
    if sinks is None:
        return scores.softmax(-1)
    column = sinks.float().reshape(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
    return torch.cat([scores, column], -1).softmax(-1)[..., :-1]


# for a decoder layer that does not pass its keyword arguments on to attention (StableLM's)
REFERENCE: ContextVar[tuple | None] = ContextVar("rheads_reference", default=None)


def sink_window_reference(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Softmax attention over one unpadded sequence in the inputs' precision as a fused kernel computes it
    (scores and softmax in fp32, the probabilities rounded to the inputs' dtype before they weigh the
    values); streaming heads see sink + window only; the model's windows, soft-caps and sinks apply."""
    split, sink, window = kwargs.get("rheads_reference") or REFERENCE.get()
    _, num_heads, n, _ = query.shape
    group = num_heads // key.shape[1]
    positions = torch.arange(n, device=query.device)
    mask = visible_keys(split, module.layer_idx, num_heads, group, positions[:, None], positions[None, :], sink, window,
                        kwargs.get("sliding_window"))
    key, value, mask = _hooks(module.layer_idx, key, value, mask, positions[:, None], positions[None, :], kwargs)
    keys = key.float().repeat_interleave(group, dim=1)
    values = value.float().repeat_interleave(group, dim=1)
    scores = (query.float() @ keys.transpose(-1, -2)) * scaling
    weights = model_softmax(scores, mask, kwargs)
    return (weights.to(query.dtype).float() @ values).to(query.dtype).transpose(1, 2).contiguous(), None


def sink_window_reference_chunked(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """`sink_window_reference` by blocks of `block` queries, so that a long sequence's scores fit in memory
    (at 31k tokens one layer's [heads, n, n] scores in fp32 would not): each block's scores against the keys
    up to its last query (later ones are masked for all of it), with the same mask and precision."""
    split, sink, window, block = kwargs.get("rheads_reference") or REFERENCE.get()
    _, num_heads, n, _ = query.shape
    group = num_heads // key.shape[1]
    key, value, _ = _hooks(module.layer_idx, key, value, None, None, None, {**kwargs, "rheads_mask_edit": None})
    keys = key.float().repeat_interleave(group, dim=1)
    values = value.float().repeat_interleave(group, dim=1)
    out = torch.empty(*query.shape[:-1], value.shape[-1], dtype=query.dtype, device=query.device)
    for start in range(0, n, block):
        end = min(start + block, n)
        q_pos = torch.arange(start, end, device=query.device)[:, None]
        k_pos = torch.arange(end, device=query.device)[None, :]
        mask = visible_keys(split, module.layer_idx, num_heads, group, q_pos, k_pos, sink, window,
                            kwargs.get("sliding_window"))
        _, _, mask = _hooks(module.layer_idx, None, None, mask, q_pos, k_pos, {**kwargs, "rheads_kv_round": None})
        scores = (query[:, :, start:end].float() @ keys[:, :, :end].transpose(-1, -2)) * scaling
        weights = model_softmax(scores, mask, kwargs)
        out[:, :, start:end] = (weights.to(query.dtype).float() @ values[:, :, :end]).to(query.dtype)
    return out.transpose(1, 2).contiguous(), None


def _hooks(layer: int, key, value, mask, q_pos, k_pos, kwargs: dict):
    if key is not None and (kv_round := kwargs.get("rheads_kv_round")):
        key, value = kv_round(layer, key, value)
    if mask is not None and (edit := kwargs.get("rheads_mask_edit")):
        mask = edit(layer, mask, q_pos, k_pos)
    return key, value, mask


AttentionInterface.register(REF_ATTENTION, sink_window_reference)
AttentionInterface.register(REF_ATTENTION_CHUNKED, sink_window_reference_chunked)


def reference_logprobs(model, ids: list[int], split: HeadSplit | None = None, sink: int = 0, window: int = 0,
                       device: str | None = None, dtype: torch.dtype | None = None, block: int | None = None,
                       last: int | None = None, kv_round=None, mask_edit=None) -> torch.Tensor:
    """log_softmax of the original model's logits over `ids` in one pass, in fp32 on the CPU: [len(ids), vocab].

    With a split: each streaming KV head's query heads see only sink + window; else the model's own
    attention (full causal). `device` / `dtype`: run a copy there and in that precision (the yardstick
    that says how far that precision alone moves the result). `block`: the masked attention by blocks of
    that many queries (long sequences). `last`: only the last rows (a long sequence's full logits in
    fp32 would take gigabytes). `kv_round(layer, key, value) -> (key, value)` [1, Hkv, n, D] in the model's
    head order, `mask_edit(layer, mask [heads, queries, keys], q_pos, k_pos) -> mask`: see the module docstring;
    either needs a split (the masked reference)."""
    ref = copy.deepcopy(model)
    if device is not None or dtype is not None:
        ref = ref.to(device or ref.device, dtype or ref.dtype)
    kwargs = {} if last is None else {"logits_to_keep": last}
    if split is not None:
        ref.config._attn_implementation = REF_ATTENTION if block is None else REF_ATTENTION_CHUNKED
        kwargs["rheads_reference"] = (split, sink, window) + (() if block is None else (block,))
        kwargs.update(rheads_kv_round=kv_round, rheads_mask_edit=mask_edit)
    elif getattr(ref.config, "attn_logit_softcapping", None):
        # the model's eager attention, which soft-caps: transformers 5.17 lets Gemma 2 default to SDPA,
        # which drops the soft-cap silently (5.25 no longer does)
        ref.config._attn_implementation = "eager"
    token = REFERENCE.set(kwargs.get("rheads_reference"))
    try:
        with torch.inference_mode():
            logits = ref(torch.tensor([ids], device=ref.device), use_cache=False, **kwargs).logits[0]
    finally:
        REFERENCE.reset(token)
    return logits.float().log_softmax(-1).cpu()


def check_logprobs_against(reference: torch.Tensor, res: Result, k: int, tol: float = 1e-4) -> None:
    """Each generated position: the chosen token's and the top-k logprobs equal the reference's."""
    n = len(res.prompt_ids)
    assert len(res.logprobs) == len(res.token_ids)
    for i, (token, lp) in enumerate(zip(res.token_ids, res.logprobs)):
        row = reference[n - 1 + i]
        assert lp.token_id == token
        assert lp.logprob == pytest.approx(float(row[token]), abs=tol), f"position {i}"
        top = torch.topk(row, k)
        assert [t for t, _ in lp.top] == top.indices.tolist(), f"position {i}"
        assert [v for _, v in lp.top] == pytest.approx(top.values.tolist(), abs=tol), f"position {i}"


# --- comparisons that allow for a precision's rounding, and no more ------------------------------------

def generated_rows(reference: torch.Tensor, res: Result) -> torch.Tensor:
    """The reference's rows that predict each generated token: [generated, vocab]."""
    n = len(res.prompt_ids)
    return reference[n - 1:n - 1 + len(res.token_ids)]


def logprob_errors(truth: torch.Tensor, other: torch.Tensor, res: Result, k: int = 5) -> torch.Tensor:
    """Per generated position, how far `other` lies from `truth` on the log-probabilities of the truth's
    top-k tokens and the generated token: [generated]."""
    errors = []
    for i, (want, got) in enumerate(zip(generated_rows(truth, res), generated_rows(other, res))):
        tokens = torch.cat([torch.topk(want, k).indices, torch.tensor([res.token_ids[i]])])
        errors.append(float((want[tokens] - got[tokens]).abs().max()))
    return torch.tensor(errors)


def precision_bounds(yardstick: torch.Tensor, factor: float, floor: float) -> torch.Tensor:
    """Per position, the log-probability error a precision may cause: `factor` x what it costs the reference
    there (some positions are far more sensitive than others), never less than its median over the
    positions (a position where the reference's rounding happened to cancel), plus `floor`."""
    return factor * yardstick.clamp(min=float(yardstick.median())) + floor


def check_within(truth: torch.Tensor, res: Result, bounds: torch.Tensor, what: str) -> int:
    """The engine's result against the fp32 truth, `bounds` being per position the log-probability error
    its precision may cause: every logprob it reports (the chosen token's and its top-k) lies within the
    bound of the truth's, and every greedy token is the truth's best wherever the truth's top-2 margin
    exceeds twice the bound (below that, rounding may rightly pick the other). Returns how many tokens
    were decided that way."""
    decided = 0
    rows = generated_rows(truth, res)
    for i, (token, row) in enumerate(zip(res.token_ids, rows)):
        bound, margin = float(bounds[i]), top2_margin(row)
        if margin > 2 * bound:
            decided += 1
            assert token == int(row.argmax()), f"{what}: position {i}: token {token}, the truth's best is " \
                f"{int(row.argmax())} by a margin of {margin:.4f} (bound {bound:.4f})"
    for i, lp in enumerate(res.logprobs):
        bound = float(bounds[i])
        for token, value in [(lp.token_id, lp.logprob)] + list(lp.top):
            error = abs(value - float(rows[i][token]))
            assert error <= bound, f"{what}: position {i}, token {token}: logprob {value:.5f} against the " \
                f"truth's {float(rows[i][token]):.5f}, off by {error:.5f} > bound {bound:.5f}"
    return decided


def fp8_rounding(split: HeadSplit, scales: torch.Tensor):
    """`kv_round` for an fp8 cache with these scales [K or V, layer, KV head in cache order]: each head's
    entries divided by its scale, saturated at +-448, rounded to e4m3 and multiplied back, worked out here."""
    def kv_round(layer: int, key: torch.Tensor, value: torch.Tensor):
        cache_place = torch.argsort(torch.tensor(split.order(layer)))  # a head of the model -> its place in the cache
        rounded = []
        for kind, x in enumerate((key, value)):
            s = scales[kind, layer, cache_place].to(x.device)[None, :, None, None]
            rounded.append(((x.float() / s).clamp(-448, 448).to(torch.float8_e4m3fn).float() * s).to(x.dtype))
        return tuple(rounded)
    return kv_round
