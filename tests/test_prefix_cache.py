"""Prefix caching against the oracles: a request served from the cache gives what it gives on a cold cache
(and what the masked reference gives), wherever its hit ends; the pools hold exactly the live sequences'
pages and slots plus the cached ones, and after every request only evictable cached ones, after a reset none.

Tiny shapes (page 4, sink 4, window 8, chunks of 7), at budget 1.0 (every head full) and a mixed split of
half the KV heads (streaming heads reused through window snapshots).
"""

from __future__ import annotations

import copy

import oracles
import pytest
import torch
from oracles import GREEDY, check_logprobs_against, run

from rheads.engine import EngineConfig, HeadSplit, LLMEngine, SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, PAGE, SINK, WINDOW = 49152, 4, 4, 8
SHAPE = dict(num_attention_heads=4, num_key_value_heads=2, hidden_size=64, head_dim=16, intermediate_size=128,
             max_position_embeddings=512, vocab_size=VOCAB)
SPLITS = {"budget-0.5": HeadSplit(((0, 1), (), (1,), (0,)), 2), "budget-1.0": HeadSplit.uniform(4, 2, True)}
PARAMS = SamplingParams(max_tokens=5, logprobs=5, **GREEDY)


@pytest.fixture(scope="module")
def llama():
    return oracles.tiny_model("llama", SHAPE, 4, 0)


@pytest.fixture(params=list(SPLITS))
def split(request) -> HeadSplit:
    return SPLITS[request.param]


def prompt(length: int, seed: int) -> list[int]:
    return oracles.random_prompt(length, seed, VOCAB)


def engine_for(model, tokenizer, split: HeadSplit, **config) -> LLMEngine:
    config = {**dict(sink=SINK, window=WINDOW, page_size=PAGE, max_num_batched_tokens=7, kv_cache_memory=8 << 20),
              **config}
    return LLMEngine(copy.deepcopy(model), tokenizer, split, EngineConfig(**config))


def check_pools(engine: LLMEngine, step: int = -1) -> None:
    """The pools partition exactly: pages held by live sequences (each by as many as hold it, each sequence
    holding the pages its cached or reused tokens need), cached evictable pages, free pages; slots likewise with
    snapshots. Bytes by the footprint formula."""
    blocks, cache, prefix = engine.blocks, engine.cache, engine.blocks.prefix
    live = engine.scheduler.running
    held = {p for s in live for p in s.pages}
    for seq in live:
        # while it recomputes its streaming heads, a sequence holds the pages it reuses ahead of its cache
        assert len(seq.pages) == cache.pages_for(max(seq.num_cached, seq.num_reused)), f"step {step}: {seq.request_id}"
    for page in range(cache.num_pages):
        assert blocks.ref_counts[page] == sum(page in s.pages for s in live), f"step {step}: page {page}"
    evictable, snapshots = list(prefix.evictable), list(prefix.snapshots.values())
    assert sorted(blocks.free_pages + evictable + list(held)) == list(range(cache.num_pages)), f"step {step}"
    assert all(page in prefix.hash_of for page in evictable)
    assert all(digest in prefix.page_of for digest in prefix.snapshots)
    assert sorted(blocks.free_slots + snapshots + [s.slot for s in live]) == list(range(cache.num_slots))
    usage = engine.usage()
    assert (usage.pages_used, usage.slots_used) == (len(held), len(live)), f"step {step}"
    assert (usage.pages_cached, usage.slots_cached) == (len(evictable), len(snapshots)), f"step {step}"
    assert usage.bytes_used == len(held) * cache.bytes_per_page + len(live) * cache.bytes_per_slot
    assert usage.bytes_cached == len(evictable) * cache.bytes_per_page + len(snapshots) * cache.bytes_per_slot


def assert_only_cached(engine: LLMEngine) -> None:
    """Every request has ended: nothing is held, what is not free is an evictable cached prefix."""
    check_pools(engine)
    assert not engine.has_unfinished() and not any(engine.blocks.ref_counts)
    usage = engine.usage()
    assert (usage.pages_used, usage.slots_used, usage.bytes_used) == (0, 0, 0)


def serve_in_turn(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams = PARAMS):
    """Each prompt alone, one after the other (so each finds what the ones before it left cached)."""
    results, cached = [], []
    for i, ids in enumerate(prompts):
        res = run(engine, {0: [(f"r{i}", ids, params)]}, check_pools)[f"r{i}"]
        results.append(res)
        cached.append(engine.blocks.prefix.hits)
    hits = [b - a for a, b in zip([0] + cached, cached)]
    return results, hits


def all_full(split: HeadSplit) -> bool:
    return sum(split.num_full) == len(split.full) * split.num_kv_heads


def check_same(cold: oracles.Result, warm: oracles.Result, model, split: HeadSplit) -> None:
    assert warm.token_ids == cold.token_ids
    assert [lp.logprob for lp in warm.logprobs] == pytest.approx([lp.logprob for lp in cold.logprobs], abs=1e-4)
    reference = oracles.reference_logprobs(model, warm.prompt_ids + warm.token_ids,
                                           None if all_full(split) else split, SINK, WINDOW)
    check_logprobs_against(reference, warm, k=5)


def cold_results(model, tokenizer, split, prompts, **config):
    engine = engine_for(model, tokenizer, split, enable_prefix_caching=False, **config)
    return [run(engine, {0: [("c", ids, PARAMS)]})["c"] for ids in prompts]


# --- where a hit ends -------------------------------------------------------------------------------

@pytest.mark.parametrize("length", [28, 29, 30, 31])
def test_the_same_prompt_again_after_the_window_wrapped(llama, tokenizer, split, length) -> None:
    """The second time, every whole page before the last token is reused, past sink + window (the ring has
    wrapped); the rest is computed again (for 29 tokens, one: a decode step), at least the last token,
    for its logits (28 tokens: the last page is computed again)."""
    ids = prompt(length, 1)
    engine = engine_for(llama, tokenizer, split)
    (first, second), hits = serve_in_turn(engine, [ids, ids])
    assert hits == [0, (length - 1) // PAGE * PAGE]
    # by the formula: every whole block of the tokens computed (all but the last output) stays cached once
    # (the second request's own copy of a block the first cached goes back to the pool), and one snapshot
    usage, computed = engine.usage(), length + PARAMS.max_tokens - 1
    assert (usage.pages_cached, usage.slots_cached) == (computed // PAGE, 0 if all_full(split) else 1)
    [cold] = cold_results(llama, tokenizer, split, [ids])
    check_same(cold, first, llama, split)
    check_same(cold, second, llama, split)
    assert_only_cached(engine)


def test_a_hit_ending_inside_the_sink(llama, tokenizer, split) -> None:
    ids = prompt(6, 2)
    engine = engine_for(llama, tokenizer, split, sink=6)
    (_, second), hits = serve_in_turn(engine, [ids, ids])
    assert hits == [0, 4]  # 4 < sink
    [cold] = cold_results(llama, tokenizer, split, [ids], sink=6)
    assert second.token_ids == cold.token_ids
    assert [lp.logprob for lp in second.logprobs] == pytest.approx([lp.logprob for lp in cold.logprobs], abs=1e-4)
    assert_only_cached(engine)


@pytest.mark.parametrize("doc_len", [22, 24], ids=["mid-page", "page-boundary"])
def test_questions_over_one_document(llama, tokenizer, split, doc_len) -> None:
    """Prompts that share a document and then differ: the hit is rounded down to the document's last
    whole page. With streaming heads the second question keeps the snapshot there, the third reuses it."""
    doc = prompt(doc_len, 3)
    prompts = [doc + prompt(9, 10 + i) for i in range(3)]
    engine = engine_for(llama, tokenizer, split)
    results, hits = serve_in_turn(engine, prompts)
    whole = doc_len // PAGE * PAGE
    assert hits == ([0, whole, whole] if all_full(split) else [0, 0, whole])
    for cold, warm in zip(cold_results(llama, tokenizer, split, prompts), results):
        check_same(cold, warm, llama, split)
    assert_only_cached(engine)


def test_questions_over_a_document_that_fills_half_the_pool(llama, tokenizer, split) -> None:
    """Each question's prompt needs more pages than are free, so it evicts the cached copy of the
    document's later blocks while it computes its own: its copies take their place in the chain, and the
    later questions still find the whole document."""
    probe = engine_for(llama, tokenizer, split).cache
    engine = engine_for(llama, tokenizer, split, max_num_seqs=8,
                        kv_cache_memory=16 * probe.bytes_per_page + 8 * probe.bytes_per_slot)
    assert engine.cache.num_pages < 2 * 12  # two prompts of 12 pages do not fit side by side
    doc = prompt(40, 3)
    prompts = [doc + prompt(5, 10 + i) for i in range(4)]
    results, hits = serve_in_turn(engine, prompts)
    # at budget 0.5 the second recomputes the streaming heads over the windows before the document's end
    assert hits == ([0, 40, 40, 40] if all_full(split) else [0, 40 - 3 * WINDOW - SINK, 40, 40])
    for cold, warm in zip(cold_results(llama, tokenizer, split, prompts), results):
        check_same(cold, warm, llama, split)
    assert_only_cached(engine)


def test_a_chat_resending_its_turns(llama, tokenizer, split) -> None:
    """Each turn sends the conversation so far plus a new message: it reuses the turn before's prompt."""
    engine = engine_for(llama, tokenizer, split)
    conversation, previous = prompt(13, 4), None
    for turn in range(3):
        before = engine.blocks.prefix.hits
        [cold] = cold_results(llama, tokenizer, split, [conversation])
        warm = run(engine, {0: [(f"t{turn}", conversation, PARAMS)]}, check_pools)[f"t{turn}"]
        check_same(cold, warm, llama, split)
        hit = engine.blocks.prefix.hits - before
        assert hit == 0 if previous is None else hit >= (previous - 1) // PAGE * PAGE
        previous = len(conversation)
        conversation = conversation + warm.token_ids + prompt(6, 20 + turn)
    assert_only_cached(engine)


def gemma2_hybrid():
    """A Gemma 2 with a sliding layer (window 6, no sink) before a full-attention one."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model("gemma2", num_hidden_layers=2, sliding_window=6, attn_logit_softcapping=2.0,
                                  layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=20,
                                  initializer_range=0.2, **SHAPE)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("doc_len", [44, 58], ids=["page-boundary", "mid-page"])
@pytest.mark.parametrize("model_name, sink", [("llama", SINK), ("llama", 0), ("gemma2", SINK)])
def test_a_document_without_a_snapshot_recomputes_the_streaming_heads(llama, tokenizer, model_name, sink,
                                                                     doc_len) -> None:
    """The first question leaves no snapshot at the document's end, so the second recomputes the streaming
    heads from the cached pages: its sinks, then the span of the windows before the document's end, the
    full heads read from the pages; the third finds the snapshot the second kept there. Each gives the cold
    result and the masked reference's; with no sink (`sink=0`) it starts at the span; in Gemma 2 the span
    counts its sliding layer's window."""
    model, split = ((llama, SPLITS["budget-0.5"]) if model_name == "llama" else (gemma2_hybrid(), HeadSplit(((), (1,)), 2)))
    span = 3 * WINDOW if model_name == "llama" else 6 + WINDOW  # the windows of the layers with streaming heads
    doc = prompt(doc_len, 3)
    prompts = [doc + prompt(5, 10 + i) for i in range(3)]  # shorter than the window: the answer sees the document's
    engine = engine_for(model, tokenizer, split, sink=sink)
    assert (engine.blocks.prefix.span, engine.blocks.prefix.sink) == (span, sink)
    results, hits = serve_in_turn(engine, prompts)
    whole = doc_len // PAGE * PAGE
    assert hits == [0, whole - span - sink, whole]
    cold = cold_results(model, tokenizer, split, prompts, sink=sink)
    for c, warm in zip(cold, results):
        assert warm.token_ids == c.token_ids
        assert [lp.logprob for lp in warm.logprobs] == pytest.approx([lp.logprob for lp in c.logprobs], abs=1e-4)
        reference = oracles.reference_logprobs(model, warm.prompt_ids + warm.token_ids, split, sink, WINDOW)
        check_logprobs_against(reference, warm, k=5)
    assert_only_cached(engine)


def test_questions_arriving_together_wait_for_the_first_ones_snapshot(llama, tokenizer, split) -> None:
    """One question over a document, then three at once: at budget 0.5 the first of the three to run
    recomputes the streaming heads at the document's end and keeps a snapshot there; the other two wait for
    it (`Hit.waits`) and compute nothing of the document. Each gives its cold result."""
    doc = prompt(44, 3)
    prompts = [doc + prompt(5, 10 + i) for i in range(4)]
    engine = engine_for(llama, tokenizer, split)
    first = run(engine, {0: [("q0", prompts[0], PARAMS)]}, check_pools)
    before, found = engine.blocks.prefix.hits, {}

    def after_step(engine, step):
        check_pools(engine, step)
        for seq in engine.scheduler.running:
            found.setdefault(seq.request_id, seq.num_cached_prompt)
    together = run(engine, {0: [(f"q{i}", p, PARAMS) for i, p in enumerate(prompts[1:], 1)]}, after_step)
    span = 0 if all_full(split) else 3 * WINDOW + SINK  # the recompute's tokens (with its sinks)
    assert found == {"q1": 44 - span, "q2": 44, "q3": 44}
    assert engine.blocks.prefix.hits - before == 3 * 44 - span
    for cold, rid in zip(cold_results(llama, tokenizer, split, prompts), ["q0", "q1", "q2", "q3"]):
        check_same(cold, {**first, **together}[rid], llama, split)
    assert_only_cached(engine)
    assert not engine.blocks.prefix.coming  # every snapshot a sequence was to keep, taken or let go


# --- sharing, pressure, the ways a request ends ------------------------------------------------------

@pytest.mark.parametrize("async_decode", [False, True], ids=["sync", "pipelined"])
def test_two_requests_sharing_a_prefix_while_one_still_prefills(llama, tokenizer, split, async_decode) -> None:
    """The second arrives while the first is prefilling their shared document: it reuses what is
    registered by then (at budget 1.0) and both give their cold-cache results."""
    doc = prompt(40, 5)
    prompts = [doc + prompt(5, 30), doc + prompt(7, 31), doc + prompt(5, 30)]
    engine = engine_for(llama, tokenizer, split, async_decode=async_decode)
    results = run(engine, {0: [("a", prompts[0], PARAMS)], 3: [("b", prompts[1], PARAMS)],
                           4: [("c", prompts[2], PARAMS)]}, check_pools)
    for cold, rid in zip(cold_results(llama, tokenizer, split, prompts), "abc"):
        check_same(cold, results[rid], llama, split)
    assert engine.blocks.prefix.hits > 0
    assert_only_cached(engine)


def test_eviction_and_preemption_under_memory_pressure(llama, tokenizer, split) -> None:
    """Memory for about two sequences: cached prefixes are evicted (least recently used first) as new
    prompts need pages, running ones are preempted and find their own prefix again; every result equals
    the cold cache's, the pools partition exactly at every step."""
    probe = engine_for(llama, tokenizer, split)
    per_page, per_slot = probe.cache.bytes_per_page, probe.cache.bytes_per_slot
    memory = 2 * 4 * per_slot + 2 * per_slot - 1 if per_slot else 14 * per_page
    docs = [prompt(20, 50 + i) for i in range(3)]
    prompts = [docs[i % 3] + prompt(6, 60 + i) for i in range(6)]
    params = SamplingParams(max_tokens=8, **GREEDY)
    roomy = run(engine_for(llama, tokenizer, split, enable_prefix_caching=False),
                {0: [(f"q{i}", p, params) for i, p in enumerate(prompts)]})
    engine = engine_for(llama, tokenizer, split, kv_cache_memory=memory, max_num_batched_tokens=8,
                        snapshot_slots=0)  # the memory above is sized for live slots and pages alone
    evicted = []

    def after_step(engine, step):
        check_pools(engine, step)
        evicted.append(engine.usage().pages_cached)
    tight = run(engine, {0: [(f"q{i}", p, params) for i, p in enumerate(prompts[:3])],
                         6: [(f"q{i}", p, params) for i, p in enumerate(prompts[3:], 3)]}, after_step)
    assert {rid: r.token_ids for rid, r in tight.items()} == {rid: r.token_ids for rid, r in roomy.items()}
    again = run(engine, {0: [("again", prompts[0], params)]}, check_pools)["again"]
    assert again.token_ids == roomy["q0"].token_ids
    assert engine.scheduler.num_preemptions > 0 and max(evicted) > 0
    assert_only_cached(engine)


def test_abort_while_prefilling_then_the_same_prompt(llama, tokenizer, split) -> None:
    ids = prompt(33, 7)
    engine = engine_for(llama, tokenizer, split)
    engine.add_request("a", ids, PARAMS)
    engine.step(), engine.step()
    engine.abort("a")
    check_pools(engine)
    [cold] = cold_results(llama, tokenizer, split, [ids])
    before = engine.blocks.prefix.hits
    warm = run(engine, {0: [("b", ids, PARAMS)]}, check_pools)["b"]
    check_same(cold, warm, llama, split)
    assert engine.blocks.prefix.hits - before == (12 if all_full(split) else 0)  # 2 chunks of 7: 3 whole pages
    assert_only_cached(engine)


def test_reset_empties_the_cache_and_off_caches_nothing(llama, tokenizer, split) -> None:
    ids = prompt(30, 8)
    engine = engine_for(llama, tokenizer, split)
    serve_in_turn(engine, [ids])
    assert engine.usage().pages_cached > 0
    engine.add_request("running", ids, PARAMS)
    engine.step()  # a running request keeps its pages through a reset
    engine.reset_prefix_cache()
    check_pools(engine)
    while engine.has_unfinished():
        engine.step()
    engine.reset_prefix_cache()
    usage = engine.usage()
    assert (usage.pages_cached, usage.slots_cached, usage.bytes_cached) == (0, 0, 0)
    assert len(engine.blocks.free_pages) == engine.cache.num_pages
    assert len(engine.blocks.free_slots) == engine.cache.num_slots
    off = engine_for(llama, tokenizer, split, enable_prefix_caching=False)
    results = [run(off, {0: [(f"o{i}", ids, PARAMS)]})[f"o{i}"] for i in range(2)]
    assert results[0].token_ids == results[1].token_ids and off.blocks.prefix is None
    assert len(off.blocks.free_pages) == off.cache.num_pages


def test_cached_tokens_are_reported_per_request(llama, tokenizer, split) -> None:
    ids = prompt(30, 9)
    engine = engine_for(llama, tokenizer, split)
    seen = {}
    for rid in ("first", "second"):
        engine.add_request(rid, ids, PARAMS)
        while engine.has_unfinished():
            for out in engine.step():
                seen[out.request_id] = out.num_cached_tokens
    assert seen == {"first": 0, "second": 28}


@pytest.mark.parametrize("snapshot_slots", [0, 1])
def test_snapshot_slots_keep_prefixes_while_every_live_slot_is_taken(llama, tokenizer, snapshot_slots) -> None:
    """Two questions over one document fill both live slots (max_num_seqs=2) as they prefill, so only the
    slots kept for snapshots can hold the document's streaming heads: with one, a third question finds the
    document; with none it recomputes them from the document's start (it is shorter than the span of the
    windows), reading its full heads from the cached pages. Live sequences never take a snapshot's own slot."""
    split = SPLITS["budget-0.5"]
    doc = prompt(24, 90)
    first = [doc + prompt(6, 91), doc + prompt(6, 92)]
    engine = engine_for(llama, tokenizer, split, max_num_seqs=2, snapshot_slots=snapshot_slots)
    assert (engine.cache.num_seq_slots, engine.cache.num_slots) == (2, 2 + snapshot_slots)

    def after_step(engine, step):
        check_pools(engine, step)
        assert len(engine.scheduler.running) <= 2

    cold = run(engine_for(llama, tokenizer, split, enable_prefix_caching=False),
               {0: [("third", doc + prompt(6, 93), PARAMS)]})["third"]
    run(engine, {0: [(f"q{i}", p, PARAMS) for i, p in enumerate(first)]}, after_step)
    before = engine.blocks.prefix.hits
    third = run(engine, {0: [("third", doc + prompt(6, 93), PARAMS)]}, after_step)["third"]
    found = engine.blocks.prefix.hits - before
    assert third.token_ids == cold.token_ids
    check_logprobs_against(oracles.reference_logprobs(llama, third.prompt_ids + third.token_ids, split, SINK, WINDOW),
                           third, k=5)
    assert_only_cached(engine)
    assert found == (len(doc) // PAGE * PAGE if snapshot_slots else 0), found


def test_a_hybrid_models_sliding_layer_is_reused_through_its_snapshot(tokenizer) -> None:
    """Gemma 2's sliding layer lives in the window slot, so a cached prefix brings it back with the streaming
    heads' snapshot: the same prompt again hits past the model's window and gives the cold result."""
    model, split, ids = gemma2_hybrid(), HeadSplit(((), (1,)), 2), prompt(29, 1)
    engine = engine_for(model, tokenizer, split)
    (first, second), hits = serve_in_turn(engine, [ids, ids])
    assert hits == [0, 28] and engine.usage().slots_cached == 1
    [cold] = cold_results(model, tokenizer, split, [ids])
    check_same(cold, first, model, split)
    check_same(cold, second, model, split)
    assert_only_cached(engine)
