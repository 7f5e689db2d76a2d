"""FP8 KV cache (`--kv-cache-dtype fp8`, vLLM's spelling): e4m3 entries, one scale per (layer, KV head).

Both pools store `x / scale` in float8_e4m3fn, saturated to its +-448 (torch's and Triton's conversions
do not agree on what an out-of-range value becomes); every reader multiplies by the scale again. Every
path attends to what the pools hold, the chunk's or step's own new keys included, so a token's attention
does not depend on whether its keys came from registers, the chunk or the pages.

The scales are fixed once, at start-up, from one calibration prompt (`calibrate`), and never change:
- deterministic: the same model and settings give the same scales whatever the traffic; scales taken from
  the first request served (vLLM's `calculate_kv_scales`) would make every later answer depend on it;
- running maxima cannot work with per-head scales: an entry written under a smaller scale would be read
  under the grown one, and rewriting the pools on each growth costs a pass over them;
- fixed device tensors keep the decode step free of host syncs, so the CUDA graphs capture them as they are.
A head's scale is HEADROOM x the calibration prompt's largest |K| (or |V|) of that head / 448: e4m3's
precision is relative (3 mantissa bits) down to 2^-6 of its range, so a head-room of 2 costs the small
entries almost nothing and lets later prompts reach twice the calibration's peak before they saturate.
"""

from __future__ import annotations

import torch

KV_CACHE_DTYPES = ("auto", "fp8")
FP8 = getattr(torch, "float8_e4m3fn", None)
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
HEADROOM = 2.0
MIN_SCALE = 2.0 ** -24  # a head whose calibration saw only zeros still divides by something
CALIBRATION_TOKENS = 512
CALIBRATION_ID = "rheads-kv-calibration"


def storage_dtype(kv_cache_dtype: str, dtype: torch.dtype) -> torch.dtype:
    """The pools' element type: the model's (`auto`) or e4m3 (`fp8`)."""
    if kv_cache_dtype == "auto":
        return dtype
    if kv_cache_dtype == "fp8":
        if FP8 is None:
            raise ValueError(f"--kv-cache-dtype fp8 needs a torch with float8_e4m3fn (this is {torch.__version__})")
        return FP8
    raise ValueError(f"--kv-cache-dtype must be one of {', '.join(KV_CACHE_DTYPES)}, not {kv_cache_dtype!r}")


def check_supported(kv_cache_dtype: str, dtype: torch.dtype, device: str) -> None:
    """Stop start-up on a combination that cannot serve fp8: a torch without it, a GPU whose Triton has no
    e4m3 conversion (compute capability below 8.9), a model not in a floating-point type fp8 can decode to."""
    storage_dtype(kv_cache_dtype, dtype)
    if kv_cache_dtype != "fp8":
        return
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"--kv-cache-dtype fp8 serves float32, bfloat16 or float16 models, not {dtype}")
    if str(device).startswith("cuda") and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(torch.device(device))
        if (major, minor) < (8, 9):
            raise ValueError(f"--kv-cache-dtype fp8 needs a GPU of compute capability 8.9 or later (Ada, Hopper; "
                             f"the decode kernel converts e4m3 in registers); this one is {major}.{minor}: "
                             "serve with --kv-cache-dtype auto")


def quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [..., H, D] over scales [H] -> e4m3, saturated."""
    return (x.float() / scale[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8)


def dequantize(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """e4m3 [..., H, D] over scales [H] -> dtype."""
    return (x.float() * scale[:, None]).to(dtype)


def observe(scale: torch.Tensor, x: torch.Tensor) -> None:
    """Grow `scale` [H] in place to cover x [..., H, D] with HEADROOM (on the device: no sync)."""
    peak = x.detach().float().abs().flatten(0, -3).amax(dim=(0, 2)) if x.numel() else torch.zeros_like(scale)
    torch.maximum(scale, (peak * (HEADROOM / FP8_MAX)).clamp_(min=MIN_SCALE), out=scale)


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """An e4m3 tensor as uint8, for the copies torch does not implement for float8 on the CPU (index_copy_)."""
    return t.view(torch.uint8) if t.dtype == FP8 else t


def calibration_prompt(tokenizer, vocab_size: int, length: int) -> list[int]:
    """The prompt the scales are measured on: the shipped haystack's first `length` tokens, or, for a
    tokenizer that cannot encode it (a test's stand-in), fixed pseudo-random ids."""
    from ..niah import haystack_files

    try:
        text = haystack_files()[0].read_text()
        ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])[:length]
    except (AttributeError, TypeError, KeyError, IndexError):
        ids = []
    if len(ids) < length or max(ids) >= vocab_size:
        ids = torch.randint(0, vocab_size, (length,), generator=torch.Generator().manual_seed(0)).tolist()
    return ids
