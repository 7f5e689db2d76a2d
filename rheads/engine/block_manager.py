"""Which pages and window slots each sequence holds: the one place that hands out and takes back KV memory.

`HeadSplitCache` owns the storage; this owns its allocation. A sequence holds one window slot (its
streaming heads' sink + ring) and a list of pages (its full heads' history, one block table row per
slot). Pages carry reference counts, so a page may belong to several sequences at once: `share` gives
a sequence pages another already holds (a prefix both have cached), and `free` returns a page to the
pool only when its last holder lets go. Every allocation is paired with its check, as in nano-vllm's
block manager: `can_allocate` / `allocate` for a new sequence, `missing_pages` / `append` for a
growing one; the scheduler checks (and preempts) first, so a failed allocation is a scheduling bug.
"""

from __future__ import annotations

import torch

from .cache import CacheFullError, CacheUsage, HeadSplitCache
from .sequence import Sequence


class BlockManager:
    def __init__(self, cache: HeadSplitCache):
        self.cache = cache
        self.free_pages = list(range(cache.num_pages - 1, -1, -1))
        self.free_slots = list(range(cache.num_slots - 1, -1, -1))
        self.ref_counts = [0] * cache.num_pages
        # Each slot's block table, kept as pages are appended (host memory): a decode step takes its rows
        # instead of rebuilding [batch, max pages] from Python lists. Entries past a sequence's pages are
        # stale and never read; the scratch slot's row is all scratch page.
        self.block_tables = torch.full((cache.num_slots + 1, max(cache.num_pages, 1)), cache.scratch_page,
                                       dtype=torch.int32)
        self.tokens: dict[int, int] = {}  # slot -> tokens its pages cover, for the full-equivalent figure

    @property
    def num_free_pages(self) -> int:
        return len(self.free_pages)

    def can_allocate(self, num_tokens: int) -> bool:
        """Whether a new sequence of num_tokens tokens fits now: a free slot and pages for all of them."""
        return bool(self.free_slots) and self.cache.pages_for(num_tokens) <= len(self.free_pages)

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """A window slot for `seq` and pages for its first num_tokens tokens (after any it was given by `share`)."""
        if not self.free_slots:
            raise CacheFullError("no free window slot")
        seq.slot = self.free_slots.pop()
        self.tokens[seq.slot] = 0
        self._write_table(seq, 0)
        self.append(seq, num_tokens)

    def missing_pages(self, seq: Sequence, num_tokens: int) -> int:
        """Pages `seq` lacks to cover num_tokens tokens."""
        return max(0, self.cache.pages_for(num_tokens) - len(seq.pages))

    def append(self, seq: Sequence, num_tokens: int) -> None:
        """Grow `seq`'s pages to cover num_tokens tokens, from the free pool."""
        need = self.missing_pages(seq, num_tokens)
        if need > len(self.free_pages):
            raise CacheFullError(f"need {need} pages, {len(self.free_pages)} free")
        start = len(seq.pages)
        for _ in range(need):
            page = self.free_pages.pop()
            self.ref_counts[page] = 1
            seq.pages.append(page)
        if need and seq.slot is not None:
            self._write_table(seq, start)
        if seq.slot is not None:
            self.tokens[seq.slot] = num_tokens

    def share(self, seq: Sequence, pages: list[int]) -> None:
        """Give a sequence that holds no pages yet these pages, held by others too (one more holder each)."""
        if seq.pages:
            raise ValueError("shared pages go first: this sequence already holds pages")
        for page in pages:
            if self.ref_counts[page] < 1:
                raise ValueError(f"page {page} is free: only a held page can be shared")
            self.ref_counts[page] += 1
        seq.pages.extend(pages)

    def free(self, seq: Sequence) -> None:
        """Let go of `seq`'s slot and pages; a page returns to the pool when no sequence holds it any more
        (idempotent for a sequence that holds nothing)."""
        for page in reversed(seq.pages):
            self.ref_counts[page] -= 1
            if self.ref_counts[page] == 0:
                self.free_pages.append(page)
        seq.pages.clear()
        if seq.slot is not None:
            self.tokens.pop(seq.slot, None)
            self.free_slots.append(seq.slot)
            seq.slot = None

    def _write_table(self, seq: Sequence, start: int) -> None:
        if seq.pages[start:]:
            self.block_tables[seq.slot, start:len(seq.pages)] = torch.tensor(seq.pages[start:], dtype=torch.int32)

    def bytes_used(self) -> int:
        """Bytes the resident sequences hold (the pools' own count; no walk over the sequences)."""
        cache = self.cache
        return ((cache.num_pages - len(self.free_pages)) * cache.bytes_per_page
                + (cache.num_slots - len(self.free_slots)) * cache.bytes_per_slot)

    def usage(self) -> CacheUsage:
        cache, page = self.cache, self.cache.config.page_size
        full_equivalent = sum(-(-n // page) * page for n in self.tokens.values()) * cache.bytes_per_token_full
        return CacheUsage(
            pages_total=cache.num_pages, pages_used=cache.num_pages - len(self.free_pages),
            slots_total=cache.num_slots, slots_used=cache.num_slots - len(self.free_slots),
            bytes_used=self.bytes_used(), bytes_full_equivalent=full_equivalent,
            bytes_capacity=cache.num_pages * cache.bytes_per_page + cache.num_slots * cache.bytes_per_slot,
        )
