"""The batched decode path: the Triton kernel (CUDA only) and the PyTorch version agree, and both
equal plain attention over each sequence's gathered history."""

import pytest
import torch

from rheads.engine.decode import paged_decode, paged_decode_reference, triton

CUDA = torch.cuda.is_available() and triton is not None


def _case(device, dtype, batch=5, heads=8, kv_heads=2, dim=64, page=16, pages=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(pages, page, kv_heads, dim, generator=g).to(device, dtype)
    v = torch.randn(pages, page, kv_heads, dim, generator=g).to(device, dtype)
    q = torch.randn(batch, heads, dim, generator=g).to(device, dtype)
    lengths = torch.tensor([1, 17, 100, 333, 16][:batch] + [50] * max(0, batch - 5), dtype=torch.int32)
    widest = int((lengths.max() + page - 1) // page)
    order = torch.randperm(pages, generator=g)
    table = torch.stack([order[(i * 7) % (pages - widest):][:widest] for i in range(batch)]).to(torch.int32)
    return q, k, v, table.to(device), lengths.to(device)


def _naive(q, k, v, table, lengths, scale):
    """Each sequence's history gathered token by token, then softmax attention per query head."""
    outs = []
    page, group = k.shape[1], q.shape[1] // k.shape[2]
    for b in range(q.shape[0]):
        n = int(lengths[b])
        idx = torch.arange(n, device=q.device)
        keys = k[table[b, idx // page].long(), idx % page].float().repeat_interleave(group, dim=1)
        values = v[table[b, idx // page].long(), idx % page].float().repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,nhd->hn", q[b].float(), keys) * scale
        outs.append(torch.einsum("hn,nhd->hd", scores.softmax(-1), values))
    return torch.stack(outs)


def test_reference_equals_naive():
    q, k, v, table, lengths = _case("cpu", torch.float32)
    got = paged_decode_reference(q, k, v, table, lengths, 0.125)
    torch.testing.assert_close(got, _naive(q, k, v, table, lengths, 0.125), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not CUDA, reason="needs CUDA and Triton")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("heads,kv_heads,dim", [(8, 2, 64), (32, 8, 128), (9, 3, 64), (4, 4, 128)])
def test_triton_equals_naive(dtype, tol, heads, kv_heads, dim):
    q, k, v, table, lengths = _case("cuda", dtype, heads=heads, kv_heads=kv_heads, dim=dim)
    got = paged_decode(q, k, v, table, lengths, dim ** -0.5, int(lengths.max()))
    torch.testing.assert_close(got.float(), _naive(q, k, v, table, lengths, dim ** -0.5), atol=tol, rtol=tol)


@pytest.mark.skipif(not CUDA, reason="needs CUDA and Triton")
def test_triton_ring_as_one_page():
    """A streaming slot of sink + window entries is one page; lengths below it mask unwritten entries."""
    q, k, v, _, _ = _case("cuda", torch.float32, page=320, pages=6)
    slots = torch.tensor([[3], [0], [5], [1], [2]], dtype=torch.int32, device="cuda")
    lengths = torch.tensor([320, 1, 77, 320, 319], dtype=torch.int32, device="cuda")
    got = paged_decode(q, k, v, slots, lengths, 0.125, 320)
    torch.testing.assert_close(got, _naive(q, k, v, slots, lengths, 0.125), atol=1e-4, rtol=1e-4)
