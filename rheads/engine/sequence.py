"""A request as the engine sees it: its sampling settings, its tokens, and its place in the cache."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch


MIN_REPETITION_PENALTY = 0.01  # dividing a logit by much less may overflow float32 to inf (and sampling to nan)


@dataclass
class SamplingParams:
    """Per-request sampling, in vLLM's terms. temperature 0 means greedy."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no top-k
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; 0: the chosen token's; k: chosen + top k
    # applied to the logits before sampling, as vLLM does (sampler.adjust_logits); logprobs stay the model's
    presence_penalty: float = 0.0  # subtracted from every token generated so far
    frequency_penalty: float = 0.0  # times how often each was generated
    repetition_penalty: float = 1.0  # divides (positive) or multiplies (negative) every prompt or output token's
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    min_tokens: int = 0  # no EOS or stop token id before this many tokens
    grammar: str | None = None  # an llguidance grammar the output must follow (grammar.py); complete: "stop"
    # special tokens the output's text keeps (a tool-call format's markers, such as Mistral's [TOOL_CALLS]);
    # every other special token is skipped in decoding, as always
    keep_special_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError("logprobs must be between 0 and 20")
        if not (-2 <= self.presence_penalty <= 2 and -2 <= self.frequency_penalty <= 2):
            raise ValueError("presence_penalty and frequency_penalty must be between -2 and 2")
        if not MIN_REPETITION_PENALTY <= self.repetition_penalty <= 2:
            raise ValueError(f"repetition_penalty must be in [{MIN_REPETITION_PENALTY}, 2]")
        if any(not -100 <= bias <= 100 for bias in self.logit_bias.values()):
            raise ValueError("logit_bias values must be between -100 and 100")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError("min_tokens must be between 0 and max_tokens")

    @property
    def adjusts_logits(self) -> bool:
        return self.penalized or self.grammar is not None

    @property
    def penalized(self) -> bool:
        """It adjusts its logits by more than a grammar's mask (penalties, logit bias, min_tokens): its
        batch is sampled on the host (`adjust_logits`), so its steps are not pipelined."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.logit_bias or self.min_tokens)


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), best first


@dataclass
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival: int = 0  # admission order; the newest is preempted first
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    status: Status = Status.WAITING
    num_cached: int = 0  # tokens whose K/V are in the cache
    pages: list[int] = field(default_factory=list)
    slot: int | None = None
    finish_reason: str | None = None
    text: str = ""  # detokenized output so far (up to any stop string)
    decoded: str = ""  # the output ids decoded so far, committed up to `read_offset`
    prefix_offset: int = 0  # incremental detokenization: decode [prefix_offset:] against [prefix_offset:read_offset]
    read_offset: int = 0
    generator: torch.Generator | None = None
    block_hashes: list[bytes] = field(default_factory=list)  # the prefix cache's chain over its full blocks
    blocks_registered: int = 0  # its first blocks the prefix cache has been offered (`PrefixCache.register`)
    snapshot_at: list[int] = field(default_factory=list)  # cached-token counts at which to keep its window
    num_reused: int = 0  # its first tokens whose full heads' K/V are cached pages it reuses (prefix_cache.py)
    jump: tuple[int, int] | None = None  # (sink, to): once its sinks are computed, it goes on at `to`
    num_cached_prompt: int | None = None  # prompt tokens its first admission found in the prefix cache
    matcher: object | None = None  # its grammar's llguidance matcher, advanced by `Scheduler.update`

    def token_ids(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output, without joining the two lists (a decode step asks
        each sequence for one token; joining a 32k-token prompt for it costs more than the answer)."""
        n = len(self.prompt_ids)
        if end <= n:
            return self.prompt_ids[start:end]
        if start >= n:
            return self.output_ids[start - n:end - n]
        return self.prompt_ids[start:] + self.output_ids[:end - n]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def in_prefill(self) -> bool:
        return self.num_cached < self.num_tokens - 1


@dataclass
class RequestOutput:
    """What one engine step produced for one request: the new tokens and text since the last output."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    new_logprobs: list[TokenLogprob]
    finished: bool
    finish_reason: str | None  # "stop", "length", "abort" or "error"
    num_prompt_tokens: int
    num_output_tokens: int
    error: str | None = None
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache (OpenAI's cached_tokens)

    @classmethod
    def failure(cls, request_id: str, error: str, num_prompt_tokens: int = 0,
                num_output_tokens: int = 0) -> "RequestOutput":
        """A failed request's last output: no tokens, finish_reason "error", the message for its client."""
        return cls(request_id, [], "", [], True, "error", num_prompt_tokens, num_output_tokens, error=error)
