"""The model's own changes to the attention softmax, and plain-PyTorch attention that applies them.

Two families change the softmax itself: Gemma 2 soft-caps every score (`cap * tanh(score / cap)`) before
it, and GPT-OSS adds a learned logit per query head to its denominator (an attention sink: a key every
query sees, whose value is zero). SDPA, cuDNN and the band's FlexAttention call take neither, so a layer
with either attends through `masked_attention` in prefill, on every device (`attention.py` routes it,
by blocks of queries); the Triton decode kernel applies both itself (`decode.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ScoreMods:
    """A layer's changes to its softmax, as its attention module hands them to the attention function."""

    softcap: float | None = None
    sinks: torch.Tensor | None = None  # [Hq] one logit per query head, in the layer's (permuted) head order

    @classmethod
    def of(cls, kwargs: dict) -> "ScoreMods | None":
        """From the attention function's keyword arguments (Gemma 2's `softcap`, GPT-OSS's `s_aux`);
        None for a layer with neither, which every fused kernel can take."""
        softcap, sinks = kwargs.get("softcap"), kwargs.get("s_aux")
        return cls(softcap, sinks) if softcap or sinks is not None else None

    def heads(self, part: slice) -> "ScoreMods":
        """The same changes for a slice of the query heads (the full heads', or the streaming heads')."""
        return ScoreMods(self.softcap, None if self.sinks is None else self.sinks[part])


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor, scaling: float,
                     mods: ScoreMods) -> torch.Tensor:
    """q [B, n, Hq, D]; k, v [B, m, Hkv, D]; visible: bool broadcastable to [B, 1, n, m] -> [B, n, Hq, D].

    Scores and softmax in fp32, the probabilities rounded to the inputs' dtype before they weigh the values
    (as a fused kernel computes them); a sink takes its share of the softmax and weighs no value.
    """
    groups = q.shape[2] // k.shape[2]
    keys = k.transpose(1, 2).repeat_interleave(groups, dim=1).float()  # [B, Hq, m, D]
    values = v.transpose(1, 2).repeat_interleave(groups, dim=1)
    scores = (q.transpose(1, 2).float() @ keys.transpose(-1, -2)) * scaling  # [B, Hq, n, m]
    return (attention_weights(scores, visible, mods).to(v.dtype) @ values).transpose(1, 2)


def attention_weights(scores: torch.Tensor, visible: torch.Tensor | None, mods: ScoreMods | None) -> torch.Tensor:
    """scores [B, Hq, n, m] (scaled, fp32) -> the softmax's weights of the keys where `visible` (broadcastable;
    None: all) allows: soft-capped before the mask (a capped -inf would be finite), a sink's share taken."""
    if mods is not None and mods.softcap:
        scores = torch.tanh(scores / mods.softcap) * mods.softcap
    if visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
    if mods is None or mods.sinks is None:
        return scores.softmax(-1)
    sinks = mods.sinks.float()[None, :, None, None].expand(*scores.shape[:-1], 1)
    return torch.cat([scores, sinks], dim=-1).softmax(-1)[..., :-1]  # the sink's column dropped
