"""The model's own logits from its last hidden states: its head, then what its CausalLM forward does after.

The runner computes hidden states and projects only the rows it samples, so it cannot call the model's
CausalLM forward; it calls this instead, eagerly and inside the CUDA graphs alike. These are the
post-processings transformers' causal-LM heads apply after `lm_head`, read from the config: Granite's
division by `logits_scaling`, Cohere's multiplication by `logit_scale`, Gemma 2/3's final soft-capping.
Skipping one leaves greedy tokens mostly alone and every log-probability and sampled token wrong, so an
architecture is served only once its head is known here (models.VERIFIED_ARCHITECTURES).
"""

from __future__ import annotations

import torch


def model_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """[rows, hidden] -> [rows, vocab], as the model's own forward computes them."""
    logits = model.lm_head(hidden)
    config = model.config
    if getattr(config, "logits_scaling", None) not in (None, 1, 1.0):
        logits = logits / config.logits_scaling
    if getattr(model, "logit_scale", None) not in (None, 1, 1.0):
        logits = logits * model.logit_scale
    if cap := getattr(config, "final_logit_softcapping", None):
        logits = torch.tanh(logits / cap) * cap
    return logits
