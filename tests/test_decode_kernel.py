"""The batched decode path: the fused Triton kernel (CUDA, or the CPU under TRITON_INTERPRET=1) and the
PyTorch path write the pools where their layout says and attend as attention worked out here over each
history does."""

import dataclasses
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_within_yardstick, exact_attention, pytorch_attention, seen  # tests/conftest.py

from rheads.engine.decode import DecodeBatch, _decode_torch, head_split_decode_triton, paged_decode_reference, triton

CUDA = torch.cuda.is_available() and triton is not None
KERNEL = CUDA or (triton is not None and os.environ.get("TRITON_INTERPRET") == "1")


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


def _layer(device, dtype, positions, num_full, kv_heads=2, group=4, dim=64, page=8, sink=4, window=12, seed=0):
    """A layer's two pools with random history, and a decode batch of sequences at `positions` (packed
    in rows 1, 3, 5, ... of a larger batch, so the other rows must stay untouched)."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(device, dtype)  # noqa: E731
    size, ring = len(positions), sink + window
    widest = max(p // page + 1 for p in positions)
    pages = size * widest + 1
    full = (rand(pages, page, num_full, dim), rand(pages, page, num_full, dim)) if num_full else None
    stream = kv_heads - num_full
    rings = (rand(size + 1, ring, stream, dim), rand(size + 1, ring, stream, dim)) if stream else None
    order = torch.randperm(pages - 1, generator=g)[:size * widest].view(size, widest).to(torch.int32)
    pos = torch.tensor(positions)
    ring_index = torch.where(pos < sink, pos, sink + (pos - sink) % window)
    batch = DecodeBatch(rows=torch.arange(1, 2 * size, 2), page_table=order, page_ids=order.gather(1, (pos // page)[:, None])[:, 0].long(),
                        page_offsets=pos % page, lengths=(pos + 1).to(torch.int32), slots=torch.randperm(size, generator=g),
                        ring_offsets=ring_index[None],  # one ring geometry: the batch's row 0
                        ring_lengths=torch.clamp(pos + 1, max=ring).to(torch.int32)[None],
                        max_length=int(pos.max()) + 1).to(device)
    tokens = 2 * size + 1
    q, k, v = rand(tokens, kv_heads * group, dim), rand(tokens, kv_heads, dim), rand(tokens, kv_heads, dim)
    return q, k, v, batch, full, rings


def _clone(pools):
    return tuple(t.clone() for t in pools) if pools else None


def _ring_index(position: int, sink: int, window: int) -> int:
    """Where a streaming slot keeps the key at `position`: the sinks in place, the rest in a ring."""
    return position if position < sink else sink + (position - sink) % window


def _streaming_seen(position: int, sink: int, window: int) -> list[int]:
    """The key positions a streaming head's query at `position` sees."""
    return [k for k in range(position + 1) if k < sink or position - k < window]


def _written(pools, batch, positions, k, v, sink, window):
    """Copies of the pools as a step must leave them: each decoding row's new K/V at its position's page
    entry (full heads, first) and ring entry (streaming heads), nothing else touched."""
    full, ring = (_clone(p) for p in pools)
    num_full = full[0].shape[2] if full else 0
    for b, (row, pos) in enumerate(zip(batch.rows.tolist(), positions)):
        if full:
            at = int(batch.page_table[b, pos // full[0].shape[1]]), pos % full[0].shape[1]
            full[0][at], full[1][at] = k[row, :num_full], v[row, :num_full]
        if ring:
            at = int(batch.slots[b]), _ring_index(pos, sink, window)
            ring[0][at], ring[1][at] = k[row, num_full:], v[row, num_full:]
    return full, ring


def _history(pools, batch, b, pos, sink, window):
    """Row b's keys and values [n, Hkv, D] for each head group the layer has, gathered position by position
    from the written pools, its newest key last."""
    full, ring = pools
    groups = []
    if full:
        at = torch.arange(pos + 1, device=full[0].device)
        pages = batch.page_table[b, at // full[0].shape[1]].long()
        groups.append(tuple(pool[pages, at % full[0].shape[1]] for pool in full))
    if ring:
        entries = [_ring_index(p, sink, window) for p in _streaming_seen(pos, sink, window)]
        groups.append(tuple(pool[int(batch.slots[b]), entries] for pool in ring))
    return groups


def _exact(q, keys, values, scale):
    return exact_attention(q[None], keys, values, scale)[0]


def _lose_newest(q, keys, values, scale):
    visible = torch.arange(len(keys), device=keys.device) < len(keys) - 1
    return exact_attention(q[None], keys, values, scale, visible[None])[0]


def _sdpa(q, keys, values, scale):
    return pytorch_attention(q[None], keys, values, scale)[0]


def _check_decode(got, q, pools, batch, positions, sink, window, scale):
    """The decoding rows of `got` against attention worked out here over the `_written` pools, row by row
    and head group by head group (a group's outputs scale with its history). The planted bug loses the
    newest key, the one the kernel takes from registers rather than the pool: in every row that has
    another key, some head group must see it."""
    full, ring = pools
    num_full = full[0].shape[2] if full else 0
    split_q = num_full * (q.shape[1] // (num_full + (ring[0].shape[2] if ring else 0)))
    heads = [h for h in (slice(0, split_q), slice(split_q, q.shape[1])) if h.stop > h.start]
    rows = batch.rows.tolist()
    histories = [_history(pools, batch, b, pos, sink, window) for b, pos in enumerate(positions)]
    caught = torch.zeros(len(positions), dtype=torch.bool)
    for i, h in enumerate(heads):
        exact, sdpa, planted = (torch.stack([attend(q[row, h], *history[i], scale)
                                             for row, history in zip(rows, histories)])
                                for attend in (_exact, _sdpa, _lose_newest))
        what = f"{'full' if h.start == 0 and num_full else 'streaming'} heads at positions {positions}: "
        tolerance = assert_within_yardstick(got[batch.rows, h], exact, sdpa, what)
        caught |= seen(planted, exact, tolerance).cpu()
    blind = [pos for pos, c in zip(positions, caught.tolist()) if pos > 0 and not c]
    assert not blind, f"the tolerance cannot see a lost newest key at positions {blind}"


def _assert_pools_equal(got, want):
    for g, w in zip(got or (), want or ()):
        differ = int((g != w).sum())
        assert differ == 0, f"{differ} of {g.numel()} pool entries differ"


@pytest.mark.triton
@pytest.mark.skipif(not KERNEL, reason="needs Triton on CUDA (or TRITON_INTERPRET=1)")
@pytest.mark.parametrize("num_full", [0, 1, 3, 4])
@pytest.mark.parametrize("programs_per_sm,positions", [(1, [0, 5, 40, 15, 16, 99]), (64, [0, 5, 40, 15, 16, 99]),
                                                       (64, [2100, 7, 700])])
def test_fused_kernel_equals_torch(num_full, programs_per_sm, positions):
    """Both head groups in one launch, one split or many (more than the merge kernel reads at a time):
    the attention worked out here, and the same pool writes as the PyTorch path (rings that wrapped
    around, a sequence at its first token, rows between decode rows)."""
    device, sink, window = "cuda" if torch.cuda.is_available() else "cpu", 4, 12
    q, k, v, batch, full, ring = _layer(device, torch.float32, positions, num_full, kv_heads=4, sink=sink,
                                        window=window)
    want = _written((full, ring), batch, positions, k, v, sink, window)
    torch_out, got_out = torch.zeros_like(q), torch.full_like(q, 7.0)
    torch_full, torch_ring = _clone(full), _clone(ring)
    _decode_torch(q, k, v, torch_out, batch, torch_full, torch_ring, 0.125)
    head_split_decode_triton(q, k, v, got_out, batch, full, ring, 0.125, num_sms=4, programs_per_sm=programs_per_sm)
    _check_decode(got_out, q, want, batch, positions, sink, window, 0.125)
    _check_decode(torch_out, q, want, batch, positions, sink, window, 0.125)
    assert (got_out[::2] == 7.0).all()  # rows that do not decode are left alone
    for got, torch_pools, expected in zip((full, ring), (torch_full, torch_ring), want):
        _assert_pools_equal(got, expected)
        _assert_pools_equal(torch_pools, expected)


def _modified(q, keys, values, scale, softcap, sinks):
    """Attention from its definition in float64 with the model's score changes: q [Hq, D] over keys, values
    [n, Hkv, D], each score soft-capped, each query head's sink logit one more term of the denominator."""
    group = q.shape[0] // keys.shape[1]
    keys, values = (x.double().repeat_interleave(group, 1) for x in (keys, values))
    scores = torch.einsum("hd,nhd->hn", q.double(), keys) * scale
    scores = torch.tanh(scores / softcap) * softcap
    weights = torch.cat([scores, sinks.double()[:, None]], 1).softmax(-1)[:, :-1]
    return torch.einsum("hn,nhd->hd", weights, values)


@pytest.mark.triton
@pytest.mark.skipif(not KERNEL, reason="needs Triton on CUDA (or TRITON_INTERPRET=1)")
@pytest.mark.parametrize("num_full", [0, 2, 4])
@pytest.mark.parametrize("programs_per_sm", [1, 64])
def test_fused_kernel_applies_softcap_and_sinks(num_full, programs_per_sm):
    """Gemma 2's soft-capped scores and GPT-OSS's learned sinks, in both head groups, through one split or
    many (the sink enters one split only): the kernel and the PyTorch path equal attention worked out here;
    plain attention is far from it, so a change skipped would show."""
    from rheads.engine.scores import ScoreMods

    device, sink, window, positions, scale = "cuda" if CUDA else "cpu", 4, 12, [0, 5, 40, 99], 0.5
    q, k, v, batch, full, ring = _layer(device, torch.float32, positions, num_full, kv_heads=4, sink=sink,
                                        window=window)
    mods = ScoreMods(softcap=2.0, sinks=torch.randn(q.shape[1], generator=torch.Generator().manual_seed(1)).to(device))
    want_pools = _written((full, ring), batch, positions, k, v, sink, window)
    torch_out, got_out = torch.zeros_like(q), torch.zeros_like(q)
    _decode_torch(q, k, v, torch_out, batch, _clone(full), _clone(ring), scale, mods=mods)
    head_split_decode_triton(q, k, v, got_out, batch, full, ring, scale, mods=mods, num_sms=4,
                             programs_per_sm=programs_per_sm)
    split_q = num_full * 4
    heads = [h for h in (slice(0, split_q), slice(split_q, q.shape[1])) if h.stop > h.start]
    for b, (row, pos) in enumerate(zip(batch.rows.tolist(), positions)):
        for h, history in zip(heads, _history(want_pools, batch, b, pos, sink, window)):
            want = _modified(q[row, h], *history, scale, mods.softcap, mods.sinks[h])
            plain = _exact(q[row, h], *history, scale).double()
            assert (plain - want).abs().max() > 1e-2  # the changes matter here
            for got in (got_out, torch_out):
                torch.testing.assert_close(got[row, h].double(), want, atol=1e-5, rtol=1e-4)


@pytest.mark.skipif(not CUDA, reason="needs CUDA and Triton")
@pytest.mark.parametrize("group,dim", [(4, 128), (3, 64), (1, 128)])
def test_fused_kernel_bfloat16(group, dim):
    positions, sink, window = [3000, 17, 700, 2], 64, 256
    q, k, v, batch, full, ring = _layer("cuda", torch.bfloat16, positions, 5, kv_heads=8, group=group, dim=dim,
                                        page=16, sink=sink, window=window)
    want = _written((full, ring), batch, positions, k, v, sink, window)
    got = torch.zeros_like(q)
    head_split_decode_triton(q, k, v, got, batch, full, ring, dim ** -0.5)
    _check_decode(got, q, want, batch, positions, sink, window, dim ** -0.5)
    for pools, expected in zip((full, ring), want):
        _assert_pools_equal(pools, expected)


@pytest.mark.skipif(not CUDA, reason="needs CUDA and Triton")
def test_one_compiled_kernel_serves_every_split_and_head_count():
    """Mixed steps vary the split count, the full heads and the table width; none of them may compile
    the kernels again (Triton would for a value of 1 or one divisible by 16), which stalls serving."""
    from rheads.engine.decode import _head_split_decode_kernel, _merge_splits_kernel

    def compiled() -> int:
        return sum(len(caches[0]) for kernel in (_head_split_decode_kernel, _merge_splits_kernel)
                   for caches in kernel.device_caches.values())

    # on the H100 / H200's 132 SMs: 27, 32, 16, 2 and 1 splits; 5, 1, 2, 4 and 1 full heads; tables 188, 126,
    # 64, 7 and 1 pages wide
    # the last: a hybrid model's second ring geometry, whose row of the batch starts unaligned (3 x 4 bytes in)
    cases = [([3000, 17, 700, 2], 5, 4, 0), ([40, 2000], 1, 1, 0), ([1023] * 3, 2, 16, 0), ([100] * 16, 4, 2, 0),
             ([7], 1, 64, 0), ([40, 2000, 9], 1, 1, 1)]
    counts, sink, window = [], 64, 256
    for positions, num_full, programs_per_sm, geometry in cases:
        q, k, v, batch, full, ring = _layer("cuda", torch.bfloat16, positions, num_full, kv_heads=8, dim=128,
                                            page=16, sink=sink, window=window)
        if geometry:  # the same ring offsets and lengths as the batch's second row
            batch = dataclasses.replace(batch, ring_offsets=batch.ring_offsets.repeat(2, 1),
                                        ring_lengths=batch.ring_lengths.repeat(2, 1))
        want = _written((full, ring), batch, positions, k, v, sink, window)
        got = torch.zeros_like(q)
        head_split_decode_triton(q, k, v, got, batch, full, ring, 128 ** -0.5, geometry,
                                 programs_per_sm=programs_per_sm)
        _check_decode(got, q, want, batch, positions, sink, window, 128 ** -0.5)
        counts.append(compiled())
    assert counts[1:] == counts[:1] * (len(cases) - 1), counts


@pytest.mark.parametrize("max_batch,captured", [(1, [1]), (6, [8, 4, 2, 1]), (64, [64, 48, 32, 24, 16, 8, 4, 2, 1]),
                                                 (300, [256, 192, 128, 96, 64, 48, 32, 24, 16, 8, 4, 2, 1])])
def test_start_up_captures_every_bucket_a_batch_can_use(max_batch, captured, monkeypatch):
    """Largest first (the smaller graphs reuse its pool), down to 1; nothing on a CPU."""
    from rheads.engine.runner import ModelRunner

    runner = ModelRunner.__new__(ModelRunner)
    runner.use_graphs, sizes = False, []
    monkeypatch.setattr(runner, "_graph", sizes.append, raising=False)
    runner.capture_graphs(max_batch)
    assert sizes == []
    runner.use_graphs = True
    runner.capture_graphs(max_batch)
    assert sizes == captured


@pytest.mark.skipif(not CUDA, reason="needs CUDA and Triton")
@pytest.mark.parametrize("budget", [1.0, 0.5, 0.0])
def test_cuda_graph_decode_equals_eager(budget):
    """Replayed decode graphs (padded batches, scratch page and slot) give the eager engine's logprobs."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from rheads.engine import EngineConfig, LLMEngine, SamplingParams, random_split

    class _Tok:
        eos_token_id = None

        def decode(self, ids, skip_special_tokens=True):
            return ""

    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=512, max_position_embeddings=4096)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config).eval()
    split = random_split(3, 2, budget, seed=0)
    results = []
    for graphs in (False, True):
        model = AutoModelForCausalLM.from_config(config).eval()
        model.load_state_dict(base.state_dict())
        engine = LLMEngine(model.cuda(), _Tok(), split, EngineConfig(
            budget=None, sink=4, window=12, page_size=8, kv_cache_memory=8 << 20, max_num_batched_tokens=64,
            max_model_len=1024, device="cuda", cuda_graphs=graphs))
        out: dict[str, list] = {}
        for step in range(60):
            if step in (0, 5, 9):  # arrivals at different steps: batch sizes 1..3 and padding rows
                for i in range(2):
                    ids = torch.randint(0, 512, (20 + 7 * step + i,), generator=torch.Generator().manual_seed(step + i))
                    engine.add_request(f"{step}-{i}", ids.tolist(),
                                       SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, logprobs=0))
            for o in engine.step():
                out.setdefault(o.request_id, []).extend((lp.token_id, lp.logprob) for lp in o.new_logprobs)
        assert not engine.has_unfinished()
        assert bool(engine.runner.graphs) == graphs
        results.append(out)
    eager, graphed = results
    assert eager.keys() == graphed.keys()
    for rid in eager:
        assert [t for t, _ in eager[rid]] == [t for t, _ in graphed[rid]]
        assert max(abs(a[1] - b[1]) for a, b in zip(eager[rid], graphed[rid])) < 1e-4


@pytest.mark.triton
@pytest.mark.skipif(not KERNEL, reason="needs Triton on CUDA (or TRITON_INTERPRET=1)")
@pytest.mark.parametrize("dtype,width", [(torch.float32, 64), (torch.float32, 100), (torch.bfloat16, 4096)])
def test_rms_norm_kernel_equals_transformers(dtype, width):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from rheads.engine.fused import add_rms_norm, rms_norm

    if dtype is torch.bfloat16 and not CUDA:
        pytest.skip("bfloat16 runs on the GPU")
    device = "cuda" if CUDA else "cpu"
    norm = LlamaRMSNorm(width, eps=1e-5).to(device, dtype)
    with torch.no_grad():
        norm.weight.normal_()
    hidden = (torch.randn(3, 5, width, generator=torch.Generator().manual_seed(0)) * 4).to(device, dtype)
    want = norm(hidden)
    got = rms_norm(norm, hidden)
    assert got.dtype == want.dtype and got.shape == want.shape
    tol = 1e-5 if dtype is torch.float32 else 1e-2
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    torch.testing.assert_close(rms_norm(norm, hidden.transpose(0, 1)), norm(hidden.transpose(0, 1)), atol=tol, rtol=tol)
    residual = torch.randn(5, 3, width, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    update = hidden.transpose(0, 1)  # strided, as a view may come
    total, normed = add_rms_norm(norm, residual, update)
    assert torch.equal(total, residual + update)  # rounded once to the dtype, as eager's add rounds
    torch.testing.assert_close(normed, norm(residual + update), atol=tol, rtol=tol)


def _dtypes():
    return [torch.float32] + ([torch.bfloat16] if CUDA else [])


@pytest.mark.parametrize("kernel", [False, pytest.param(True, marks=pytest.mark.triton)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_equals_transformers_bit_for_bit(kernel, dtype, monkeypatch):
    """q and k as the fused forward hands them over (strided views of one q/k/v product), positions
    out of order; the kernel and the PyTorch form both give transformers' apply_rotary_pos_emb exactly."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    from rheads.engine import fused

    if kernel and not KERNEL:
        pytest.skip("needs Triton on CUDA (or TRITON_INTERPRET=1)")
    if kernel and dtype is torch.bfloat16 and not CUDA:
        pytest.skip("bfloat16 runs on the GPU")
    if not kernel:
        monkeypatch.setattr(fused, "kernels_on", lambda tensor: False)
    device = "cuda" if CUDA and kernel else "cpu"
    heads, kv_heads, dim, tokens = 8, 2, 64, 7
    config = LlamaConfig(hidden_size=heads * dim, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         rope_theta=500000.0)
    g = torch.Generator().manual_seed(0)
    qkv = (torch.randn(1, tokens, heads + 2 * kv_heads, dim, generator=g) * 3).to(device, dtype)
    q, k, _ = qkv.split([heads, kv_heads, kv_heads], dim=-2)
    positions = torch.tensor([[0, 1, 2, 900, 31000, 5, 77]], device=device)
    cos, sin = LlamaRotaryEmbedding(config).to(device)(qkv, positions)
    want_q, want_k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    got_q, got_k = fused.rotary(q, k, cos, sin)
    assert got_q.is_contiguous() and got_k.is_contiguous()
    for got, want in ((got_q, want_q.transpose(1, 2)), (got_k, want_k.transpose(1, 2))):
        differ = int((got != want).sum())
        assert differ == 0, f"{differ} of {got.numel()} differ, by up to {float((got.float() - want.float()).abs().max())}"


@pytest.mark.triton
@pytest.mark.skipif(not KERNEL, reason="needs Triton on CUDA (or TRITON_INTERPRET=1)")
@pytest.mark.parametrize("dtype", _dtypes())
def test_silu_and_mul_kernel_equals_transformers(dtype):
    from rheads.engine.fused import silu_and_mul

    device = "cuda" if CUDA else "cpu"
    width = 1500  # not a multiple of the block: the last block is masked
    gate_up = (torch.randn(5, 2 * width, generator=torch.Generator().manual_seed(0)) * 4).to(device, dtype)
    want = F.silu(gate_up[:, :width]) * gate_up[:, width:]
    got = silu_and_mul(gate_up)
    assert got.shape == want.shape and got.dtype == dtype
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5 if dtype is torch.float32 else 8e-3)


def test_fused_weights_are_views_the_permutation_writes_through():
    """After fusion q/k/v and gate/up are views of the fused weights: permuting and restoring the heads
    moves both, and no weight is held twice."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from rheads.engine.fused import fuse_modules
    from rheads.engine.heads import HeadSplit, permute_attention_heads, restore_attention_heads

    config = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300)
    model = AutoModelForCausalLM.from_config(config).eval()
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    before = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).clone()
    counts = fuse_modules(model)
    assert counts["attention"] == counts["mlp"] == 2 and fuse_modules(model) == counts  # idempotent
    assert torch.equal(attn.qkv_weight, before)
    assert attn.q_proj.weight.data_ptr() == attn.qkv_weight.data_ptr()
    assert mlp.up_proj.weight.data_ptr() == mlp.gate_up_weight[config.intermediate_size:].data_ptr()
    split = HeadSplit(((1,), (0, 1)), 2)
    permute_attention_heads(model, split)
    assert torch.equal(attn.qkv_weight, torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))
    assert torch.equal(attn.qkv_bias, torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]))
    assert not torch.equal(attn.qkv_weight, before)
    restore_attention_heads(model, split)
    assert torch.equal(attn.qkv_weight, before)


def _quantized(pools, scales):
    """fp32 pools [.., Hkv, D] as e4m3 under per-head scales, worked out here; and what they read back as."""
    if not pools:
        return None, None
    stored = tuple((p / s[:, None]).clamp(-448, 448).to(torch.float8_e4m3fn) for p, s in zip(pools, scales))
    return stored, tuple(x.float() * s[:, None] for x, s in zip(stored, scales))


@pytest.mark.triton
@pytest.mark.skipif(not KERNEL, reason="needs Triton on CUDA (or TRITON_INTERPRET=1)")
@pytest.mark.parametrize("num_full", [0, 1, 4])
@pytest.mark.parametrize("programs_per_sm", [1, 64])
def test_fused_kernel_reads_and_writes_fp8(num_full, programs_per_sm):
    """e4m3 pools with a scale per KV head (K and V apart): the kernel and the PyTorch path store the new
    token's e4m3 bytes where the layout says, and attend as float64 attention over what the pools hold
    (the new token as stored) does, within the yardstick; the tolerance sees a lost newest key."""
    device, sink, window, positions = "cuda" if CUDA else "cpu", 4, 12, [0, 5, 40, 15, 99]
    q, k, v, batch, full, ring = _layer(device, torch.float32, positions, num_full, kv_heads=4, sink=sink,
                                        window=window)
    g = torch.Generator().manual_seed(2)
    scales = tuple((torch.rand(4, generator=g) * 0.02 + 0.005).to(device) for _ in range(2))  # some entries saturate
    own = lambda heads: tuple(s[heads] for s in scales)  # noqa: E731
    if not CUDA:  # Triton 3.9's interpreter rounds fp32 to e4m3 wrongly where the rounding carries into the
        # exponent (-31.6 gives -16, not -32; CUDA's cvt.rn.satfinite does not): there the new K/V start on the
        # e4m3 grid, so any correct rounding stores the same bytes; on CUDA they are arbitrary
        k, v = ((x / s[:, None]).clamp(-448, 448).to(torch.float8_e4m3fn).float() * s[:, None]
                for x, s in zip((k, v), scales))
    full8, full_read = _quantized(full, own(slice(0, num_full)))
    ring8, ring_read = _quantized(ring, own(slice(num_full, None)))
    seen_kv = [(x / s[:, None]).clamp(-448, 448).to(torch.float8_e4m3fn).float() * s[:, None] for x, s in zip((k, v), scales)]
    want = _written((full_read, ring_read), batch, positions, *seen_kv, sink, window)
    torch_out, got_out = torch.zeros_like(q), torch.zeros_like(q)
    torch_full, torch_ring = _clone(full8), _clone(ring8)
    _decode_torch(q, k, v, torch_out, batch, torch_full, torch_ring, 0.125, scales=scales)
    head_split_decode_triton(q, k, v, got_out, batch, full8, ring8, 0.125, num_sms=4, programs_per_sm=programs_per_sm,
                             scales=scales)
    _check_decode(torch_out, q, want, batch, positions, sink, window, 0.125)
    _check_decode(got_out, q, want, batch, positions, sink, window, 0.125)
    for got, torch_pools, expected, heads in zip((full8, ring8), (torch_full, torch_ring), want,
                                                 (slice(0, num_full), slice(num_full, None))):
        if got is None:
            continue
        stored = tuple((e / s[:, None]).clamp(-448, 448).to(torch.float8_e4m3fn) for e, s in zip(expected, own(heads)))
        for pools in (got, torch_pools):
            _assert_pools_equal(tuple(p.view(torch.uint8) for p in pools), tuple(p.view(torch.uint8) for p in stored))
