"""Streaming heads' FlexAttention band (`rheads/engine/band.py`): its block mask admits exactly the sink +
window pairs (any device), and the kernel is as close to attention worked out here over that band as
SDPA is (uncompiled on the CPU, compiled on CUDA)."""

import pytest
import torch
from conftest import assert_sees, assert_within_yardstick, exact_attention, pytorch_attention  # tests/conftest.py
from torch.nn.attention.flex_attention import flex_attention

from rheads.engine import band
from rheads.engine.band import BLOCK, band_attention, band_block_mask, band_key_positions
from rheads.engine.cache import held_positions

CASES = [  # (start, chunk length, sink, window)
    (0, 300, 4, 64), (0, 1000, 64, 256), (5000, 777, 64, 256), (100, 129, 4, 200), (0, 128, 64, 256),
    (70, 10, 64, 256), (130, 2000, 3, 500), (20000, 4096, 64, 1024), (0, 8192, 64, 256),
    (300, 1000, 4, 2 * 128 - 1),  # a block one before the query block has its far corner on the window's edge
]


def _visible(q_pos: torch.Tensor, k_pos: torch.Tensor, sink: int, window: int) -> torch.Tensor:
    """[queries, keys]: a key at k is visible to a query at q when k <= q and (k < sink or q - k < window)."""
    q, k = q_pos[:, None], k_pos[None, :]
    return (k <= q) & ((k < sink) | (q - k < window))


def _edge_lost(q_pos: torch.Tensor, k_pos: torch.Tensor, sink: int, window: int) -> torch.Tensor:
    """`_visible` without the oldest key each query sees past the sinks: the window one shorter where the
    window binds, the first key after the sinks where it holds the whole history (a band off by one)."""
    edge = torch.clamp(q_pos - window + 1, min=sink)[:, None]
    return _visible(q_pos, k_pos, sink, window) & (k_pos[None, :] != edge)


def _blocks(counts: torch.Tensor, indices: torch.Tensor, key_blocks: int) -> torch.Tensor:
    dense = torch.zeros(counts.shape[-1], key_blocks, dtype=torch.bool)
    for row, (count, chosen) in enumerate(zip(counts[0, 0], indices[0, 0])):
        dense[row, chosen[:count].long()] = True
    return dense


@pytest.mark.parametrize("start,n,sink,window", CASES)
def test_block_mask_admits_exactly_the_band(start, n, sink, window):
    """The pairs the kernel admits (full blocks whole, partial blocks through the mask_mod) are exactly
    the sink + window rule's, padding keys never among them, and the blocks visited are exactly those
    holding a visible pair (nothing outside the band is read)."""
    held = held_positions(start, sink, window, "cpu")
    mask = band_block_mask(held, start, n, sink, window)
    query_blocks, key_blocks = mask.kv_indices.shape[-2:]
    k_pos = band_key_positions(held, start, n)
    assert mask.seq_lengths == (query_blocks * BLOCK, key_blocks * BLOCK) == (query_blocks * BLOCK, len(k_pos))
    assert torch.equal(k_pos[k_pos < start + query_blocks * BLOCK], torch.cat([held, torch.arange(start, start + n)]))
    partial = _blocks(mask.kv_num_blocks, mask.kv_indices, key_blocks)
    full = _blocks(mask.full_kv_num_blocks, mask.full_kv_indices, key_blocks)
    assert not (partial & full).any()

    def pairs(blocks: torch.Tensor) -> torch.Tensor:
        return blocks.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)

    truth = _visible(torch.arange(start, start + query_blocks * BLOCK), k_pos, sink, window)
    masked = mask.mask_mod(0, 0, torch.arange(query_blocks * BLOCK)[:, None], torch.arange(len(k_pos))[None, :])
    admitted = pairs(full) | (pairs(partial) & masked)
    assert torch.equal(admitted, truth), f"{int((admitted != truth).sum())} pairs differ from the rule"
    holds_visible = truth.view(query_blocks, BLOCK, key_blocks, BLOCK).any(3).any(1)
    assert torch.equal(partial | full, holds_visible)
    if n >= 4 * BLOCK and window >= 2 * BLOCK:
        assert full.any(), "no full block: the mask_mod would run everywhere"


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_band_attention_equals_sdpa_band(monkeypatch):
    """The padded mask as FlexAttention reads it (padding, grouped query heads, scale) gives the band's
    attention; uncompiled here (the CPU), compiled on CUDA below."""
    monkeypatch.setattr(band, "_compiled_flex", lambda: flex_attention)
    for (start, n, sink, window), heads in [((700, 1000, 4, 64), 8), ((5000, 777, 64, 256), 4), ((3, 5, 4, 8), 12)]:
        _check_band(start, n, sink, window, heads, "cpu", torch.float32)


def _check_band(start, n, sink, window, heads, device, dtype, dim=32, seed=0):
    """`band_attention` over a random chunk and held keys, query by query (a query's output scales with the
    keys it sees) within twice SDPA's error against the exact band, and able to see the band's edge lost."""
    g = torch.Generator().manual_seed(seed)
    held = held_positions(start, sink, window, device)
    q = torch.randn(n, heads, dim, generator=g).to(device, dtype)
    held_k, held_v, k, v = (torch.randn(rows, heads // 4, dim, generator=g).to(device, dtype)
                            for rows in (len(held), len(held), n, n))
    out = band_attention(q, held_k, held_v, k, v, band_block_mask(held, start, n, sink, window), dim ** -0.5)
    q_pos = torch.arange(start, start + n, device=device)
    keys, values, k_pos = torch.cat([held_k, k]), torch.cat([held_v, v]), torch.cat([held, q_pos])
    visible = _visible(q_pos, k_pos, sink, window)
    reference = exact_attention(q, keys, values, dim ** -0.5, visible)
    what = f"{n} queries from {start}, sink {sink}, window {window}, {dtype}: "
    tolerance = assert_within_yardstick(out, reference, pytorch_attention(q, keys, values, dim ** -0.5, visible),
                                        what)
    planted = exact_attention(q, keys, values, dim ** -0.5, _edge_lost(q_pos, k_pos, sink, window))
    assert_sees(planted, reference, tolerance, what)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_band_equals_sdpa_band_on_cuda(dtype):
    """After `warm_up`, chunks of every length, start, sink, window and KV-head count run without another
    compile, and are as close to the band's attention as SDPA is."""
    from torch._dynamo.utils import counters

    band.warm_up(4, 128, dtype, "cuda", 64, 256, 128 ** -0.5)
    compiled = counters["stats"]["unique_graphs"]
    for i, (start, n, sink, window) in enumerate(CASES):
        with torch.inference_mode():  # as the engine runs (grad mode is one of the compile's guards)
            _check_band(start, n, sink, window, 4 * (1 + i % 3), "cuda", dtype, dim=128, seed=i)
    assert counters["stats"]["unique_graphs"] == compiled, "a chunk compiled the kernel again after the warm-up"
