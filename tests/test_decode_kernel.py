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
@pytest.mark.parametrize("programs_per_sm", [1, 2, 8])
def test_triton_split_counts(programs_per_sm):
    """One split (no merge) for a batch that fills the GPU, several for a small one: same answer."""
    from rheads.engine.decode import paged_decode_triton
    for batch in (3, 300):
        q, k, v, table, lengths = _case("cuda", torch.float32, batch=batch, heads=8, kv_heads=4, pages=128)
        got = paged_decode_triton(q, k, v, table, lengths, 0.125, int(lengths.max()), 132,
                                  programs_per_sm=programs_per_sm)
        torch.testing.assert_close(got, _naive(q, k, v, table, lengths, 0.125), atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not CUDA, reason="needs CUDA and Triton")
def test_triton_ring_as_one_page():
    """A streaming slot of sink + window entries is one page; lengths below it mask unwritten entries."""
    q, k, v, _, _ = _case("cuda", torch.float32, page=320, pages=6)
    slots = torch.tensor([[3], [0], [5], [1], [2]], dtype=torch.int32, device="cuda")
    lengths = torch.tensor([320, 1, 77, 320, 319], dtype=torch.int32, device="cuda")
    got = paged_decode(q, k, v, slots, lengths, 0.125, 320)
    torch.testing.assert_close(got, _naive(q, k, v, slots, lengths, 0.125), atol=1e-4, rtol=1e-4)


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
