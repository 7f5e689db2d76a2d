"""Which KV heads keep the full history, and the one-time weight permutation that makes them contiguous.

After `permute_attention_heads`, layer l's first `num_full[l]` KV heads (and their query heads) are
the retrieval heads, so the cache and the attention work on two dense slices per layer.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

import torch

from ..profiling.profile import ModelIdentity, Profile, head_dim_of

log = logging.getLogger(__name__)

DEFAULT_BUDGET = 0.5  # with a profile that carries no measured default_budget (the imported ones)


@dataclass(frozen=True)
class HeadSplit:
    """Per layer, the original indices of the KV heads that keep a full cache, and the model's own window of
    each sliding-window layer (`windows`, None per full-attention layer; empty: none is sliding). A sliding
    layer keeps no full head: the model itself lets every head of it see only its window."""

    full: tuple[tuple[int, ...], ...]
    num_kv_heads: int
    windows: tuple[int | None, ...] = ()

    def __post_init__(self):
        if self.windows and (len(self.windows) != len(self.full)
                             or any(w and heads for w, heads in zip(self.windows, self.full))):
            raise ValueError("a sliding-window layer keeps no full heads, and every layer has a window entry")

    def window_of(self, layer: int) -> int | None:
        """The model's own window of a sliding-window layer; None for a full-attention layer."""
        return self.windows[layer] if self.windows else None

    def with_windows(self, windows: list[int | None]) -> "HeadSplit":
        """This split on a model with these layer windows: a sliding layer's full heads (a uniform split's,
        made without knowing the model's layers) become windowed, as the model attends with them."""
        windows = tuple(windows) if any(windows) else ()
        full = tuple(() if w else heads for w, heads in zip(windows or [None] * self.num_layers, self.full))
        return HeadSplit(full, self.num_kv_heads, windows)

    @property
    def num_layers(self) -> int:
        return len(self.full)

    @property
    def num_full(self) -> list[int]:
        return [len(heads) for heads in self.full]

    @property
    def fraction_full(self) -> float:
        """The share of the full-attention layers' KV heads that keep a full cache (sliding layers have no
        choice to make)."""
        choosable = sum(self.window_of(layer) is None for layer in range(self.num_layers)) * self.num_kv_heads
        return sum(self.num_full) / choosable if choosable else 0.0

    def order(self, layer: int) -> list[int]:
        """KV heads of a layer in cache order: full heads first, then streaming heads."""
        full = self.full[layer]
        return list(full) + [h for h in range(self.num_kv_heads) if h not in full]

    @classmethod
    def uniform(cls, num_layers: int, num_kv_heads: int, full: bool) -> "HeadSplit":
        heads = tuple(range(num_kv_heads)) if full else ()
        return cls(tuple(heads for _ in range(num_layers)), num_kv_heads)


def _from_ranking(ranked: list[tuple[int, int]], count: int, num_layers: int, num_kv_heads: int,
                  windows: list[int | None] | None = None) -> HeadSplit:
    """The first `count` of the ranked (layer, head) pairs of the full-attention layers (`windows`: the
    model's layer windows; the sliding layers' heads are no choice)."""
    windows = windows or [None] * num_layers
    chosen = sorted([(l, h) for l, h in ranked if windows[l] is None][:count])
    return HeadSplit(tuple(tuple(h for l, h in chosen if l == layer) for layer in range(num_layers)),
                     num_kv_heads).with_windows(windows)


def select_heads(profile: Profile, budget: float | None = None, threshold: float | None = None) -> HeadSplit:
    """Retrieval KV heads by a global budget (fraction of the full-attention layers' KV heads, top scores) or
    a score threshold.

    Ties are broken by (layer, head) so a profile and a budget always give the same split. Only the
    full-attention layers' heads are chosen from (the budget is a fraction of theirs): a sliding-window
    layer's heads are windowed by the model itself.
    """
    if (budget is None) == (threshold is None):
        raise ValueError("give exactly one of budget or threshold")
    scores, windows = profile.kv_head_scores, profile.model.windows
    layers, kv = len(scores), len(scores[0])
    ranked = sorted(((l, h) for l in range(layers) for h in range(kv) if windows[l] is None),
                    key=lambda lh: (-scores[lh[0]][lh[1]], lh))
    if threshold is not None:
        count = sum(scores[l][h] > threshold for l, h in ranked)
    else:
        if not 0.0 <= budget <= 1.0:
            raise ValueError(f"budget must be in [0, 1], got {budget}")
        count = round(budget * len(ranked))
    return _from_ranking(ranked, count, layers, kv, windows)


def choose_split(identity: ModelIdentity, profile_path, budget: float | None = None, threshold: float | None = None,
                 max_model_len: int | None = None) -> tuple[HeadSplit, int | None]:
    """The heads a model serves with, and the profile's calibrated window (None: not calibrated): from its
    profile file by budget (None: the profile's default_budget) or threshold, after checking the profile was
    made for this model, with a warning where `max_model_len` goes past the contexts it measured; without a
    profile, every head full (budget 1.0, the default) or every head streaming (0.0)."""
    if profile_path is None:
        budget = 1.0 if budget is None else budget
        if budget not in (0.0, 1.0) or threshold is not None:
            raise ValueError("a budget between 0 and 1 or a threshold needs a profile")
        split = HeadSplit.uniform(identity.num_layers, identity.num_key_value_heads, budget == 1.0)
        return split.with_windows(identity.windows), None
    profile = Profile.load(profile_path)
    profile.check_fits(identity)
    if budget is None:
        budget = DEFAULT_BUDGET if profile.default_budget is None else profile.default_budget
    split = select_heads(profile, budget=budget if threshold is None else None, threshold=threshold)
    warning = max_model_len and profile.coverage_warning(max_model_len)
    if warning and min(split.num_full) < split.num_kv_heads:
        log.warning("%s", warning)
    return split, profile.default_window


def random_split(num_layers: int, num_kv_heads: int, budget: float, seed: int,
                 windows: list[int | None] | None = None) -> HeadSplit:
    """The same number of full heads as `budget` would give, chosen at random (the control) among the
    full-attention layers' heads (`windows`: the model's layer windows; None: every layer is one)."""
    ranked = [(l, h) for l in range(num_layers) for h in range(num_kv_heads)]
    random.Random(seed).shuffle(ranked)
    choosable = sum(w is None for w in windows or [None] * num_layers) * num_kv_heads
    return _from_ranking(ranked, round(budget * choosable), num_layers, num_kv_heads, windows)


def _rows(weight_or_bias: torch.Tensor, index: torch.Tensor, block: int) -> torch.Tensor:
    """The blocks of `block` rows (a head's) that `index` names, in its order: all of them (a permutation)
    or some (a tensor-parallel rank's heads)."""
    return weight_or_bias.view(-1, block, *weight_or_bias.shape[1:])[index].reshape(-1, *weight_or_bias.shape[1:])


@torch.no_grad()
def _permute(model, orders: list[list[int]]) -> None:
    """Reorder each layer's KV heads (with their query heads) into `orders[layer]`."""
    config = model.config
    head_dim = head_dim_of(config)
    group = config.num_attention_heads // config.num_key_value_heads
    for layer, kv_list in zip(model.model.layers, orders):
        attn = layer.self_attn
        kv_order = torch.tensor(kv_list)
        q_order = (kv_order[:, None] * group + torch.arange(group)).flatten()
        orders = (q_order, kv_order, kv_order)
        if hasattr(attn, "qkv_proj"):  # Phi-3: q, k and v rows in one matrix, in that order
            sizes = [config.num_attention_heads * head_dim] + [config.num_key_value_heads * head_dim] * 2
            params = [p for p in (attn.qkv_proj.weight, attn.qkv_proj.bias) if p is not None]
            blocks = [(part, order) for p in params for part, order in zip(p.split(sizes), orders)]
        else:
            projs = (attn.q_proj, attn.k_proj, attn.v_proj)
            blocks = [(p, order) for proj, order in zip(projs, orders) for p in (proj.weight, proj.bias)
                      if p is not None]
        for param, order in blocks:  # views into the weights: copied in place
            param.copy_(_rows(param, order, head_dim))
        o = attn.o_proj.weight  # [hidden, heads * head_dim]: permute input columns
        o.copy_(_rows(o.t().contiguous(), q_order, head_dim).t())
        if getattr(attn, "sinks", None) is not None:  # GPT-OSS: a learned sink logit per query head
            attn.sinks.copy_(attn.sinks[q_order])
        for names, order in ((("q_norm", "q_layernorm"), q_order), (("k_norm", "k_layernorm"), kv_order)):
            norm = next((getattr(attn, n) for n in names if getattr(attn, n, None) is not None), None)
            _permute_norm(norm, order, head_dim)


def _permute_norm(norm, order: torch.Tensor, head_dim: int) -> None:
    """A q or k norm whose weights span every head (Olmo2's over heads x head_dim, Cohere's per head,
    StableLM's one LayerNorm per head) moves with its heads; one shared by the heads (Qwen3's over
    head_dim) has nothing to move."""
    per_head = getattr(norm, "norms", None)  # StableLM's modules, one per head
    if per_head is not None:
        for name in ("weight", "bias"):
            params = [getattr(m, name) for m in per_head if getattr(m, name, None) is not None]
            if params:
                for param, moved in zip(params, torch.stack(params)[order]):
                    param.copy_(moved)
        return
    for param in (getattr(norm, "weight", None), getattr(norm, "bias", None)):
        if param is not None and param.numel() == len(order) * head_dim:
            param.copy_(_rows(param.reshape(-1), order, head_dim).view_as(param))


def permute_attention_heads(model, split: HeadSplit) -> None:
    """Reorder each layer's q/k/v/o projections so the layer's full KV heads come first (exact)."""
    _permute(model, [split.order(layer) for layer in range(split.num_layers)])


def restore_attention_heads(model, split: HeadSplit) -> None:
    """Undo permute_attention_heads, so one loaded model can serve several splits in turn."""
    inverse = []
    for layer in range(split.num_layers):
        order = split.order(layer)
        inverse.append(sorted(range(len(order)), key=order.__getitem__))
    _permute(model, inverse)
