"""Shared fixtures."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import CausalBias


@pytest.fixture(autouse=True, scope="session")
def compiles_per_engine():
    """Each engine a test builds on CUDA compiles FlexAttention for its dtype and head counts, as a server
    does once; past dynamo's default recompile limit it would silently run FlexAttention uncompiled."""
    config = torch._dynamo.config
    before = config.recompile_limit, config.accumulated_recompile_limit
    config.recompile_limit, config.accumulated_recompile_limit = 1024, 4096
    yield
    config.recompile_limit, config.accumulated_recompile_limit = before


@pytest.fixture(scope="module")
def tokenizer():
    """The SmolLM2 preset's tokenizer (converted into $RHEADS_CACHE on first use), one per module as a test
    may change it: the tiny random models' vocabularies lie within its, so it decodes their tokens."""
    from transformers import AutoTokenizer

    from rheads.models import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model("smollm2-135m-instruct").path)


@pytest.fixture
def one_thread():
    """Tiny models run far faster on one thread (two OpenMP threads thrash on a busy two-core box)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def one_thread_module():
    """The same for a whole module (a served engine steps in its own thread, on torch's global setting)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def exact_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                    visible: torch.Tensor | None = None, block: int = 512) -> torch.Tensor:
    """Attention from its definition, in float64: q [n, Hq, D] over k, v [m, Hkv, D] (a KV head serves
    Hq / Hkv query heads in turn), each query over the keys `visible` [n, m] marks (all without it); a
    query that sees none gets NaN. By blocks of queries, so that a long chunk's scores fit."""
    group = q.shape[1] // k.shape[1]
    k, v = (x.double().repeat_interleave(group, 1) for x in (k, v))
    out = []
    for i in range(0, q.shape[0], block):
        scores = torch.einsum("qhd,khd->hqk", q[i:i + block].double(), k) * scale
        if visible is not None:
            scores = scores.masked_fill(~visible[i:i + block], float("-inf"))
        out.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), v))
    return torch.cat(out)


def pytorch_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask=None) -> torch.Tensor:
    """PyTorch's own attention in the inputs' dtype, the yardstick of `assert_within_yardstick`: q [n, Hq, D]
    over k, v [m, Hkv, D], `mask` a boolean [n, m] or a CausalBias. On CUDA only the flash and
    memory-efficient kernels may serve: like the kernels under test they round the probabilities to the
    inputs' dtype, where the math kernel computes in fp32 and would set a stricter bar than any fused
    kernel meets."""
    group = q.shape[1] // k.shape[1]
    q, k, v = (x.transpose(0, 1)[None] for x in (q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)))
    if isinstance(mask, torch.Tensor) and not isinstance(mask, CausalBias):  # (a CausalBias is a Tensor too)
        mask = mask[None, None]
    fused = sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]) if q.is_cuda else nullcontext()
    with fused:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)[0].transpose(0, 1)


def unit_error(x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """The largest error of each unit (the leading dimension: a row, a block of rows), in float64."""
    return (x.double() - reference.double()).abs().flatten(1).amax(1)


# Tolerance kept whatever the yardstick, relative to a unit's largest output: fp32 kernels order their sums
# differently from PyTorch's; a bf16 output carries its own rounding, at least this much at that magnitude
FLOOR = {torch.float32: 1e-4, torch.bfloat16: 2 ** -9}


def assert_within_yardstick(got: torch.Tensor, reference: torch.Tensor, yardstick: torch.Tensor, what: str = "",
                            factor: float = 2.0) -> torch.Tensor:
    """An attention kernel's output against the `exact_attention` reference, unit by unit, with a tolerance
    scaled to each unit: `factor` times the error there of the `pytorch_attention` yardstick plus the
    dtype's `FLOOR` of the unit's largest output. One tolerance for the whole output would be set by its
    largest values and miss a lost key where outputs are small (a long history averages them down).
    Returns the tolerances."""
    error, yard = unit_error(got, reference), unit_error(yardstick, reference)
    tolerance = factor * yard + FLOOR[got.dtype] * reference.double().abs().flatten(1).amax(1)
    worst = int((error / tolerance).nan_to_num(torch.inf).argmax())
    assert (error <= tolerance).all(), (
        f"{what}unit {worst} of {len(error)}: error {error[worst]:.3g} against PyTorch's {yard[worst]:.3g} "
        f"(ratio {error[worst] / yard[worst]:.3g}; tolerance {tolerance[worst]:.3g})")
    return tolerance


def seen(planted: torch.Tensor, reference: torch.Tensor, tolerance: torch.Tensor) -> torch.Tensor:
    """Per unit, whether a kernel returning `planted` (the reference recomputed with keys lost, as a bug
    would lose them) would fail the check; a unit the loss leaves without keys (NaN) does not count."""
    return unit_error(planted, reference) > tolerance


def assert_sees(planted: torch.Tensor, reference: torch.Tensor, tolerance: torch.Tensor, what: str = "") -> None:
    """The check with these tolerances fails on the planted loss: it is not blind to such a bug."""
    shift = unit_error(planted, reference)
    best = int((shift / tolerance).nan_to_num(0).argmax())
    assert seen(planted, reference, tolerance).any(), (
        f"{what}a tolerance of {tolerance[best]:.3g} cannot see the planted loss, which moves unit {best} the "
        f"most: by {shift[best]:.3g}")
