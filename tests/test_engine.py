"""The engine against its correctness oracles.

1. budget 1.0 == transformers `generate`, token for token, under continuous batching and chunked prefill;
2. compressed logits == the original model run in one pass with a per-head sink + window mask;
3. the cache's byte accounting == the analytic formula, and zero once every request has ended;
4. admission and preemption in tight memory never change greedy results;
5. sampling (seeds, top-k, stop strings, lengths, logprobs);
6. head selection and the head permutation.

Tiny random Llama, Mistral, Qwen2 and Qwen3 models, with GQA groups of 2 and 7 and MHA (vocabulary 49152,
so the SmolLM2 tokenizer decodes them), stand in wherever the weights do not matter; one test runs the
real SmolLM2 preset. The references live in tests/oracles.py; tests/test_served_oracles.py holds the
engine to them on the served GPU path.
"""

from __future__ import annotations

import copy
import math
import weakref

import oracles
import pytest
import torch
from oracles import GREEDY, check_logprobs_against, run

from rheads.engine import EngineConfig, HeadSplit, LLMEngine, SamplingParams, random_split, select_heads
from rheads.engine import attention
from rheads.engine import llm as llm_module
from rheads.engine import runner as runner_module
from rheads.engine.heads import permute_attention_heads, restore_attention_heads
from rheads.engine import RequestError
from rheads.models import load_model, resolve_model
from rheads.profiling.profile import ModelIdentity, Profile, ProfileMethod

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 49152  # SmolLM2's, so its tokenizer can decode the tiny models' tokens
HEAD_DIM = 16
TINY = dict(num_attention_heads=4, num_key_value_heads=2, hidden_size=64, head_dim=HEAD_DIM,
            intermediate_size=128, max_position_embeddings=512, vocab_size=VOCAB)
SINK, WINDOW, PAGE = 4, 8, 4

# 4 layers x 2 KV heads: all full, all streaming, mixed (head 1 full: the permutation swaps), mixed.
MIXED = HeadSplit(((0, 1), (), (1,), (0,)), 2)


# --- models and helpers ------------------------------------------------------------------------

def tiny_model(kind: str, num_layers: int = 4, seed: int = 0, **overrides):
    """A tiny random Llama, Mistral, Qwen2 or Qwen3 with peaky attention (oracles.tiny_model)."""
    return oracles.tiny_model(kind, TINY, num_layers, seed, **overrides)


# the families, and the GQA groups of the models served: Qwen3's q/k norms, Qwen2.5's group of 7, MHA (group 1)
KINDS = {"llama": ("llama", {}), "mistral": ("mistral", {}), "qwen2": ("qwen2", {}), "qwen3": ("qwen3", {}),
         "gqa7": ("qwen2", {"num_attention_heads": 14}), "mha": ("llama", {"num_key_value_heads": 4})}


@pytest.fixture(scope="module", params=list(KINDS))
def model(request):
    kind, overrides = KINDS[request.param]
    return tiny_model(kind, **overrides)


def splits(kv: int) -> dict[str, HeadSplit]:
    """4 layers: all full, none, the last head alone (the permutation moves it first), the first alone;
    a random half; every head streaming."""
    return {"mixed": HeadSplit((tuple(range(kv)), (), (kv - 1,), (0,)), kv), "random": random_split(4, kv, 0.5, seed=3),
            "streaming": HeadSplit.uniform(4, kv, full=False)}


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def random_prompt(length: int, seed: int) -> list[int]:
    return oracles.random_prompt(length, seed, VOCAB)


def make_engine(model, tokenizer, split: HeadSplit, **config) -> LLMEngine:
    """An engine over a copy of `model` in the engine's dtype (the engine permutes its weights in place),
    its cached tokens counted by a Ledger. Prefix caching is off: these oracles count every token from
    zero and want the pools empty at the end; tests/test_prefix_cache.py holds it to the same oracles."""
    config = {**dict(sink=SINK, window=WINDOW, page_size=PAGE, max_num_batched_tokens=7,
                     kv_cache_memory=8 << 20, enable_prefix_caching=False), **config}
    config = EngineConfig(**config)
    engine = LLMEngine(copy.deepcopy(model).to(config.dtype), tokenizer, split, config)
    LEDGERS[engine] = Ledger(engine)
    return engine


def reference_logprobs(model, ids: list[int], split: HeadSplit | None = None, sink: int = SINK,
                       window: int = WINDOW) -> torch.Tensor:
    return oracles.reference_logprobs(model, ids, split, sink, window)


def hf_greedy(model, prompt_ids: list[int], n: int) -> list[int]:
    return oracles.hf_greedy(model, prompt_ids, n)[0]


# --- oracle 1: budget 1.0 == transformers generate ------------------------------------------------

def staggered(prompts: list[list[int]], params: SamplingParams, later_at: int = 3):
    """The first two requests at step 0, the others at step `later_at`."""
    return {0: [(f"r{i}", p, params) for i, p in enumerate(prompts[:2])],
            later_at: [(f"r{i}", p, params) for i, p in enumerate(prompts[2:], start=2)]}


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "qwen3"])
def test_full_budget_equals_generate_tiny(kind, tokenizer) -> None:
    model = tiny_model(kind, num_layers=3)
    split = HeadSplit.uniform(3, 2, full=True)
    prompts = [random_prompt(n, seed=n) for n in (5, 17, 9, 23)]
    engine = make_engine(model, tokenizer, split)
    results = run(engine, staggered(prompts, SamplingParams(max_tokens=8, **GREEDY)))
    for i, prompt in enumerate(prompts):
        res = results[f"r{i}"]
        assert res.finish_reason == "length"
        assert res.token_ids == hf_greedy(model, prompt, 8), f"request {i}"
    assert engine.usage().bytes_used == 0


def test_full_budget_equals_generate_smollm2(tokenizer) -> None:
    model, tok = load_model(resolve_model("smollm2-135m-instruct"))
    config = model.config
    split = HeadSplit.uniform(config.num_hidden_layers, config.num_key_value_heads, full=True)
    texts = ["The capital of France is", "def fibonacci(n):\n    ",
             "Once upon a time, in a small village by the sea, there lived an old fisherman who",
             "List three colours:"]
    prompts = [tok(t)["input_ids"] for t in texts]
    engine = make_engine(model, tok, split, page_size=4, max_num_batched_tokens=16, kv_cache_memory=64 << 20)
    results = run(engine, staggered(prompts, SamplingParams(max_tokens=6, **GREEDY), later_at=2))
    for i, prompt in enumerate(prompts):
        assert results[f"r{i}"].token_ids == hf_greedy(model, prompt, 6), texts[i]
    assert engine.usage().bytes_used == 0


# --- oracle 2: compressed == the masked reference --------------------------------------------------

@pytest.mark.parametrize("split_name", ["mixed", "random", "streaming"])
def test_compressed_logprobs_equal_masked_reference(model, tokenizer, split_name) -> None:
    split = splits(model.config.num_key_value_heads)[split_name]
    params = SamplingParams(max_tokens=6, logprobs=5, **GREEDY)
    prompts = [random_prompt(n, seed=100 + n) for n in (41, 53, 60)]
    engine = make_engine(model, tokenizer, split, max_num_batched_tokens=7)
    results = run(engine, {0: [("a", prompts[0], params), ("b", prompts[1], params)],
                           4: [("c", prompts[2], params)]})
    differs = 0.0
    for res in results.values():
        ids = res.prompt_ids + res.token_ids
        reference = reference_logprobs(model, ids, split)
        n = len(res.prompt_ids)
        assert res.token_ids == reference[n - 1:-1].argmax(-1).tolist()  # greedy on the reference
        check_logprobs_against(reference, res, k=5)
        full = reference_logprobs(model, ids)
        differs = max(differs, float((full[n - 1:-1] - reference[n - 1:-1]).abs().max()))
    assert differs > 1e-2, "the sink + window mask changes nothing: the test would not see a wrong mask"
    assert engine.usage().bytes_used == 0


@pytest.mark.parametrize("split_name", ["mixed", "streaming"])
def test_short_sequences_equal_full_attention(model, tokenizer, split_name) -> None:
    """Sequences shorter than sink + window lose nothing: the engine equals plain full attention."""
    split = splits(model.config.num_key_value_heads)[split_name]
    params = SamplingParams(max_tokens=4, logprobs=3, **GREEDY)
    prompts = [random_prompt(n, seed=200 + n) for n in (1, 3, 7)]
    engine = make_engine(model, tokenizer, split, max_num_batched_tokens=5)
    results = run(engine, {0: [(f"s{i}", p, params) for i, p in enumerate(prompts)]})
    for res in results.values():
        assert len(res.prompt_ids) + len(res.token_ids) <= SINK + WINDOW
        ids = res.prompt_ids + res.token_ids
        check_logprobs_against(reference_logprobs(model, ids), res, k=3)
        check_logprobs_against(reference_logprobs(model, ids, split), res, k=3)


@pytest.mark.parametrize("band_block", [None, 4, 7], ids=["plain", "band-4", "band-7"])
def test_window_larger_than_a_chunk_and_long_chunks(llama, tokenizer, band_block, monkeypatch) -> None:
    """A window wider than the chunk, and chunks wider than the window, both match the reference; with a
    small band block, chunks longer than it take the banded streaming-head path (blocks that straddle
    the sinks, partial last blocks, bands past the last key)."""
    if band_block:
        monkeypatch.setattr(attention, "BAND_BLOCK", band_block)
    params = SamplingParams(max_tokens=5, logprobs=2, **GREEDY)
    prompts = [random_prompt(n, seed=300 + n) for n in (37, 50)]
    for window, chunk in ((16, 5), (5, 32)):
        engine = make_engine(llama, tokenizer, MIXED, window=window, sink=3, max_num_batched_tokens=chunk)
        results = run(engine, {0: [(f"w{i}", p, params) for i, p in enumerate(prompts)]})
        for res in results.values():
            ids = res.prompt_ids + res.token_ids
            check_logprobs_against(reference_logprobs(llama, ids, MIXED, sink=3, window=window), res, k=2)


# --- oracle 3: accounting -------------------------------------------------------------------------

class Ledger:
    """The tokens each sequence has in the cache, counted from outside the engine: a chunk adds what it
    feeds once its forward returns; a preemption or a free starts the count again at zero. Every chunk
    must start where the ledger says the sequence's cache ends, so a scheduler or runner that loses or
    invents cached tokens (a preemption that keeps num_cached, say) fails at the next chunk."""

    def __init__(self, engine: LLMEngine):
        self.cached: dict[str, int] = {}
        self.sampled: set[str] = set()  # fed a chunk that ends its tokens since it was last (re)admitted
        runner_run, preempt, free = engine.runner.run, engine.scheduler.preempt, engine.scheduler.free

        def run(chunks, *args):
            for chunk in chunks:
                rid = chunk.seq.request_id
                assert chunk.seq.num_cached == self.cached.get(rid, 0), \
                    f"{rid}: a chunk starts at {chunk.seq.num_cached}, its cache ends at {self.cached.get(rid, 0)}"
            ends = [chunk.samples for chunk in chunks]
            logits = runner_run(chunks, *args)
            for chunk, end in zip(chunks, ends):
                rid = chunk.seq.request_id
                self.cached[rid] = self.cached.get(rid, 0) + chunk.num_tokens
                if end:
                    self.sampled.add(rid)
            return logits

        def restart(original):
            def wrapped(seq):
                original(seq)
                self.cached.pop(seq.request_id, None)
                self.sampled.discard(seq.request_id)
            return wrapped

        engine.runner.run = run
        engine.scheduler.preempt, engine.scheduler.free = restart(preempt), restart(free)


LEDGERS: "weakref.WeakKeyDictionary[LLMEngine, Ledger]" = weakref.WeakKeyDictionary()


def analytic_usage(engine: LLMEngine, split: HeadSplit, page: int, sink: int, window: int,
                   head_dim: int = HEAD_DIM, element: int = 4,
                   full_element: int | None = None) -> tuple[int, int, int, int]:
    """(pages, slots, bytes, full-equivalent bytes) of the resident sequences, from first principles and
    the ledger's token counts; `element`: the pools' bytes per entry, `full_element`: the model's (the full
    cache the saving is against; default `element`)."""
    layers, kv = len(split.full), split.num_kv_heads
    full_heads = sum(len(heads) for heads in split.full)
    stream_heads = layers * kv - full_heads
    per_page = page * full_heads * 2 * head_dim * element
    per_slot = (sink + window) * stream_heads * 2 * head_dim * element
    per_token_all = layers * kv * 2 * head_dim * (full_element or element)
    cached = [LEDGERS[engine].cached.get(s.request_id, 0) for s in engine.scheduler.running]
    pages = sum(math.ceil(n / page) for n in cached) if full_heads else 0
    full_equivalent = sum(math.ceil(n / page) * page for n in cached) * per_token_all
    return pages, len(cached), pages * per_page + len(cached) * per_slot, full_equivalent


def check_accounting(split: HeadSplit, page: int = PAGE, sink: int = SINK, window: int = WINDOW, element: int = 4,
                     full_element: int | None = None):
    def after_step(engine: LLMEngine, step: int) -> None:
        usage = engine.usage()
        pages, slots, used, full_equivalent = analytic_usage(engine, split, page, sink, window, element=element,
                                                             full_element=full_element)
        assert (usage.pages_used, usage.slots_used) == (pages, slots), f"step {step}"
        assert usage.bytes_used == used, f"step {step}"
        assert usage.bytes_full_equivalent == full_equivalent, f"step {step}"
        assert usage.bytes_capacity <= engine.config.kv_cache_memory
        ledger = LEDGERS[engine]
        in_flight = engine.pipeline.in_flight.seqs if engine.pipeline.in_flight else []  # pipelined: their newest token is
        for seq in engine.scheduler.running:  # on the device; others cache everything but the newest token
            assert seq.num_cached == ledger.cached.get(seq.request_id, 0), f"step {step}: {seq.request_id}"
            if seq.request_id in ledger.sampled:
                assert seq.num_cached == seq.num_tokens - (seq not in in_flight), f"step {step}: {seq.request_id}"
        for seq in engine.scheduler.waiting:
            assert seq.slot is None and not seq.pages and seq.num_cached == 0
    return after_step


def assert_empty(engine: LLMEngine) -> None:
    usage = engine.usage()
    assert (usage.pages_used, usage.slots_used, usage.bytes_used, usage.bytes_full_equivalent) == (0, 0, 0, 0)
    assert not engine.has_unfinished() and not engine.sequences
    blocks = engine.blocks
    assert len(blocks.free_pages) == len(set(blocks.free_pages)) == engine.cache.num_pages
    assert len(blocks.free_slots) == len(set(blocks.free_slots)) == engine.cache.num_slots
    assert not any(blocks.ref_counts)


@pytest.mark.parametrize("dtype, element", [(torch.float32, 4), (torch.bfloat16, 2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("split", [MIXED, HeadSplit.uniform(4, 2, True), HeadSplit.uniform(4, 2, False)],
                         ids=["mixed", "full", "streaming"])
def test_accounting_matches_formula_every_step(llama, tokenizer, split, dtype, element) -> None:
    params = SamplingParams(max_tokens=5, **GREEDY)
    arrivals = {0: [("a", random_prompt(13, 1), params), ("b", random_prompt(6, 2), params)],
                2: [("c", random_prompt(21, 3), params)], 5: [("d", random_prompt(2, 4), params)]}
    engine = make_engine(llama, tokenizer, split, max_num_batched_tokens=6, dtype=dtype)
    seen = []

    def after_step(engine, step):
        check_accounting(split, element=element)(engine, step)
        seen.append(engine.usage().bytes_used)

    results = run(engine, arrivals, after_step)
    assert all(r.finish_reason == "length" for r in results.values())
    assert max(seen) > 0
    # the pools' tensors hold exactly the formula's bytes: every page and slot, plus one scratch page and slot
    cache = engine.cache
    held = sum(t.numel() * t.element_size() for pool in (cache.full_k, cache.full_v, cache.ring_k, cache.ring_v)
               for t in pool if t is not None)
    full_heads, layers_x_kv = sum(split.num_full), len(split.full) * split.num_kv_heads
    per_page = PAGE * full_heads * 2 * HEAD_DIM * element
    per_slot = (SINK + WINDOW) * (layers_x_kv - full_heads) * 2 * HEAD_DIM * element
    assert held == (cache.num_pages + 1) * per_page * bool(full_heads) + (cache.num_slots + 1) * per_slot
    assert_empty(engine)


def test_usage_is_zero_after_every_way_of_ending(llama, tokenizer) -> None:
    split = MIXED
    check = check_accounting(split)
    base = SamplingParams(max_tokens=8, **GREEDY)
    prompt = random_prompt(9, 11)
    engine = make_engine(llama, tokenizer, split, max_num_batched_tokens=5)
    greedy = run(engine, {0: [("g", prompt, base)]}, check)["g"]
    assert_empty(engine)

    # stop token id: the third generated token ends the request (and is returned, as in vLLM)
    stop_token = SamplingParams(max_tokens=8, stop_token_ids=[greedy.token_ids[2]], **GREEDY)
    first = greedy.token_ids.index(greedy.token_ids[2])
    res = run(engine, {0: [("t", prompt, stop_token)]}, check)["t"]
    assert res.finish_reason == "stop" and res.token_ids == greedy.token_ids[:first + 1]
    assert_empty(engine)

    # eos ends a request unless ignore_eos
    eos = SamplingParams(max_tokens=8, temperature=0.0)
    engine.scheduler.eos_ids = {greedy.token_ids[1]}
    res = run(engine, {0: [("e", prompt, eos)]}, check)["e"]
    first_eos = greedy.token_ids.index(greedy.token_ids[1])
    assert res.finish_reason == "stop" and res.token_ids == greedy.token_ids[:first_eos + 1]
    assert_empty(engine)

    # stop string
    stop = stop_string_for(tokenizer, greedy.token_ids)
    assert stop is not None, "no usable stop string in the generated text: the stop-string path would go untested"
    res = run(engine, {0: [("s", prompt, SamplingParams(max_tokens=8, stop=[stop[0]], **GREEDY))]}, check)["s"]
    assert res.finish_reason == "stop" and res.token_ids == greedy.token_ids[:stop[1]]
    assert_empty(engine)

    # aborted in prefill, aborted in decode, one of each while another request runs on
    long_prompt = random_prompt(30, 12)
    engine.add_request("decode", random_prompt(3, 13), base)
    engine.add_request("prefill", long_prompt, base)
    engine.add_request("keep", prompt, base)
    engine.step()  # decode: its whole prompt and a first token; prefill: 2 of its 30 tokens
    check(engine, 0)
    assert engine.sequences["prefill"].in_prefill and engine.sequences["prefill"].slot is not None
    assert engine.sequences["decode"].output_ids and engine.sequences["decode"].slot is not None
    assert engine.abort("prefill") and not engine.abort("prefill")
    check(engine, 1)
    engine.step()
    check(engine, 2)
    assert len(engine.sequences["decode"].output_ids) == 2
    assert engine.abort("decode")
    check(engine, 3)
    engine.step()
    assert engine.sequences["keep"].slot is not None
    assert engine.abort("keep")
    assert_empty(engine)
    assert not engine.abort("never-added")

    # aborted while waiting (never admitted)
    engine.add_request("waiting", prompt, base)
    assert engine.abort("waiting")
    assert_empty(engine)


@pytest.mark.parametrize("async_decode", [False, True], ids=["sync", "pipelined"])
def test_failed_step_leaves_consistent_state_and_cleans_up(llama, tokenizer, monkeypatch, async_decode) -> None:
    """A step whose forward raises: the engine re-raises with nothing lost; the requests can go on
    (and give the same tokens), or be ended -- as the server's EngineClient does -- freeing everything."""
    split = MIXED
    check = check_accounting(split)
    params = SamplingParams(max_tokens=6, **GREEDY)
    prompts = [random_prompt(n, 20 + n) for n in (11, 19)]
    engine = make_engine(llama, tokenizer, split, max_num_batched_tokens=6, async_decode=async_decode)
    clean = run(engine, {0: [(f"f{i}", p, params) for i, p in enumerate(prompts)]})

    real_run = engine.runner.run
    failures = {"left": 1}

    def flaky(chunks, *args):
        if failures["left"]:
            failures["left"] -= 1
            raise RuntimeError("injected failure")
        return real_run(chunks, *args)

    monkeypatch.setattr(engine.runner, "run", flaky)
    for step_to_fail in (0, 3, 6):  # in prefill, across, in decode
        failures["left"] = 0
        for i, p in enumerate(prompts):
            engine.add_request(f"f{i}", p, params)
        outs: dict[str, list[int]] = {f"f{i}": [] for i in range(2)}
        for step in range(100):
            if not engine.has_unfinished():
                break
            if step == step_to_fail:
                failures["left"] = 1
                with pytest.raises(RuntimeError, match="injected"):
                    engine.step()
                assert engine.has_unfinished()  # nothing lost: a failed prefill waits to be computed again
                # decoding sequences keep the page their retried token goes to
                assert engine.usage().pages_used >= analytic_usage(engine, split, PAGE, SINK, WINDOW)[0]
                continue
            for out in engine.step():
                outs[out.request_id] += out.new_token_ids
            check(engine, step)
        assert outs == {rid: res.token_ids for rid, res in clean.items()}
        assert_empty(engine)

    # ended after the failure, the server's way: every request in flight fails with the error
    from server.engine_client import EngineClient

    client = EngineClient.__new__(EngineClient)  # no engine thread: just its step-and-fail policy
    client.engine = engine
    for i, p in enumerate(prompts):
        engine.add_request(f"f{i}", p, params)
    engine.step()
    assert engine.usage().bytes_used > 0
    failures["left"] = 1
    failed = client._step()
    assert sorted(o.request_id for o in failed) == ["f0", "f1"]
    assert all(o.finished and o.finish_reason == "error" and "injected" in o.error for o in failed)
    assert_empty(engine)


def test_failure_inside_the_forward_then_retry(llama, tokenizer, monkeypatch) -> None:
    """A forward that dies after some layers wrote the cache (a prefill chunk past sink + window, which
    overwrites window entries its own queries read): stepping on gives the tokens of a clean run."""
    split = HeadSplit.uniform(4, 2, full=False)
    params = SamplingParams(max_tokens=4, logprobs=0, **GREEDY)
    prompt = random_prompt(40, 5)
    engine = make_engine(llama, tokenizer, split, max_num_batched_tokens=6)
    clean = [lp.logprob for lp in run(engine, {0: [("x", prompt, params)]})["x"].logprobs]
    layer = engine.model.model.layers[2]
    real_forward = layer.forward
    state = {"fail": False}

    def flaky(*args, **kwargs):
        if state["fail"]:
            state["fail"] = False
            raise RuntimeError("injected failure in layer 2")
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(layer, "forward", flaky)
    engine.add_request("x", prompt, params)
    tokens = []
    for step in range(100):
        if not engine.has_unfinished():
            break
        if step == 4:  # a prefill chunk of 6 tokens, past sink + window: the ring is being overwritten
            state["fail"] = True
            with pytest.raises(RuntimeError):
                engine.step()
            continue
        tokens += [lp.logprob for out in engine.step() for lp in out.new_logprobs]
    assert_empty(engine)
    assert tokens == pytest.approx(clean, abs=1e-5)


# --- 4. admission under a tight budget -------------------------------------------------------------

def _sizes(split: HeadSplit, page: int = PAGE, sink: int = SINK, window: int = WINDOW) -> tuple[int, int]:
    full_heads = sum(len(h) for h in split.full)
    stream_heads = len(split.full) * split.num_kv_heads - full_heads
    return page * full_heads * 2 * HEAD_DIM * 4, (sink + window) * stream_heads * 2 * HEAD_DIM * 4


def _tight_memory(split: HeadSplit) -> tuple[int, int | None]:
    """Memory for ~2 sequences of <= 33 tokens (9 pages each), and how many sequences fit at once (None:
    as many as the pages hold, which depends on how far each has grown)."""
    per_page, per_slot = _sizes(split)
    if per_slot == 0:
        return 13 * per_page, None  # 13 pages: two or three admitted prompts, then preemption as they grow
    if per_page == 0:
        return 2 * per_slot, 2  # two slots
    # slots = (memory // 2) // per_slot = 2; pages = the rest
    memory = 2 * 2 * per_slot + 2 * per_slot - 1
    assert (memory // 2) // per_slot == 2
    return memory, 2


@pytest.mark.parametrize("split", [MIXED, HeadSplit.uniform(4, 2, True), HeadSplit.uniform(4, 2, False)],
                         ids=["mixed", "full", "streaming"])
@pytest.mark.parametrize("async_decode", [False, True], ids=["sync", "pipelined"])
def test_tight_memory_admission_and_preemption(llama, tokenizer, split, async_decode) -> None:
    params = SamplingParams(max_tokens=8, **GREEDY)
    prompts = [random_prompt(n, 40 + n) for n in (19, 25, 15, 22, 24, 17)]
    arrivals = {0: [(f"q{i}", p, params) for i, p in enumerate(prompts)]}
    roomy = run(make_engine(llama, tokenizer, split, max_num_batched_tokens=8), arrivals)

    memory, fits = _tight_memory(split)
    engine = make_engine(llama, tokenizer, split, max_num_batched_tokens=8, kv_cache_memory=memory,
                         async_decode=async_decode)
    assert engine.cache.num_slots == 2 or not _sizes(split)[1]
    running = []

    def after_step(engine, step):
        check_accounting(split)(engine, step)
        running.append(engine.num_running)

    tight = run(engine, arrivals, after_step)
    assert max(running) == fits if fits else max(running) >= 2  # pages: checked at every step
    assert {rid: (r.token_ids, r.finish_reason) for rid, r in tight.items()} == \
        {rid: (r.token_ids, r.finish_reason) for rid, r in roomy.items()}
    if _sizes(split)[0]:  # pages run out as sequences grow: the newest is preempted and recomputed
        assert engine.scheduler.num_preemptions > 0
    assert_empty(engine)


def test_pipelined_decode_equals_synchronous(llama, tokenizer) -> None:
    """Async decode (each decode step launched before the last one's tokens are read back) gives the
    synchronous engine's tokens, texts and finish reasons: through EOS, a stop token id, a stop string
    and length; a seeded request (sampled on the host, so the engine falls back to synchronous steps
    while it runs); a late arrival; an abort while a token is in flight; with the accounting exact at
    every step and nothing left at the end."""
    greedy = SamplingParams(max_tokens=12, **GREEDY)
    prompts = [random_prompt(n, 80 + n) for n in (9, 14, 11, 8)]
    reference = run(make_engine(llama, tokenizer, MIXED), {0: [("r", prompts[1], greedy)]})["r"].token_ids
    stop = stop_string_for(tokenizer, reference)
    assert stop is not None, "no usable stop string in the generated text: the stop-string path would go untested"
    arrivals = {
        0: [("len", prompts[0], SamplingParams(max_tokens=30, **GREEDY)),
            ("eos", prompts[1], SamplingParams(max_tokens=12, temperature=0.0)),
            ("stop-id", prompts[1], SamplingParams(max_tokens=12, stop_token_ids=[reference[5]], **GREEDY)),
            ("abort", prompts[2], greedy)],
        4: [("seeded", prompts[3], SamplingParams(max_tokens=5, temperature=0.9, seed=3))],
        20: [("late", prompts[1], SamplingParams(max_tokens=12, stop=[stop[0]], **GREEDY))],
    }
    results, pipelined = {}, {}
    for async_decode in (False, True):
        engine = make_engine(llama, tokenizer, MIXED, async_decode=async_decode)
        engine.scheduler.eos_ids = {reference[3]}
        check = check_accounting(MIXED)
        in_flight = []

        def after_step(engine, step):
            check(engine, step)
            in_flight.append(engine.pipeline.in_flight is not None)
            if step == 10:
                assert engine.abort("abort")

        results[async_decode] = run(engine, arrivals, after_step)
        pipelined[async_decode] = sum(in_flight)
        assert_empty(engine)
    sync, piped = results[False], results[True]
    assert pipelined[False] == 0 and pipelined[True] >= 5
    aborted = sorted((sync.pop("abort").token_ids, piped.pop("abort").token_ids), key=len)
    assert aborted[1][:len(aborted[0])] == aborted[0] and aborted[0]  # aborted one step apart at most
    assert {k: (r.token_ids, r.text, r.finish_reason) for k, r in piped.items()} == \
        {k: (r.token_ids, r.text, r.finish_reason) for k, r in sync.items()}
    assert sync["eos"].finish_reason == sync["stop-id"].finish_reason == "stop"
    assert sync["len"].finish_reason == "length" and len(sync["len"].token_ids) == 30
    assert sync["late"].finish_reason == "stop" and len(sync["late"].token_ids) < 12


def test_a_step_is_schedule_execute_update(llama, tokenizer) -> None:
    """The three calls of a step made by hand -- the scheduler's output checked against one written out,
    the runner's `execute`, the scheduler's `update` -- leave every sequence as `LLMEngine.step` does and
    give the same tokens; the runner changes no sequence."""
    prompts = {"a": random_prompt(9, 90), "b": random_prompt(5, 91)}
    params = SamplingParams(max_tokens=3, **GREEDY)
    stepped, manual = (make_engine(llama, tokenizer, MIXED, async_decode=False) for _ in range(2))
    for engine in (stepped, manual):
        for rid, prompt in prompts.items():
            engine.add_request(rid, prompt, params)
    a, b = manual.sequences["a"], manual.sequences["b"]
    script = [[(a, 7, False)], [(a, 2, True), (b, 5, True)], [(a, 1, True), (b, 1, True)],
              [(a, 1, True), (b, 1, True)]]  # chunks of 7 step tokens; decode rows ride outside them
    tokens = {rid: [] for rid in prompts}
    for step, want in enumerate(script):
        scheduled = manual.scheduler.schedule()
        assert [(c.seq, c.num_tokens, c.samples) for c in scheduled.chunks] == want, step
        before = [(c.seq.num_cached, list(c.seq.output_ids), list(c.seq.pages)) for c in scheduled.chunks]
        result = manual.runner.execute(scheduled)
        assert [(c.seq.num_cached, list(c.seq.output_ids), list(c.seq.pages)) for c in scheduled.chunks] == before
        assert result.seqs == scheduled.sampling and not result.errors
        for appended in manual.scheduler.update(scheduled, result):
            tokens[appended.seq.request_id].append(appended.token_id)
        for out in stepped.step():
            assert out.new_token_ids == [tokens[out.request_id][-1]], step
        for rid in prompts:
            mine, theirs = manual.sequences[rid], stepped.sequences.get(rid)
            if theirs is None:  # finished: by length, freed by the update
                assert mine.finish_reason == "length" and mine.slot is None and not mine.pages
                continue
            assert (mine.num_cached, mine.output_ids, mine.pages, mine.slot) == \
                (theirs.num_cached, theirs.output_ids, theirs.pages, theirs.slot), (step, rid)
    assert not stepped.has_unfinished() and not manual.has_unfinished()
    assert manual.usage().bytes_used == 0 and all(len(t) == 3 for t in tokens.values())


def test_finishing_by_length_keeps_the_pipeline_going(llama, tokenizer) -> None:
    """Requests that reach max_tokens one after another leave the pipelined batch without a synchronous
    step: once all are decoding, the scheduler is never asked for a decode step again (each finish used
    to cost one, the GPU idle while the host scheduled), and the tokens equal the synchronous engine's."""
    arrivals = {0: [(f"r{n}", random_prompt(5 + n, 400 + n), SamplingParams(max_tokens=n, **GREEDY))
                    for n in (6, 9, 10, 14)]}
    want = run(make_engine(llama, tokenizer, MIXED, max_num_batched_tokens=64), arrivals)
    engine = make_engine(llama, tokenizer, MIXED, max_num_batched_tokens=64, async_decode=True)
    schedule, scheduled = engine.scheduler.schedule, []

    def counted():
        output = schedule()
        scheduled.append([c.num_tokens for c in output.chunks])
        return output

    engine.scheduler.schedule = counted
    check = check_accounting(MIXED)
    got = run(engine, arrivals, check)
    assert {k: (r.token_ids, r.finish_reason) for k, r in got.items()} == \
        {k: (r.token_ids, r.finish_reason) for k, r in want.items()}
    assert scheduled[:2] == [[5 + n for n in (6, 9, 10, 14)], [1] * 4]  # the prompts, the first decode step
    assert all(chunks == [] for chunks in scheduled[2:]), scheduled  # then only pipelined launches
    assert_empty(engine)


def test_prefill_chunks_stay_on_whole_chunks_whatever_else_runs(llama, tokenizer, monkeypatch) -> None:
    """Prompts of uneven lengths arriving while others prefill and decode: no prefill chunk crosses a
    multiple of the token budget, so a chunk is a whole block (the shape the GPU planned at start-up)
    unless it is a prompt's tail or the step's budget ran out in it; a step's prefill tokens stay
    within the budget, and decoding sequences ride outside it."""
    size = 16
    engine = make_engine(llama, tokenizer, MIXED, max_num_batched_tokens=size)
    real_run, steps = engine.runner.run, []

    def recording(chunks, *args):
        steps.append([(len(c.seq.prompt_ids), c.seq.num_cached, c.num_tokens) for c in chunks])
        return real_run(chunks, *args)

    monkeypatch.setattr(engine.runner, "run", recording)
    params = SamplingParams(max_tokens=6, **GREEDY)
    run(engine, {0: [("a", random_prompt(37, 500), params), ("b", random_prompt(23, 501), params)],
                 3: [("c", random_prompt(61, 502), params)], 5: [("d", random_prompt(50, 503), params)]})
    mixed = 0
    for step in steps:
        prefill = [(prompt, start, n) for prompt, start, n in step if start < prompt]
        tokens = sum(n for _, _, n in prefill)
        assert tokens <= size
        for prompt, start, n in prefill:
            assert start // size == (start + n - 1) // size, step
            assert start % size or n == size or start + n == prompt or tokens == size, step
        mixed += len(prefill) < len(step) and tokens == size
    assert mixed > 0  # a whole chunk beside decoding sequences: their tokens are not taken from it
    assert_empty(engine)


def test_a_failed_device_draw_in_a_pipelined_step_falls_back_to_the_host(llama, tokenizer, monkeypatch,
                                                                        caplog) -> None:
    """When the device-side draw of a pipelined step raises, that step's tokens are sampled on the host
    after the step before it is appended: nothing is lost or reordered, and a row that still fails there
    finishes its request alone. Each fallback and the failed request are logged (with its id)."""
    prompts = [random_prompt(n, 300 + n) for n in (9, 14, 11)]
    arrivals = {0: [(f"r{i}", p, SamplingParams(max_tokens=12, **GREEDY)) for i, p in enumerate(prompts)]}
    want = run(make_engine(llama, tokenizer, MIXED), arrivals)
    engine = make_engine(llama, tokenizer, MIXED, async_decode=True)
    real_draw, real_sample, draws = runner_module.draw_tokens, runner_module.sample_batch, []

    def flaky_draw(logits, params, plain=None):
        draws.append(len(params))
        if len(draws) % 3 == 0:
            raise RuntimeError("device draw failed")
        return real_draw(logits, params, plain)

    monkeypatch.setattr(runner_module, "draw_tokens", flaky_draw)
    got = run(engine, arrivals)
    assert len(draws) >= 6  # pipelined steps ran, and every third one's draw failed
    assert {k: (r.token_ids, r.finish_reason) for k, r in got.items()} == \
        {k: (r.token_ids, r.finish_reason) for k, r in want.items()}
    assert_empty(engine)

    engine = make_engine(llama, tokenizer, MIXED, async_decode=True)
    poison = SamplingParams(max_tokens=12, **GREEDY)
    arrivals = {0: [("r0", prompts[0], arrivals[0][0][2]), ("bad", prompts[1], poison), ("r2", prompts[2], arrivals[0][2][2])]}
    draws.clear()

    def draw_fails_after_the_first(logits, params, plain=None):
        draws.append(len(params))
        if len(draws) > 1:
            raise RuntimeError("device draw failed")
        return real_draw(logits, params, plain)

    def sample_fails_for_poison(logits, params, generators, raw=None):
        if any(p is poison for p in params) and len(draws) > 1:
            raise RuntimeError("poisoned row")
        return real_sample(logits, params, generators, raw)

    monkeypatch.setattr(runner_module, "draw_tokens", draw_fails_after_the_first)
    monkeypatch.setattr(runner_module, "sample_batch", sample_fails_for_poison)
    caplog.clear()
    with caplog.at_level("WARNING", logger="rheads.engine"):
        got = run(engine, arrivals)
    assert got["bad"].finish_reason == "error"
    logged = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert ("ERROR", "request bad failed: RuntimeError: poisoned row") in logged
    assert any(level == "WARNING" and "device draw failed" in message for level, message in logged)
    assert not any("r0" in message or "r2" in message for _, message in logged)
    for rid in ("r0", "r2"):
        assert (got[rid].token_ids, got[rid].finish_reason) == (want[rid].token_ids, want[rid].finish_reason)
    assert_empty(engine)


def test_max_num_seqs_limits_running(llama, tokenizer) -> None:
    params = SamplingParams(max_tokens=4, **GREEDY)
    arrivals = {0: [(f"m{i}", random_prompt(5 + i, 60 + i), params) for i in range(5)]}
    roomy = run(make_engine(llama, tokenizer, MIXED), arrivals)
    engine = make_engine(llama, tokenizer, MIXED, max_num_seqs=2)
    running = []
    limited = run(engine, arrivals, lambda e, s: running.append(e.num_running))
    assert max(running) == 2
    assert {k: v.token_ids for k, v in limited.items()} == {k: v.token_ids for k, v in roomy.items()}


def test_requests_too_large_are_refused(llama, tokenizer) -> None:
    engine = make_engine(llama, tokenizer, HeadSplit.uniform(4, 2, True), kv_cache_memory=10 * _sizes(
        HeadSplit.uniform(4, 2, True))[0], max_model_len=64)
    assert engine.cache.num_pages == 10
    assert engine.limits.output_room(37) == 3 and engine.limits.output_room(38) == 2  # 10 pages of 4 hold 40 tokens
    with pytest.raises(RequestError, match="KV cache"):
        engine.add_request("big", random_prompt(38, 1), SamplingParams(max_tokens=3))  # 41 tokens > 40
    with pytest.raises(RequestError, match="maximum context length"):
        engine.add_request("long", random_prompt(60, 1), SamplingParams(max_tokens=5))
    with pytest.raises(RequestError, match="empty"):
        engine.add_request("empty", [], SamplingParams())
    with pytest.raises(RequestError):
        engine.add_request("oov", [VOCAB], SamplingParams())
    engine.add_request("ok", random_prompt(37, 1), SamplingParams(max_tokens=3, **GREEDY))  # 40: fits exactly
    with pytest.raises(RequestError, match="already"):
        engine.add_request("ok", [1], SamplingParams())
    outputs = [out for _ in range(30) for out in engine.step()]
    assert [o.finish_reason for o in outputs] == [None, None, "length"]
    assert_empty(engine)


# --- 5. sampling --------------------------------------------------------------------------------

def _one(engine, prompt, params, rid="x"):
    return run(engine, {0: [(rid, prompt, params)]})[rid]


def test_seeds(llama, tokenizer) -> None:
    engine = make_engine(llama, tokenizer, MIXED)
    prompt = random_prompt(12, 70)
    sampled = lambda seed: SamplingParams(max_tokens=8, temperature=1.0, seed=seed, ignore_eos=True)  # noqa: E731
    # the same seed twice in one batch, and again alone later: the same tokens
    both = run(engine, {0: [("a", prompt, sampled(7)), ("b", prompt, sampled(7)), ("c", prompt, sampled(8))]})
    again = _one(make_engine(llama, tokenizer, MIXED), prompt, sampled(7))
    assert both["a"].token_ids == both["b"].token_ids == again.token_ids
    assert both["a"].token_ids != both["c"].token_ids
    greedy = _one(engine, prompt, SamplingParams(max_tokens=8, **GREEDY))
    assert both["a"].token_ids != greedy.token_ids  # it really samples


def test_top_k_1_and_tiny_top_p_are_greedy(llama, tokenizer) -> None:
    engine = make_engine(llama, tokenizer, MIXED)
    prompt = random_prompt(15, 71)
    greedy = _one(engine, prompt, SamplingParams(max_tokens=8, **GREEDY)).token_ids
    top_k = _one(engine, prompt, SamplingParams(max_tokens=8, temperature=1.5, top_k=1, ignore_eos=True))
    top_p = _one(engine, prompt, SamplingParams(max_tokens=8, temperature=1.5, top_p=1e-6, ignore_eos=True))
    assert top_k.token_ids == greedy == top_p.token_ids


def stop_string_for(tokenizer, token_ids: list[int]) -> tuple[str, int, str] | None:
    """A two-character stop string straddling two generated tokens' text.

    Returns (stop, tokens generated when it completes, the text before it), or None."""
    for k in range(1, len(token_ids) - 1):
        before = tokenizer.decode(token_ids[:k], skip_special_tokens=True)
        after = tokenizer.decode(token_ids[:k + 1], skip_special_tokens=True)
        if not before or len(after) <= len(before) or not after.startswith(before) or "\ufffd" in after:
            continue
        stop = before[-1] + after[len(before)]
        if after.find(stop) == len(before) - 1:
            return stop, k + 1, before[:-1]
    return None


def test_stop_string_truncates_text(llama, tokenizer) -> None:
    engine = make_engine(llama, tokenizer, MIXED)
    prompt = random_prompt(10, 72)
    greedy = _one(engine, prompt, SamplingParams(max_tokens=10, **GREEDY))
    assert greedy.finish_reason == "length" and len(greedy.token_ids) == 10
    assert greedy.text == tokenizer.decode(greedy.token_ids, skip_special_tokens=True)
    found = stop_string_for(tokenizer, greedy.token_ids)
    assert found is not None, "no usable stop string in the generated text"
    stop, n_tokens, text = found
    unmatched = _one(engine, prompt, SamplingParams(max_tokens=10, stop=["never-there"], **GREEDY))
    assert (unmatched.finish_reason, unmatched.text) == ("length", greedy.text)  # held-back text is flushed
    res = _one(engine, prompt, SamplingParams(max_tokens=10, stop=["never-there", stop], **GREEDY))
    assert res.finish_reason == "stop"
    assert res.token_ids == greedy.token_ids[:n_tokens]
    assert res.text == text, "the streamed text must end before the stop string"
    assert stop not in res.text


def test_stop_string_inside_one_token(llama, tokenizer) -> None:
    engine = make_engine(llama, tokenizer, MIXED)
    prompt = random_prompt(10, 72)
    greedy = _one(engine, prompt, SamplingParams(max_tokens=10, **GREEDY))
    piece = tokenizer.decode(greedy.token_ids[:4], skip_special_tokens=True)
    prev = tokenizer.decode(greedy.token_ids[:3], skip_special_tokens=True)
    stop = piece[len(prev):].strip()[:2] or piece[-1]
    expected = piece[:piece.find(stop)]
    res = _one(engine, prompt, SamplingParams(max_tokens=10, stop=[stop], **GREEDY))
    assert res.finish_reason == "stop" and res.text == expected and len(res.token_ids) <= 4


def test_max_tokens_is_length(llama, tokenizer) -> None:
    engine = make_engine(llama, tokenizer, MIXED)
    for n in (1, 3):
        res = _one(engine, random_prompt(4, 73), SamplingParams(max_tokens=n, **GREEDY))
        assert res.finish_reason == "length" and len(res.token_ids) == n and res.outputs == n


@pytest.mark.parametrize("k", [0, 1, 4])
def test_logprobs_equal_reference_log_softmax(model, tokenizer, k) -> None:
    """At budget 1.0, the chosen token's logprob (greedy or sampled) is the model's log_softmax."""
    engine = make_engine(model, tokenizer, HeadSplit.uniform(4, model.config.num_key_value_heads, True))
    prompt = random_prompt(14, 74)
    for params in (SamplingParams(max_tokens=5, logprobs=k, **GREEDY),
                   SamplingParams(max_tokens=5, logprobs=k, temperature=0.7, top_k=50, seed=1, ignore_eos=True)):
        res = _one(engine, prompt, params)
        reference = reference_logprobs(model, res.prompt_ids + res.token_ids)
        check_logprobs_against(reference, res, k)
        for lp in res.logprobs:
            assert len(lp.top) == k
            values = [v for _, v in lp.top]
            assert values == sorted(values, reverse=True)
            if params.temperature == 0 and k:
                assert lp.top[0][0] == lp.token_id
    no_logprobs = _one(engine, prompt, SamplingParams(max_tokens=3, **GREEDY))
    assert no_logprobs.logprobs == []


# --- 6. head selection and permutation ----------------------------------------------------------------

def make_profile(kv_scores: list[list[float]]) -> Profile:
    layers, kv = len(kv_scores), len(kv_scores[0])
    identity = ModelIdentity(name="hand-made", architecture="LlamaForCausalLM", num_layers=layers,
                             num_attention_heads=2 * kv, num_key_value_heads=kv, head_dim=HEAD_DIM)
    query = [[s for s in row for _ in range(2)] for row in kv_scores]
    return Profile(model=identity, method=ProfileMethod(name="retrieval_head_niah"), samples_total=1,
                   samples_kept=1, query_head_scores=query, kv_head_scores=kv_scores)


SCORES = [[0.1, 0.9, 0.0, 0.3],
          [0.5, 0.2, 0.8, 0.05],
          [0.0, 0.7, 0.4, 0.6]]


@pytest.mark.parametrize("budget, expected", [
    (0.0, ((), (), ())),
    (1 / 12, ((1,), (), ())),
    (0.25, ((1,), (2,), (1,))),
    (0.5, ((1,), (0, 2), (1, 2, 3))),
    (1.0, ((0, 1, 2, 3),) * 3),
])
def test_select_heads_by_budget(budget, expected) -> None:
    split = select_heads(make_profile(SCORES), budget=budget)
    assert split.full == expected and split.num_kv_heads == 4
    assert split.fraction_full == pytest.approx(sum(map(len, expected)) / 12)


@pytest.mark.parametrize("threshold, expected", [
    (0.55, ((1,), (2,), (1, 3))),
    (0.6, ((1,), (2,), (1,))),  # strictly above
    (1.0, ((), (), ())),
    (-1.0, ((0, 1, 2, 3),) * 3),
])
def test_select_heads_by_threshold(threshold, expected) -> None:
    assert select_heads(make_profile(SCORES), threshold=threshold).full == expected


def test_select_heads_ties_and_errors() -> None:
    ties = make_profile([[0.5, 0.5], [0.5, 0.5], [0.9, 0.5]])
    # (2, 0) wins on score; then ties go to the lowest (layer, head)
    assert select_heads(ties, budget=3 / 6).full == ((0, 1), (), (0,))
    assert select_heads(ties, budget=4 / 6).full == ((0, 1), (0,), (0,))
    assert all(select_heads(ties, budget=0.5) == select_heads(ties, budget=0.5) for _ in range(3))
    with pytest.raises(ValueError):
        select_heads(ties)
    with pytest.raises(ValueError):
        select_heads(ties, budget=0.5, threshold=0.1)
    with pytest.raises(ValueError):
        select_heads(ties, budget=1.5)


def test_select_heads_chooses_among_the_full_attention_layers_only() -> None:
    """A sliding-window layer's heads are windowed by the model: no budget or threshold picks them, and the
    budget is a fraction of the full layers' heads."""
    profile = make_profile(SCORES)
    profile.model.layer_windows = [None, 64, None]
    split = select_heads(profile, budget=0.5)
    assert split.full == ((1,), (), (1, 2, 3)) and split.windows == (None, 64, None)
    assert split.fraction_full == 0.5 and split.window_of(1) == 64 and split.window_of(0) is None
    assert select_heads(profile, threshold=0.75).full == ((1,), (), ())  # layer 1's 0.8 is no choice
    assert select_heads(profile, budget=1.0).full == ((0, 1, 2, 3), (), (0, 1, 2, 3))
    assert HeadSplit.uniform(3, 4, True).with_windows([None, 64, None]) == select_heads(profile, budget=1.0)
    with pytest.raises(ValueError, match="sliding-window layer keeps no full heads"):
        HeadSplit(((0,), (1,), ()), 4, (None, 64, None))


def test_random_split() -> None:
    a, b = random_split(6, 4, 0.25, seed=1), random_split(6, 4, 0.25, seed=1)
    assert a == b and sum(a.num_full) == 6
    assert any(random_split(6, 4, 0.25, seed=s) != a for s in range(2, 6))
    assert all(list(h) == sorted(h) for h in a.full)
    assert random_split(6, 4, 0.0, seed=1) == HeadSplit.uniform(6, 4, False)
    assert random_split(6, 4, 1.0, seed=1) == HeadSplit.uniform(6, 4, True)
    hybrid = random_split(3, 4, 0.5, seed=1, windows=[None, 64, None])  # as many as a budget of the full layers
    assert hybrid.full[1] == () and sum(hybrid.num_full) == 4 and hybrid.windows == (None, 64, None)


def test_head_split_order() -> None:
    split = HeadSplit(((2,), (), (0, 3)), 4)
    assert split.order(0) == [2, 0, 1, 3] and split.order(1) == [0, 1, 2, 3] and split.order(2) == [0, 3, 1, 2]
    assert split.num_full == [1, 0, 2] and split.num_layers == 3


@pytest.mark.parametrize("kind, overrides", [("llama", {}), ("qwen2", {}), ("llama", {"attention_bias": True}),
                                             ("qwen2", {"num_key_value_heads": 4})])
def test_permutation_leaves_logits_unchanged(kind, overrides) -> None:
    model = tiny_model(kind, num_layers=3, **overrides)
    kv = model.config.num_key_value_heads
    split = random_split(3, kv, 0.5, seed=4)
    assert any(split.order(l) != list(range(kv)) for l in range(3)), "a split that permutes nothing"
    ids = torch.tensor([random_prompt(20, 75)])
    with torch.inference_mode():
        before = model(ids).logits
        permuted = copy.deepcopy(model)
        permute_attention_heads(permuted, split)
        after = permuted(ids).logits
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), permuted.parameters()))
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


def test_restore_undoes_the_permutation() -> None:
    model = tiny_model("qwen2", num_layers=3)
    before = {name: p.clone() for name, p in model.named_parameters()}
    split = HeadSplit(((1,), (), (1, 0)), 2)
    permute_attention_heads(model, split)
    restore_attention_heads(model, split)
    assert all(torch.equal(before[name], p) for name, p in model.named_parameters())


def test_close_gives_the_model_back(tokenizer, monkeypatch) -> None:
    """An engine changes its model in place (heads reordered, its attention, fused forwards); `close` (or
    leaving its `with`) undoes all of it, so transformers' own forward gives the logits it gave before, and
    so does an engine whose construction failed after the model was changed."""
    model = tiny_model("llama", num_layers=4)
    ids = torch.tensor([random_prompt(20, 76)])
    with torch.inference_mode():
        before = model(ids).logits
    weights = {name: p.clone() for name, p in model.named_parameters()}
    implementation = model.config._attn_implementation

    def unchanged() -> None:
        assert model.config._attn_implementation == implementation
        assert all(torch.equal(weights[name], p) for name, p in model.named_parameters())
        assert not any("forward" in vars(m) for m in model.modules())
        with torch.inference_mode():
            assert torch.equal(model(ids).logits, before)

    config = EngineConfig(sink=SINK, window=WINDOW, page_size=PAGE, kv_cache_memory=8 << 20)
    with LLMEngine(model, tokenizer, MIXED, config) as engine:
        assert model.config._attn_implementation != implementation
        engine.add_request("r", random_prompt(9, 77), SamplingParams(max_tokens=30, **GREEDY))
        engine.step()
    assert not engine.has_unfinished() and engine.usage().bytes_used == 0  # unfinished work is aborted
    unchanged()
    engine.close()  # a second close changes nothing
    unchanged()
    monkeypatch.setattr(llm_module.ModelRunner, "capture_graphs", lambda *a: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        LLMEngine(model, tokenizer, MIXED, config)
    unchanged()


def test_incremental_detokenization_equals_full_decode(tokenizer) -> None:
    """Decoding only the newest tokens gives, after every token, the text a full decode gives (multi-byte
    characters split over tokens wait for their last byte)."""
    from rheads.engine.output import detokenize
    from rheads.engine.sequence import Sequence

    text = "Hello 世界 🙂🙂 naïve café — ok\n\n  spaces\tand 1234567 digits; «quotes» ∑ end"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    ids += torch.randint(0, tokenizer.vocab_size, (200,), generator=torch.Generator().manual_seed(0)).tolist()
    seq = Sequence("r", [1, 2, 3], SamplingParams())
    for i, token in enumerate(ids, 1):
        seq.output_ids.append(token)
        got = detokenize(tokenizer, seq)
        assert got == tokenizer.decode(ids[:i], skip_special_tokens=True), i
    assert seq.read_offset > len(ids) - 10  # it really decoded incrementally


def test_default_budget_comes_from_the_profile(tmp_path) -> None:
    """Without --budget the engine takes the profile's measured default_budget; without a profile, 1.0."""
    from pathlib import Path

    shipped = Profile.load(Path(__file__).parents[1] / "profiles" / "SmolLM2-135M-Instruct.json")
    assert shipped.default_budget is not None, "the shipped profile carries no measured default budget"
    other = 0.25 if shipped.default_budget != 0.25 else 0.75
    shipped.model_copy(update={"default_budget": other}).save(tmp_path / "other.json")
    config = EngineConfig(budget=None, kv_cache_memory=64 << 20, max_num_seqs=2)
    for profile, expected in (("auto", shipped.default_budget), (tmp_path / "other.json", other), (None, 1.0)):
        engine = LLMEngine.from_model("smollm2-135m-instruct", profile, config)
        assert engine.split.fraction_full == pytest.approx(expected, abs=0.02), profile
    engine = LLMEngine.from_model("smollm2-135m-instruct", "auto", EngineConfig(budget=0.1, kv_cache_memory=64 << 20))
    assert engine.split.fraction_full == pytest.approx(0.1, abs=0.02)  # an explicit budget wins


def test_token_ids_spans_prompt_and_output() -> None:
    from rheads.engine.sequence import Sequence

    seq = Sequence("r", [10, 11, 12], SamplingParams(), output_ids=[20, 21])
    joined = seq.prompt_ids + seq.output_ids
    for start in range(6):
        for end in range(start, 6):
            assert seq.token_ids(start, end) == joined[start:end], (start, end)


def _filtered_probs(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """The sampling distribution from first principles: top-k (ties with the k-th kept), then the smallest
    set of the best tokens whose probability reaches top_p (the token crossing it kept)."""
    if 0 < top_k < logits.numel():
        logits = logits.masked_fill(logits < torch.topk(logits, top_k).values[-1], float("-inf"))
    probs = logits.softmax(-1)
    kept, total = set(), 0.0
    for token in probs.argsort(descending=True).tolist():
        if total >= top_p and top_p < 1.0:
            break
        kept.add(token)
        total += float(probs[token])
    mask = torch.tensor([i not in kept for i in range(logits.numel())])
    return logits.masked_fill(mask, float("-inf")).softmax(-1)


@pytest.mark.parametrize("vocab", [128256, 49152, 1000, 37])
def test_greedy_tokens_equal_argmax_ties_included(vocab) -> None:
    """The two-pass greedy pick is argmax's, the first of equal maxima too, for vocabularies that split
    into chunks (Llama 3's, SmolLM2's, a small one) and one that does not."""
    from rheads.engine.sampler import greedy_tokens

    logits = torch.randn(5, vocab, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    logits[0] = 1.0  # all equal: token 0
    logits[1, [3, vocab // 2, vocab - 1]] = 99.0  # equal maxima in different chunks
    logits[2, -1] = 99.0  # in the last chunk
    logits[3, [vocab // 2, vocab // 2 + 1]] = 99.0  # equal maxima in one chunk
    want = logits.argmax(-1)
    assert want[:4].tolist() == [0, 3, vocab - 1, vocab // 2]
    assert torch.equal(greedy_tokens(logits), want)
    assert torch.equal(greedy_tokens(logits.float()), want)


@pytest.mark.parametrize("seeded", [False, True], ids=["batched-draw", "seeded-row"])
def test_sampling_keeps_top_k_top_p_and_the_distribution(seeded) -> None:
    """Unseeded rows are drawn together on the device, seeded rows one by one with their own generator:
    both follow the requested distribution after temperature, top-k and top-p."""
    from rheads.engine.sampler import _draw, sample

    torch.manual_seed(0)
    logits = torch.randn(3, 40) * 2
    settings = [SamplingParams(temperature=0.8, top_k=5), SamplingParams(temperature=1.5, top_p=0.75),
                SamplingParams(temperature=1.3)]  # top_p 0.75 keeps 5 tokens here, the 5th crossing it
    draws = 4000
    if seeded:
        generator = torch.Generator().manual_seed(0)
        tokens = torch.tensor([[sample(logits[row], params, generator)[0] for row, params in enumerate(settings)]
                               for _ in range(draws)])
    else:
        tokens = _draw(logits.repeat(draws, 1), settings * draws).view(draws, 3)
    for row, params in enumerate(settings):
        expected = _filtered_probs(logits[row] / params.temperature, params.top_k, params.top_p)
        counts = torch.bincount(tokens[:, row], minlength=40).float()
        assert set(torch.nonzero(counts).flatten().tolist()) <= set(torch.nonzero(expected).flatten().tolist())
        # every allowed token within 5 standard errors of its probability
        error = (counts / draws - expected).abs()
        assert (error <= 5 * (expected * (1 - expected) / draws).sqrt() + 1e-3).all(), (row, error.max())


def test_unseeded_sampling_in_a_batch_goes_through_the_batched_draw(monkeypatch) -> None:
    from rheads.engine import sampler

    calls = []
    real = sampler._draw
    monkeypatch.setattr(sampler, "_draw", lambda logits, params: calls.append(len(params)) or real(logits, params))
    logits = torch.randn(4, 30)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.9),
              SamplingParams(temperature=0.9, seed=3), SamplingParams(temperature=1.1, top_k=3)]
    generators = [None, None, torch.Generator().manual_seed(3), None]
    picks = sampler.sample_batch(logits, params, generators)
    assert calls == [2]  # rows 1 and 3 together; the seeded row alone, the greedy row by the argmax
    assert picks[0] == (int(logits[0].argmax()), None)
    assert picks[3][0] in torch.topk(logits[3], 3).indices.tolist()
    assert picks[2] == sampler.sample(logits[2], params[2], torch.Generator().manual_seed(3))


def test_a_memory_fraction_is_taken_of_what_is_free_after_the_weights(llama, tokenizer, monkeypatch) -> None:
    """kv_cache_memory=0.25 sizes the pools from the device's free memory when the engine is built."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (64 << 20, 80 << 20))
    engine = make_engine(llama, tokenizer, MIXED, kv_cache_memory=0.25)
    capacity = engine.usage().bytes_capacity
    assert 15 << 20 < capacity <= 16 << 20  # a quarter of the 64 MiB "free", less what pages cannot fill
