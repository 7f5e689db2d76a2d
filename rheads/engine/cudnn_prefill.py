"""Full heads' prefill attention on CUDA through cuDNN: a chunk in two calls, merged by log-sum-exp.

For a chunk at the end of a long history SDPA picks FlashAttention-2, ~340 TFLOP/s on the H200.
cuDNN's kernel runs a dense rectangle or a square causal block at ~600, but a lower-right causal mask
over a long history at only ~250 (`benchmarks/bench_prefill_attention.py`). So a chunk of queries
attends (1) over the history's whole ALIGN-blocks before it, unmasked, and (2) over the rest -- the
part-block of history just before it and the chunk itself -- as one square causal block whose first
rows are placeholder queries; the two outputs are merged by their log-sum-exp.

cuDNN builds a plan for every new shape, 50-70 ms on the H200, and a layer's number of full heads is
part of the shape, so a compressed model has several sets of plans; built while serving, each would
stall its step. So the plans are built before serving (`CudnnPlans.warm_up`: whole chunks after whole chunks,
the shapes that carry most of a long prompt's attention, and the scheduler keeps a prompt's chunks on
them), lengths are padded to whole ALIGN-blocks so that shapes repeat, and a chunk of any other shape
goes through SDPA's flash kernel instead, except a prompt's tail long enough to pay for running
padded to a planned chunk (`CudnnPlans.planned_queries`). PyTorch keeps cuDNN's plans per thread, so the
thread that steps the engine builds its own (`LLMEngine.prepare_thread`), and the record of what is
planned (`CudnnPlans`, which the model runner owns and hands to attention with each batch) is per
thread too.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable

import torch
import torch.nn.functional as F

ALIGN = 512  # rows of every length handed to cuDNN are a multiple of this
HALF = (torch.float16, torch.bfloat16)  # cuDNN's attention takes no fp32
CUDNN_OVER_FLASH = 1.8  # the split through cuDNN against flash, 8k queries over 8k-32k keys (H200, RESULTS.md)

log = logging.getLogger(__name__)

# (q [L, Hq, D], k, v [M, Hkv, D], causal, scaling) -> (out [L, Hq, D], log-sum-exp [Hq, L] in fp32)
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool, float], tuple[torch.Tensor, torch.Tensor]]

def cudnn_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                 scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """SDPA's cuDNN kernel with its log-sum-exp; the KV heads go in as they are (GQA)."""
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], None, True, 0.0, causal, False,
        scale=scaling)[:2]
    return out[0].transpose(0, 1), lse.reshape(q.shape[1], q.shape[0])


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _pad_rows(x: torch.Tensor, before: int, after: int) -> torch.Tensor:
    return F.pad(x, (0, 0, 0, 0, before, after))


def _layout(n: int, start: int) -> tuple[int, int, int]:
    """For a chunk of n queries after `start` keys: the history keys [0, split) that go to the unmasked
    part, the `lead` keys after them that go to the causal part (facing placeholder queries), and that
    part's padded length."""
    split = start // ALIGN * ALIGN
    lead = start - split
    return split, lead, _aligned(lead + n)


def _calls(n: int, start: int) -> list[tuple[int, int, bool]]:
    """(queries, keys, causal) of the kernel calls `chunk_attention` makes for this chunk."""
    split, _, length = _layout(n, start)
    return [(length, length, True)] + ([(_aligned(n), split, False)] if split else [])


def chunk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, history_k: torch.Tensor,
                    history_v: torch.Tensor, scaling: float, attend: Attend = cudnn_attend,
                    queries: int | None = None) -> torch.Tensor:
    """Causal attention of a chunk over its history and itself.

    q [n, Hq, D], k, v [n, Hkv, D]: the chunk, at positions start..start+n-1; history_k, history_v
    [start, Hkv, D]: the keys before it. Returns [n, Hq, D]. `attend` is the kernel (cuDNN; tests pass
    a plain one to check the decomposition anywhere). `queries` > n runs the chunk as that many, the
    rest placeholders after it (`planned_queries`): a real query sees no key after its own.
    """
    n, start = q.shape[0], history_k.shape[0]
    if queries is not None and queries > n:
        q, k, v = (_pad_rows(x, 0, queries - n) for x in (q, k, v))
        return chunk_attention(q, k, v, history_k, history_v, scaling, attend)[:n]
    split, lead, length = _layout(n, start)
    own_q = _pad_rows(q, lead, length - lead - n)  # row i is position split + i
    own_k = _pad_rows(torch.cat([history_k[split:], k]), 0, length - lead - n)  # padding: after every real query
    own_v = _pad_rows(torch.cat([history_v[split:], v]), 0, length - lead - n)
    out, lse = attend(own_q, own_k, own_v, True, scaling)
    out, lse = out[lead:lead + n], lse[:, lead:lead + n]
    if split == 0:
        return out
    before, before_lse = attend(_pad_rows(q, 0, _aligned(n) - n), history_k[:split], history_v[:split], False, scaling)
    own_share = torch.sigmoid(lse - before_lse[:, :n]).transpose(0, 1)[..., None]  # exp(lse - logaddexp(both))
    return torch.lerp(before[:n].to(own_share.dtype), out.to(own_share.dtype), own_share).to(q.dtype)  # in fp32


def attention_area(n: int, start: int) -> float:
    """Query-key pairs a chunk of n queries after `start` keys attends: its attention work."""
    return n * (start + (n + 1) / 2)


def usable(q: torch.Tensor) -> bool:
    """Whether cuDNN's kernel can take these queries at all: half precision on a GPU."""
    return q.is_cuda and q.dtype in HALF


class CudnnPlans:
    """Which cuDNN kernel calls have been planned in the calling thread: an engine's prefill chunks take
    the cuDNN path only for those (a call planned in another thread would plan again, mid-step)."""

    def __init__(self):
        self._here = threading.local()  # .calls: (device, dtype, Hq, Hkv, D, queries, keys, causal)
        self.chunk: int | None = None  # the whole chunk's size the plans are for

    def _calls(self) -> set[tuple]:
        return self._here.__dict__.setdefault("calls", set())

    def planned(self, q: torch.Tensor, kv_heads: int, start: int, queries: int | None = None) -> bool:
        """Whether this thread built the plans for a chunk with queries q [n, Hq, D] after `start` keys (run
        as `queries` queries, if given)."""
        shape = (q.device, q.dtype, q.shape[1], kv_heads, q.shape[2])
        return all((*shape, *call) in self._calls() for call in _calls(queries or q.shape[0], start))

    def planned_queries(self, q: torch.Tensor, kv_heads: int, start: int) -> int | None:
        """How many queries to run this chunk as on the cuDNN path, or None for flash: its own number when
        planned; else, for a chunk shorter than the planned ones (a prompt's tail), theirs when the
        padded chunk through cuDNN costs less than the chunk through flash."""
        n, size = q.shape[0], self.chunk
        if self.planned(q, kv_heads, start):
            return n
        worth_padding = size and n < size and attention_area(size, start) < CUDNN_OVER_FLASH * attention_area(n, start)
        return size if worth_padding and self.planned(q, kv_heads, start, size) else None

    def plan_chunks(self, device: torch.device, dtype: torch.dtype, head_dim: int, groups: int,
                    kv_head_counts: set[int], chunk: int, max_len: int, attend: Attend = cudnn_attend) -> None:
        """Run (so plan) and record the calls of whole chunks: for each number of full KV heads a layer holds,
        a chunk of `chunk` queries after every whole number of chunks, starting on a block boundary or just
        past one. The scheduler keeps a prompt's chunks on whole multiples of `chunk` (its module
        docstring); a chunk up to a block shorter or later makes the same calls."""
        self.chunk = chunk
        starts = sorted({0} | {start for whole in range(chunk, max_len - chunk + 1, chunk)
                               for start in (whole - 1, whole)})
        for kv_heads in sorted(kv_head_counts):
            # contiguous, as the engine's gathered history is: cuDNN's plans are per stride too, and a plan
            # for the heads of a wider tensor would leave the served call to plan again, mid-step
            history = torch.zeros(max_len, kv_heads, head_dim, dtype=dtype, device=device)
            q = torch.zeros(chunk, kv_heads * groups, head_dim, dtype=dtype, device=device)
            own = history[:chunk]
            for start in starts:
                chunk_attention(q, own, own, history[:start], history[:start], 1.0, attend)
                self._calls().update((device, dtype, q.shape[1], kv_heads, head_dim, *call)
                                     for call in _calls(chunk, start))

    def warm_up(self, device: str | torch.device, dtype: torch.dtype, head_dim: int, groups: int,
                kv_head_counts: set[int], chunk: int, max_len: int) -> None:
        """Start cuDNN (slow the first time in a process) and build this thread's plans of whole chunks
        now, so no request waits for them. Where cuDNN does not run, every chunk stays on SDPA's flash path."""
        device = torch.empty(0, device=device).device
        if dtype in HALF and kv_head_counts and _works(device, dtype, head_dim):
            self.plan_chunks(device, dtype, head_dim, groups, kv_head_counts, chunk, max_len)


@functools.cache
def _works(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """One small call: cuDNN may be missing or refuse this head size."""
    q = torch.zeros(ALIGN + 1, 2, head_dim, dtype=dtype, device=device)
    k = torch.zeros(ALIGN + 1, 1, head_dim, dtype=dtype, device=device)
    try:
        chunk_attention(q[:1], k[:1], k[:1], k, k, 1.0)
    except RuntimeError as error:
        log.warning("cuDNN attention unavailable (%s); full heads prefill through SDPA's flash kernel",
                    str(error).splitlines()[0])
        return False
    return True
