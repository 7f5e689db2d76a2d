"""Turning one row of logits into the next token, per request settings (penalties, logit bias, min_tokens,
grammars, greedy, temperature, top-k/p, seed)."""

from __future__ import annotations

import math

import torch

from .grammar import mask_rows, row_matchers
from .sequence import SamplingParams, Sequence, TokenLogprob
from .transfer import to_device


GREEDY_BELOW = 1e-5  # as vLLM: a smaller temperature is greedy (dividing by it overflows to nan)


def is_plain(params: SamplingParams, generator: torch.Generator | None) -> bool:
    """A row the device samples with the others: no logprobs, and greedy or drawn without a seed."""
    return params.logprobs is None and (params.temperature < GREEDY_BELOW or generator is None)


def adjust_logits(logits: torch.Tensor, seqs: list[Sequence], eos_ids: set[int]) -> torch.Tensor:
    """[rows, vocab] logits as each row's request adjusts them before sampling, in vLLM's meaning: until
    `min_tokens` are out, EOS (unless ignored) and the stop token ids cannot be drawn; `logit_bias` adds to
    its tokens; `repetition_penalty` divides the positive logits of tokens in the prompt or the output and
    multiplies the negative ones; `frequency_penalty` x a token's count in the output and
    `presence_penalty` for its being there at all are subtracted; a grammar's matcher forbids what it
    cannot take next (`grammar.mask_rows`), and min_tokens never forbids the last tokens left. Rows that
    ask for none come back as they are (the tensor itself when no row asks). The rows that ask are
    adjusted together, a few kernels for all of them: only their token lists are gathered on the host."""
    rows = [row for row, seq in enumerate(seqs) if seq.params.adjusts_logits]
    if not rows:
        return logits
    device, vocab = logits.device, logits.shape[-1]
    asked = [seqs[row] for row in rows]
    params = [seq.params for seq in asked]
    index = to_device(rows, device, torch.long)
    picked = mask_rows(logits[index].float(), row_matchers(asked))  # [asked rows, vocab]
    held_back = [sorted(set(p.stop_token_ids) | (set() if p.ignore_eos else eos_ids))
                 if len(s.output_ids) < p.min_tokens else [] for s, p in zip(asked, params)]
    held = _per_row(held_back, 1.0, vocab, device) > 0
    # min_tokens yields where it would leave nothing to draw: a grammar that takes only EOS now, or a row
    # whose stop token ids are all its grammar allows
    held &= (torch.isfinite(picked) & ~held).any(-1, keepdim=True)
    picked = picked.masked_fill(held, float("-inf"))
    biases = [list(p.logit_bias.items()) for p in params]
    picked += _per_row([[t for t, _ in b] for b in biases], [[v for _, v in b] for b in biases], vocab, device)
    penalty = to_device([p.repetition_penalty for p in params], device, torch.float32)[:, None]
    seen = _per_row([s.prompt_ids + s.output_ids if p.repetition_penalty != 1.0 else [] for s, p in zip(asked, params)],
                    1.0, vocab, device) > 0
    picked = torch.where(seen, torch.where(picked > 0, picked / penalty, picked * penalty), picked)
    counts = _per_row([s.output_ids for s in asked], 1.0, vocab, device)
    frequency = to_device([p.frequency_penalty for p in params], device, torch.float32)[:, None]
    presence = to_device([p.presence_penalty for p in params], device, torch.float32)[:, None]
    picked -= frequency * counts + presence * (counts > 0)
    return logits.float().index_copy(0, index, picked)


def _per_row(ids: list[list[int]], values: float | list[list[float]], vocab: int, device) -> torch.Tensor:
    """[len(ids), vocab] float32: each row's `values` summed at its token ids (a repeated id counts again),
    zero elsewhere. Ids past the vocabulary are dropped (the API refuses them before)."""
    width = max(1, max(map(len, ids)))
    flat = torch.full((len(ids), width), vocab, dtype=torch.long)  # column `vocab` takes the padding
    weights = torch.zeros(len(ids), width)
    for row, row_ids in enumerate(ids):
        if row_ids:
            row_ids = torch.tensor(row_ids)
            flat[row, :len(row_ids)] = torch.where((row_ids < 0) | (row_ids > vocab), vocab, row_ids)
            weights[row, :len(row_ids)] = torch.tensor(values[row], dtype=torch.float32) if isinstance(values, list) \
                else values
    out = torch.zeros(len(ids), vocab + 1, device=device)
    return out.scatter_add_(1, to_device(flat, device), to_device(weights, device))[:, :vocab]


def draw_tokens(logits: torch.Tensor, params: list[SamplingParams], plain: list[bool] | None = None) -> torch.Tensor:
    """The next token of every plain row (default: every row) of [rows, vocab] logits, on their device,
    without waiting for it (other rows get an argmax nobody reads): greedy rows by one argmax, the
    others by one batched draw."""
    tokens = greedy_tokens(logits)
    drawn = [row for row, p in enumerate(params) if (plain is None or plain[row]) and p.temperature >= GREEDY_BELOW]
    if drawn:
        rows = to_device(drawn, logits.device)
        tokens = tokens.index_copy(0, rows, _draw(logits[rows].float(), [params[row] for row in drawn]))
    return tokens


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """logits.argmax(-1) (the first of equal maxima) of [rows, vocab] logits, in two passes over chunks of
    the vocabulary: one pass gives each row to one block of threads, 35 us at 48 x 128k on the H200,
    where the chunks' maxima spread over the whole GPU."""
    chunk = math.gcd(logits.shape[-1], 1024)
    if chunk < 64 or logits.shape[0] == 0:
        return logits.argmax(-1)
    best, where = logits.reshape(logits.shape[0], -1, chunk).max(-1)  # each chunk's first maximum
    winner = best.argmax(-1, keepdim=True)  # the first chunk holding the row's maximum
    return (winner * chunk + where.gather(1, winner))[:, 0]


def sample_batch(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
                 raw: torch.Tensor | None = None) -> list[tuple[int, TokenLogprob | None]]:
    """Next tokens for a [rows, vocab] batch with one device sync for the plain rows (`draw_tokens`).
    Rows with a seed (their own CPU generator, so a seed gives the same tokens on any device), with
    logprobs or with adjusted logits go through `sample` one by one. `raw`: the model's logits before
    `adjust_logits`, which logprobs report (default: `logits`)."""
    plain = [is_plain(p, g) for p, g in zip(params, generators)]
    tokens = draw_tokens(logits, params, plain).tolist()
    raw = logits if raw is None else raw
    return [(tokens[row], None) if plain[row] else sample(logits[row], p, g, raw[row])
            for row, (p, g) in enumerate(zip(params, generators))]


def _sorted_probs(logits: torch.Tensor, params: list[SamplingParams]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row of [rows, vocab] float logits after its request's temperature, top-k (ties with the k-th
    kept) and top-p over what is left: its probabilities in descending order, and that order."""
    vocab = logits.shape[1]
    device = logits.device
    temperature = to_device([p.temperature for p in params], device)
    top_k = to_device([p.top_k if 0 < p.top_k < vocab else vocab for p in params], device)
    top_p = to_device([p.top_p for p in params], device)
    ordered, order = (logits / temperature[:, None]).sort(-1, descending=True)
    kth = ordered.gather(1, (top_k - 1)[:, None])
    ordered = ordered.masked_fill(ordered < kth, float("-inf"))
    probs = ordered.softmax(-1)
    drop = (probs.cumsum(-1) - probs >= top_p[:, None]) & (top_p[:, None] < 1.0)  # keep the one crossing top_p
    drop[:, 0] = False  # always keep the best token (a top_p below float32's range rounds to 0)
    return ordered.masked_fill(drop, float("-inf")).softmax(-1), order


def _draw(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """One token per row of [rows, vocab] float logits, drawn on their device from torch's global generator."""
    probs, order = _sorted_probs(logits, params)
    return order.gather(1, torch.multinomial(probs, 1))[:, 0]


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None,
           raw: torch.Tensor | None = None) -> tuple[int, TokenLogprob | None]:
    """Pick the next token from a [vocab] row; log-probabilities are the model's (`raw`, default the row
    itself), before any adjustment or filtering."""
    raw = (logits if raw is None else raw).float()
    logits = logits.float()
    if params.temperature < GREEDY_BELOW:
        token = int(logits.argmax())
    else:
        probs, order = _sorted_probs(logits[None], [params])  # the batched draw's filters, one row
        token = int(order[0, int(torch.multinomial(probs[0].cpu(), 1, generator=generator))])
    if params.logprobs is None:
        return token, None
    logprobs = raw.log_softmax(-1)
    top = torch.topk(logprobs, params.logprobs) if params.logprobs else None
    pairs = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
    return token, TokenLogprob(token, float(logprobs[token]), pairs)
