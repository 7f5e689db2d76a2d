"""Continuous batching: which sequences run this step, and how many of their tokens.

Every step, running sequences go first (oldest first): a decoding sequence feeds its one new token,
a sequence still in prefill feeds its next chunk. Spare step tokens admit waiting requests, FIFO,
when a window slot and the pages for their whole prompt are free: admission is decided by the
compressed footprint. When a running sequence needs a page and none is free, the newest sequence is
preempted (its cache freed, its tokens kept) and re-prefilled later, so requests wait, never fail.

`max_num_batched_tokens` (the chunk size) bounds a step's prefill tokens; a decoding sequence's one
token rides outside it (there are at most `max_num_seqs` of them). And no prefill chunk crosses a
multiple of the chunk size. So a prompt's chunks are whole chunk-sized blocks, the shape the GPU kernels
planned at start-up (`cudnn_prefill.plan_chunks`), except its tail and a block in which an older
prompt's tail left fewer step tokens than the block needs (split in two; in a wave of long prompts, each
prompt's first block, where attention is cheapest). Before, other prompts' tails shifted a prompt's
every chunk off those shapes unless every prompt was a whole number of blocks long, and decoding
sequences shifted them a little more each step.

A step is `schedule` (or, for a pipelined decode step, `schedule_pipelined`), the runner's `execute`,
then `update` (`messages.py`): the scheduler is what admits, grows, preempts, advances a sequence's
cached tokens, appends its sampled tokens (feeding them to its grammar's matcher) and finishes it on EOS,
a stop token id, a length limit or a complete grammar; the runner only reads sequences.

With prefix caching, an admitted sequence reuses its cached prefix's pages and starts where its hit
says (`prefix_cache.py`): at the prefix's end, at a snapshot of its streaming heads, or recomputing them
(its sinks, then a jump to the last span of the prefix); its prefill chunks stop at the points where it
keeps a snapshot, which `update` takes once the chunk ending there has run, as it registers every block
the step completed, at its jump, and where the pages it reuses end.
"""

from __future__ import annotations

from collections import deque

from .block_manager import BlockManager
from .grammar import GrammarError, advance
from .messages import Appended, Chunk, RunnerOutput, SchedulerOutput
from .sequence import Sequence, Status


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_batched_tokens: int, max_model_len: int | None = None,
                 eos_ids: set[int] | None = None):
        self.blocks = blocks
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.eos_ids = eos_ids or set()
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence, reason: str) -> None:
        """End a sequence ("stop", "length", "abort" or "error") and give its cache back."""
        self.free(seq)
        seq.status, seq.finish_reason = Status.FINISHED, reason

    def free(self, seq: Sequence) -> None:
        """Take a sequence out of the scheduler and give its cache back (finished, aborted or failed)."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq)
        self._keep_snapshots_at(seq, [])
        seq.num_cached, seq.num_reused, seq.jump = 0, 0, None

    def preempt(self, seq: Sequence) -> None:
        """Give a running sequence's cache back and queue it first, to be computed again from its first token."""
        self.running.remove(seq)
        self.blocks.free(seq)
        self._keep_snapshots_at(seq, [])
        seq.num_cached, seq.status, seq.num_reused, seq.jump = 0, Status.WAITING, 0, None
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _reserve(self, seq: Sequence, num_tokens: int) -> bool:
        """Pages for seq's first num_tokens tokens, preempting newer sequences if needed."""
        while self.blocks.missing_pages(seq, num_tokens) > self.blocks.num_free_pages:
            victim = max(self.running, key=lambda s: s.arrival)
            self.preempt(victim)
            if victim is seq:
                return False
        self.blocks.append(seq, num_tokens)
        return True

    def _prefill_tokens(self, seq: Sequence, room: int) -> int:
        """How many of seq's uncached tokens to feed: at most `room` (what is left of this step's), not past
        the next multiple of the chunk size (max_num_batched_tokens), its next snapshot point, its jump
        or the end of the pages it reuses (a chunk either reuses its full heads' pages or writes them)."""
        size, cached = self.max_num_batched_tokens, seq.num_cached
        ends = [*seq.snapshot_at[:1], *(seq.jump or ())[:1], seq.num_reused]
        return min(seq.num_tokens - cached, room, size - cached % size, *(p - cached for p in ends if p > cached))

    def schedule(self) -> SchedulerOutput:
        room = self.max_num_batched_tokens  # prefill tokens left this step (see the module docstring)
        chunks: list[Chunk] = []
        for seq in sorted(self.running, key=lambda s: s.arrival):
            if seq.status is not Status.RUNNING:
                continue  # preempted earlier in this loop
            decoding = seq.num_tokens - seq.num_cached == 1
            n = 1 if decoding else self._prefill_tokens(seq, room)
            if n > 0 and self._reserve(seq, seq.num_cached + n):
                chunks.append(Chunk.of(seq, n))
                room -= 0 if decoding else n
        chunks = [c for c in chunks if c.seq.status is Status.RUNNING]  # drop any preempted later
        while self.waiting and room > 0 and self.blocks.can_allocate(self.waiting[0]):
            seq = self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            hit = self.blocks.allocate(seq)
            seq.num_cached, seq.num_reused, seq.jump = hit.start, hit.matched_tokens, hit.jump
            self._jump(seq)
            if seq.num_cached_prompt is None:
                seq.num_cached_prompt = hit.num_tokens
            if self.blocks.prefix:
                self._keep_snapshots_at(seq, self.blocks.prefix.snapshot_points(seq, hit))
            n = self._prefill_tokens(seq, room)
            self.blocks.append(seq, seq.num_cached + n)
            chunks.append(Chunk.of(seq, n))
            room -= n
        return SchedulerOutput(chunks)

    def failed(self, output: SchedulerOutput) -> None:
        """A forward over `output` raised. A decode chunk writes its sequence's new entry alone, and again
        the same when retried; a prefill chunk that died after some layers wrote its window slot has lost
        entries its later queries read, so those sequences go back to the waiting queue, to be computed again."""
        for chunk in output.chunks:
            if not chunk.decodes:
                self.preempt(chunk.seq)

    def update(self, output: SchedulerOutput, result: RunnerOutput) -> list[Appended]:
        """After a forward over `output` returned: its chunks' tokens are in the cache. Then `result`'s tokens
        are appended, in order, to their sequences still running, each finishing its sequence (and freeing
        it) on EOS or a stop token id ("stop"), a length limit ("length") or its grammar's completion
        ("stop"); a row whose sampling failed, or whose token its grammar refuses, finishes its sequence
        with "error". Returns what was done, for the output processor."""
        for chunk in output.chunks:
            seq = chunk.seq
            seq.num_cached += chunk.num_tokens
            self._jump(seq)
            if seq.status is Status.RUNNING:
                self._cache_prefix(seq)
        appended = []
        for row, seq in enumerate(result.seqs):
            if seq.status is not Status.RUNNING:
                continue  # finished or aborted while this token was computed
            if row in result.errors:
                self.finish(seq, "error")
                appended.append(Appended(seq, None, error=result.errors[row]))
                continue
            token, logprob = result.token_ids[row], result.logprobs[row]
            seq.output_ids.append(token)
            if logprob is not None:
                seq.logprobs.append(logprob)
            reason = self._finish_reason(seq, token)
            try:
                # its matcher takes the token now, before its next mask is built (a pipelined step builds it
                # right after this update); a token that ends the request otherwise is never fed to it
                if reason is None and seq.matcher is not None and advance(seq.matcher, token):
                    reason = "stop"
            except GrammarError as error:
                self.finish(seq, "error")
                appended.append(Appended(seq, token, logprob, error=f"{type(error).__name__}: {error}"))
                continue
            if reason is not None:
                self.finish(seq, reason)
            appended.append(Appended(seq, token, logprob))
        return appended

    @staticmethod
    def _jump(seq: Sequence) -> None:
        """Once its sinks are computed, a sequence recomputing its streaming heads goes on where that starts."""
        if seq.jump and seq.num_cached == seq.jump[0]:
            seq.num_cached, seq.jump = seq.jump[1], None

    def _cache_prefix(self, seq: Sequence) -> None:
        """Register the blocks seq has computed and, at a snapshot point, keep its streaming heads there."""
        self.blocks.cache_computed(seq)
        if seq.snapshot_at and seq.num_cached >= seq.snapshot_at[0]:
            if seq.num_cached == seq.snapshot_at[0]:
                self.blocks.snapshot(seq)
            self._keep_snapshots_at(seq, [p for p in seq.snapshot_at if p > seq.num_cached])

    def _keep_snapshots_at(self, seq: Sequence, points: list[int]) -> None:
        """Where seq is still to keep snapshots, counted by the prefix cache (`Hit.waits`)."""
        if self.blocks.prefix:
            self.blocks.prefix.expect(seq, seq.snapshot_at, -1)
            self.blocks.prefix.expect(seq, points, 1)
        seq.snapshot_at = points

    def _finish_reason(self, seq: Sequence, token: int) -> str | None:
        params = seq.params
        # the sampler keeps stops out of the first min_tokens tokens (adjust_logits); this token is number
        # len(output_ids), counted from 1
        stops = len(seq.output_ids) > params.min_tokens
        if stops and (token in params.stop_token_ids or (token in self.eos_ids and not params.ignore_eos)):
            return "stop"
        if len(seq.output_ids) >= params.max_tokens or seq.num_tokens >= (self.max_model_len or float("inf")):
            return "length"
        return None

    def schedule_pipelined(self, seqs: list[Sequence]) -> SchedulerOutput | None:
        """One more decode step of these sequences, each with its last sampled token still on the device
        (not appended: output_ids and num_tokens count the tokens before it), less those for which that
        token is the last by length (they finish when it is read back); or None whenever the batch may
        change otherwise: one finished or was aborted, another is running or a waiting request fits, or
        a page is missing (`schedule` then decides, preempting if it must)."""
        if len(self.running) != len(seqs) or any(s.status is not Status.RUNNING for s in seqs):
            return None
        if self.waiting and self.blocks.can_allocate(self.waiting[0]):
            return None
        limit = self.max_model_len or float("inf")
        going_on = [s for s in seqs if len(s.output_ids) + 1 < s.params.max_tokens and s.num_tokens + 1 < limit]
        missing = sum(self.blocks.missing_pages(s, s.num_cached + 1) for s in going_on)
        if not going_on or missing > self.blocks.num_free_pages:
            return None
        for seq in going_on:
            self.blocks.append(seq, seq.num_cached + 1)
        going = set(map(id, going_on))
        return SchedulerOutput([Chunk(seq, 1, samples=True) for seq in going_on],  # each feeds its in-flight token
                               fed_rows=[row for row, seq in enumerate(seqs) if id(seq) in going])
