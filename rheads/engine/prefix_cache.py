"""Prefix caching on the head-split cache: which pages and window snapshots hold a computed prefix.

Full heads: a page whose `page_size` tokens are all computed is registered under its block's hash, a
chain (sha256 of the parent block's hash and the block's token ids), so a page stands for its whole
prefix, not only its own tokens. A later sequence whose tokens begin with the same blocks takes those
pages instead of computing them (the block manager's reference counts share them). A registered page
that no sequence holds any more stays cached, evictable least-recently-used when the pool needs a page.

Streaming heads keep only sink + window entries per sequence, overwritten as it moves on, so reusing a
prefix of M tokens needs their state as of M too. Two ways to have it:
- a snapshot: a copy of a sequence's window slot taken when its cache ended exactly at a page boundary,
  stored in a free window slot (the same layout, so it is copied back as it is). Taken at two points a
  sequence chooses when it is admitted: the last page boundary before its prompt's last token (the next
  turn of a chat resends the prompt) and the end of the cached blocks it matched (where it branched off
  a cached prefix: the other questions over the same document branch there too);
- recomputing it from the pages. A streaming head at a layer sees `window` positions back, and the full
  heads read the cached pages, which are exact; so a forward over the last `span` tokens before M (the
  sum of the windows of the layers with streaming heads), after the sinks, gives every layer's window
  entries as of M exactly, whatever the ring held before (`recompute_start`). Those chunks read the
  full heads from the pages and write only the streaming heads (`Chunk.reuses`).
A sequence starts from whichever is later: the last snapshot on its matched chain, or M - span. So a
cached prefix costs its full heads' pages alone, a snapshot only saves the recompute, and every cached
page boundary is a hit. A sequence that would recompute where a running one is about to keep a snapshot
(questions arriving together over a document: the first to run branches there) waits for it instead
(`Hit.waits`): a few steps, where it would compute the span itself. Without streaming heads (budget 1.0)
every hit resumes at M.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import Counter, OrderedDict
from dataclasses import dataclass

from .sequence import Sequence


@dataclass(frozen=True)
class Hit:
    """The cached prefix a sequence reuses. Its full heads' pages cover `matched_tokens`; it is computed
    from `start` (with the snapshot slot copied into its own where one is kept there), and, where `jump`
    is (sink, to), its sinks are computed and then it goes on at `to`: the streaming heads' state is
    recomputed from there (the module docstring). Up to `matched_tokens` its chunks only read the full heads."""

    pages: list[int]
    matched_tokens: int
    start: int = 0
    snapshot: int | None = None
    jump: tuple[int, int] | None = None
    waits: bool = False  # a running sequence will keep a snapshot at matched_tokens: better to wait for it

    @property
    def num_tokens(self) -> int:
        """The prompt tokens the hit saves computing (OpenAI's cached_tokens; the hits counter)."""
        return self.jump[1] - self.jump[0] if self.jump else self.start

    @property
    def resumes(self) -> int:
        """The first position computed after any sinks."""
        return self.jump[1] if self.jump else self.start


class PrefixCache:
    def __init__(self, page_size: int, streaming: bool, span: int = 0, sink: int = 0):
        """`span`, `sink`: the tokens a recompute of the streaming heads covers, and the most sinks a layer has."""
        self.page_size, self.streaming, self.span, self.sink = page_size, streaming, span, sink
        self.page_of: dict[bytes, int] = {}  # block hash -> the page holding that block
        self.hash_of: dict[int, bytes] = {}  # registered page -> its block hash
        self.evictable: OrderedDict[int, None] = OrderedDict()  # registered pages nobody holds, LRU first
        self.snapshots: OrderedDict[bytes, int] = OrderedDict()  # block hash -> slot (state at its end), LRU first
        self.coming: Counter[bytes] = Counter()  # block hash -> running sequences that will keep a snapshot there
        self.queries = self.hits = 0  # prompt tokens looked up and found, since start (Prometheus counters)

    def clear(self) -> tuple[list[int], list[int]]:
        """Forget every cached block and snapshot (the query and hit totals go on); the evictable pages
        and the snapshots' slots, now free."""
        pages, slots = list(self.evictable), list(self.snapshots.values())
        self.page_of.clear(), self.hash_of.clear(), self.evictable.clear(), self.snapshots.clear()
        return pages, slots

    def block_hashes(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """The chain's hashes of seq's first num_blocks blocks, kept on the sequence as they are computed."""
        hashes, page = seq.block_hashes, self.page_size
        while len(hashes) < num_blocks:
            i = len(hashes)
            tokens = array("q", seq.token_ids(i * page, (i + 1) * page)).tobytes()
            hashes.append(hashlib.sha256((hashes[-1] if hashes else b"") + tokens).digest())
        return hashes[:num_blocks]

    def lookup(self, seq: Sequence) -> Hit:
        """The longest cached prefix of seq that leaves its last token to compute (its logits are sampled),
        and where seq starts computing (the module docstring)."""
        pages: list[int] = []
        for digest in self.block_hashes(seq, (seq.num_tokens - 1) // self.page_size):
            page = self.page_of.get(digest)
            if page is None:
                break
            pages.append(page)
        matched = len(pages) * self.page_size
        if not self.streaming:
            return Hit(pages, matched, matched)
        kept = len(pages)
        while kept and seq.block_hashes[kept - 1] not in self.snapshots:
            kept -= 1
        snapshot = self.snapshots[seq.block_hashes[kept - 1]] if kept else None
        recompute = matched - self.span
        waits = kept < len(pages) and self.coming[seq.block_hashes[len(pages) - 1]] > 0  # a snapshot at `matched`
        if kept * self.page_size >= recompute:
            return Hit(pages, matched, kept * self.page_size, snapshot, waits=waits)
        if recompute <= self.sink:
            return Hit(pages, matched, waits=waits)
        return Hit(pages, matched, jump=(self.sink, recompute), waits=waits)

    def expect(self, seq: Sequence, points: list[int], count: int) -> None:
        """Count (count=1) or stop counting (-1) the snapshots seq is to keep at these points."""
        for point in points:
            digest = seq.block_hashes[point // self.page_size - 1]
            self.coming[digest] += count
            if not self.coming[digest]:
                del self.coming[digest]

    def snapshot_points(self, seq: Sequence, hit: Hit) -> list[int]:
        """Where seq's streaming heads are to be kept (see the module docstring): ascending, past the hit."""
        if not self.streaming:
            return []
        prompt_end = (len(seq.prompt_ids) - 1) // self.page_size * self.page_size
        return sorted({p for p in (hit.matched_tokens, prompt_end) if p > hit.resumes})

    def register(self, seq: Sequence, num_tokens: int, start: int | None = None) -> list[int]:
        """Register seq's pages whose blocks lie within its first num_tokens computed tokens, from block
        `start` (default: the first not offered yet, so a step walks only its new block, not a long
        sequence's every page). A block already cached in a page some sequence holds keeps that page;
        one cached in an evictable page moves to seq's (its copy, computed alike): else, as seq grows and
        evicts the older copies, the chain would lose blocks seq holds. Returns the pages so freed."""
        hashes, freed = self.block_hashes(seq, num_tokens // self.page_size), []
        for i in range(seq.blocks_registered if start is None else start, len(hashes)):
            digest, page = hashes[i], seq.pages[i]
            if page in self.hash_of:
                continue
            old = self.page_of.get(digest)
            if old is not None and old in self.evictable:
                del self.evictable[old], self.hash_of[old]
                freed.append(old)
                old = None
            if old is None:
                self.page_of[digest], self.hash_of[page] = page, digest
        seq.blocks_registered = max(seq.blocks_registered, len(hashes))
        return freed

    def snapshot_hash(self, seq: Sequence) -> bytes | None:
        """The hash a snapshot of seq's slot, now, would be kept under; None where one is kept already or
        seq's cache does not end on a registered block."""
        blocks, rest = divmod(seq.num_cached, self.page_size)
        if rest or not blocks:
            return None
        digest = self.block_hashes(seq, blocks)[-1]
        if digest in self.snapshots:
            self.snapshots.move_to_end(digest)
            return None
        return digest if digest in self.page_of else None

    def touch(self, seq: Sequence, hit: Hit) -> None:
        """Mark the hit's snapshot most recently used (it is about to be copied from)."""
        if hit.snapshot is not None:
            self.snapshots.move_to_end(seq.block_hashes[hit.start // self.page_size - 1])

    def evict_page(self) -> tuple[int, int | None]:
        """The least recently used evictable page, now unregistered, and the snapshot slot it frees (if any)."""
        page, _ = self.evictable.popitem(last=False)
        digest = self.hash_of.pop(page)
        del self.page_of[digest]
        return page, self.snapshots.pop(digest, None)

    def evict_snapshot(self, keep: int | None = None) -> int | None:
        """Drop the least recently used snapshot other than slot `keep`; its slot, or None if there is none."""
        for digest, slot in self.snapshots.items():
            if slot != keep:
                del self.snapshots[digest]
                return slot
        return None
