"""Fewer, larger kernels for the Llama-style decoder: fused projections, each residual add fused into the
RMSNorm after it, and RMSNorm, RoPE and SiLU-and-mul in one Triton launch each on CUDA.

A decode step reads the weights once and otherwise runs tiny element-wise kernels: transformers' RMSNorm
is 6-7 of them, RoPE ~10 (two halves, a negation, a concatenation, two products and a sum, for q and
for k), the MLP's activation 2, and q/k/v and gate/up are 5 separate matrix products where 2 would read
the same bytes. On the H100 at batch 48 those small kernels cost ~1.6 ms of a 13.4 ms step
(benchmarks/profile_engine.py). Here:

- q/k/v and gate/up each become one matrix product over the weights concatenated once; the original
  `q_proj`... weights become views into the concatenation, so the head permutation (heads.py), which
  copies into them in place, keeps both in step and no memory is doubled;
- a decoder layer adds its residual inside the norm that follows (the attention's in the layer's second
  norm, the MLP's in the next layer's first): one launch where eager runs an add and a norm, 63 fewer
  launches per step on a 32-layer model;
- RMSNorm, RoPE and SiLU-and-mul run as one program per row with transformers' arithmetic, rounding to
  the input's dtype after every operation it rounds after, so outputs equal transformers' (bit for bit
  for RoPE; RMSNorm and SiLU up to the last bit of rsqrt and exp). Elsewhere (CPU) the same forwards
  run on PyTorch operators.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from .attention import head_split_attention
from .decode import kernels_on, triton

if triton is not None:
    import triton.language as tl

LLAMA_STYLE_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")  # same forward as Llama's
LLAMA_STYLE_ATTENTION = ("LlamaAttention", "MistralAttention", "Qwen2Attention", "Qwen3Attention")
LLAMA_STYLE_MLPS = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP")
LLAMA_STYLE_LAYERS = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer")


def fuse_modules(model: nn.Module) -> dict[str, int]:
    """Give a Llama-style model's attention, MLP and norm modules the fused forwards (idempotent); return
    how many of each. Call it once the model sits on its device: moving it afterwards would part the
    fused weights from the views the head permutation writes through."""
    counts = {"attention": 0, "mlp": 0, "norm": 0, "layer": 0}
    kernels = kernels_on(next(model.parameters()))
    for module in model.modules():
        kind = type(module).__name__
        if kind in LLAMA_STYLE_ATTENTION:
            if not hasattr(module, "qkv_weight"):
                module.qkv_weight, module.qkv_bias = _concatenate(module.q_proj, module.k_proj, module.v_proj)
                config = module.config
                module.qkv_heads = [config.num_attention_heads, config.num_key_value_heads, config.num_key_value_heads]
                module.forward = types.MethodType(attention_forward, module)
            counts["attention"] += 1
        elif kind in LLAMA_STYLE_MLPS and module.config.hidden_act == "silu":
            if not hasattr(module, "gate_up_weight"):
                module.gate_up_weight, module.gate_up_bias = _concatenate(module.gate_proj, module.up_proj)
                module.forward = types.MethodType(mlp_forward, module)
            counts["mlp"] += 1
        elif kind in LLAMA_STYLE_LAYERS:
            module.forward = types.MethodType(decoder_layer_forward, module)
            counts["layer"] += 1
        elif kind in LLAMA_STYLE_NORMS and kernels:
            module.forward = types.MethodType(rms_norm, module)
            counts["norm"] += 1
    return counts


FUSED_ATTRIBUTES = ("forward", "qkv_weight", "qkv_bias", "qkv_heads", "gate_up_weight", "gate_up_bias")


def unfuse_modules(model: nn.Module) -> None:
    """Give every module its class's forward back (the undo of `fuse_modules`). The projections' weights
    stay views of the concatenations: the same values, read by the class's forward as they were."""
    for module in model.modules():
        for name in FUSED_ATTRIBUTES:
            module.__dict__.pop(name, None)


@torch.no_grad()
def _concatenate(*linears: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight (and bias) for several linears over the same input; each linear's own become views of it."""
    weight = torch.cat([linear.weight for linear in linears])
    bias = None if linears[0].bias is None else torch.cat([linear.bias for linear in linears])
    begin = 0
    for linear in linears:
        rows = slice(begin, begin + linear.out_features)
        linear.weight = nn.Parameter(weight[rows], requires_grad=False)
        if bias is not None:
            linear.bias = nn.Parameter(bias[rows], requires_grad=False)
        begin = rows.stop
    return weight, bias


def attention_forward(module: nn.Module, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                      attention_mask: torch.Tensor | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """The module's forward (projections, Qwen3's q/k norms, RoPE, attention, output projection) with one
    q/k/v product and one RoPE launch, inside the engine; outside it (a reference forward, generate()
    with transformers' cache) the class's own forward, over the same weights."""
    if "rheads_batch" not in kwargs:
        return type(module).forward(module, hidden_states, position_embeddings=position_embeddings,
                                    attention_mask=attention_mask, **kwargs)
    shape = hidden_states.shape[:-1]
    qkv = F.linear(hidden_states, module.qkv_weight, module.qkv_bias).view(*shape, -1, module.head_dim)
    q, k, v = qkv.split(module.qkv_heads, dim=-2)
    if hasattr(module, "q_norm"):
        q, k = module.q_norm(q), module.k_norm(k)
    q, k = rotary(q, k, *position_embeddings)
    out, _ = head_split_attention(module, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attention_mask,
                                  scaling=module.scaling, **kwargs)
    return module.o_proj(out.reshape(*shape, -1)), None


def decoder_layer_forward(module: nn.Module, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """transformers' decoder layer (norm, attention, add; norm, MLP, add) with each add done by the norm
    after it, inside the engine; outside it the class's own forward.

    Every layer but the last returns its MLP output without the residual, which it hands on in the
    forward's `Residual` (in the batch's metadata) for the next layer's first norm to add; the last adds
    it itself, so the model's final norm and every caller see what the eager layers return.
    """
    meta = kwargs.get("rheads_batch")
    if meta is None:
        return type(module).forward(module, hidden_states, *args, **kwargs)
    layer = module.self_attn.layer_idx
    if layer == 0:  # the embeddings: nothing to add yet
        residual, normed = hidden_states, module.input_layernorm(hidden_states)
    else:
        residual, normed = add_rms_norm(module.input_layernorm, meta.residual.value, hidden_states)
    attended, _ = module.self_attn(hidden_states=normed, **kwargs)
    residual, normed = add_rms_norm(module.post_attention_layernorm, residual, attended)
    update = module.mlp(normed)
    if layer == module.self_attn.config.num_hidden_layers - 1:
        meta.residual.value = None
        return residual + update
    meta.residual.value = residual
    return update


def mlp_forward(module: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)) with one gate/up product and one activation launch."""
    return module.down_proj(silu_and_mul(F.linear(hidden, module.gate_up_weight, module.gate_up_bias)))


def rms_norm(module: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """`module`'s forward (weight * normalised hidden, as transformers computes it) in one launch."""
    return _norm_rows(module, hidden, None)[1]


def add_rms_norm(module: nn.Module, residual: torch.Tensor, update: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(residual + update, `module`(residual + update)), the sum rounded to the inputs' dtype as eager
    rounds it: one launch on CUDA."""
    if not kernels_on(update):
        total = residual + update
        return total, module(total)
    return _norm_rows(module, update, residual)


def _norm_rows(module: nn.Module, hidden: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The norm kernel over hidden's rows (plus residual's first, when given): (the rows it normalised, out)."""
    weight = module.weight
    width = hidden.shape[-1]
    rows = _contiguous_rows(hidden)
    out = torch.empty(rows.shape, dtype=torch.result_type(weight, hidden), device=hidden.device)
    added = rows if residual is None else _contiguous_rows(residual)
    total = rows if residual is None else torch.empty_like(rows)
    block = triton.next_power_of_2(width)
    _rms_norm_kernel[(rows.shape[0],)](rows, added, weight, out, total, rows.stride(0), added.stride(0), width,
                                       module.variance_epsilon, ADD=residual is not None, BLOCK=block,
                                       num_warps=min(16, max(1, block // 256)))
    return total.view(hidden.shape), out.view(hidden.shape)


def _contiguous_rows(hidden: torch.Tensor) -> torch.Tensor:
    rows = hidden.reshape(-1, hidden.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE as transformers' `apply_rotary_pos_emb` computes it: q [..., Hq, D], k [..., Hkv, D] (any
    strides), cos/sin [..., D] -> contiguous q, k. One launch covers both on CUDA."""
    dim = q.shape[-1]
    if not (kernels_on(q) and cos.shape[-1] == dim and dim % 2 == 0 and triton.next_power_of_2(dim) == dim):
        return _rotate(q, cos, sin), _rotate(k, cos, sin)
    q_rows, k_rows = q.reshape(-1, q.shape[-2], dim), k.reshape(-1, k.shape[-2], dim)
    cos, sin = cos.reshape(-1, dim), sin.reshape(-1, dim)
    q_out = torch.empty(q_rows.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k_rows.shape, dtype=k.dtype, device=k.device)
    assert q_rows.stride(-1) == k_rows.stride(-1) == cos.stride(-1) == sin.stride(-1) == 1
    _rotary_kernel[(q_rows.shape[0], q_rows.shape[1] + k_rows.shape[1])](
        q_rows, k_rows, q_out, k_out, cos, sin, q_rows.stride(0), q_rows.stride(1), k_rows.stride(0), k_rows.stride(1),
        cos.stride(0), sin.stride(0), q_rows.shape[1], q_rows.shape[1] * dim, k_rows.shape[1] * dim, HALF=dim // 2,
        enable_fp_fusion=False)  # no fused multiply-adds: eager rounds each product before the sum
    return q_out.view(q.shape), k_out.view(k.shape)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-second, first), dim=-1) * sin


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up = [..., gate | up], as transformers' MLP computes it."""
    width = gate_up.shape[-1] // 2
    if not kernels_on(gate_up):
        gate, up = gate_up.split(width, dim=-1)
        return F.silu(gate) * up
    rows = _contiguous_rows(gate_up)
    out = torch.empty(rows.shape[0], width, dtype=gate_up.dtype, device=gate_up.device)
    block = min(1024, triton.next_power_of_2(width))
    _silu_and_mul_kernel[(rows.shape[0], triton.cdiv(width, block))](rows, out, rows.stride(0), width, BLOCK=block)
    return out.view(*gate_up.shape[:-1], width)


if triton is not None:

    @triton.jit
    def _rms_norm_kernel(X, R, W, Y, SUM, stride_x, stride_r, width, eps, ADD: tl.constexpr, BLOCK: tl.constexpr):
        """Y = W * norm(X) for one row; with ADD, of X + R rounded to X's dtype, which goes to SUM too."""
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        mask = offs < width
        x = tl.load(X + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
        if ADD:
            residual = tl.load(R + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32)
            x = (residual + x).to(X.dtype.element_ty)
            tl.store(SUM + row * width + offs, x, mask=mask)
            x = x.to(tl.float32)
        normed = (x * tl.rsqrt(tl.sum(x * x, 0) / width + eps)).to(X.dtype.element_ty)
        w = tl.load(W + offs, mask=mask, other=0.0)
        y = w.to(tl.float32) * normed.to(tl.float32)
        tl.store(Y + row * width + offs, y.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _rotate_head(X, Y, COS, SIN, HALF: tl.constexpr):
        """x * cos + rotate_half(x) * sin for one head, each product rounded to the dtype as eager does."""
        offs = tl.arange(0, HALF)
        dtype = Y.dtype.element_ty
        first, second = tl.load(X + offs).to(tl.float32), tl.load(X + HALF + offs).to(tl.float32)
        cos1, cos2 = tl.load(COS + offs).to(tl.float32), tl.load(COS + HALF + offs).to(tl.float32)
        sin1, sin2 = tl.load(SIN + offs).to(tl.float32), tl.load(SIN + HALF + offs).to(tl.float32)
        out1 = (first * cos1).to(dtype).to(tl.float32) + (-second * sin1).to(dtype).to(tl.float32)
        out2 = (second * cos2).to(dtype).to(tl.float32) + (first * sin2).to(dtype).to(tl.float32)
        tl.store(Y + offs, out1.to(dtype))
        tl.store(Y + HALF + offs, out2.to(dtype))

    @triton.jit
    def _rotary_kernel(Q, K, QO, KO, COS, SIN, stride_qt, stride_qh, stride_kt, stride_kh, stride_cos, stride_sin,
                       q_heads, q_row, k_row, HALF: tl.constexpr):
        """Program (token, head): heads below q_heads are query heads, the rest key heads."""
        token = tl.program_id(0).to(tl.int64)
        head = tl.program_id(1)
        cos, sin = COS + token * stride_cos, SIN + token * stride_sin
        if head < q_heads:
            _rotate_head(Q + token * stride_qt + head * stride_qh, QO + token * q_row + head * 2 * HALF, cos, sin, HALF)
        else:
            head -= q_heads
            _rotate_head(K + token * stride_kt + head * stride_kh, KO + token * k_row + head * 2 * HALF, cos, sin, HALF)

    @triton.jit
    def _silu_and_mul_kernel(X, Y, stride_x, width, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < width
        gate = tl.load(X + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(X + row * stride_x + width + offs, mask=mask, other=0.0).to(tl.float32)
        dtype = Y.dtype.element_ty
        act = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)  # F.silu, rounded as eager rounds it
        tl.store(Y + row * width + offs, (act * up).to(dtype), mask=mask)
