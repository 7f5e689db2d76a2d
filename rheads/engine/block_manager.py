"""Which pages and window slots each sequence holds: the one place that hands out and takes back KV memory.

`HeadSplitCache` owns the storage; this owns its allocation. A sequence holds one window slot (its
streaming heads' sink + ring) and a list of pages (its full heads' history, one block table row per
slot). Pages carry reference counts, so a page may belong to several sequences at once: `share` gives
a sequence pages another already holds (a prefix both have cached), and `free` returns a page to the
pool only when its last holder lets go. Every allocation is paired with its check, as in nano-vllm's
block manager: `can_allocate` / `allocate` for a new sequence, `missing_pages` / `append` for a
growing one; the scheduler checks (and preempts) first, so a failed allocation is a scheduling bug.

With prefix caching (`prefix_cache.py`) a page nobody holds may stay registered, evictable: it counts as
free, and is taken (unregistered) only when no page is free at all; window slots likewise hold snapshots
of the streaming heads until a sequence needs the slot. A new sequence reuses a cached prefix through
`allocate`, and `can_allocate` counts only the pages it newly needs.
"""

from __future__ import annotations

import torch

from .cache import CacheFullError, CacheUsage, HeadSplitCache
from .prefix_cache import Hit, PrefixCache
from .sequence import Sequence

NO_HIT = Hit([], 0)


class BlockManager:
    def __init__(self, cache: HeadSplitCache, prefix_caching: bool = False):
        self.cache = cache
        # Without full heads there are no pages to hold a prefix: nothing is cached then.
        span, sink = cache.recompute
        self.prefix = (PrefixCache(cache.config.page_size, span > 0, span, sink)
                       if prefix_caching and cache.has_full_heads else None)
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
        """Pages a sequence can be given now: free ones and cached ones nobody holds."""
        return len(self.free_pages) + (len(self.prefix.evictable) if self.prefix else 0)

    def lookup(self, seq: Sequence) -> Hit:
        """The cached prefix a new sequence would reuse (none without prefix caching, or after `share`)."""
        return self.prefix.lookup(seq) if self.prefix and not seq.pages else NO_HIT

    def can_allocate(self, seq: Sequence, num_tokens: int | None = None) -> bool:
        """Whether a new sequence fits now with num_tokens tokens (default: its tokens and one more): a slot
        and the pages its cached prefix does not cover, which cannot come from that prefix's own pages;
        and not while it waits for a snapshot a running sequence is about to keep (`Hit.waits`)."""
        hit = self.lookup(seq)
        if hit.waits:
            return False
        needed = self.cache.pages_for(seq.num_tokens + 1 if num_tokens is None else num_tokens) - len(hit.pages)
        evictable = self.prefix.evictable if self.prefix else ()
        available = self.num_free_pages - sum(page in evictable for page in hit.pages)
        cached = len(self.prefix.snapshots) if self.prefix else 0
        live = self.cache.num_slots - len(self.free_slots) - cached
        return live < self.cache.num_seq_slots and len(self.free_slots) + cached > 0 and needed <= available

    def allocate(self, seq: Sequence, num_tokens: int = 0) -> Hit:
        """A window slot for `seq`, its cached prefix (pages shared, the snapshot copied into its slot)
        and pages for its first num_tokens tokens (after any it was given by `share`). Returns the hit:
        the scheduler starts the sequence where it says."""
        hit = self.lookup(seq)
        if self.prefix:
            self.prefix.touch(seq, hit)
        seq.slot = self._take_slot(keep=hit.snapshot)
        if hit.snapshot is not None and hit.snapshot != seq.slot:
            self.cache.copy_slot(hit.snapshot, seq.slot)
        elif hit.jump:
            self.cache.clear_slot(seq.slot)  # what the ring held must not be NaN (masked entries still multiply)
        self._hold(seq, hit.pages)
        seq.blocks_registered = len(hit.pages)
        self.tokens[seq.slot] = hit.matched_tokens
        self._write_table(seq, 0)
        if num_tokens > hit.matched_tokens:
            self.append(seq, num_tokens)
        if self.prefix:
            self.prefix.queries += seq.num_tokens  # a preempted sequence looks up its output too
            self.prefix.hits += hit.num_tokens
        return hit

    def missing_pages(self, seq: Sequence, num_tokens: int) -> int:
        """Pages `seq` lacks to cover num_tokens tokens."""
        return max(0, self.cache.pages_for(num_tokens) - len(seq.pages))

    def append(self, seq: Sequence, num_tokens: int) -> None:
        """Grow `seq`'s pages to cover num_tokens tokens, from the free pool."""
        need = self.missing_pages(seq, num_tokens)
        if need > self.num_free_pages:
            raise CacheFullError(f"need {need} pages, {self.num_free_pages} free")
        start = len(seq.pages)
        for _ in range(need):
            page = self._take_page()
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
        self._hold(seq, pages)

    def _hold(self, seq: Sequence, pages: list[int]) -> None:
        for page in pages:
            if self.prefix and page in self.prefix.evictable:  # a cached page nobody held: held again
                del self.prefix.evictable[page]
            self.ref_counts[page] += 1
        seq.pages.extend(pages)

    def _take_page(self) -> int:
        if self.free_pages:
            return self.free_pages.pop()
        page, slot = self.prefix.evict_page()
        if slot is not None:
            self.free_slots.append(slot)
        return page

    def _take_slot(self, keep: int | None = None) -> int:
        """A free slot, else one a snapshot held (the least recently used other than `keep`, else `keep`
        itself: the new sequence then starts from that snapshot in place)."""
        if self.free_slots:
            return self.free_slots.pop()
        slot = self.prefix.evict_snapshot(keep) if self.prefix else None
        if slot is None and keep is not None:
            slot = self.prefix.evict_snapshot()
        if slot is None:
            raise CacheFullError("no free window slot")
        return slot

    def cache_computed(self, seq: Sequence, every_block: bool = False) -> None:
        """Register the pages of seq's computed blocks whose tokens are known (a pipelined step's token is
        computed before the host has it), so later sequences can reuse them: its new blocks, or (as it
        ends) `every_block` again, for a block whose other cached copy was evicted while seq ran."""
        if self.prefix and seq.pages:
            self.free_pages += self.prefix.register(seq, min(seq.num_cached, seq.num_tokens),
                                                    0 if every_block else None)

    def snapshot(self, seq: Sequence) -> None:
        """Keep a copy of seq's window slot as of its cache's end (a page boundary), if a slot is free or
        an older snapshot can give its up."""
        digest = self.prefix.snapshot_hash(seq) if self.prefix and self.prefix.streaming else None
        if digest is None:
            return
        slot = self.free_slots.pop() if self.free_slots else self.prefix.evict_snapshot()
        if slot is not None:
            self.cache.copy_slot(seq.slot, slot)
            self.prefix.snapshots[digest] = slot

    def free(self, seq: Sequence) -> None:
        """Let go of `seq`'s slot and pages, registering its computed blocks first; a page returns to the
        pool when no sequence holds it any more, or, registered, waits there evictable, the last block
        first in line (idempotent for a sequence that holds nothing)."""
        self.cache_computed(seq, every_block=True)
        for page in reversed(seq.pages):
            self.ref_counts[page] -= 1
            if self.ref_counts[page] == 0:
                if self.prefix and page in self.prefix.hash_of:
                    self.prefix.evictable[page] = None
                else:
                    self.free_pages.append(page)
        seq.pages.clear()
        seq.blocks_registered = 0
        if seq.slot is not None:
            self.tokens.pop(seq.slot, None)
            self.free_slots.append(seq.slot)
            seq.slot = None

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix: evictable pages and snapshot slots go back to the pools, and pages
        still held stop standing for their blocks (they are freed when their holders end)."""
        if self.prefix:
            pages, slots = self.prefix.clear()
            self.free_pages.extend(pages)
            self.free_slots.extend(slots)

    def _write_table(self, seq: Sequence, start: int) -> None:
        if seq.pages[start:]:
            self.block_tables[seq.slot, start:len(seq.pages)] = torch.tensor(seq.pages[start:], dtype=torch.int32)

    def _cached(self) -> tuple[int, int]:
        """Pages and slots the prefix cache holds for no sequence (evictable pages, snapshots)."""
        return (len(self.prefix.evictable), len(self.prefix.snapshots)) if self.prefix else (0, 0)

    def bytes_used(self) -> int:
        """Bytes the resident sequences hold (the pools' own count; no walk over the sequences)."""
        cache, (pages, slots) = self.cache, self._cached()
        return ((cache.num_pages - len(self.free_pages) - pages) * cache.bytes_per_page
                + (cache.num_slots - len(self.free_slots) - slots) * cache.bytes_per_slot)

    def usage(self) -> CacheUsage:
        cache, page = self.cache, self.cache.config.page_size
        full_equivalent = (sum(-(-n // page) * page for n in self.tokens.values()) * cache.bytes_per_token_full
                           + len(self.tokens) * cache.footprint.bytes_per_slot_sliding)
        pages, slots = self._cached()
        return CacheUsage(
            pages_total=cache.num_pages, pages_used=cache.num_pages - len(self.free_pages) - pages,
            slots_total=cache.num_slots, slots_used=cache.num_slots - len(self.free_slots) - slots,
            bytes_used=self.bytes_used(), bytes_full_equivalent=full_equivalent,
            bytes_capacity=cache.num_pages * cache.bytes_per_page + cache.num_slots * cache.bytes_per_slot,
            pages_cached=pages, slots_cached=slots,
            bytes_cached=pages * cache.bytes_per_page + slots * cache.bytes_per_slot,
        )
