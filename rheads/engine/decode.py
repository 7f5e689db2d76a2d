"""Batched decode attention over paged KV storage: one launch for every sequence of the batch.

Both pools look the same to it: storage [pages, page_len, heads, dim] plus a block table per sequence.
The full-head pool has pages of `page_size` tokens; a streaming slot is one page of `sink + window`
entries, so the ring is read in place too (softmax does not care about the ring's order).

On CUDA a Triton split-K kernel reads keys and values straight from their pages (flash-decoding:
each program covers a range of one sequence's tokens for one KV head and all its query heads, and the
partial results are merged by log-sum-exp). Elsewhere a plain-PyTorch gather + SDPA computes the same.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None

BLOCK_N = 64
PROGRAMS_PER_SM = 8  # split-K programs per SM a launch aims for: 8 reads 2.13 TB/s at 8 x 32k, 2 only 1.80
                     # (H100, benchmarks/bench_decode_kernel.py --programs-per-sm 2,4,8,16)


def paged_decode_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_table: torch.Tensor,
                           lengths: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B, Hq, D]; k, v [pages, page_len, Hkv, D]; block_table [B, max_pages]; lengths [B] -> [B, Hq, D]."""
    batch, heads, dim = q.shape
    page_len, kv_heads = k.shape[1], k.shape[2]
    keys = k[block_table].reshape(batch, -1, kv_heads, dim)  # [B, max_pages * page_len, Hkv, D]
    values = v[block_table].reshape(batch, -1, kv_heads, dim)
    visible = torch.arange(keys.shape[1], device=q.device)[None, :] < lengths[:, None]
    out = F.scaled_dot_product_attention(q[:, :, None], keys.transpose(1, 2), values.transpose(1, 2),
                                         attn_mask=visible[:, None, None], scale=scale,
                                         enable_gqa=heads != kv_heads)
    return out[:, :, 0]


if triton is not None:

    @triton.jit
    def _paged_decode_kernel(
        Q, K, V, BT, LENS, OUT, LSE, scale, TOKENS_PER_SPLIT,
        stride_qb, stride_qh, stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh, stride_bt,
        stride_ob, stride_oh, stride_os, stride_lb, stride_lh, stride_ls,
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, DIM: tl.constexpr, PAGE: tl.constexpr,
        BLOCK: tl.constexpr, IEEE: tl.constexpr,
    ):
        b = tl.program_id(0)
        h = tl.program_id(1)
        s = tl.program_id(2)
        length = tl.load(LENS + b)
        tokens_per_split = tl.load(TOKENS_PER_SPLIT)
        start = s * tokens_per_split
        end = tl.minimum(start + tokens_per_split, length)
        offs_g = tl.arange(0, GROUP_PAD)
        offs_d = tl.arange(0, DIM)
        q_rows = h * GROUP + offs_g
        q = tl.load(Q + b * stride_qb + q_rows[:, None] * stride_qh + offs_d[None, :],
                    mask=offs_g[:, None] < GROUP, other=0.0)
        m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        l = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, DIM], tl.float32)
        for n0 in range(start, end, BLOCK):
            offs_n = n0 + tl.arange(0, BLOCK)
            valid = offs_n < end
            page = tl.load(BT + b * stride_bt + offs_n // PAGE, mask=valid, other=0).to(tl.int64)
            slot = offs_n % PAGE
            k = tl.load(K + page[:, None] * stride_kp + slot[:, None] * stride_ks + h * stride_kh + offs_d[None, :],
                        mask=valid[:, None], other=0.0)
            if IEEE:
                scores = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                scores = tl.dot(q, tl.trans(k))
            scores = tl.where(valid[None, :], scores * scale, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, 1))
            p = tl.exp(scores - m_new[:, None])
            alpha = tl.exp(m - m_new)
            v = tl.load(V + page[:, None] * stride_vp + slot[:, None] * stride_vs + h * stride_vh + offs_d[None, :],
                        mask=valid[:, None], other=0.0)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            l = l * alpha + tl.sum(p, 1)
            m = m_new
        empty = l == 0.0
        out = acc / tl.where(empty, 1.0, l)[:, None]
        lse = tl.where(empty, float("-inf"), m + tl.log(tl.where(empty, 1.0, l)))
        rows = offs_g < GROUP
        tl.store(OUT + b * stride_ob + q_rows[:, None] * stride_oh + s * stride_os + offs_d[None, :], out,
                 mask=rows[:, None])
        tl.store(LSE + b * stride_lb + q_rows * stride_lh + s * stride_ls, lse, mask=rows)


def paged_decode_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_table: torch.Tensor,
                        lengths: torch.Tensor, scale: float, max_length: int, num_sms: int = 132,
                        block: int = BLOCK_N, num_warps: int = 4, num_stages: int = 3,
                        programs_per_sm: int = PROGRAMS_PER_SM) -> torch.Tensor:
    """The Triton split-K kernel, free of host syncs (so it can be captured in a CUDA graph).

    The number of splits comes from the batch shape and `max_length`, a host-side upper bound; the
    tokens per split are computed on the device from the real lengths, so a graph captured for the
    longest context still spreads a short batch over every split.
    """
    batch, heads, dim = q.shape
    kv_heads, page_len = k.shape[2], k.shape[1]
    group = heads // kv_heads
    blocks = max(1, math.ceil(max_length / block))
    splits = max(1, min(blocks, math.ceil(programs_per_sm * num_sms / (batch * kv_heads))))
    per_split = splits * block
    tokens_per_split = ((lengths.max() + per_split - 1) // per_split * block).to(torch.int32)
    partial = torch.empty(batch, heads, splits, dim, dtype=torch.float32, device=q.device)
    lse = torch.empty(batch, heads, splits, dtype=torch.float32, device=q.device)
    _paged_decode_kernel[(batch, kv_heads, splits)](
        q, k, v, block_table, lengths, partial, lse, scale, tokens_per_split,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        block_table.stride(0), partial.stride(0), partial.stride(1), partial.stride(2),
        lse.stride(0), lse.stride(1), lse.stride(2),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), DIM=dim, PAGE=page_len, BLOCK=block,
        IEEE=q.dtype == torch.float32, num_warps=num_warps, num_stages=num_stages,
    )
    if splits == 1:  # nothing to merge (a short window, or a batch that fills the GPU by itself)
        return partial[:, :, 0].to(q.dtype)
    weights = torch.softmax(lse, dim=-1).nan_to_num_(0.0)  # splits past a sequence's end weigh 0
    return (partial * weights[..., None]).sum(2).to(q.dtype)


def paged_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_table: torch.Tensor,
                 lengths: torch.Tensor, scale: float, max_length: int) -> torch.Tensor:
    """Decode attention for a batch of single queries over paged storage (Triton on CUDA)."""
    if q.is_cuda and triton is not None and q.shape[-1] in (16, 32, 64, 128, 256):
        return paged_decode_triton(q, k, v, block_table, lengths, scale, max_length,
                                   torch.cuda.get_device_properties(q.device).multi_processor_count)
    return paged_decode_reference(q, k, v, block_table, lengths, scale)
