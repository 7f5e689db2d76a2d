"""What passes between the three calls of a step: `Scheduler.schedule() -> SchedulerOutput`,
`ModelRunner.execute(SchedulerOutput) -> RunnerOutput`, `Scheduler.update(SchedulerOutput, RunnerOutput)`.

The scheduler decides and records everything (chunks, pages, which rows sample, and in `update` the
cached tokens, the appended tokens and the finishes); the runner reads the sequences to build tensors
and returns tokens, never changing a sequence. A pipelined decode step's tokens stay on the device
(`PendingOutput`) until the step after it has been launched; they are then read and updated like any.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .sequence import Sequence, TokenLogprob


@dataclass(frozen=True)
class Chunk:
    seq: Sequence
    num_tokens: int  # tokens fed this step, starting at seq.num_cached
    samples: bool  # its logits give the sequence's next token: it reaches the last token (or feeds a sampled one)
    # its tokens' full heads are cached pages the sequence reuses: it reads them and writes only the streaming
    # heads (a recompute of their window, `prefix_cache.py`)
    reuses: bool = False

    @classmethod
    def of(cls, seq: Sequence, num_tokens: int) -> "Chunk":
        end = seq.num_cached + num_tokens
        return cls(seq, num_tokens, end == seq.num_tokens, end <= seq.num_reused)

    @property
    def decodes(self) -> bool:
        """It feeds one token on the decode path (which writes every head's entry)."""
        return self.num_tokens == 1 and not self.reuses


@dataclass(frozen=True)
class SchedulerOutput:
    chunks: list[Chunk] = field(default_factory=list)
    fed_rows: list[int] | None = None  # pipelined: the row of the step before whose token each chunk feeds

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def decode_only(self) -> bool:
        """Every sequence in it feeds one token and samples the next."""
        return all(c.decodes and c.samples for c in self.chunks)

    @property
    def sampling(self) -> list[Sequence]:
        return [c.seq for c in self.chunks if c.samples]


@dataclass(frozen=True)
class RunnerOutput:
    """One sampled token for each of `seqs`, in order; `errors[i]` where sampling row i failed (its token
    is then None)."""

    seqs: list[Sequence] = field(default_factory=list)
    token_ids: list[int | None] = field(default_factory=list)
    logprobs: list[TokenLogprob | None] = field(default_factory=list)
    errors: dict[int, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Appended:
    """What `Scheduler.update` did with one token: appended it to `seq` (which it may have finished), or,
    where `error` is set, finished `seq` because sampling failed (no token) or its grammar refused the token."""

    seq: Sequence
    token_id: int | None
    logprob: TokenLogprob | None = None
    error: str | None = None


class PendingOutput:
    """A decode step's sampled tokens still on the device, with a copy on its way to pinned host memory
    (a plain `.tolist()` would wait for every step launched after it)."""

    def __init__(self, seqs: list[Sequence], tokens: torch.Tensor):
        self.seqs, self.tokens = seqs, tokens
        self._host, self._ready = tokens, None
        if tokens.is_cuda:
            self._host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            self._host.copy_(tokens, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()

    def read(self) -> RunnerOutput:
        if self._ready is not None:
            self._ready.synchronize()
        tokens = self._host.tolist()
        return RunnerOutput(list(self.seqs), tokens, [None] * len(tokens))
