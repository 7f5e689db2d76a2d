"""Continuous batching: which sequences run this step, and how many of their tokens.

Every step, running sequences go first (oldest first): a decoding sequence feeds its one new token,
a sequence still in prefill feeds its next chunk. Spare token budget admits waiting requests, FIFO,
when a window slot and the pages for their whole prompt are free: admission is decided by the
compressed footprint. When a running sequence needs a page and none is free, the newest sequence is
preempted (its cache freed, its tokens kept) and re-prefilled later, so requests wait, never fail.

The token budget (`max_num_batched_tokens`) bounds a step's prefill tokens; a decoding sequence's one
token rides outside it (there are at most `max_num_seqs` of them). And no prefill chunk crosses a
multiple of the budget. So a prompt's chunks are whole budget-sized blocks, the shape the GPU kernels
planned at start-up (`cudnn_prefill.plan_chunks`), except its tail and a block in which an older
prompt's tail left less budget than the block needs (split in two; in a wave of long prompts, each
prompt's first block, where attention is cheapest). Before, other prompts' tails shifted a prompt's
every chunk off those shapes unless every prompt was a whole number of blocks long, and decoding
sequences shifted them a little more each step.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from .cache import HeadSplitCache
from .sequence import Sequence, Status


@dataclass
class Chunk:
    seq: Sequence
    num_tokens: int  # tokens fed this step, starting at seq.num_cached

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the sequence's last token, so its logits give the next token."""
        return self.seq.num_cached + self.num_tokens == self.seq.num_tokens


class Scheduler:
    def __init__(self, cache: HeadSplitCache, max_num_batched_tokens: int):
        self.cache = cache
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def free(self, seq: Sequence) -> None:
        """Take a sequence out of the scheduler and give its cache back (finished, aborted or failed)."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.cache.release(seq.slot, seq.pages)
        seq.slot, seq.num_cached = None, 0

    def preempt(self, seq: Sequence) -> None:
        """Give a running sequence's cache back and queue it first, to be computed again from its first token."""
        self.running.remove(seq)
        self.cache.release(seq.slot, seq.pages)
        seq.slot, seq.num_cached, seq.status = None, 0, Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _reserve(self, seq: Sequence, num_tokens: int) -> bool:
        """Pages for seq's first num_tokens tokens, preempting newer sequences if needed."""
        need = self.cache.pages_for(num_tokens) - len(seq.pages)
        while need > len(self.cache.free_pages):
            victim = max(self.running, key=lambda s: s.arrival)
            self.preempt(victim)
            if victim is seq:
                return False
        self.cache.grow(seq.slot, seq.pages, num_tokens)
        return True

    def _prefill_tokens(self, seq: Sequence, budget: int) -> int:
        """How many of seq's uncached tokens to feed: at most `budget` (what is left of this step's), and
        not past the next multiple of the chunk size (max_num_batched_tokens)."""
        size = self.max_num_batched_tokens
        return min(seq.num_tokens - seq.num_cached, budget, size - seq.num_cached % size)

    def schedule(self) -> list[Chunk]:
        budget = self.max_num_batched_tokens  # prefill tokens (see the module docstring)
        chunks: list[Chunk] = []
        for seq in sorted(self.running, key=lambda s: s.arrival):
            if seq.status is not Status.RUNNING:
                continue  # preempted earlier in this loop
            decoding = seq.num_tokens - seq.num_cached == 1
            n = 1 if decoding else self._prefill_tokens(seq, budget)
            if n > 0 and self._reserve(seq, seq.num_cached + n):
                chunks.append(Chunk(seq, n))
                budget -= 0 if decoding else n
        chunks = [c for c in chunks if c.seq.status is Status.RUNNING]  # drop any preempted later
        while self.waiting and budget > 0 and self.cache.can_admit(self.waiting[0].num_tokens + 1):
            seq = self.waiting.popleft()
            seq.slot, seq.status = self.cache.allocate_slot(), Status.RUNNING
            self.running.append(seq)
            n = self._prefill_tokens(seq, budget)
            self.cache.grow(seq.slot, seq.pages, n)
            chunks.append(Chunk(seq, n))
            budget -= n
        return chunks
