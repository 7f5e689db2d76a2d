"""The retrieval-head profiler (Wu et al. 2024), built to run at full context length on a CPU.

The model runs through its own transformers modules with one attention function swapped in. Prefill
uses fused SDPA (memory linear in length); each decode step has a single query, so the attention row
of every query head is cheap to form explicitly, and its argmax is all the copy test needs. No
[heads x length x length] matrix and no full-vocabulary logits for the prompt are ever built.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import AttentionInterface

from ..models import check_attention_supported, eos_token_ids, load_model, resolve_model
from ..niah import Needle, NiahPrompt, build_prompt, haystack_files, load_needles, unigram_recall
from .profile import (
    KvAggregate, ModelIdentity, Profile, ProfileError, ProfileMethod, SampleRecord, aggregate_kv_scores,
)

ATTENTION_NAME = "rheads_profiler"


@dataclass
class ProfileConfig:
    """The profiling grid and method settings; the same config always gives the same profile."""

    lengths: list[int] = field(default_factory=lambda: [500, 1000, 1500, 2000, 2500])
    depths: list[float] = field(default_factory=lambda: [round(0.1 * i, 1) for i in range(11)])
    needles_file: Path | None = None
    haystack_paths: list[Path] | None = None
    kv_aggregate: KvAggregate = "max"
    max_new_tokens: int | None = None  # None: answer length + 32
    recall_threshold: float = 0.5
    span: str = "answer"  # count copies from the answer tokens ("needle": the whole needle sentence)


class _KVStore:
    """Per-layer K/V of the one sequence being profiled, in buffers sized once for the whole sample
    (appending never copies the history), plus each layer's last argmax row."""

    def __init__(self, num_layers: int, capacity: int):
        self.capacity = capacity
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.length = [0] * num_layers
        self.argmax: list[torch.Tensor | None] = [None] * num_layers

    def append(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys[layer] is None:
            shape = (key.shape[0], key.shape[1], self.capacity, key.shape[3])
            self.keys[layer] = key.new_empty(shape)
            self.values[layer] = value.new_empty(shape)
        start, end = self.length[layer], self.length[layer] + key.shape[2]
        self.keys[layer][:, :, start:end] = key
        self.values[layer][:, :, start:end] = value
        self.length[layer] = end
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


def _profiling_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention that records, at single-query steps, each query head's argmax key position."""
    store: _KVStore = kwargs["rheads_store"]
    key, value = store.append(module.layer_idx, key, value)
    batch, heads, q_len, dim = query.shape
    groups = heads // key.shape[1]
    if q_len == 1:
        q = query.view(batch, key.shape[1], groups, dim)
        scores = torch.einsum("bkgd,bktd->bkgt", q, key).float() * scaling
        store.argmax[module.layer_idx] = scores.argmax(-1).reshape(heads)
        out = torch.einsum("bkgt,bktd->bkgd", scores.softmax(-1).to(value.dtype), value)
        return out.reshape(batch, 1, heads, dim), None
    if key.shape[2] != q_len:
        raise RuntimeError("the profiler prefills a prompt in one pass")
    out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=groups > 1)
    return out.transpose(1, 2), None


AttentionInterface.register(ATTENTION_NAME, _profiling_attention)


def copy_hits(argmax: torch.Tensor, token: int, prompt_ids: torch.Tensor, span: tuple[int, int]) -> torch.Tensor:
    """The paper's copy test for one decode step.

    argmax: [layers, query heads] key position each head attends to most. A head copies when that
    position lies in the answer span and the prompt token there is the token just generated.
    """
    start, end = span
    in_span = (argmax >= start) & (argmax < end)
    at = prompt_ids[argmax.clamp(max=prompt_ids.numel() - 1)]
    return in_span & (at == token)


@dataclass
class SampleResult:
    response_ids: list[int]
    copies: torch.Tensor  # [layers, query heads] copy count over the decode


@torch.inference_mode()
def run_sample(model, prompt: NiahPrompt, max_new_tokens: int, stop_ids: set[int],
               span: tuple[int, int]) -> SampleResult:
    """Prefill all but the last prompt token, then decode greedily, testing every head at every step."""
    device = next(model.parameters()).device
    layers = model.config.num_hidden_layers
    store = _KVStore(layers, len(prompt.input_ids) + max_new_tokens)
    ids = torch.tensor(prompt.input_ids, device=device)
    body = model.model
    body(input_ids=ids[None, :-1], position_ids=torch.arange(ids.numel() - 1, device=device)[None],
         use_cache=False, rheads_store=store)
    copies = torch.zeros(layers, model.config.num_attention_heads, dtype=torch.int32, device=device)
    token, response = ids[-1:], []
    for step in range(max_new_tokens):
        position = torch.tensor([[ids.numel() - 1 + step]], device=device)
        hidden = body(input_ids=token[None], position_ids=position, use_cache=False,
                      rheads_store=store).last_hidden_state
        token = model.lm_head(hidden[:, -1]).argmax(-1)
        copies += copy_hits(torch.stack(store.argmax), int(token), ids, span)
        if int(token) in stop_ids:
            break
        response.append(int(token))
    return SampleResult(response, copies.cpu())


def _grid(config: ProfileConfig, num_needles: int) -> list[tuple[int, int, float]]:
    """(length, needle, depth) in a fixed order: short contexts first, so early results come fast."""
    return list(itertools.product(sorted(config.lengths), range(num_needles), config.depths))


def _method_params(config: ProfileConfig, needles: list[Needle], files: list[Path]) -> dict:
    return {
        "needles": [n.__dict__ for n in needles],
        "haystack": [f.name for f in files],
        "lengths": sorted(config.lengths),
        "depths": list(config.depths),
        "recall_threshold": config.recall_threshold,
        "max_new_tokens": config.max_new_tokens,
        "span": config.span,
        "argmax": "top-1 key position per query head at every greedy decode step",
    }


def _check_resumable(old: Profile, params: dict, identity: ModelIdentity) -> None:
    old.check_fits(identity)
    for key in ("needles", "haystack", "recall_threshold", "max_new_tokens", "span"):
        if old.method.params.get(key) != params[key]:
            raise ProfileError(
                f"cannot resume: the existing profile was made with a different {key} "
                f"({json.dumps(old.method.params.get(key))[:200]}). Use the same settings or a new --out file."
            )


def profile_from_samples(identity: ModelIdentity, method: ProfileMethod, samples: list[SampleRecord]) -> Profile:
    """Per-head means over kept samples (heads that never copied score 0), then KV-head aggregates."""
    layers, heads = identity.num_layers, identity.num_attention_heads
    kept = [s for s in samples if s.kept]
    totals = torch.zeros(layers, heads, dtype=torch.float64)
    for sample in kept:
        for name, score in sample.head_scores.items():
            layer, head = map(int, name.split("-"))
            totals[layer, head] += score
    means = (totals / max(len(kept), 1)).tolist()
    query_scores = [[round(x, 6) for x in row] for row in means]
    return Profile(
        model=identity, method=method, samples_total=len(samples), samples_kept=len(kept),
        query_head_scores=query_scores,
        kv_head_scores=aggregate_kv_scores(query_scores, identity.num_key_value_heads, method.kv_aggregate),
        samples=samples,
    )


def profile_model(model_spec: str, config: ProfileConfig, out: Path, device: str = "cpu") -> Profile:
    """Run the grid (skipping samples already in `out`), saving the profile after every sample."""
    source = resolve_model(model_spec)
    model, tokenizer = load_model(source, device=device)
    check_attention_supported(model.config)
    model.config._attn_implementation = ATTENTION_NAME
    identity = ModelIdentity.from_config(model.config, source.name)
    needles = load_needles(config.needles_file)
    files = haystack_files(config.haystack_paths)
    params = _method_params(config, needles, files)
    samples: list[SampleRecord] = []
    if Path(out).exists():
        old = Profile.load(out)
        _check_resumable(old, params, identity)
        samples = list(old.samples)
        params["lengths"] = sorted(set(params["lengths"]) | set(old.method.params["lengths"]))
        params["depths"] = sorted(set(params["depths"]) | set(old.method.params["depths"]))
    method = ProfileMethod(name="retrieval_head_niah", kv_aggregate=config.kv_aggregate, params=params)
    done = {(s.context_length, s.needle_index, s.depth) for s in samples}
    todo = [cell for cell in _grid(config, len(needles)) if cell not in done]
    stop_ids = eos_token_ids(model) | ({tokenizer.eos_token_id} - {None})
    kept = sum(s.kept for s in samples)
    profile = profile_from_samples(identity, method, samples)
    bar = tqdm(todo, desc=f"profiling {source.name}", unit="sample")  # closed when the loop ends
    for length, needle_index, depth in bar:
        needle = needles[needle_index]
        prompt = build_prompt(tokenizer, needle, length, depth, config.haystack_paths)
        span = prompt.answer_span if config.span == "answer" else prompt.needle_span
        max_new_tokens = config.max_new_tokens or (prompt.answer_span[1] - prompt.answer_span[0]) + 32
        result = run_sample(model, prompt, max_new_tokens, stop_ids, span)
        response = tokenizer.decode(result.response_ids, skip_special_tokens=True)
        recall = unigram_recall(needle.real_needle, response)
        per_head = result.copies.double() / (span[1] - span[0])
        samples.append(SampleRecord(
            needle_index=needle_index, context_length=length, depth=depth,
            prompt_tokens=len(prompt.input_ids), response=response, recall=round(recall, 4),
            kept=recall > config.recall_threshold,
            head_scores={f"{l}-{h}": round(float(per_head[l, h]), 6)
                         for l, h in per_head.nonzero().tolist()},
        ))
        kept += samples[-1].kept
        bar.set_postfix(kept=kept, done=len(samples))
        profile = profile_from_samples(identity, method, samples)
        profile.save(out)
    return profile

