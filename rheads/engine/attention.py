"""Head-split attention over a packed batch, registered as a transformers attention function.

transformers runs the model's own modules (projections, RoPE, MLP); at each layer it hands us the
new tokens' post-RoPE query/key/value for the whole packed batch. We write the keys and values into
the head-split cache and attend: full heads over their whole history, streaming heads over the
attention sinks plus the last `window` positions (a key at position k is visible to a query at q
when k <= q and (k < sink or q - k < window)). Prefill chunks go one sequence at a time: full heads
on CUDA in half precision through cuDNN for the chunk shapes planned at start-up (`cudnn_prefill.py`),
otherwise through SDPA with a lower-right causal mask; streaming heads over their band only, on CUDA through
FlexAttention (`band.py`), elsewhere through SDPA by blocks of queries (it runs anywhere torch does).
Sequences that decode one token this step are handled together instead, by `decode.decode_attention`
(one Triton launch per layer on CUDA) reading both pools in place.

A sliding-window layer is a layer of streaming heads with the model's window and no sink (`cache.py`):
the same path, with that layer's geometry. A layer whose softmax the model changes (soft-capping, learned
sinks: `scores.py`) prefills through `scores.masked_attention` by blocks of queries, on every device:
cuDNN, SDPA and the band's FlexAttention call take neither change.

An fp8 cache (`kvquant.py`) is read through `cache.decode` after each gather, and a chunk attends to its own
keys as the pools store them (`cache.encode` then `decode`), so every kernel here takes the model's dtype,
cuDNN and FlexAttention included, and the chunk sees what its later decode steps will read.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import CausalBias, causal_lower_right
from transformers import AttentionInterface

from . import cudnn_prefill
from .band import band_attention, band_block_mask
from .cache import HeadSplitCache, held_positions, ring_index
from .decode import DecodeBatch, decode_attention
from .scores import ScoreMods, masked_attention

ATTENTION_NAME = "rheads_head_split"
PREFILL_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
BAND_BLOCK = 256  # queries per block of the banded streaming-head attention (longer chunks take that path)
DENSE_SCORES = 1 << 24  # scores per block of queries in a layer with score changes (64 MiB in fp32)


@dataclass
class SeqSlice:
    """One sequence's part of the packed batch: tokens [begin, end) at positions start..start+n-1."""

    begin: int
    end: int
    start: int
    slot: int
    page_table: torch.Tensor  # page ids covering positions 0..start+n-1
    reuses: bool = False  # its full heads' K/V are in the pages already (a recompute: `Chunk.reuses`)
    shared: dict[str, Any] = field(default_factory=dict)  # what every layer computes alike: see `once`

    def once(self, name: Hashable, build: Callable[[], Any]) -> Any:
        """`build()` the first time a layer asks for `name` this step, then the same object. The cache
        indices and the band mask are the same at every layer, and a step with a short chunk is bound
        by the host's launches: built once, a 512-token chunk beside 8 decode rows makes 6-9% fewer
        aten calls on a 32-layer model."""
        if name not in self.shared:
            self.shared[name] = build()
        return self.shared[name]


@dataclass
class Residual:
    """The residual stream a fused decoder layer leaves for the next one's first norm to add (`fused.py`);
    the last layer takes it back, so it is empty between forwards."""

    value: torch.Tensor | None = None


@dataclass(frozen=True)
class BatchMeta:
    """What the model runner hands every layer of one forward (as the `rheads_batch` keyword argument)."""

    cache: HeadSplitCache
    seqs: list[SeqSlice]  # sequences fed through the per-sequence path (prefill chunks)
    positions: torch.Tensor  # [tokens]
    decode: DecodeBatch | None = None
    plans: cudnn_prefill.CudnnPlans | None = None  # the full heads' prefill shapes planned in this thread
    residual: Residual = field(default_factory=Residual)


# A decoder layer that does not pass its keyword arguments on to its attention (StableLM's) drops
# `rheads_batch`: the runner also sets the batch here for the duration of each forward.
CURRENT_BATCH: ContextVar[BatchMeta | None] = ContextVar("rheads_batch", default=None)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, scaling: float,
          mods: ScoreMods | None = None) -> torch.Tensor:
    """q [B, n, Hq, D]; k, v [B, m, Hkv, D]; mask broadcastable to [B, 1, n, m] (or a CausalBias) -> [B, n, Hq, D].

    Inputs go to SDPA as 4-D [B, H, tokens, D]: its fused (flash / memory-efficient) kernels take only
    batched inputs; with 3-D ones it falls back to the math kernel, which materialises every score.
    The causal path (full heads) hands flash the KV heads as they are (`enable_gqa`: no copy of a 32k
    history repeated to every query head, and 3-23% faster on the H100, benchmarks/bench_prefill_attention.py);
    the memory-efficient kernel (the banded path's boolean mask, fp32 on CUDA) takes only repeated keys,
    and would otherwise hand over to the math kernel, which materialises every score.
    cuDNN is left out here: with a lower-right mask over a long history it is slower than flash (15.4
    against 11.8 ms for 8k queries over 32k keys); `cudnn_prefill` splits the chunk so that it is not.
    A layer with score changes (`mods`, a boolean mask then) goes to `masked_attention`, which applies them.
    """
    if mods is not None:
        return masked_attention(q, k, v, mask, scaling, mods)
    gqa = isinstance(mask, CausalBias) and (q.dtype in (torch.float16, torch.bfloat16) or not q.is_cuda)
    if not gqa:
        groups = q.shape[2] // k.shape[2]
        k, v = k.repeat_interleave(groups, dim=2), v.repeat_interleave(groups, dim=2)
    with sdpa_kernel(PREFILL_BACKENDS):
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                              scale=scaling, enable_gqa=gqa).transpose(1, 2)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor | None,
            k_pos: torch.Tensor | None, scaling: float, sink: int | None = None,
            window: int | None = None, mods: ScoreMods | None = None) -> torch.Tensor:
    """q: [n, Hq, D]; k, v: [m, Hkv, D] -> [n, Hq, D], causal by position, optionally sink + window.

    Without positions, the queries are the last n of the m keys: a lower-right causal mask, which
    lets SDPA use its fused kernels instead of materialising the mask. With score changes (`mods`) the
    scores are formed, by blocks of queries that hold about DENSE_SCORES of them.
    """
    if mods is not None:
        n, m = q.shape[0], k.shape[0]
        if q_pos is None:
            q_pos, k_pos = torch.arange(m - n, m, device=q.device), torch.arange(m, device=q.device)
        block = max(1, DENSE_SCORES // (q.shape[1] * m))
        return torch.cat([_sdpa(q[None, i:i + block], k[None], v[None],
                                _visible(q_pos[i:i + block, None], k_pos[None, :], sink, window), scaling, mods)[0]
                          for i in range(0, n, block)])
    if q_pos is None:
        visible = causal_lower_right(q.shape[0], k.shape[0])
    else:
        visible = _visible(q_pos[:, None], k_pos[None, :], sink, window)
    return _sdpa(q[None], k[None], v[None], visible, scaling)[0]


def _visible(q_pos: torch.Tensor, k_pos: torch.Tensor, sink: int | None, window: int | None) -> torch.Tensor:
    visible = k_pos <= q_pos
    if window is not None:
        visible &= (k_pos < sink) | (q_pos - k_pos < window)
    return visible


def attend_band(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
                 start: int, scaling: float, sink: int, window: int, mods: ScoreMods | None = None) -> torch.Tensor:
    """Streaming-head attention for a long chunk, by blocks of queries: a block sees the sinks and the
    keys from `window` - 1 before its first query to its last, so the work is O(n (sink + window + block))
    instead of O(n m) and the mask stays small.

    The keys are `_streaming_heads`' layout for a chunk of positions start..start+n-1: the held sinks,
    the held window, then the chunk, ascending; every index below comes from host integers, so the
    step never waits for the device.
    """
    n, block = q.shape[0], BAND_BLOCK
    num_sinks = min(sink, start + n)  # keys at positions below `sink` (held or new)
    first_rest = max(sink, start - window)  # position of the first key after them
    blocks = -(-n // block)
    pad = blocks * block - n
    q_pos = F.pad(q_pos, (0, pad), value=start + n - 1)  # padding rows repeat the last query, then drop
    qb = F.pad(q, (0, 0, 0, 0, 0, pad)).view(blocks, block, *q.shape[1:])
    qpb = q_pos.view(blocks, block)
    band = window - 1 + block
    lo = torch.clamp(qpb[:, 0] - window + 1, min=sink) - first_rest + num_sinks  # index of each block's band start
    index = lo.clamp(min=num_sinks)[:, None] + torch.arange(band, device=q.device)  # [blocks, band]
    real = index < k.shape[0]  # a band running past the last key: those entries are masked, not duplicated
    index = torch.cat([torch.arange(num_sinks, device=q.device).expand(blocks, -1), index.clamp(max=k.shape[0] - 1)], 1)
    real = torch.cat([torch.ones(blocks, num_sinks, dtype=torch.bool, device=q.device), real], 1)
    visible = _visible(qpb[:, :, None], k_pos[index][:, None, :], sink, window) & real[:, None, :]
    out = _sdpa(qb, k[index], v[index], visible[:, None], scaling, mods)
    return out.reshape(blocks * block, *q.shape[1:])[:n]


def _page_rows(page_table: torch.Tensor, length: int, page: int) -> torch.Tensor:
    """Where positions 0..length-1 live among a full-heads pool's rows (its pages flattened)."""
    positions = torch.arange(length, device=page_table.device)
    return page_table[positions // page] * page + positions % page


def _full_heads(cache: HeadSplitCache, layer: int, seq: SeqSlice, q, k, v, pos, scaling,
                plans: cudnn_prefill.CudnnPlans | None, mods: ScoreMods | None) -> torch.Tensor:
    rows = seq.once("page_rows", lambda: _page_rows(seq.page_table, seq.start + len(pos), cache.config.page_size))
    keys, values = (pool.flatten(0, 1) for pool in (cache.full_k[layer], cache.full_v[layer]))
    heads = slice(0, k.shape[1])
    read = lambda pool, at, kind: cache.decode(pool.index_select(0, at), layer, heads, kind)  # noqa: E731
    if not seq.reuses:  # a recompute's own k, v are not all exact (its first tokens saw no window): the pages' are
        k_stored, v_stored = cache.encode(k, layer, heads, 0), cache.encode(v, layer, heads, 1)
        cache.put(keys, rows[seq.start:], k_stored)
        cache.put(values, rows[seq.start:], v_stored)
        k, v = cache.decode(k_stored, layer, heads, 0), cache.decode(v_stored, layer, heads, 1)
    cudnn = plans and mods is None and not seq.reuses and cudnn_prefill.usable(q)
    queries = plans.planned_queries(q, k.shape[1], seq.start) if cudnn else None
    if queries:  # through cuDNN the chunk's own keys come from k, v: only the history comes from the pages
        history = rows[:seq.start]
        return cudnn_prefill.chunk_attention(q, k, v, read(keys, history, 0), read(values, history, 1),
                                             scaling, queries=queries)
    return _attend(q, read(keys, rows, 0), read(values, rows, 1), None, None, scaling, mods=mods)


def _streaming_heads(cache: HeadSplitCache, layer: int, seq: SeqSlice, q, k, v, pos, scaling,
                     mods: ScoreMods | None) -> torch.Tensor:
    """The layer's streaming heads over their sink + window, in its geometry (`cache.geometry`): the
    indices each geometry needs are built once per step, shared by the layers that have it."""
    geometry = cache.geometry(layer)
    sink, window = geometry
    ring_k, ring_v = cache.ring_k[layer][seq.slot], cache.ring_v[layer][seq.slot]
    device, n = pos.device, pos.shape[0]
    heads = slice(cache.split.num_kv_heads - k.shape[1], None)
    held = seq.once(("held", geometry), lambda: held_positions(seq.start, sink, window, device))
    held_slots = seq.once(("held_slots", geometry), lambda: ring_index(held, sink, window))
    held_k = cache.decode(ring_k.index_select(0, held_slots), layer, heads, 0)
    held_v = cache.decode(ring_v.index_select(0, held_slots), layer, heads, 1)
    k_stored, v_stored = cache.encode(k, layer, heads, 0), cache.encode(v, layer, heads, 1)
    k, v = cache.decode(k_stored, layer, heads, 0), cache.decode(v_stored, layer, heads, 1)
    if q.is_cuda and mods is None:
        mask = seq.once(("band_mask", geometry), lambda: band_block_mask(held, seq.start, n, sink, window))
        out = band_attention(q, held_k, held_v, k, v, mask, scaling)
    else:
        keys, values, key_pos = torch.cat([held_k, k]), torch.cat([held_v, v]), torch.cat([held, pos])
        if n > BAND_BLOCK:
            out = attend_band(q, keys, values, pos, key_pos, seq.start, scaling, sink, window, mods)
        else:
            out = _attend(q, keys, values, pos, key_pos, scaling, sink, window, mods)
    keep, keep_slots = seq.once(("kept", geometry), lambda: _kept(pos, seq.start, sink, window))
    cache.put(ring_k, keep_slots, k_stored.index_select(0, keep))
    cache.put(ring_v, keep_slots, v_stored.index_select(0, keep))
    return out


def _kept(pos: torch.Tensor, start: int, sink: int, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Which of a chunk's tokens survive in a streaming slot (its new sinks and its last `window`, so no
    slot is written twice) and the slots they go to; chosen by host arithmetic, not a boolean mask,
    which would make the step wait for the device."""
    n = pos.shape[0]
    sinks_end = min(max(sink - start, 0), n)
    keep = torch.cat([torch.arange(sinks_end, device=pos.device), torch.arange(max(sinks_end, n - window), n, device=pos.device)])
    return keep, ring_index(pos[keep], sink, window)


def head_split_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention interface: query [1, H, N, D], key/value [1, Hkv, N, D] -> [1, N, H, D].

    The layer's window comes from the cache (the model's config, read once); its score changes from the
    keyword arguments its module passes (`ScoreMods.of`)."""
    meta: BatchMeta = kwargs.get("rheads_batch") or CURRENT_BATCH.get()
    mods = ScoreMods.of(kwargs)
    cache, layer = meta.cache, module.layer_idx
    num_full = cache.split.num_full[layer]
    groups = query.shape[1] // key.shape[1]
    split_q = num_full * groups
    q, k, v = query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1)
    out = torch.empty_like(q)
    if meta.decode is not None:
        decode_attention(cache, layer, meta.decode, q, k, v, out, scaling, mods)
    for seq in meta.seqs:
        rows = slice(seq.begin, seq.end)
        pos = meta.positions[rows]
        if num_full:
            out[rows, :split_q] = _full_heads(cache, layer, seq, q[rows, :split_q], k[rows, :num_full],
                                              v[rows, :num_full], pos, scaling, meta.plans,
                                              mods and mods.heads(slice(None, split_q)))
        if num_full < key.shape[1]:
            out[rows, split_q:] = _streaming_heads(cache, layer, seq, q[rows, split_q:], k[rows, num_full:],
                                                   v[rows, num_full:], pos, scaling,
                                                   mods and mods.heads(slice(split_q, None)))
    return out[None], None


def register_attention() -> str:
    """Make the head-split attention a transformers attention implementation; its name for the config."""
    AttentionInterface.register(ATTENTION_NAME, head_split_attention)
    return ATTENTION_NAME
