"""Turning one row of logits into the next token, per request settings (greedy, temperature, top-k/p, seed)."""

from __future__ import annotations

import torch

from .sequence import SamplingParams, TokenLogprob


def _filter(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask everything outside the top-k tokens and outside the smallest set with probability >= top_p."""
    if top_k > 0 and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= top_p  # keep the token that crosses top_p
        drop[0] = False  # always keep the best token (a top_p below float32's range rounds to 0)
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


GREEDY_BELOW = 1e-5  # as vLLM: a smaller temperature is greedy (dividing by it overflows to nan)


def sample_batch(logits: torch.Tensor, params: list[SamplingParams],
                 generators: list[torch.Generator | None]) -> list[tuple[int, TokenLogprob | None]]:
    """Next tokens for a [rows, vocab] batch: one argmax (one device sync) serves every plain greedy row."""
    greedy = logits.argmax(-1).tolist()
    return [(greedy[row], None) if p.temperature < GREEDY_BELOW and p.logprobs is None else sample(logits[row], p, g)
            for row, (p, g) in enumerate(zip(params, generators))]


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> tuple[int, TokenLogprob | None]:
    """Pick the next token from a [vocab] float row; log-probabilities are the model's, before filtering."""
    logits = logits.float()
    if params.temperature < GREEDY_BELOW:
        token = int(logits.argmax())
    else:
        filtered = _filter(logits / params.temperature, params.top_k, params.top_p)
        probs = filtered.softmax(-1)
        token = int(torch.multinomial(probs.cpu(), 1, generator=generator))
    if params.logprobs is None:
        return token, None
    logprobs = logits.log_softmax(-1)
    top = torch.topk(logprobs, params.logprobs) if params.logprobs else None
    pairs = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
    return token, TokenLogprob(token, float(logprobs[token]), pairs)
