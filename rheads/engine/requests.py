"""What a request may ask of an engine: refusals decided from fixed settings alone, before it queues.

The server validates in its handlers (so a bad request is a 400 at once) and hands the engine thread
requests it has validated; the offline engine validates as it adds. Both read these limits, which never
change after start-up, so any thread may.
"""

from __future__ import annotations

from dataclasses import dataclass

from .sequence import SamplingParams


class RequestError(ValueError):
    """A request the engine cannot take (too long, duplicate id); the message is for the client, `param` the
    field at fault where it is not the prompt."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class EngineBrokenError(RuntimeError):
    """The engine cannot step again (a tensor-parallel forward failed on rank 0 after the other ranks had
    begun it, so their collectives and rank 0's no longer pair up): the server must be restarted."""


@dataclass(frozen=True)
class RequestLimits:
    vocab_size: int
    max_model_len: int
    token_capacity: int | None  # tokens the whole full-head pool holds for one sequence (None: no full heads)

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise RequestError if the request can never run here."""
        if not prompt_ids:
            raise RequestError("the prompt is empty")
        if min(prompt_ids) < 0 or max(prompt_ids) >= self.vocab_size:
            raise RequestError(f"prompt token ids must be in [0, {self.vocab_size})")
        if params.logit_bias and not all(0 <= t < self.vocab_size for t in params.logit_bias):
            raise RequestError(f"logit_bias token ids must be in [0, {self.vocab_size})", "logit_bias")
        total = len(prompt_ids) + params.max_tokens
        if total > self.max_model_len:
            raise RequestError(
                f"this model's maximum context length is {self.max_model_len} tokens; the request has "
                f"{len(prompt_ids)} prompt tokens and asks for {params.max_tokens} more ({total})."
            )
        if self.token_capacity is not None and total > self.token_capacity:
            raise RequestError(
                f"the request needs {total} tokens of KV cache but the whole cache holds "
                f"{self.token_capacity}; reduce max_tokens or the prompt."
            )

    def output_room(self, num_prompt_tokens: int) -> int:
        """The most tokens a request with this many prompt tokens may generate here: what the model's context
        and the whole full-head pool leave (`validate` refuses more)."""
        return min(self.max_model_len, self.token_capacity or self.max_model_len) - num_prompt_tokens
