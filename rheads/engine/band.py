"""Streaming heads' prefill attention on CUDA: FlexAttention over the sink + window band only.

A chunk of n queries at positions start..start+n-1 sees the keys its streaming heads hold (sinks and
window) and the chunk's own. For SDPA that band is a boolean mask, which sends it to the
memory-efficient kernel over blocks of queries with the keys gathered and repeated per block
(`attention.attend_band`, the path everywhere else). FlexAttention visits only the key blocks that
touch the band and takes the KV heads as they are: 0.4 against 0.8 ms a layer for 8k queries of 4 KV
heads on the H100 (`benchmarks/bench_prefill_attention.py --band-starts`), without the per-block key
gathers and repeats; serving gains 1-5% of a 32k TTFT (benchmarks/RESULTS.md).

The block mask is built once per chunk (every layer shares it) from each block's lowest and highest
position, a dozen small kernels and no host sync; `create_block_mask`, which evaluates the mask for
every query-key pair, took 7-9 ms a chunk.
"""

from __future__ import annotations

import functools

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from .cache import held_positions
from .transfer import to_device

BLOCK = 128  # FlexAttention's default block size, in queries and in keys


@functools.cache
def _compiled_flex():
    """flex_attention compiled for every shape `band_attention` makes: see `warm_up`."""
    return torch.compile(flex_attention, dynamic=True)


@torch.inference_mode()  # as the engine runs: grad mode is part of what a compilation is guarded on
def warm_up(groups: int, head_dim: int, dtype: torch.dtype, device: str | torch.device, sink: int,
            window: int, scaling: float) -> None:
    """Compile now (at start-up, like the decode graphs), so no request waits for it.

    Two calls differing in every size: Dynamo compiles the first, then once more with the sizes that
    changed made symbolic, which serves every chunk from then on. For that the second call's sizes must
    all differ from each other (duck sizing gives equal sizes one symbol, then recompiles when they
    differ), and `band_attention` keeps every size away from the cases Dynamo specialises: lengths are
    whole blocks (divisibility), and neither the KV-head count (the batch) nor the query blocks are ever
    one. The scale is compiled in: warm up with the model's.
    """
    batch = next(b for b in (3, 5, 6) if b != groups)
    for kv_heads, n, start in ((2, 2, 0), (batch, 6 * BLOCK + 1, sink + window + 1)):  # 7 query blocks
        held = held_positions(start, sink, window, device)
        q = torch.zeros(n, kv_heads * groups, head_dim, dtype=dtype, device=device)
        k = torch.zeros(n, kv_heads, head_dim, dtype=dtype, device=device)
        held_k = torch.zeros(len(held), kv_heads, head_dim, dtype=dtype, device=device)
        band_attention(q, held_k, held_k, k, k, band_block_mask(held, start, n, sink, window), scaling)


def _query_length(n: int) -> int:
    return max(-(-n // BLOCK), 2) * BLOCK


def band_key_positions(held: torch.Tensor, start: int, n: int) -> torch.Tensor:
    """Key positions as the kernel reads them: the held keys, padding up to a whole block, the chunk,
    then padding as long as the queries' padding plus one block. Padding sits after every query (never
    visible, never read). The chunk starting on a block boundary lines its key blocks up with its query
    blocks, so a block well inside the window is visible whole (run without the mask)."""
    queries = _query_length(n)
    future = start + queries
    chunk = torch.arange(start, start + n, device=held.device)
    return torch.cat([held, held.new_full((-len(held) % BLOCK,), future), chunk, held.new_full((queries - n + BLOCK,), future)])


def band_block_mask(held: torch.Tensor, start: int, n: int, sink: int, window: int) -> BlockMask:
    """Block mask for queries at positions start..start+n-1 (padded to `_query_length`) over
    `band_key_positions(held, start, n)`; `held` are the positions of the keys held before the chunk.

    A key at k is visible to a query at q when k <= q and (k < sink or q - k < window). A key block is
    skipped when no pair in it can be visible, run without the mask when every pair is (judged from the
    blocks' position bounds, so a block straddling the sinks and the window is merely partial), and
    masked per pair otherwise. Sink and window reach the mask as tensors: as Python numbers they would
    be compiled in.
    """
    device = held.device
    k_pos = band_key_positions(held, start, n)
    q_pos = torch.arange(start, start + _query_length(n), device=device)
    blocked = k_pos.view(-1, BLOCK)
    padding = blocked >= start + len(q_pos)
    k_lo = blocked.amin(1)[None, :]  # padding is above every real key: a block of padding only is after every query
    k_hi = blocked.masked_fill(padding, -1).amax(1)[None, :]  # of the real keys
    q_lo = q_pos[::BLOCK, None]
    q_hi = q_lo + BLOCK - 1
    none = (k_lo > q_hi) | ((k_lo >= sink) & (q_lo - k_hi >= window))
    full = (k_hi <= q_lo) & ((k_hi < sink) | (q_hi - k_lo < window)) & ~padding.any(1)[None, :]
    partial = ~none & ~full
    sink_t, window_t = to_device(sink, device), to_device(window, device)  # without waiting for the GPU

    def visible(b, h, q_index, k_index):
        query, key = q_pos[q_index], k_pos[k_index]
        return (key <= query) & ((key < sink_t) | (query - key < window_t))

    def blocks(chosen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        counts = chosen.sum(1, dtype=torch.int32)
        indices = torch.argsort(chosen.to(torch.int8), dim=1, descending=True, stable=True).to(torch.int32)
        return counts[None, None], indices[None, None]

    return BlockMask.from_kv_blocks(*blocks(partial), *blocks(full), BLOCK_SIZE=BLOCK, mask_mod=visible,
                                    seq_lengths=(len(q_pos), len(k_pos)), compute_q_blocks=False)


def band_attention(q: torch.Tensor, held_k: torch.Tensor, held_v: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   mask: BlockMask, scaling: float) -> torch.Tensor:
    """q, k, v: the chunk's [n, H(kv), D]; held_k, held_v: [held, Hkv, D] -> [n, Hq, D] over the band
    `mask` (from `band_block_mask`, which lays the keys out).

    The kernel takes the KV heads as its batch, each with its group of query heads: Dynamo keeps the
    batch size symbolic, where it compiled once per head count as heads (layers hold different numbers
    of streaming heads). A single KV head runs beside an idle one (a batch of one would compile apart).
    """
    n, kv_heads, (queries, keys) = q.shape[0], k.shape[1], mask.seq_lengths
    batch = max(kv_heads, 2)

    def padded(parts: list[torch.Tensor], length: int) -> torch.Tensor:
        """Rows concatenated and zero-padded to `length` -> [batch, heads of each, length, D]."""
        rows = torch.cat(parts).unflatten(1, (kv_heads, -1))
        rows = torch.nn.functional.pad(rows, (0, 0, 0, 0, 0, batch - kv_heads, 0, length - rows.shape[0]))
        return rows.permute(1, 2, 0, 3)

    gap = held_k.new_zeros((-held_k.shape[0] % BLOCK, *held_k.shape[1:]))
    out = _compiled_flex()(padded([q], queries), padded([held_k, gap, k], keys), padded([held_v, gap, v], keys),
                           block_mask=mask, scale=scaling, enable_gqa=True)
    return out[:kv_heads].permute(2, 0, 1, 3)[:n].flatten(1, 2)
