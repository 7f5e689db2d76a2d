"""The full heads' cuDNN prefill (`cudnn_prefill.chunk_attention`): its two-part decomposition equals
causal attention worked out here for every alignment of history and chunk (checked on any device with a
plain kernel), and on CUDA the cuDNN kernel is within a few times SDPA's flash error of it."""

import threading

import pytest
import torch
from conftest import assert_sees, assert_within_yardstick, exact_attention, pytorch_attention  # tests/conftest.py
from torch.nn.attention.bias import causal_lower_right

from rheads.engine import cudnn_prefill


def plain_attend(q, k, v, causal, scaling):
    """The Attend contract from first principles: scores, a top-left causal mask, softmax, log-sum-exp."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scaling
    if causal:
        scores = scores.masked_fill(torch.ones(q.shape[0], k.shape[0], dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v), scores.logsumexp(-1)


def _causal(n: int, m: int, device) -> torch.Tensor:
    """[n, m]: the chunk's queries are the last n of m positions, and each sees the keys up to its own."""
    return torch.arange(m, device=device)[None, :] <= torch.arange(m - n, m, device=device)[:, None]


def _exact_causal(q, keys, values, scaling, lost=None):
    """The chunk q [n, Hq, D] at the end of keys, values [m, Hkv, D], attended in float64; keys at the
    positions `lost` (a slice) hidden, as a bug would lose them."""
    visible = _causal(q.shape[0], keys.shape[0], q.device)
    if lost is not None:
        visible[:, lost] = False
    return exact_attention(q, keys, values, scaling, visible)


def _planted_loss(start: int) -> slice:
    """What a broken split would lose: the last whole block of history (the unmasked call's), or in a
    chunk with no whole block before it, the first key."""
    split = start // cudnn_prefill.ALIGN * cudnn_prefill.ALIGN
    return slice(split - cudnn_prefill.ALIGN, split) if split else slice(0, 1)


def _assert_cudnn_close(out, q, keys, values, scaling, what=""):
    """Query by query (outputs shrink as the history grows) within four times flash's own error, and able
    to see a `_planted_loss`. Four, not two: each of the split's calls rounds its output to the half dtype
    before the merge rounds once more, and each part, over fewer keys, is larger than the merged output,
    so the split carries up to 1 + sqrt(2) of flash's single rounding."""
    reference = _exact_causal(q, keys, values, scaling)
    flash = pytorch_attention(q, keys, values, scaling, causal_lower_right(q.shape[0], keys.shape[0]))
    tolerance = assert_within_yardstick(out, reference, flash, what, factor=4)
    start = keys.shape[0] - q.shape[0]
    assert_sees(_exact_causal(q, keys, values, scaling, _planted_loss(start)), reference, tolerance, what)


def _chunk(start, n, heads=4, kv_heads=2, dim=8, dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, heads, dim, generator=g, dtype=dtype).to(device)
    keys, values = (torch.randn(start + n, kv_heads, dim, generator=g, dtype=dtype).to(device) for _ in range(2))
    return q, keys, values


@pytest.mark.parametrize("start", [0, 3, 8, 13, 16, 40])
@pytest.mark.parametrize("n,queries", [(1, None), (5, None), (8, None), (11, None), (24, None), (5, 24), (19, 32)])
def test_decomposition_equals_causal_attention(monkeypatch, start, n, queries):
    """Every split of the history into whole blocks and a remainder, chunks shorter and longer than a
    block, and chunks run as more queries than they have (a tail padded to a planned chunk)."""
    monkeypatch.setattr(cudnn_prefill, "ALIGN", 8)
    q, keys, values = _chunk(start, n)
    out = cudnn_prefill.chunk_attention(q, keys[start:], values[start:], keys[:start], values[:start], 0.3,
                                        attend=plain_attend, queries=queries)
    assert out.shape == q.shape
    torch.testing.assert_close(out, _exact_causal(q, keys, values, 0.3), atol=1e-10, rtol=1e-10)


def test_decomposition_at_the_real_block_size():
    """In fp32, through the same check as the cuDNN kernel's on CUDA below."""
    q, keys, values = _chunk(1500, 600, dtype=torch.float32)
    out = cudnn_prefill.chunk_attention(q, keys[1500:], values[1500:], keys[:1500], values[:1500], 0.35,
                                        attend=plain_attend)
    _assert_cudnn_close(out, q, keys, values, 0.35)


def test_only_shapes_planned_at_start_up_take_the_path(monkeypatch):
    """Whole chunks after whole chunks, also shifted by a few tokens, are planned in the thread that planned
    them; a prompt's tail, a chunk shifted by more than a block, a layer with another number of full heads,
    or another thread are not (SDPA serves them)."""
    monkeypatch.setattr(cudnn_prefill, "ALIGN", 8)
    plans = cudnn_prefill.CudnnPlans()
    device, chunk = torch.device("cpu"), 32
    elsewhere = threading.Thread(target=plans.plan_chunks,
                                 args=(device, torch.float64, 8, 2, {1, 3}, chunk, 4 * chunk, plain_attend))
    elsewhere.start()
    elsewhere.join()
    shape = torch.zeros(chunk, 6, 8, dtype=torch.float64)
    assert not plans.planned(shape, 3, 0), "plans (thread-local in PyTorch) counted in another thread"
    plans.plan_chunks(device, torch.float64, 8, 2, {1, 3}, chunk, 4 * chunk, attend=plain_attend)

    def planned(n, start, kv_heads=3):
        return plans.planned(torch.zeros(n, 2 * kv_heads, 8, dtype=torch.float64), kv_heads, start)

    for whole in (0, chunk, 2 * chunk, 3 * chunk):
        assert planned(chunk, whole) and planned(chunk - 3, whole) and planned(chunk, max(whole - 3, 0))
    assert planned(chunk - 3, chunk - 5, kv_heads=1)
    assert not planned(5, 2 * chunk)  # a tail
    assert not planned(chunk, chunk + 13)  # a chunk moved by more than a block
    assert not planned(chunk, 2 * chunk, kv_heads=2)  # no layer has 2 full heads
    assert not cudnn_prefill.usable(torch.zeros(chunk, 6, 8, dtype=torch.float64))  # not on a GPU

    def queries(n, start):
        return plans.planned_queries(torch.zeros(n, 6, 8, dtype=torch.float64), 3, start)

    assert queries(chunk, 2 * chunk) == chunk and queries(chunk - 3, 2 * chunk) == chunk - 3  # planned as they are
    assert queries(24, 2 * chunk) == chunk  # a long tail: padded, cheaper than flash
    assert queries(16, 0) is None  # a whole short prompt: padding its causal block costs more than it saves
    assert queries(5, 2 * chunk) is None and queries(24, 2 * chunk + 13) is None  # a short tail; off the plans


def test_planned_calls_have_the_strides_of_the_served_ones(monkeypatch):
    """cuDNN keys its plans by stride as well as shape: the calls planned at start-up must hand the kernel
    tensors laid out as a served chunk's are (its history gathered from the pages, its queries a slice of
    the layer's heads), or each served call of a layer with fewer full heads than the widest plans anew."""
    monkeypatch.setattr(cudnn_prefill, "ALIGN", 8)
    plans = cudnn_prefill.CudnnPlans()
    layouts = []

    def recording_attend(q, k, v, causal, scaling):
        layouts.append(tuple((x.shape, x.stride()) for x in (q, k, v)) + (causal,))
        return plain_attend(q, k, v, causal, scaling)

    chunk, groups, dim = 16, 2, 8
    plans.plan_chunks(torch.device("cpu"), torch.float64, dim, groups, {1, 3}, chunk, 4 * chunk, recording_attend)
    planned, layouts[:] = set(layouts), []
    pages = torch.randn(8, 8, 3, dim, dtype=torch.float64)  # a layer's pool: pages of 8 tokens, 3 full KV heads
    for kv_heads in (1, 3):
        qkv = torch.randn(chunk, (groups + 2) * 4, dim, dtype=torch.float64)  # all of a layer's q, k, v heads
        q, k, v = qkv[:, :groups * kv_heads], qkv[:, 8:8 + kv_heads], qkv[:, 12:12 + kv_heads]
        history = torch.arange(2 * chunk)
        keys = pages[history // 8, history % 8, :kv_heads].contiguous()  # gathered, as attention._full_heads does
        cudnn_prefill.chunk_attention(q, k, v, keys, keys, 1.0, recording_attend)
    assert layouts and set(layouts) <= planned


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("start,n", [(0, 100), (0, 1024), (700, 1), (1024, 512), (1500, 2100), (8181, 8192)])
def test_cudnn_equals_flash_on_cuda(start, n):
    q, keys, values = _chunk(start, n, heads=32, kv_heads=8, dim=128, dtype=torch.bfloat16, device="cuda")
    out = cudnn_prefill.chunk_attention(q, keys[start:], values[start:], keys[:start], values[:start], 128 ** -0.5)
    _assert_cudnn_close(out, q, keys, values, 128 ** -0.5, f"{n} queries after {start}: ")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_warm_up_then_a_chunk_after_whole_chunks():
    plans = cudnn_prefill.CudnnPlans()
    plans.warm_up("cuda", torch.bfloat16, 128, 4, {1, 3}, 1024, 4096)
    q, keys, values = _chunk(2047, 1024, heads=12, kv_heads=3, dim=128, dtype=torch.bfloat16, device="cuda")
    assert cudnn_prefill.usable(q) and plans.planned_queries(q, 3, 2047) == 1024
    assert plans.planned_queries(q[:100], 3, 2047) is None and not cudnn_prefill.usable(q.float())
    out = cudnn_prefill.chunk_attention(q, keys[2047:], values[2047:], keys[:2047], values[:2047], 128 ** -0.5)
    _assert_cudnn_close(out, q, keys, values, 128 ** -0.5, "a chunk after 2047: ")

    plans = cudnn_prefill.CudnnPlans()
    plans.warm_up("cuda", torch.bfloat16, 128, 4, {3}, 2048, 8192)  # chunks of 2048: a tail of 1400
    q, keys, values = _chunk(4096, 1400, heads=12, kv_heads=3, dim=128, dtype=torch.bfloat16, device="cuda")
    tail = plans.planned_queries(q, 3, 4096)  # (its own 1536 rows are not planned) runs padded
    assert tail == 2048 and plans.planned_queries(q[:1100], 3, 4096) is None  # (a short one: flash)
    out = cudnn_prefill.chunk_attention(q, keys[4096:], values[4096:], keys[:4096], values[:4096], 128 ** -0.5,
                                        queries=tail)
    _assert_cudnn_close(out, q, keys, values, 128 ** -0.5, "a padded tail after 4096: ")
