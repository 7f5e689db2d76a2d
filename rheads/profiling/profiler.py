"""The retrieval-head profiler (Wu et al. 2024), built to run at full context length on a CPU or a GPU.

The model runs through its own transformers modules with one attention function swapped in. Prefill
uses fused SDPA (memory linear in length); each decode step has a single query, so the attention row
of every query head is cheap to form explicitly, and its argmax is all the copy test needs. No
[heads x length x length] matrix and no full-vocabulary logits for the prompt are ever built, and only
the current query's rows live on the device. Samples of one length (prompts are built to exactly that
many tokens) run as one batch: on a GPU a decode step of one long sample is a few hundred small
launches, the same for eight.
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

from ..engine.scores import ScoreMods, attention_weights, masked_attention
from ..models import check_attention_supported, eos_token_ids, load_model, resolve_model
from ..niah import Needle, NiahPrompt, build_prompt, haystack_files, load_needles, unigram_recall
from .profile import (
    HeadScore, KvAggregate, ModelIdentity, Profile, ProfileError, ProfileMethod, SampleRecord, aggregate_kv_scores,
)

ATTENTION_NAME = "rheads_profiler"
PREFILL_BLOCK = 512  # queries per block of a prefill whose scores are formed (sliding windows, changed scores)


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
    score: HeadScore = "copy"  # the samples' score the profile ranks heads by (both are recorded)
    batch_size: int = 1  # samples of one length run together
    dtype: torch.dtype = torch.float32  # the model's weights and activations


class _KVStore:
    """Per-layer K/V of the samples being profiled (a batch of one length), in buffers sized once for the
    whole run (appending never copies the history), plus each layer's last argmax rows and attention
    mass on the samples' spans (`span_mask` [B, capacity]: 1 on a sample's span)."""

    def __init__(self, num_layers: int, capacity: int, span_mask: torch.Tensor | None = None):
        self.capacity, self.span_mask = capacity, span_mask
        self.mass: list[torch.Tensor | None] = [None] * num_layers
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
    """Attention that records, at single-query steps, each query head's argmax key position and the share
    of its attention on the sample's span."""
    store: _KVStore = kwargs["rheads_store"]
    key, value = store.append(module.layer_idx, key, value)
    batch, heads, q_len, dim = query.shape
    groups, length = heads // key.shape[1], key.shape[2]
    window, mods = kwargs.get("sliding_window"), ScoreMods.of(kwargs)  # the model's own attention: `scores.py`
    if q_len == 1:
        q = query.view(batch, key.shape[1], groups, dim)
        scores = torch.einsum("bkgd,bktd->bkgt", q, key).float().reshape(batch, heads, 1, length) * scaling
        visible = torch.arange(length, device=key.device) > length - 1 - window if window else None
        masked = scores if visible is None else scores.masked_fill(~visible, float("-inf"))
        store.argmax[module.layer_idx] = masked.argmax(-1).reshape(batch, heads)
        probs = attention_weights(scores, visible, mods).view(batch, key.shape[1], groups, length)
        if store.span_mask is not None:
            on_span = store.span_mask[:, None, None, :probs.shape[-1]]
            store.mass[module.layer_idx] = (probs * on_span).sum(-1).reshape(batch, heads)
        out = torch.einsum("bkgt,bktd->bkgd", probs.to(value.dtype), value)
        return out.reshape(batch, 1, heads, dim), None
    if length != q_len:
        raise RuntimeError("the profiler prefills a prompt in one pass")
    if window is None and mods is None:
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=groups > 1)
        return out.transpose(1, 2), None
    # a sliding-window layer or changed scores: by blocks of PREFILL_BLOCK queries, the scores formed
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    positions = torch.arange(length, device=key.device)
    out = []
    for start in range(0, q_len, PREFILL_BLOCK):
        q_pos = positions[start:start + PREFILL_BLOCK, None]
        visible = (positions[None, :] <= q_pos) & (q_pos - positions[None, :] < (window or length))
        out.append(masked_attention(q[:, start:start + PREFILL_BLOCK], k, v, visible, scaling, mods or ScoreMods()))
    return torch.cat(out, 1), None


AttentionInterface.register(ATTENTION_NAME, _profiling_attention)


def copy_hits(argmax: torch.Tensor, token: int | torch.Tensor, prompt_ids: torch.Tensor,
              span: tuple[int, int] | torch.Tensor) -> torch.Tensor:
    """The paper's copy test for one decode step.

    argmax: [layers, query heads] key position each head attends to most. A head copies when that
    position lies in the answer span and the prompt token there is the token just generated. Batched:
    argmax [B, layers, heads], token [B], prompt_ids [B, L], span [B, 2].
    """
    if argmax.dim() == 2:
        return copy_hits(argmax[None], torch.tensor([token]), prompt_ids[None], torch.tensor([span]))[0]
    start, end = (span[:, i, None, None].to(argmax.device) for i in (0, 1))
    in_span = (argmax >= start) & (argmax < end)
    at = prompt_ids.gather(1, argmax.flatten(1).clamp(max=prompt_ids.shape[1] - 1)).view_as(argmax)
    return in_span & (at == token.to(argmax.device)[:, None, None])


@dataclass
class SampleResult:
    response_ids: list[int]
    copies: torch.Tensor  # [layers, query heads] copy count over the decode
    attention: torch.Tensor  # [layers, query heads] attention mass on the span, mean over the decode steps


def run_sample(model, prompt: NiahPrompt, max_new_tokens: int, stop_ids: set[int],
               span: tuple[int, int]) -> SampleResult:
    """One sample: `run_samples` with a batch of one."""
    return run_samples(model, [prompt], [max_new_tokens], stop_ids, [span])[0]


@torch.inference_mode()
def run_samples(model, prompts: list[NiahPrompt], max_new_tokens: list[int], stop_ids: set[int],
                spans: list[tuple[int, int]]) -> list[SampleResult]:
    """Prefill all but the last prompt token of every prompt (all of one length), then decode each greedily
    for its own number of steps or to a stop id, testing every head at every step."""
    device = next(model.parameters()).device
    if len({len(p.input_ids) for p in prompts}) != 1:
        raise ValueError("a batch of samples needs prompts of one length")
    layers, batch = model.config.num_hidden_layers, len(prompts)
    ids = torch.tensor([p.input_ids for p in prompts], device=device)  # [B, L]
    n = ids.shape[1]
    span_mask = torch.zeros(batch, n + max(max_new_tokens), device=device)
    for row, (start, end) in enumerate(spans):
        span_mask[row, start:end] = 1.0
    store = _KVStore(layers, n + max(max_new_tokens), span_mask)
    body = model.model
    body(input_ids=ids[:, :-1], position_ids=torch.arange(n - 1, device=device)[None].expand(batch, -1),
         use_cache=False, rheads_store=store)
    copies = torch.zeros(batch, layers, model.config.num_attention_heads, dtype=torch.int32, device=device)
    mass = torch.zeros(batch, layers, model.config.num_attention_heads, dtype=torch.float64, device=device)
    decoded = [0] * batch
    span_rows = torch.tensor(spans)
    token, responses, running = ids[:, -1], [[] for _ in prompts], list(range(batch))
    for step in range(max(max_new_tokens)):
        position = torch.full((batch, 1), n - 1 + step, device=device)
        hidden = body(input_ids=token[:, None], position_ids=position, use_cache=False,
                      rheads_store=store).last_hidden_state
        token = model.lm_head(hidden[:, -1]).argmax(-1)
        hits = copy_hits(torch.stack(store.argmax, dim=1), token, ids, span_rows)  # [B, layers, heads]
        rows = torch.tensor(running, device=device)
        copies[rows] += hits[rows]
        mass[rows] += torch.stack(store.mass, dim=1)[rows].double()
        picked = token.tolist()
        for b in list(running):
            decoded[b] += 1
            if picked[b] in stop_ids:
                running.remove(b)
                continue
            responses[b].append(picked[b])
            if step + 1 >= max_new_tokens[b]:
                running.remove(b)
        if not running:
            break
    copies, mass = copies.cpu(), mass.cpu()
    return [SampleResult(responses[b], copies[b], mass[b] / decoded[b]) for b in range(batch)]


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
        "score": config.score,
        "dtype": str(config.dtype).removeprefix("torch."),
        "argmax": "top-1 key position per query head at every greedy decode step",
    }


def _check_resumable(old: Profile, params: dict, identity: ModelIdentity) -> None:
    old.check_fits(identity)
    recorded = {"dtype": "float32", **old.method.params}  # profiles made before the dtype was recorded: float32
    for key in ("needles", "haystack", "recall_threshold", "max_new_tokens", "span", "dtype"):
        if recorded.get(key) != params[key]:
            raise ProfileError(
                f"cannot resume: the existing profile was made with a different {key} "
                f"({json.dumps(recorded.get(key))[:200]}). Use the same settings or a new --out file."
            )


def profile_from_samples(identity: ModelIdentity, method: ProfileMethod, samples: list[SampleRecord]) -> Profile:
    """Per-head means over kept samples of the method's score (a head absent from a sample scored 0 there),
    then KV-head aggregates."""
    layers, heads = identity.num_layers, identity.num_attention_heads
    kept = [s for s in samples if s.kept]
    totals = torch.zeros(layers, heads, dtype=torch.float64)
    which = method.params.get("score", "copy")
    if which == "attention" and any(not s.head_attention for s in kept):
        raise ProfileError("these samples were recorded before attention scores were: profile again to rank by "
                           "attention")
    for sample in kept:
        for name, score in (sample.head_attention if which == "attention" else sample.head_scores).items():
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


def rescore(profile: Profile, score: HeadScore | None = None, kv_aggregate: KvAggregate | None = None) -> Profile:
    """The same samples ranked by another score or KV aggregate (None: the profile's own). A measured
    default_budget (and window) belongs to the heads it was measured with, so it is dropped when the ranking
    changes."""
    if profile.method.name != "retrieval_head_niah":
        raise ProfileError(f"only profiles made by `rheads profile` keep their samples ({profile.method.name})")
    params = {**profile.method.params, "score": score or profile.method.params.get("score", "copy")}
    method = ProfileMethod(name=profile.method.name, kv_aggregate=kv_aggregate or profile.method.kv_aggregate,
                           params=params)
    out = profile_from_samples(profile.model, method, list(profile.samples))
    if (params["score"], method.kv_aggregate) == (profile.method.params.get("score", "copy"),
                                                  profile.method.kv_aggregate):
        out.default_budget, out.default_window = profile.default_budget, profile.default_window
        out.calibration = profile.calibration
    return out


def profile_model(model_spec: str, config: ProfileConfig, out: Path, device: str = "cpu") -> Profile:
    """Run the grid (skipping samples already in `out`), saving the profile after every batch."""
    source = resolve_model(model_spec)
    model, tokenizer = load_model(source, dtype=config.dtype, device=device)
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
    profile = profile_from_samples(identity, method, samples)
    with tqdm(total=len(todo), desc=f"profiling {source.name}", unit="sample") as bar:
        for batch in _batches(todo, config.batch_size):
            samples += _run_batch(model, tokenizer, needles, batch, config, stop_ids)
            bar.update(len(batch))
            bar.set_postfix(kept=sum(s.kept for s in samples), done=len(samples))
            profile = profile_from_samples(identity, method, samples)
            profile.save(out)
    return profile


def _batches(cells: list[tuple[int, int, float]], size: int) -> list[list[tuple[int, int, float]]]:
    """The grid's cells in order, in batches of up to `size` cells of one length."""
    out = []
    for cell in cells:
        if out and len(out[-1]) < size and out[-1][0][0] == cell[0]:
            out[-1].append(cell)
        else:
            out.append([cell])
    return out


def _run_batch(model, tokenizer, needles: list[Needle], cells: list[tuple[int, int, float]],
               config: ProfileConfig, stop_ids: set[int]) -> list[SampleRecord]:
    prompts = [build_prompt(tokenizer, needles[n], length, depth, config.haystack_paths) for length, n, depth in cells]
    spans = [p.answer_span if config.span == "answer" else p.needle_span for p in prompts]
    steps = [config.max_new_tokens or (p.answer_span[1] - p.answer_span[0]) + 32 for p in prompts]
    records = []
    for (length, needle_index, depth), prompt, span, result in zip(
            cells, prompts, spans, run_samples(model, prompts, steps, stop_ids, spans)):
        response = tokenizer.decode(result.response_ids, skip_special_tokens=True)
        recall = unigram_recall(needles[needle_index].real_needle, response)
        per_head = result.copies.double() / (span[1] - span[0])
        records.append(SampleRecord(
            needle_index=needle_index, context_length=length, depth=depth,
            prompt_tokens=len(prompt.input_ids), response=response, recall=round(recall, 4),
            kept=recall > config.recall_threshold,
            head_scores=_sparse(per_head), head_attention=_sparse(result.attention),
        ))
    return records


def _sparse(scores: torch.Tensor) -> dict[str, float]:
    """[layers, heads] scores as "layer-head" -> score, for the heads that round to a non-zero score."""
    rounded = scores.double().mul(1e6).round().div(1e6)
    return {f"{l}-{h}": float(rounded[l, h]) for l, h in rounded.nonzero().tolist()}
