"""Tensor parallelism: the sharding plans, and two gloo processes serving a tiny model against both oracles.

1. `balanced_plan` gives every rank an equal share (within one) of each layer's retrieval and streaming KV
   heads and of the retrieval heads over all layers; every head goes to exactly one rank with its whole GQA
   group; its worst rank never holds more retrieval heads than `contiguous_plan`'s (vLLM's sharding).
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rheads.engine.heads import HeadSplit
from rheads.engine.tensor_parallel import balanced_plan, contiguous_plan


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
