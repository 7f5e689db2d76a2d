"""The head-split KV cache: full heads in shared fixed-size pages, streaming heads in per-sequence rings.

Full (retrieval) heads of every layer share one page numbering: page p holds `page_size` tokens of
every full head of every layer, so a sequence needs one block table. Streaming heads get one slot per
running sequence: `sink` first tokens plus a ring of the last `window` tokens, which never grows.
A sliding-window layer (the model's own window, every head of it) is a layer of streaming heads only,
whose ring has the model's window and no sink: its KV is bounded per sequence like theirs, so it lives in
the same slot, one way to store, index and attend to a window. A layer's (sink, window) is its
*geometry*; the ring index, the held positions and the decode batch's ring offsets are per geometry.
All storage is allocated up front from a number of bytes; the accounting below is exact. Which sequence
holds which page and slot is the block manager's (`block_manager.py`). With `kv_cache_dtype` fp8 both pools
hold e4m3 entries under one fixed scale per (layer, KV head) (`kvquant.py`): `encode`, `put` and `decode`
below are the only way in and out, so every path agrees on what the pools mean.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from . import kvquant
from .heads import HeadSplit


@dataclass(frozen=True)
class CacheConfig:
    page_size: int = 16
    sink: int = 64
    window: int = 256
    memory_bytes: int = 512 << 20  # KV memory for both pools together
    max_num_seqs: int = 64  # window slots for sequences (and so the most sequences resident at once)
    snapshot_slots: int = 0  # more window slots that only prefix-cache snapshots may hold
    dtype: torch.dtype = torch.float32  # the model's: what attention computes in
    device: str = "cpu"
    kv_cache_dtype: str = "auto"  # what the pools store: the model's dtype, or "fp8" (e4m3)

    @property
    def storage_dtype(self) -> torch.dtype:
        return kvquant.storage_dtype(self.kv_cache_dtype, self.dtype)


@dataclass(frozen=True)
class Footprint:
    """Bytes per page, per window slot and per sequence under a head split: the analytic formula that
    both the allocator and the reports use."""

    page_size: int
    bytes_per_page: int  # page_size tokens of every full head of every layer, K and V
    bytes_per_slot: int  # sink + window entries of every streaming head of every layer, K and V
    # what a full cache of the model (budget 1.0) in its own dtype holds (so an fp8 cache's saving shows both
    # factors): one token of every head of its full-attention layers, and per sequence its sliding layers'
    # rings (a model's own window is no saving of the head split)
    bytes_per_token_full: int
    bytes_per_slot_sliding: int = 0

    @classmethod
    def of(cls, split: HeadSplit, head_dim: int, config: CacheConfig) -> "Footprint":
        elt, kv = config.storage_dtype.itemsize, split.num_kv_heads
        model_elt = config.dtype.itemsize
        full_heads = sum(split.num_full)
        ring_entries = sum(sum(layer_geometry(split, layer, config)) * (kv - n)
                           for layer, n in enumerate(split.num_full))  # sum over layers of ring x streaming heads
        windows = [split.window_of(layer) for layer in range(split.num_layers)]
        return cls(config.page_size, config.page_size * full_heads * 2 * head_dim * elt,
                   ring_entries * 2 * head_dim * elt, sum(w is None for w in windows) * kv * 2 * head_dim * model_elt,
                   sum(w or 0 for w in windows) * kv * 2 * head_dim * model_elt)

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size) if self.bytes_per_page else 0

    def bytes_for(self, num_tokens: int) -> int:
        """Bytes one sequence of num_tokens tokens holds: its full-head pages plus its window slot."""
        return self.pages_for(num_tokens) * self.bytes_per_page + self.bytes_per_slot


def layer_geometry(split: HeadSplit, layer: int, config) -> tuple[int, int]:
    """(sink, window) of a layer's streaming heads: the model's own window and no sink in a sliding-window
    layer, the configured sink and window elsewhere (`config`: a CacheConfig, or the integration's Kernels)."""
    window = split.window_of(layer)
    return (0, window) if window else (config.sink, config.window)


def ring_index(positions: torch.Tensor, sink: int, window: int) -> torch.Tensor:
    """Where each token position lives in a streaming slot of this geometry: sinks in place, the rest in a ring."""
    return torch.where(positions < sink, positions, sink + (positions - sink) % window)


def held_positions(start: int, sink: int, window: int, device: torch.device | str) -> torch.Tensor:
    """Positions a streaming slot holds before position `start`: its sinks, then its window, ascending."""
    return torch.cat([torch.arange(min(sink, start), device=device),
                      torch.arange(max(sink, start - window), max(sink, start), device=device)])


def recompute_span(split: HeadSplit, config: CacheConfig) -> tuple[int, int]:
    """(span, sink) of a recompute of the streaming heads from cached pages (`prefix_cache.py`): the sum of
    the windows of the layers that have streaming heads, and the most sinks one of them has."""
    geometries = [layer_geometry(split, layer, config) for layer, n in enumerate(split.num_full)
                  if n < split.num_kv_heads]
    return sum(w for _, w in geometries), max((s for s, _ in geometries), default=0)


class CacheFullError(RuntimeError):
    """An allocation beyond the free pages or slots: the scheduler checks (and preempts) before it
    allocates, so this means a scheduling bug, not a full cache."""


@dataclass(frozen=True)
class CacheUsage:
    """What the pools hold now, and what a full cache would hold for the same tokens."""

    pages_total: int
    pages_used: int
    slots_total: int
    slots_used: int
    bytes_used: int
    bytes_full_equivalent: int
    bytes_capacity: int
    pages_cached: int = 0  # held by the prefix cache alone: evictable pages and window snapshots
    slots_cached: int = 0
    bytes_cached: int = 0

    @property
    def usage_fraction(self) -> float:
        return self.bytes_used / self.bytes_capacity if self.bytes_capacity else 0.0


class PoolSizes(NamedTuple):
    pages: int
    seq_slots: int  # window slots for sequences
    snapshot_slots: int  # more window slots for prefix-cache snapshots alone

    @classmethod
    def of(cls, footprint: Footprint, config: CacheConfig) -> "PoolSizes":
        """What `config.memory_bytes` holds. Snapshots take free slots when they can; `snapshot_slots`
        more are theirs alone, so that a cache whose slots all hold live sequences (max_num_seqs of them)
        still keeps its prefixes' streaming heads. With full heads, slots take at most half the memory,
        live ones first."""
        memory, per_slot, full_heads = config.memory_bytes, footprint.bytes_per_slot, footprint.bytes_per_page > 0
        slots, snapshots = config.max_num_seqs, 0
        if per_slot:
            cap = memory // per_slot if not full_heads else (memory // 2) // per_slot
            slots = min(slots, cap)
            snapshots = min(config.snapshot_slots, cap - slots) if full_heads else 0
        pages = (memory - (slots + snapshots) * per_slot) // footprint.bytes_per_page if full_heads else 0
        if slots < 1 or (full_heads and pages < 1):
            raise ValueError(f"KV memory of {memory} bytes holds no sequence: raise it")
        return cls(int(pages), int(slots), int(snapshots))


class HeadSplitCache:
    """Storage and allocation for one model's KV cache under a given head split."""

    def __init__(self, split: HeadSplit, head_dim: int, config: CacheConfig, sizes: PoolSizes | None = None):
        """`sizes`: the pools' (what `config`'s memory holds under `split` by default; tensor parallelism
        gives every rank the smallest of its ranks', so that one page or slot number means the same there)."""
        self.split, self.config, self.head_dim = split, config, head_dim
        self.footprint = footprint = Footprint.of(split, head_dim, config)
        # the distinct (sink, window) of the layers, and which one each layer's streaming heads have
        geometry = [layer_geometry(split, layer, config) for layer in range(split.num_layers)]
        self.geometries = sorted(set(geometry))
        self.layer_geometry = [self.geometries.index(g) for g in geometry]
        self.bytes_per_page, self.bytes_per_slot = footprint.bytes_per_page, footprint.bytes_per_slot
        self.bytes_per_token_full = footprint.bytes_per_token_full
        self.recompute = recompute_span(split, config)  # of the whole model's heads (tensor parallelism: every rank's)
        pages, slots, snapshots = sizes or PoolSizes.of(footprint, config)
        self.num_pages, self.num_seq_slots, self.num_slots = pages, slots, slots + snapshots
        # One more page and slot than the memory holds: never handed out, they take the writes of the
        # padding rows of a CUDA-graph decode batch (a few KiB, outside the accounting).
        self.scratch_page, self.scratch_slot = self.num_pages, self.num_slots
        shape_full = lambda n: (self.num_pages + 1, config.page_size, n, head_dim)  # noqa: E731
        shape_ring = lambda n, g: (self.num_slots + 1, sum(g), n, head_dim)  # noqa: E731
        make = lambda shape: torch.zeros(shape, dtype=config.storage_dtype, device=config.device)  # noqa: E731
        self.full_k = [make(shape_full(n)) if n else None for n in split.num_full]
        self.full_v = [make(shape_full(n)) if n else None for n in split.num_full]
        stream = [(split.num_kv_heads - n, g) for n, g in zip(split.num_full, geometry)]
        self.ring_k = [make(shape_ring(n, g)) if n else None for n, g in stream]
        self.ring_v = [make(shape_ring(n, g)) if n else None for n, g in stream]
        # [K or V, layer, KV head in cache order], fixed after `calibrate`; 8 bytes per head, outside the
        # accounting like the scratch page. In place on the device, so graphs captured over them stay valid.
        self.scales = None
        if config.storage_dtype != config.dtype:
            self.scales = torch.ones(2, split.num_layers, split.num_kv_heads, dtype=torch.float32, device=config.device)
        self.calibrating = False

    @property
    def quantized(self) -> bool:
        return self.scales is not None

    def encode(self, x: torch.Tensor, layer: int, heads: slice, kind: int) -> torch.Tensor:
        """New K (`kind` 0) or V (1) entries [..., H, D] of the layer's KV heads `heads` as the pools store
        them; while calibrating, their peaks first grow the heads' scales."""
        if self.scales is None:
            return x
        scale = self.scales[kind, layer, heads]
        if self.calibrating:
            kvquant.observe(scale, x)
        return kvquant.quantize(x, scale)

    def decode(self, x: torch.Tensor, layer: int, heads: slice, kind: int) -> torch.Tensor:
        """Entries read from a pool, in the model's dtype."""
        if self.scales is None:
            return x
        return kvquant.dequantize(x, self.scales[kind, layer, heads], self.config.dtype)

    def layer_scales(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The layer's K and V scales [KV heads] (None: an unquantized cache)."""
        return None if self.scales is None else (self.scales[0, layer], self.scales[1, layer])

    @staticmethod
    def put(pool: torch.Tensor, index: torch.Tensor, entries: torch.Tensor) -> None:
        """pool.index_copy_(0, index, entries), for e4m3 pools too."""
        kvquant.as_bytes(pool).index_copy_(0, index, kvquant.as_bytes(entries))

    def start_calibration(self) -> None:
        """Scales from zero up, grown by every write until `finish_calibration`."""
        if self.scales is not None:
            self.scales.fill_(kvquant.MIN_SCALE)
            self.calibrating = True

    def finish_calibration(self) -> None:
        self.calibrating = False

    @property
    def has_full_heads(self) -> bool:
        return self.num_pages > 0

    def pages_for(self, num_tokens: int) -> int:
        return self.footprint.pages_for(num_tokens) if self.has_full_heads else 0

    @property
    def token_capacity(self) -> int | None:
        """The most tokens one sequence can hold: every page (None without full heads: a slot never fills)."""
        return self.num_pages * self.config.page_size if self.has_full_heads else None

    def copy_slot(self, source: int, target: int) -> None:
        """Copy one window slot's entries, every streaming head of every layer, into another (a prefix
        cache snapshot taken or restored: a slot's layout depends on positions only)."""
        for pool in (*self.ring_k, *self.ring_v):
            if pool is not None:
                pool[target].copy_(pool[source])

    def clear_slot(self, slot: int) -> None:
        """Zero one window slot's entries, every streaming head of every layer."""
        for pool in (*self.ring_k, *self.ring_v):
            if pool is not None:
                pool[slot].zero_()

    def geometry(self, layer: int) -> tuple[int, int]:
        """(sink, window) of the layer's streaming heads."""
        return self.geometries[self.layer_geometry[layer]]
