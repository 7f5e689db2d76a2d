"""Output processing: what a sampled token means for its request's text and its end.

Outside the model's step, as vLLM keeps detokenizing and stop strings in an output processor: the engine
hands each sampled token here, which appends it, decodes only the newest tokens, applies stop token ids,
EOS, stop strings (holding back text that may be a stop string's start) and the length limits, and says
what the client gets now.
"""

from __future__ import annotations

from .sequence import RequestOutput, Sequence, TokenLogprob


def detokenize(tokenizer, seq: Sequence) -> str:
    """The whole output's text, decoding only the last few tokens (as vLLM does): the tokens since the
    last committed text, with the ones before them as context, so spaces and merges come out as a
    full decode would. A trailing incomplete UTF-8 character ("\ufffd") is not committed yet."""
    ids, decode = seq.output_ids, tokenizer.decode
    prefix = decode(ids[seq.prefix_offset:seq.read_offset], skip_special_tokens=True)
    full = decode(ids[seq.prefix_offset:], skip_special_tokens=True)
    text = seq.decoded + full[len(prefix):]
    if not text.endswith("\ufffd") and len(full) > len(prefix):
        seq.decoded, seq.prefix_offset, seq.read_offset = text, seq.read_offset, len(ids)
    return text


def append_token(tokenizer, seq: Sequence, token: int, logprob: TokenLogprob | None, eos_ids: set[int],
                 max_model_len: int) -> RequestOutput:
    """Append one sampled token to `seq` and return what its client gets: the text that is now final,
    and the finish reason if this token ends the request (the caller frees it then)."""
    params = seq.params
    finish = None
    if token in params.stop_token_ids or (token in eos_ids and not params.ignore_eos):
        finish = "stop"
    seq.output_ids.append(token)
    if logprob is not None:
        seq.logprobs.append(logprob)
    text = detokenize(tokenizer, seq)
    for stop in params.stop:
        at = text.find(stop, max(0, len(seq.text) - len(stop)))
        if at >= 0:
            text, finish = text[:at], "stop"
            break
    if finish is None and (len(seq.output_ids) >= params.max_tokens or seq.num_tokens >= max_model_len):
        finish = "length"
    if finish is None and text.endswith("\ufffd"):
        text = seq.text  # an incomplete UTF-8 sequence: wait for the next token
    if finish is None and params.stop:  # hold back what may be the start of a stop string
        text = text[:max(len(seq.text), len(text) - max(map(len, params.stop)) + 1)]
    new_text, seq.text = text[len(seq.text):], text
    return RequestOutput(seq.request_id, [token], new_text, [logprob] if logprob else [], finish is not None,
                         finish, len(seq.prompt_ids), len(seq.output_ids))
