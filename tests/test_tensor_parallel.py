"""Tensor parallelism: the sharding plans, and two gloo processes serving a tiny model against both oracles.

1. `balanced_plan` gives every rank an equal share (within one) of each layer's retrieval and streaming KV
   heads and of the retrieval heads over all layers; every head goes to exactly one rank with its whole GQA
   group; its worst rank never holds more retrieval heads than `contiguous_plan`'s (vLLM's sharding).
2. Two gloo processes on 127.0.0.1 serve a tiny random Llama (8 query heads over 4 KV heads, so each rank
   holds 2 KV heads and their groups of 2): at budget 1.0 the tokens equal transformers `generate`; at
   budget 0.5 (a split whose retrieval heads vLLM's sharding would leave 4 to 2 over the ranks; also with
   q/k/v/o and MLP biases, and sharded contiguously as vLLM does) and on Qwen3 (q/k norms) with 7 full
   heads (4 to 3) the logprobs equal the masked reference; each rank's cache holds the heads the plan gives it, every rank's pools have the
   fewest pages and slots any rank's memory holds, and rank 0's pools (whose page and slot numbers are
   every rank's) are empty once the requests end.
3. With prefix caching, questions over one document reuse it on both ranks: the recompute of the streaming
   heads and the snapshots (slot copies made on rank 0, replayed by rank 1) keep the masked reference.
4. A forward that fails on rank 0 after rank 1 began it breaks the engine for good and lets rank 1 go.
5. An fp8 cache, each rank calibrating its own heads, serves as one process's fp8 engine does.

Both ranks run in one launch for the whole module, bounded by a deadline and the process group's timeout.
"""

from __future__ import annotations

import time
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import oracles
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st
from oracles import GREEDY, check_logprobs_against
from transformers import AutoTokenizer

from rheads.engine import EngineBrokenError, EngineConfig, LLMEngine, SamplingParams
from rheads.engine.cache import Footprint, PoolSizes
from rheads.engine.heads import HeadSplit
from rheads.engine.tensor_parallel import (TensorParallelEngine, balanced_plan, contiguous_plan, follow, free_port,
                                           join_group)
from rheads.models import resolve_model


@st.composite
def split_and_world(draw):
    """A random split of up to 8 layers over 1-16 KV heads, and a world size that divides the heads."""
    world = draw(st.sampled_from([1, 2, 4, 8]))
    kv = world * draw(st.integers(1, 4))
    layers = draw(st.integers(1, 8))
    full = tuple(tuple(sorted(draw(st.sets(st.integers(0, kv - 1))))) for _ in range(layers))
    return HeadSplit(full, kv), world


def spread(values) -> int:
    return max(values) - min(values)


@settings(max_examples=300, deadline=None)
@given(split_and_world())
def test_balanced_plan_balances_every_layer_and_the_totals(case) -> None:
    split, world = case
    plan = balanced_plan(split, world)
    counts = [plan.full_counts(rank) for rank in range(world)]  # [rank][layer]
    per_rank = split.num_kv_heads // world
    for layer in range(split.num_layers):
        full = [counts[rank][layer] for rank in range(world)]
        assert spread(full) <= 1
        assert spread([per_rank - n for n in full]) <= 1  # streaming heads
        assert sum(full) == split.num_full[layer]
    assert spread([sum(c) for c in counts]) <= 1


@settings(max_examples=300, deadline=None)
@given(split_and_world(), st.sampled_from([1, 2, 7]))
@pytest.mark.parametrize("make", [balanced_plan, contiguous_plan], ids=["balanced", "contiguous"])
def test_every_head_once_with_its_group_full_heads_first(make, case, group) -> None:
    split, world = case
    plan = make(split, world)
    for layer in range(split.num_layers):
        held = [h for rank in range(world) for h in plan.kv_heads[rank][layer]]
        assert sorted(held) == list(range(split.num_kv_heads))
        queries = [q for rank in range(world) for q in plan.query_heads(rank, layer, group)]
        assert sorted(queries) == list(range(split.num_kv_heads * group))
        for rank in range(world):
            heads = plan.kv_heads[rank][layer]
            assert len(heads) == split.num_kv_heads // world
            assert plan.query_heads(rank, layer, group)[::group] == [h * group for h in heads]
            n = plan.full_counts(rank)[layer]
            assert set(heads[:n]) <= set(split.full[layer]) and not set(heads[n:]) & set(split.full[layer])
            assert plan.rank_split(rank).full[layer] == tuple(range(n))


@settings(max_examples=300, deadline=None)
@given(split_and_world())
def test_balanced_worst_rank_holds_no_more_than_contiguous(case) -> None:
    split, world = case
    worst = {make: max(sum(make(split, world).full_counts(rank)) for rank in range(world))
             for make in (balanced_plan, contiguous_plan)}
    assert worst[balanced_plan] <= worst[contiguous_plan]
    for layer in range(split.num_layers):
        per_layer = {make: max(make(split, world).full_counts(rank)[layer] for rank in range(world))
                     for make in (balanced_plan, contiguous_plan)}
        assert per_layer[balanced_plan] <= per_layer[contiguous_plan]


def test_contiguous_is_unbalanced_where_balanced_is_not() -> None:
    """A layer whose retrieval heads are its first half: vLLM's sharding puts them all on rank 0."""
    split = HeadSplit(((0, 1), (0, 1, 2)), 4)
    assert [contiguous_plan(split, 2).full_counts(r) for r in range(2)] == [[2, 2], [0, 1]]
    balanced = balanced_plan(split, 2)
    assert [balanced.full_counts(r) for r in range(2)] == [[1, 2], [1, 1]]  # layer 1's third: a tie, to rank 0
    assert balanced.kv_heads == (((0, 2), (0, 1)), ((1, 3), (2, 3)))


def test_heads_that_do_not_divide_are_refused() -> None:
    with pytest.raises(ValueError, match="do not divide"):
        balanced_plan(HeadSplit(((0,),), 3), 2)


# --- two gloo processes serving a tiny model -----------------------------------------------------------

WORLD = 2
VOCAB = 49152  # SmolLM2's, so its tokenizer can decode the tiny model's tokens
SHAPE = dict(num_attention_heads=8, num_key_value_heads=4, hidden_size=64, head_dim=8, intermediate_size=128,
             max_position_embeddings=512, vocab_size=VOCAB)
LAYERS, SINK, WINDOW, PAGE = 3, 4, 8, 4
# half the heads full, the first two of layer 0 and first three of layer 1: contiguous, rank 0 holds 4 of them
HALF = HeadSplit(((0, 1), (0, 1, 2), (3,)), 4)
FULL = HeadSplit.uniform(LAYERS, 4, full=True)
# 7 full heads: balanced, 4 on rank 0 and 3 on rank 1, whose memory holds more pages than rank 0's
ODD = HeadSplit(((0, 1, 2), (1,), (0, 2, 3)), 4)
# case: (family, config overrides, split, prompt lengths, sharding); the partial splits' prompts pass sink +
# window. Llama with biases: q/k/v's sliced by head, o's and down's added once; Qwen3: its q/k norms over
# head_dim; vLLM's contiguous sharding, which the GPU comparison runs, serves as exactly.
CASES = {"full": ("llama", {}, FULL, [5, 17, 9, 23], balanced_plan),
         "half": ("llama", {}, HALF, [41, 53, 30], balanced_plan),
         "half-biases": ("llama", dict(attention_bias=True, mlp_bias=True), HALF, [41, 30], balanced_plan),
         "odd-qwen3": ("qwen3", {}, ODD, [41, 30], balanced_plan),
         "half-contiguous": ("llama", {}, HALF, [41, 30], contiguous_plan),
         "half-prefix": ("llama", {}, HALF, [40], balanced_plan),
         "half-fp8": ("llama", {}, HALF, [41, 53, 30], balanced_plan)}
# half-fp8: an fp8 cache, each rank calibrating its own heads' scales (held to one process's fp8 engine)
FP8_EXACT = 1e-2  # test_fp8.py's EXACT: an entry the ranks' sums round to the other side of an e4m3 step
# half-prefix: questions over one document, one after another, with prefix caching (`_prefix_prompts`)
MAX_TOKENS = 6
LAUNCH_DEADLINE = 120  # seconds for both processes to start, serve every case and stop
GROUP_TIMEOUT = timedelta(seconds=60)  # a collective waiting longer than this fails its rank


def tiny_model(case: str):
    kind, overrides, *_ = CASES[case]
    return oracles.tiny_model(kind, SHAPE, LAYERS, seed=0, **overrides)


def prompts(case: str) -> list[list[int]]:
    if case == "half-prefix":
        return _prefix_prompts()
    return [oracles.random_prompt(n, seed=n, vocab=VOCAB) for n in CASES[case][3]]


def _prefix_prompts() -> list[list[int]]:
    """Three questions over a 40-token document, then the first again: the second finds the document's pages
    with no snapshot at its end and recomputes the streaming heads (after its 4 sinks, the last 3 windows of
    8 before position 40: 12 tokens not computed), the third finds the snapshot the second kept there (40),
    the fourth its own prompt's (44)."""
    doc = oracles.random_prompt(CASES["half-prefix"][3][0], seed=77, vocab=VOCAB)
    questions = [doc + oracles.random_prompt(5, seed=80 + i, vocab=VOCAB) for i in range(3)]
    return questions + questions[:1]


PREFIX_HITS = 12 + 40 + 44  # `_prefix_prompts`'s


def _case_config(config: EngineConfig, case: str) -> EngineConfig:
    return replace(config, enable_prefix_caching=case == "half-prefix",
                   kv_cache_dtype="fp8" if case == "half-fp8" else "auto")


def _own_sizes(shard) -> PoolSizes:
    """What the rank's memory would hold on its own, before the ranks agree on the smallest."""
    return PoolSizes.of(Footprint.of(shard.split, SHAPE["head_dim"], shard.cache_config), shard.cache_config)


def _rank(rank: int, port: int, out_dir: str) -> None:
    """One process: join the group, serve every case (rank 0 drives the engine, rank 1 follows), and save
    what the parent checks: rank 0's results and pool usage, each rank's cache shape."""
    torch.set_num_threads(1)
    config = EngineConfig(sink=SINK, window=WINDOW, page_size=PAGE, kv_cache_memory=8 << 20, max_num_batched_tokens=7,
                          enable_prefix_caching=False)
    config = join_group(rank, WORLD, port, config, timeout=GROUP_TIMEOUT)
    try:
        report = {}
        for case, (_, _, split, _, sharding) in CASES.items():
            model = tiny_model(case)
            if rank:
                shard = follow(model, split, _case_config(config, case), sharding)
                report[case] = {"split": shard.split, "sizes": shard.sizes, "own": _own_sizes(shard),
                                "footprint": shard.cache(SHAPE["head_dim"]).footprint}
                continue
            tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m-instruct").path)
            params = SamplingParams(max_tokens=MAX_TOKENS, logprobs=5, **GREEDY)
            ids = prompts(case)
            arrivals = {0: [(f"r{i}", p, params) for i, p in enumerate(ids[:2])],
                        3: [(f"r{i}", p, params) for i, p in enumerate(ids[2:], start=2)]}
            if case == "half-prefix":  # one after another, each finding what the one before it cached
                arrivals = {20 * i: [(f"r{i}", p, params)] for i, p in enumerate(ids)}
            peak = []
            engine_config = _case_config(config, case)
            with TensorParallelEngine(model, tokenizer, split, engine_config, sharding=sharding) as engine:
                results = oracles.run(engine, arrivals, after_step=lambda e, _: peak.append(e.usage().pages_used))
                cache = engine.cache
                hits = engine.blocks.prefix.hits if engine.blocks.prefix else 0
                report[case] = {"results": results, "usage": engine.usage(), "peak_pages": max(peak), "hits": hits,
                                "split": engine.split, "sizes": engine.shard.sizes, "own": _own_sizes(engine.shard),
                                "pools": (cache.num_pages, cache.num_seq_slots, cache.num_slots - cache.num_seq_slots),
                                "footprint": cache.footprint}
        report["broken"] = _break_rank_0(rank, config, out_dir)  # last: it leaves the group
        torch.save(report, f"{out_dir}/rank{rank}.pt")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _break_rank_0(rank: int, config: EngineConfig, out_dir: str) -> dict:
    """A forward that fails on rank 0 after rank 1 has begun it (rank 0's first MLP raises): rank 0's engine
    raises EngineBrokenError, then again at once on the next step; rank 1, waiting in the MLP's all-reduce
    rank 0 never reaches, fails as rank 0 leaves the group instead of waiting for ever: while rank 0 still
    runs (it waits for rank 1 to say so), not only once its process leaves the group at the end."""
    model, split = tiny_model("half"), CASES["half"][2]
    failed = Path(out_dir) / "follower-failed"
    if rank:
        try:
            follow(model, split, config)
        except RuntimeError as error:
            failed.write_text(type(error).__name__)
        return {}
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m-instruct").path)
    engine = TensorParallelEngine(model, tokenizer, split, config)

    def fail(*args, **kwargs):
        raise RuntimeError("injected")
    engine.model.model.layers[0].mlp.forward = fail
    engine.add_request("doomed", prompts("half")[0], SamplingParams(max_tokens=2, **GREEDY))
    errors = []
    for _ in range(2):
        try:
            engine.step()
        except EngineBrokenError as error:
            errors.append(str(error))
    engine.close()
    deadline = time.monotonic() + GROUP_TIMEOUT.total_seconds() / 2
    while not failed.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    return {"errors": errors, "follower_freed": failed.exists()}


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> list[dict]:
    """Both ranks' reports; the processes are killed if they pass the deadline."""
    out_dir = tmp_path_factory.mktemp("tp")
    context = mp.spawn(_rank, args=(free_port(), str(out_dir)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + LAUNCH_DEADLINE
    try:
        while not context.join(timeout=max(0.0, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                pytest.fail(f"the {WORLD} ranks did not finish in {LAUNCH_DEADLINE} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)]


def test_full_budget_equals_generate(served) -> None:
    model = tiny_model("full")
    results = served[0]["full"]["results"]
    for i, prompt in enumerate(prompts("full")):
        assert results[f"r{i}"].finish_reason == "length"
        assert results[f"r{i}"].token_ids == oracles.hf_greedy(model, prompt, MAX_TOKENS)[0], f"request {i}"


@pytest.mark.parametrize("case", [case for case in CASES if case not in ("full", "half-fp8")])
def test_partial_budget_equals_masked_reference(served, case) -> None:
    model = tiny_model(case)
    differs = 0.0
    for res in served[0][case]["results"].values():
        ids = res.prompt_ids + res.token_ids
        reference = oracles.reference_logprobs(model, ids, CASES[case][2], SINK, WINDOW)
        n = len(res.prompt_ids)
        assert res.token_ids == reference[n - 1:-1].argmax(-1).tolist()
        check_logprobs_against(reference, res, k=5)
        full = oracles.reference_logprobs(model, ids)
        differs = max(differs, float((full[n - 1:-1] - reference[n - 1:-1]).abs().max()))
    assert differs > 1e-2, "the sink + window mask changes nothing: the test would not see a wrong mask"


@pytest.mark.parametrize("case", list(CASES))
def test_each_rank_holds_its_planned_heads_in_pools_of_one_size(served, case) -> None:
    plan = CASES[case][4](CASES[case][2], WORLD)
    for rank, report in enumerate(served):
        assert report[case]["split"] == plan.rank_split(rank)
        per_head = 2 * SHAPE["head_dim"] * (1 if case == "half-fp8" else 4)  # K and V of one head, fp32 or e4m3
        assert report[case]["footprint"].bytes_per_page == PAGE * sum(plan.full_counts(rank)) * per_head
        # every rank's pools: the smallest number of pages and of slots any rank's memory holds
        assert report[case]["sizes"] == tuple(map(min, *(r[case]["own"] for r in served)))
    assert served[0][case]["pools"] == served[0][case]["sizes"]  # what rank 0's scheduler allocates from
    if case.startswith("half"):  # balanced: 3 retrieval heads on each rank, where vLLM's sharding gives 4 and 2
        assert [sum(plan.full_counts(r)) for r in range(WORLD)] == ([4, 2] if "contiguous" in case else [3, 3])
    if case == "odd-qwen3":  # rank 0's 4 full heads take more bytes a page: its memory sets the pages
        assert [sum(plan.full_counts(r)) for r in range(WORLD)] == [4, 3]
        assert served[0][case]["sizes"].pages == served[0][case]["own"].pages < served[1][case]["own"].pages


@pytest.mark.parametrize("case", list(CASES))
def test_pools_empty_after_the_requests(served, case) -> None:
    report = served[0][case]
    assert report["peak_pages"] > 0
    usage = report["usage"]
    assert (usage.pages_used, usage.slots_used, usage.bytes_used) == (0, 0, 0)


def test_an_fp8_cache_serves_as_one_process_does(served, tokenizer) -> None:
    """Each rank calibrates its own heads' scales on the same prompt: the tokens and log-probabilities equal
    those of one process's fp8 engine within fp8's own tolerance (test_fp8.py holds that one to the
    references), and they differ from the unquantized run by more, so the check would see the scales lost."""
    _, _, split, ids, _ = CASES["half-fp8"]
    config = EngineConfig(sink=SINK, window=WINDOW, page_size=PAGE, kv_cache_memory=8 << 20, max_num_batched_tokens=7,
                          enable_prefix_caching=False, kv_cache_dtype="fp8")
    params = SamplingParams(max_tokens=MAX_TOKENS, logprobs=5, **GREEDY)
    arrivals = {0: [(f"r{i}", p, params) for i, p in enumerate(prompts("half-fp8")[:2])],
                3: [(f"r{i}", p, params) for i, p in enumerate(prompts("half-fp8")[2:], start=2)]}
    with LLMEngine(tiny_model("half-fp8"), tokenizer, split, config) as engine:
        alone = oracles.run(engine, arrivals)
    sharded, unquantized = served[0]["half-fp8"]["results"], served[0]["half"]["results"]
    moved = 0.0
    for rid, res in sharded.items():
        assert res.token_ids == alone[rid].token_ids, rid
        ours, theirs = [lp.logprob for lp in res.logprobs], [lp.logprob for lp in alone[rid].logprobs]
        assert ours == pytest.approx(theirs, abs=FP8_EXACT), rid
        moved = max(moved, max(abs(a - b) for a, b in zip(ours, [lp.logprob for lp in unquantized[rid].logprobs])))
    assert moved > FP8_EXACT / 10, "fp8 moves nothing: the comparison could not see its scales"


def test_a_forward_failing_on_rank_0_breaks_the_engine_and_frees_the_followers(served) -> None:
    errors = served[0]["broken"]["errors"]
    assert len(errors) == 2 and all("restart the server" in e and "injected" in e for e in errors)
    assert served[0]["broken"]["follower_freed"]  # not after the group's timeout (a serving group's is a year)


def test_prefix_caching_reaches_every_rank(served) -> None:
    """The later questions over the document were served from the cache, recomputing the streaming heads and
    restoring snapshots on both ranks (rank 1's slots took rank 0's copies and clears: else the masked
    reference, which test_partial_budget_equals_masked_reference holds them to, would not be met)."""
    assert served[0]["half-prefix"]["hits"] == PREFIX_HITS
    assert served[0]["half-prefix"]["usage"].slots_cached > 0
