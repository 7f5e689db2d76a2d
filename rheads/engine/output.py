"""Output processing: what a sampled token means for its request's text and its end.

Outside the model's step, as vLLM keeps detokenizing and stop strings in an output processor: the
scheduler has appended each sampled token, fed it to its grammar's matcher and finished its sequence on
EOS, stop token ids, length limits and a complete grammar (`Scheduler.update`); here only the newest
tokens are decoded, stop strings are applied (holding back text that may be a stop string's start), and
the client's output is made.
"""

from __future__ import annotations

import logging

from .messages import Appended
from .sequence import RequestOutput, Sequence

log = logging.getLogger(__name__)


def detokenize(tokenizer, seq: Sequence) -> str:
    """The whole output's text, decoding only the last few tokens (as vLLM does): the tokens since the
    last committed text, with the ones before them as context, so spaces and merges come out as a
    full decode would. A trailing incomplete UTF-8 character ("\ufffd") is not committed yet."""
    ids, keep = seq.output_ids, seq.params.keep_special_ids
    prefix = decode(tokenizer, ids[seq.prefix_offset:seq.read_offset], keep)
    full = decode(tokenizer, ids[seq.prefix_offset:], keep)
    text = seq.decoded + full[len(prefix):]
    if not text.endswith("\ufffd") and len(full) > len(prefix):
        seq.decoded, seq.prefix_offset, seq.read_offset = text, seq.read_offset, len(ids)
    return text


def decode(tokenizer, ids: list[int], keep: tuple[int, ...] = ()) -> str:
    """The tokens' text, special tokens skipped except those in `keep`, which are written as themselves
    (decoding the spans between them, so that the skipped ones stay skipped)."""
    if not keep or not any(token in keep for token in ids):
        return tokenizer.decode(ids, skip_special_tokens=True)
    parts, start = [], 0
    for at, token in enumerate(ids):
        if token in keep:
            parts += [tokenizer.decode(ids[start:at], skip_special_tokens=True), tokenizer.convert_ids_to_tokens(token)]
            start = at + 1
    parts.append(tokenizer.decode(ids[start:], skip_special_tokens=True))
    return "".join(parts)


def process_all(tokenizer, appended: list[Appended]) -> list[tuple[Sequence, RequestOutput | Exception]]:
    """`process` for each token in turn: its request's output, or the error that processing it raised."""
    results = []
    for item in appended:
        try:
            results.append((item.seq, process(tokenizer, item)))
        except Exception as error:  # noqa: BLE001 - reported to this request's client
            results.append((item.seq, error))
    return results


def process(tokenizer, appended: Appended) -> RequestOutput:
    """What the client of a request gets for a token the scheduler appended: the text that is now final,
    and the finish reason if the request ends here. A stop string ends it too ("stop", also over a length
    limit reached by the same token: the caller finishes the sequence then)."""
    seq, token, logprob = appended.seq, appended.token_id, appended.logprob
    if appended.error is not None:
        log.error("request %s failed: %s", seq.request_id, appended.error)
        return RequestOutput.failure(seq.request_id, appended.error, len(seq.prompt_ids), len(seq.output_ids))
    params, finish = seq.params, seq.finish_reason
    text = detokenize(tokenizer, seq)
    for stop in params.stop:
        at = text.find(stop, max(0, len(seq.text) - len(stop)))
        if at >= 0:
            text, finish = text[:at], "stop"
            break
    if finish is None and text.endswith("\ufffd"):
        text = seq.text  # an incomplete UTF-8 sequence: wait for the next token
    if finish is None and params.stop:  # hold back what may be the start of a stop string
        text = text[:max(len(seq.text), len(text) - max(map(len, params.stop)) + 1)]
    new_text, seq.text = text[len(seq.text):], text
    return RequestOutput(seq.request_id, [token], new_text, [logprob] if logprob else [], finish is not None,
                         finish, len(seq.prompt_ids), len(seq.output_ids),
                         num_cached_tokens=seq.num_cached_prompt or 0)
