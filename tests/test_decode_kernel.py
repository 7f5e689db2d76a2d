"""The batched decode path: the fused Triton kernel (CUDA, or the CPU under TRITON_INTERPRET=1) and the
PyTorch path write and attend alike, and the PyTorch path equals plain attention over each history."""

import os

import pytest
import torch

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
                        ring_offsets=ring_index, ring_lengths=torch.clamp(pos + 1, max=ring).to(torch.int32),
                        max_length=int(pos.max()) + 1).to(device)
    tokens = 2 * size + 1
    q, k, v = rand(tokens, kv_heads * group, dim), rand(tokens, kv_heads, dim), rand(tokens, kv_heads, dim)
    return q, k, v, batch, full, rings


def _clone(pools):
    return tuple(t.clone() for t in pools) if pools else None


@pytest.mark.skipif(not KERNEL, reason="needs Triton on CUDA (or TRITON_INTERPRET=1)")
@pytest.mark.parametrize("num_full", [0, 1, 3, 4])
@pytest.mark.parametrize("programs_per_sm", [1, 64])
def test_fused_kernel_equals_torch(num_full, programs_per_sm):
    """Both head groups in one launch, one split or many: the same outputs and the same pool writes as
    the PyTorch path (rings that wrapped around, a sequence at its first token, rows between decode rows)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v, batch, full, ring = _layer(device, torch.float32, [0, 5, 40, 15, 16, 99], num_full, kv_heads=4)
    want_out, got_out = torch.zeros_like(q), torch.full_like(q, 7.0)
    want_full, want_ring = _clone(full), _clone(ring)
    _decode_torch(q, k, v, want_out, batch, want_full, want_ring, 0.125)
    head_split_decode_triton(q, k, v, got_out, batch, full, ring, 0.125, num_sms=4, programs_per_sm=programs_per_sm)
    torch.testing.assert_close(got_out[batch.rows], want_out[batch.rows], atol=1e-4, rtol=1e-4)
    assert (got_out[::2] == 7.0).all()  # rows that do not decode are left alone
    for got, want in ((full, want_full), (ring, want_ring)):
        for g, w in zip(got or (), want or ()):
            torch.testing.assert_close(g, w, atol=0, rtol=0)


@pytest.mark.skipif(not CUDA, reason="needs CUDA and Triton")
@pytest.mark.parametrize("group,dim", [(4, 128), (3, 64), (1, 128)])
def test_fused_kernel_bfloat16(group, dim):
    q, k, v, batch, full, ring = _layer("cuda", torch.bfloat16, [3000, 17, 700, 2], 5, kv_heads=8, group=group,
                                        dim=dim, page=16, sink=64, window=256)
    want, got = torch.zeros_like(q), torch.zeros_like(q)
    _decode_torch(q, k, v, want, batch, _clone(full), _clone(ring), dim ** -0.5)
    head_split_decode_triton(q, k, v, got, batch, full, ring, dim ** -0.5)
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)


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


@pytest.mark.skipif(not KERNEL, reason="needs Triton on CUDA (or TRITON_INTERPRET=1)")
@pytest.mark.parametrize("dtype,width", [(torch.float32, 64), (torch.float32, 100), (torch.bfloat16, 4096)])
def test_rms_norm_kernel_equals_transformers(dtype, width):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from rheads.engine.norm import rms_norm

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


@pytest.mark.skipif(not KERNEL, reason="needs Triton on CUDA (or TRITON_INTERPRET=1)")
def test_fused_norms_leave_the_logits_unchanged():
    from transformers import AutoModelForCausalLM, Qwen2Config

    from rheads.engine.norm import fuse_rms_norms

    config = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300)
    device = "cuda" if CUDA else "cpu"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval().to(device)
    ids = torch.randint(0, 300, (1, 12), device=device)
    with torch.no_grad():
        want = model(ids).logits
        assert fuse_rms_norms(model) == 2 * 2 + 1
        got = model(ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
