"""Batched decode attention for one layer: every decoding sequence, both head groups, in place.

A layer's KV heads come in cache order: its full (retrieval) heads first, stored in pages of
`page_size` tokens shared through one block table per sequence, then its streaming heads, stored in
one window slot per sequence (`sink + window` entries; softmax does not care about the ring's order).

On CUDA one Triton launch per layer does the whole step's attention (flash-decoding): a program covers
one sequence, one KV head with all its query heads, and one split of that head's tokens; full heads
spread over many splits, a streaming head's short window takes one program, which stores its output
itself. The same program writes the new token's K/V into its pool and reads that token from registers,
not from the cache, so no write has to land before the reads start. A second small launch merges the
full heads' splits by log-sum-exp into the layer's output rows. Elsewhere (CPU) the writes and a
PyTorch gather + SDPA compute the same.

A layer's streaming heads have its geometry's ring (`cache.py`: a sliding-window layer's is the model's
window, without sinks), so the batch carries the ring offsets and lengths of every geometry. The
model's score changes (`scores.py`) enter the kernel as a soft-cap of each score and, for learned sinks,
as a starting point of the online softmax: split 0 of each head begins with the sink's logit as its
running maximum and a denominator of one, a key of value zero, which the log-sum-exp merge then weighs
like any other.

An fp8 cache (`kvquant.py`) enters the kernel as the layer's K and V scales per KV head: it loads e4m3
entries, converts them in registers and folds the K scale into the score scale and the V scale into the
output, so no entry is multiplied twice; the new token is quantised as it is stored, and attended to as
stored, as every other path does.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import kvquant
from .cache import HeadSplitCache
from .scores import ScoreMods, masked_attention
from .transfer import to_device

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None

BLOCK_N = 64
NUM_STAGES = 2  # 2.15 TB/s against 2.01 with 3 on shuffled pages (bench_decode_kernel.py, H100)
MERGE_CHUNK = 32  # splits the merge kernel reads at a time (one compiled kernel serves every split count)
PROGRAMS_PER_SM = 8  # split-K programs per SM a launch aims for: 8 reads 2.13 TB/s at 8 x 32k, 2 only 1.80
                     # (H100, benchmarks/bench_decode_kernel.py --programs-per-sm 2,4,8,16)


@dataclass
class DecodeBatch:
    """The sequences feeding exactly one token this step, as device tensors built once per step."""

    rows: torch.Tensor  # [B] their rows in the packed batch
    page_table: torch.Tensor  # [B, max pages] int32, padded with 0
    page_ids: torch.Tensor  # [B] page holding the new token
    page_offsets: torch.Tensor  # [B] its place in that page
    lengths: torch.Tensor  # [B] int32 tokens in the full-head cache after this token
    slots: torch.Tensor  # [B] streaming slot of each sequence
    ring_offsets: torch.Tensor  # [geometries, B] ring index of the new token, per ring geometry
    ring_lengths: torch.Tensor  # [geometries, B] int32 valid ring entries after this token
    max_length: int  # an upper bound of `lengths` known on the host (sizes the kernel's splits)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: value for name, value in self.__dict__.items() if isinstance(value, torch.Tensor)}

    def to(self, device: torch.device) -> "DecodeBatch":
        return DecodeBatch(**{**self.__dict__, **{k: to_device(v, device) for k, v in self.tensors().items()}})


def paged_decode_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_table: torch.Tensor,
                           lengths: torch.Tensor, scale: float, mods: ScoreMods | None = None,
                           scales: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """q [B, Hq, D]; k, v [pages, page_len, Hkv, D]; block_table [B, max_pages]; lengths [B] -> [B, Hq, D].
    `scales`: e4m3 pools' K and V scales [Hkv], dequantised after the gather."""
    batch, heads, dim = q.shape
    kv_heads = k.shape[2]
    keys = k[block_table].reshape(batch, -1, kv_heads, dim)  # [B, max_pages * page_len, Hkv, D]
    values = v[block_table].reshape(batch, -1, kv_heads, dim)
    if scales is not None:
        keys, values = (kvquant.dequantize(x, s, q.dtype) for x, s in zip((keys, values), scales))
    visible = torch.arange(keys.shape[1], device=q.device)[None, :] < lengths[:, None]
    if mods is not None:
        return masked_attention(q[:, None], keys, values, visible[:, None, None], scale, mods)[:, 0]
    out = F.scaled_dot_product_attention(q[:, :, None], keys.transpose(1, 2), values.transpose(1, 2),
                                         attn_mask=visible[:, None, None], scale=scale,
                                         enable_gqa=heads != kv_heads)
    return out[:, :, 0]


def decode_attention(cache: HeadSplitCache, layer: int, batch: DecodeBatch, q: torch.Tensor, k: torch.Tensor,
                     v: torch.Tensor, out: torch.Tensor, scale: float, mods: ScoreMods | None = None) -> None:
    """Write the decoding rows' new K/V into the layer's pools and their attention into `out`.

    q, out: the packed batch's [tokens, Hq, D]; k, v: [tokens, Hkv, D], heads in cache order.
    """
    full = (cache.full_k[layer], cache.full_v[layer]) if cache.full_k[layer] is not None else None
    ring = (cache.ring_k[layer], cache.ring_v[layer]) if cache.ring_k[layer] is not None else None
    geometry, scales = cache.layer_geometry[layer], cache.layer_scales(layer)
    if _use_triton(q):
        head_split_decode_triton(q, k, v, out, batch, full, ring, scale, geometry, mods, scales=scales)
    else:
        _decode_torch(q, k, v, out, batch, full, ring, scale, geometry, mods, scales)


def kernels_on(tensor: torch.Tensor) -> bool:
    """Whether our Triton kernels run for `tensor`: on CUDA, or on the CPU under TRITON_INTERPRET=1
    (which the tests use to check them)."""
    return triton is not None and (tensor.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


def _use_triton(q: torch.Tensor) -> bool:
    return q.shape[-1] in (16, 32, 64, 128, 256) and kernels_on(q)


def _decode_torch(q, k, v, out, batch: DecodeBatch, full, ring, scale: float, geometry: int = 0,
                  mods: ScoreMods | None = None, scales: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """The CPU's decode and the kernel's oracle; `scales`: the layer's K and V scales of an e4m3 cache."""
    rows = batch.rows
    ring_offsets, ring_lengths = batch.ring_offsets[geometry], batch.ring_lengths[geometry]
    num_full = full[0].shape[2] if full else 0
    split_q = num_full * (q.shape[1] // k.shape[1])
    q, k, v = q[rows], k[rows], v[rows]
    result = torch.empty_like(q)
    for pools, heads, queries, table, lengths in ((full, slice(0, num_full), slice(0, split_q), batch.page_table,
                                                   batch.lengths),
                                                  (ring, slice(num_full, None), slice(split_q, None),
                                                   batch.slots[:, None], ring_lengths)):
        if not pools:
            continue
        own = None if scales is None else (scales[0][heads], scales[1][heads])
        new = [x[:, heads] if own is None else kvquant.quantize(x[:, heads], s) for x, s in zip((k, v), own or (0, 0))]
        at = (batch.page_ids, batch.page_offsets) if pools is full else (batch.slots, ring_offsets)
        pools[0][at], pools[1][at] = new
        result[:, queries] = paged_decode_reference(q[:, queries], *pools, table, lengths, scale,
                                                    mods and mods.heads(queries), own)
    out[rows] = result


def decode_splits(batch: int, num_full: int, max_length: int, num_sms: int, block: int = BLOCK_N,
                  programs_per_sm: int = PROGRAMS_PER_SM) -> int:
    """How many splits each full head's tokens get: enough programs to fill the GPU, from host numbers
    only (the graph captured for the longest context keeps them; each sequence then divides its own
    length among them on the device)."""
    if not num_full:
        return 1
    blocks = max(1, math.ceil(max_length / block))
    return max(1, min(blocks, math.ceil(programs_per_sm * num_sms / (batch * num_full))))


def head_split_decode_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                             batch: DecodeBatch, full: tuple[torch.Tensor, torch.Tensor] | None,
                             ring: tuple[torch.Tensor, torch.Tensor] | None, scale: float,
                             geometry: int = 0, mods: ScoreMods | None = None, num_sms: int | None = None,
                             block: int = BLOCK_N, num_warps: int = 4,
                             num_stages: int = NUM_STAGES, programs_per_sm: int = PROGRAMS_PER_SM,
                             scales: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """The fused kernel, free of host syncs (so a CUDA graph can capture it); see the module docstring.
    `geometry`: the batch's row of ring offsets and lengths this layer's ring has; `scales`: an e4m3
    cache's K and V scales of the layer's KV heads, in cache order (device tensors, read by the kernel).

    The split count, the number of full heads and the strides that follow them are runtime arguments
    that Triton does not specialise on (`_VARYING`): mixed prefill + decode steps vary them, and each
    new constant compiles a new kernel (1-2 s, measured as a 4x slower 32k prefill at budget 0.5 on the
    H100). Left to itself Triton also compiles apart an integer equal to 1 and one divisible by 16:
    a compressed split's layers hold different numbers of full heads, so mid-serving compiles stalled
    saturated prefills at budgets 0.5 and 0.25 only (benchmarks/RESULTS.md, H200).
    """
    if num_sms is None:
        num_sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 4
    size, kv_heads, dim = batch.rows.shape[0], k.shape[1], q.shape[-1]
    group = q.shape[1] // kv_heads
    num_full = full[0].shape[2] if full else 0
    splits = decode_splits(size, num_full, batch.max_length, num_sms, block, programs_per_sm)
    full_k, full_v = full or ring  # a layer without one of the pools passes the other's tensors: the
    ring_k, ring_v = ring or full  # kernel never reaches their branch (no head of that kind)
    table = batch.page_table
    assert q.stride(-1) == k.stride(-1) == v.stride(-1) == out.stride(-1) == 1 and table.stride(1) == 1
    split_q = num_full * group  # the full heads' query heads: only they have partial results to merge
    if splits > 1:
        partial = torch.empty(size, split_q, splits, dim, dtype=torch.float32, device=q.device)
        lse = torch.empty(size, split_q, splits, dtype=torch.float32, device=q.device)
    else:  # unused (the kernel stores straight into `out`), but fp32 as when used: one compiled kernel for both
        partial = lse = torch.empty(1, 1, 1, dtype=torch.float32, device=q.device)
    softcap = mods.softcap if mods else None
    sinks = mods.sinks if mods and mods.sinks is not None else None
    k_scales, v_scales = scales or (lse, lse)  # (unread without FP8)
    _head_split_decode_kernel[(size, num_full * splits + kv_heads - num_full)](
        q, k, v, batch.rows, full_k, full_v, table, batch.lengths, batch.page_ids, batch.page_offsets,
        ring_k, ring_v, batch.slots, batch.ring_lengths[geometry], batch.ring_offsets[geometry], out, partial, lse,
        q if sinks is None else sinks, k_scales, v_scales, scale, softcap or 1.0,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        full_k.stride(0), full_k.stride(1), full_k.stride(2), table.stride(0),
        ring_k.stride(0), ring_k.stride(1), ring_k.stride(2),
        out.stride(0), out.stride(1), partial.stride(0), partial.stride(1), partial.stride(2),
        lse.stride(0), lse.stride(1),
        num_full, splits, GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), DIM=dim,
        PAGE=full_k.shape[1], RING=ring_k.shape[1], BLOCK=block, IEEE=q.dtype == torch.float32,
        SOFTCAP=bool(softcap), SINKS=sinks is not None, FP8=scales is not None, num_warps=num_warps,
        num_stages=num_stages,
    )
    if splits > 1:
        _merge_splits_kernel[(size, split_q)](
            batch.rows, partial, lse, out, partial.stride(0), partial.stride(1), partial.stride(2),
            lse.stride(0), lse.stride(1), out.stride(0), out.stride(1), splits, CHUNK=MERGE_CHUNK, DIM=dim,
        )


# Runtime integers that vary from step to step, which Triton would otherwise compile a kernel apart for
# when one is 1 or divisible by 16: the split count, the full heads, the block table's width, the
# partial results' strides
_VARYING = ["NUM_FULL", "SPLITS", "stride_bt", "stride_pb", "stride_ph", "stride_ps", "stride_lb", "stride_lh"]

if triton is not None:

    @triton.jit
    def _attend_range(acc, m, l, q, K, V, k_new, v_new, table, stride_p, stride_s, head_offset, start, end,
                      new_index, scale, softcap, PAGE: tl.constexpr, DIM: tl.constexpr, BLOCK: tl.constexpr,
                      IEEE: tl.constexpr, SOFTCAP: tl.constexpr):
        """Online softmax over tokens [start, end) of one head; token `new_index` comes from k_new/v_new.
        With SOFTCAP each score becomes softcap * tanh(score / softcap) (tanh(x) = 2 sigmoid(2x) - 1)."""
        offs_d = tl.arange(0, DIM)
        for n0 in range(start, end, BLOCK):
            offs_n = n0 + tl.arange(0, BLOCK)
            valid = offs_n < end
            page = tl.load(table + offs_n // PAGE, mask=valid, other=0).to(tl.int64)
            where = page[:, None] * stride_p + (offs_n % PAGE)[:, None] * stride_s + head_offset + offs_d[None, :]
            is_new = (offs_n == new_index)[:, None]
            k = tl.where(is_new, k_new[None, :], tl.load(K + where, mask=valid[:, None], other=0.0).to(k_new.dtype))
            if IEEE:
                scores = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                scores = tl.dot(q, tl.trans(k))
            scores = scores * scale
            if SOFTCAP:
                scores = softcap * (2.0 * tl.sigmoid(2.0 * scores / softcap) - 1.0)
            scores = tl.where(valid[None, :], scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, 1))
            p = tl.exp(scores - m_new[:, None])
            alpha = tl.exp(m - m_new)
            v = tl.where(is_new, v_new[None, :], tl.load(V + where, mask=valid[:, None], other=0.0).to(v_new.dtype))
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            l = l * alpha + tl.sum(p, 1)
            m = m_new
        return acc, m, l

    # A geometry's row of the batch's ring offsets and lengths starts wherever the rows before it end: read
    # once per program, they gain nothing from alignment, and a compile per alignment would stall serving
    @triton.jit(do_not_specialize=_VARYING, do_not_specialize_on_alignment=["RLENS", "ROFFS"])
    def _head_split_decode_kernel(
        Q, KN, VN, ROWS, FK, FV, BT, LENS, PAGE_IDS, PAGE_OFFS, RK, RV, SLOTS, RLENS, ROFFS, OUT, PART, LSE,
        SINK_LOGITS, KSCALES, VSCALES, scale, softcap,
        stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh,
        stride_fp, stride_fs, stride_fh, stride_bt, stride_rp, stride_rs, stride_rh,
        stride_on, stride_oh, stride_pb, stride_ph, stride_ps, stride_lb, stride_lh,
        NUM_FULL, SPLITS, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, DIM: tl.constexpr,
        PAGE: tl.constexpr, RING: tl.constexpr, BLOCK: tl.constexpr, IEEE: tl.constexpr,
        SOFTCAP: tl.constexpr, SINKS: tl.constexpr, FP8: tl.constexpr,
    ):
        b = tl.program_id(0)
        p = tl.program_id(1)  # the full heads' NUM_FULL x SPLITS programs, then one per streaming head
        if p < NUM_FULL * SPLITS:
            h = p // SPLITS
            s = p % SPLITS
        else:
            h = p - NUM_FULL * SPLITS + NUM_FULL
            s = 0
        row = tl.load(ROWS + b).to(tl.int64)
        offs_g = tl.arange(0, GROUP_PAD)
        offs_d = tl.arange(0, DIM)
        q_heads = h * GROUP + offs_g
        q = tl.load(Q + row * stride_qn + q_heads[:, None] * stride_qh + offs_d[None, :],
                    mask=offs_g[:, None] < GROUP, other=0.0)
        k_new = tl.load(KN + row * stride_kn + h * stride_kh + offs_d)
        v_new = tl.load(VN + row * stride_vn + h * stride_vh + offs_d)
        k_store = k_new
        v_store = v_new
        v_scale = 1.0
        if FP8:  # the new token as the pool stores it, in e4m3 units like every entry loaded; scales folded
            k_scale = tl.load(KSCALES + h)
            v_scale = tl.load(VSCALES + h)
            k_store = tl.clamp(tl.div_rn(k_new.to(tl.float32), k_scale), -448.0, 448.0).to(FK.dtype.element_ty)
            v_store = tl.clamp(tl.div_rn(v_new.to(tl.float32), v_scale), -448.0, 448.0).to(FV.dtype.element_ty)
            k_new = k_store.to(KN.dtype.element_ty)
            v_new = v_store.to(VN.dtype.element_ty)
            scale = scale * k_scale
        m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        l = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, DIM], tl.float32)
        if SINKS:
            if s == 0:  # the sink: a key of value zero at each query head's learned logit, in one split only
                m = tl.load(SINK_LOGITS + q_heads, mask=offs_g < GROUP, other=float("-inf")).to(tl.float32)
                l = tl.where(offs_g < GROUP, 1.0, 0.0)
        if h < NUM_FULL:  # a retrieval head: its pages, split evenly over this sequence's length
            length = tl.load(LENS + b)
            per_split = tl.cdiv(tl.cdiv(length, SPLITS), BLOCK) * BLOCK
            start = s * per_split
            end = tl.minimum(start + per_split, length)
            acc, m, l = _attend_range(acc, m, l, q, FK, FV, k_new, v_new, BT + b * stride_bt, stride_fp, stride_fs,
                                      h * stride_fh, start, end, length - 1, scale, softcap, PAGE, DIM, BLOCK, IEEE,
                                      SOFTCAP)
            if s == 0:
                at = tl.load(PAGE_IDS + b).to(tl.int64) * stride_fp + tl.load(PAGE_OFFS + b) * stride_fs + h * stride_fh
                tl.store(FK + at + offs_d, k_store)
                tl.store(FV + at + offs_d, v_store)
        else:  # a streaming head: its whole window slot, one "page" of RING entries, in one program
            ring_head = h - NUM_FULL
            ring_offset = tl.load(ROFFS + b)
            acc, m, l = _attend_range(acc, m, l, q, RK, RV, k_new, v_new, SLOTS + b, stride_rp, stride_rs,
                                      ring_head * stride_rh, 0, tl.load(RLENS + b), ring_offset, scale, softcap,
                                      RING, DIM, BLOCK, IEEE, SOFTCAP)
            at = tl.load(SLOTS + b).to(tl.int64) * stride_rp + ring_offset * stride_rs + ring_head * stride_rh
            tl.store(RK + at + offs_d, k_store)
            tl.store(RV + at + offs_d, v_store)
        empty = l == 0.0
        out = acc * v_scale / tl.where(empty, 1.0, l)[:, None]
        rows = offs_g[:, None] < GROUP
        if SPLITS == 1 or h >= NUM_FULL:  # a head of one program stores its result itself
            tl.store(OUT + row * stride_on + q_heads[:, None] * stride_oh + offs_d[None, :],
                     out.to(OUT.dtype.element_ty), mask=rows)
        else:
            lse = tl.where(empty, float("-inf"), m + tl.log(tl.where(empty, 1.0, l)))
            tl.store(PART + b * stride_pb + q_heads[:, None] * stride_ph + s * stride_ps + offs_d[None, :], out,
                     mask=rows)
            tl.store(LSE + b * stride_lb + q_heads * stride_lh + s, lse, mask=offs_g < GROUP)

    @triton.jit(do_not_specialize=_VARYING)  # the names it lacks are ignored
    def _merge_splits_kernel(ROWS, PART, LSE, OUT, stride_pb, stride_ph, stride_ps, stride_lb, stride_lh,
                             stride_on, stride_oh, SPLITS, CHUNK: tl.constexpr, DIM: tl.constexpr):
        """out[row, head] = the splits' partial outputs weighted by softmax(lse), CHUNK splits at a time
        (online, as attention itself); an empty split weighs 0."""
        b = tl.program_id(0)
        h = tl.program_id(1)
        offs_d = tl.arange(0, DIM)
        lse_row = LSE + b * stride_lb + h * stride_lh
        part_row = PART + b * stride_pb + h * stride_ph
        m = tl.max(tl.full([CHUNK], float("-inf"), tl.float32), 0)
        total = tl.sum(tl.zeros([CHUNK], tl.float32), 0)
        acc = tl.zeros([DIM], tl.float32)
        for s0 in range(0, SPLITS, CHUNK):
            offs_s = s0 + tl.arange(0, CHUNK)
            valid = offs_s < SPLITS
            lse = tl.load(lse_row + offs_s, mask=valid, other=float("-inf"))
            m_new = tl.maximum(m, tl.max(lse, 0))  # finite from the first chunk on: split 0 is never empty
            alpha = tl.exp(m - m_new)
            weights = tl.exp(lse - m_new)
            partial = tl.load(part_row + offs_s[:, None] * stride_ps + offs_d[None, :], mask=valid[:, None], other=0.0)
            acc = acc * alpha + tl.sum(partial * weights[:, None], 0)
            total = total * alpha + tl.sum(weights, 0)
            m = m_new
        row = tl.load(ROWS + b).to(tl.int64)
        tl.store(OUT + row * stride_on + h * stride_oh + offs_d, (acc / total).to(OUT.dtype.element_ty))
