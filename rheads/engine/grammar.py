"""Grammar-constrained decoding with llguidance: a request's grammar (an llguidance grammar definition, as
`LLMatcher.grammar_from_json_schema` and its siblings make) gets a matcher per sequence.

The sampler reads each matcher's token bitmask and masks its row (`mask_rows`); the scheduler advances
the matcher with each token it appends (`advance`, in `Scheduler.update`). A pipelined decode step masks
its grammar rows once the tokens before have been read back and updated, while its forward runs
(`PipelinedDecode.step`), so a row is never drawn ahead of its matcher and never leaves the device for it.
"""

from __future__ import annotations

import functools

import torch

from .requests import RequestError
from .sequence import Sequence, Status
from .transfer import to_device


class Grammars:
    """Matchers for grammars over one model's tokenizer; the tokenizer is wrapped on first use (it walks the
    whole vocabulary), so engines that never see a grammar never pay for it."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids: set[int]):
        self.hf_tokenizer, self.vocab_size, self.eos_ids = tokenizer, vocab_size, sorted(eos_ids)

    @functools.cached_property
    def tokenizer(self):
        import llguidance.hf

        return llguidance.hf.from_tokenizer(self.hf_tokenizer, n_vocab=self.vocab_size,
                                            eos_token=self.eos_ids or None)

    def check(self, grammar: str) -> None:
        """RequestError unless the grammar compiles over this tokenizer (any thread may ask: the server's
        handlers do, so the first grammar's tokenizer wrapping happens outside the engine thread)."""
        import llguidance

        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer)
        if is_error:
            raise RequestError(f"the grammar does not compile: {messages[0] if messages else 'invalid'}")

    def matcher(self, grammar: str):
        """A fresh matcher at the grammar's start; RequestError if the grammar does not compile."""
        import llguidance

        matcher = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise RequestError(f"the grammar does not compile: {matcher.get_error()}")
        return matcher


class GrammarError(RuntimeError):
    """A sampled token the grammar refuses (a stop token id or EOS the mask let through is not one)."""


def row_matchers(seqs: list[Sequence]) -> list:
    """The matcher to mask each row with (None: no mask). A sequence that ended while its row was computed
    (a pipelined step's row whose grammar completed or that was aborted on the token before) gets none:
    its token is dropped anyway, and its matcher may allow nothing, a row of -inf that a draw on CUDA
    stops the device on."""
    return [seq.matcher if seq.status is Status.RUNNING else None for seq in seqs]


def mask_rows(logits: torch.Tensor, matchers: list) -> torch.Tensor:
    """[rows, vocab] float logits with each row's tokens its matcher forbids set to -inf (a None matcher
    leaves its row alone). The bitmasks are computed on the host, one int32 word per 32 tokens, and
    unpacked on the logits' device."""
    rows = [row for row, matcher in enumerate(matchers) if matcher is not None]
    if not rows:
        return logits
    vocab = logits.shape[-1]
    words = torch.stack([torch.frombuffer(bytearray(matchers[row].compute_bitmask()), dtype=torch.int32)
                         for row in rows])
    shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
    bits = (to_device(words, logits.device)[:, :, None] >> shifts) & 1
    allowed = torch.ones_like(logits, dtype=torch.bool)
    allowed[to_device(rows, logits.device, torch.long)] = bits.reshape(len(rows), -1)[:, :vocab].bool()
    return logits.masked_fill(~allowed, float("-inf"))


def advance(matcher, token: int) -> bool:
    """Feed a sampled token to a matcher; True once the grammar is complete (nothing but EOS may follow)."""
    if not matcher.consume_token(token):
        raise GrammarError(f"token {token} breaks the grammar: {matcher.get_error()}")
    return matcher.is_stopped()
