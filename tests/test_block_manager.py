"""The block manager: pages and slots handed out in pairs with their checks, pages shared by reference
count and returned to the pool only when their last holder lets go, and the bytes it reports equal to
the footprint formula at every point."""

from __future__ import annotations

import pytest
import torch

from rheads.engine.block_manager import BlockManager
from rheads.engine.cache import CacheConfig, CacheFullError, HeadSplitCache
from rheads.engine.heads import HeadSplit
from rheads.engine.messages import RunnerOutput
from rheads.engine.sequence import SamplingParams, Sequence

SPLIT = HeadSplit(((0,), (1,), ()), num_kv_heads=2)  # full heads in two layers, streaming in every one
PAGE, SINK, WINDOW, HEAD_DIM = 4, 2, 6, 8


def manager(pages: int = 12, slots: int = 3) -> BlockManager:
    probe = HeadSplitCache(SPLIT, HEAD_DIM, CacheConfig(page_size=PAGE, sink=SINK, window=WINDOW, memory_bytes=1 << 20))
    memory = pages * probe.bytes_per_page + slots * probe.bytes_per_slot
    cache = HeadSplitCache(SPLIT, HEAD_DIM, CacheConfig(page_size=PAGE, sink=SINK, window=WINDOW, memory_bytes=memory,
                                                        max_num_seqs=slots))
    assert (cache.num_pages, cache.num_slots) == (pages, slots)
    return BlockManager(cache)


def seq(name: str, n: int = 1) -> Sequence:
    return Sequence(name, [0] * n, SamplingParams())


def check_bytes(blocks: BlockManager, holders: list[Sequence]) -> None:
    """Used bytes by the formula: every distinct page held once, every slot held once."""
    cache = blocks.cache
    pages = {p for s in holders for p in s.pages}
    slots = [s.slot for s in holders if s.slot is not None]
    assert blocks.bytes_used() == len(pages) * cache.bytes_per_page + len(slots) * cache.bytes_per_slot
    assert blocks.usage().pages_used == len(pages) and blocks.usage().slots_used == len(slots)
    for page in range(cache.num_pages):
        assert blocks.ref_counts[page] == sum(page in s.pages for s in holders), page
        assert (blocks.ref_counts[page] == 0) == (page in blocks.free_pages), page


def test_allocate_append_free_pair_with_their_checks() -> None:
    blocks = manager(pages=8, slots=2)
    a = seq("a")
    assert blocks.can_allocate(seq("x"), 32) and not blocks.can_allocate(seq("x"), 33)  # 8 pages of 4 tokens
    blocks.allocate(a, 9)
    assert len(a.pages) == 3 and a.slot is not None
    assert blocks.block_tables[a.slot, :3].tolist() == a.pages
    assert blocks.missing_pages(a, 12) == 0 and blocks.missing_pages(a, 13) == 1
    blocks.append(a, 16)
    assert len(a.pages) == 4 and blocks.block_tables[a.slot, :4].tolist() == a.pages
    assert blocks.usage().bytes_full_equivalent == 16 * blocks.cache.bytes_per_token_full
    check_bytes(blocks, [a])
    with pytest.raises(CacheFullError):
        blocks.append(a, 36)  # 9 pages: one more than the pool
    assert len(a.pages) == 4  # a refused allocation takes nothing
    blocks.free(a)
    blocks.free(a)  # idempotent
    assert a.slot is None and not a.pages
    check_bytes(blocks, [])
    assert sorted(blocks.free_pages) == list(range(8)) and sorted(blocks.free_slots) == [0, 1]


def test_shared_pages_return_to_the_pool_with_their_last_holder() -> None:
    blocks = manager()
    a, b, c = seq("a"), seq("b"), seq("c")
    blocks.allocate(a, 12)  # 3 pages
    blocks.share(b, a.pages[:2])  # b begins with a's first two pages
    blocks.allocate(b, 14)  # and gets two of its own
    assert b.pages[:2] == a.pages[:2] and len(b.pages) == 4 and not set(b.pages[2:]) & set(a.pages)
    assert blocks.block_tables[b.slot, :4].tolist() == b.pages
    check_bytes(blocks, [a, b])
    blocks.share(c, a.pages[:1])
    blocks.allocate(c, 4)
    assert c.pages == a.pages[:1]
    check_bytes(blocks, [a, b, c])
    first, second = a.pages[0], a.pages[1]
    blocks.free(a)
    assert first not in blocks.free_pages and second not in blocks.free_pages  # b and c still hold them
    check_bytes(blocks, [b, c])
    blocks.free(b)
    assert first not in blocks.free_pages and second in blocks.free_pages
    check_bytes(blocks, [c])
    blocks.free(c)
    check_bytes(blocks, [])
    assert sorted(blocks.free_pages) == list(range(12))


def test_sharing_refuses_free_pages_and_pages_after_own_ones() -> None:
    blocks = manager()
    a, b = seq("a"), seq("b")
    blocks.allocate(a, 4)
    with pytest.raises(ValueError, match="free"):
        blocks.share(b, [blocks.free_pages[-1]])
    blocks.allocate(b, 4)
    with pytest.raises(ValueError, match="first"):
        blocks.share(b, a.pages)
    check_bytes(blocks, [a, b])


def test_a_slot_is_the_other_limit() -> None:
    blocks = manager(pages=10, slots=2)
    held = [seq(str(i)) for i in range(2)]
    for s in held:
        blocks.allocate(s, 1)
    assert not blocks.can_allocate(seq("x"), 1)
    with pytest.raises(CacheFullError):
        blocks.allocate(seq("x"), 1)
    blocks.free(held[0])
    assert blocks.can_allocate(seq("x"), 1)


def test_the_engine_allocates_through_it(monkeypatch) -> None:
    """Every page the scheduler hands a sequence comes from the block manager's pairs (no side door)."""
    from rheads.engine.scheduler import Scheduler
    blocks = manager(pages=8, slots=2)
    calls = []
    for name in ("allocate", "append", "free"):
        original = getattr(blocks, name)
        monkeypatch.setattr(blocks, name, lambda *a, _o=original, _n=name: calls.append(_n) or _o(*a))
    scheduler = Scheduler(blocks, max_num_batched_tokens=8)
    s = seq("s", n=10)
    scheduler.add(s)
    output = scheduler.schedule()
    [chunk] = output.chunks
    assert chunk.num_tokens == 8 and len(s.pages) == 2 and calls == ["allocate", "append"]
    scheduler.update(output, RunnerOutput())
    [chunk] = scheduler.schedule().chunks
    assert chunk.num_tokens == 2 and len(s.pages) == 3
    scheduler.free(s)
    assert calls[-1] == "free" and blocks.bytes_used() == 0 and torch.equal(
        torch.tensor(sorted(blocks.free_pages)), torch.arange(8))


# --- prefix caching -------------------------------------------------------------------------------

FULL = HeadSplit(((0, 1), (0, 1), (0, 1)), num_kv_heads=2)  # every head full: any cached block boundary hits


def caching_manager(pages: int) -> BlockManager:
    cache = HeadSplitCache(FULL, HEAD_DIM, CacheConfig(page_size=PAGE, sink=SINK, window=WINDOW, max_num_seqs=3,
                                                       memory_bytes=pages * PAGE * 6 * 2 * HEAD_DIM * 4))
    assert cache.num_pages == pages
    return BlockManager(cache, prefix_caching=True)


def computed(blocks: BlockManager, name: str, tokens: list[int]) -> Sequence:
    """A sequence that has computed all its tokens and ended: its whole blocks stay cached."""
    s = Sequence(name, tokens, SamplingParams())
    blocks.allocate(s, len(tokens))
    s.num_cached = len(tokens)
    blocks.free(s)
    return s


def test_admission_counts_only_the_pages_a_hit_does_not_cover() -> None:
    blocks = caching_manager(pages=8)
    doc = list(range(100, 112))  # 3 blocks
    computed(blocks, "a", doc)
    assert blocks.num_free_pages == 8 and len(blocks.prefix.evictable) == 3
    # 28 tokens + 1 need 8 pages: 3 cached + 5 new, and the 5 others are free (the cached 3 are not extra)
    assert blocks.can_allocate(Sequence("b", doc + list(range(16)), SamplingParams()))
    assert not blocks.can_allocate(Sequence("c", doc + list(range(20)), SamplingParams()))
    b = Sequence("b", doc + list(range(16)), SamplingParams())
    hit = blocks.allocate(b, 29)
    assert hit.num_tokens == 12 and b.pages[:3] == hit.pages and len(b.pages) == 8
    assert blocks.num_free_pages == 0 and [blocks.ref_counts[p] for p in hit.pages] == [1, 1, 1]


def test_a_block_is_found_only_after_its_own_prefix() -> None:
    """The hash chain covers every block before: the same tokens after a different prefix are not a hit."""
    blocks = caching_manager(pages=12)
    a, b, c = [1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]
    computed(blocks, "x", a + b + c)
    assert blocks.lookup(Sequence("y", a + c + [0], SamplingParams())).num_tokens == 4
    assert blocks.lookup(Sequence("z", a + b + c + [0], SamplingParams())).num_tokens == 12
    assert blocks.lookup(Sequence("w", a + b + c, SamplingParams())).num_tokens == 8  # its last token is computed


def test_cached_pages_are_evicted_least_recently_used_last_block_first() -> None:
    blocks = caching_manager(pages=4)
    old, new = computed(blocks, "old", list(range(8))), computed(blocks, "new", list(range(50, 58)))
    s = Sequence("s", [99], SamplingParams())
    blocks.allocate(s, 1)  # no page free: the oldest prefix's last block goes first
    assert blocks.lookup(Sequence("o", list(range(8)) + [0], SamplingParams())).num_tokens == 4
    assert blocks.lookup(Sequence("n", list(range(50, 58)) + [0], SamplingParams())).num_tokens == 8
    blocks.free(s)
    blocks.reset_prefix_cache()
    assert blocks.num_free_pages == len(blocks.free_pages) == 4 and not blocks.prefix.page_of
    assert old.pages == new.pages == []


def test_a_block_computed_again_takes_the_place_of_its_evictable_copy() -> None:
    """A prompt of whole blocks computes its last block again (its last token's logits are sampled), though a
    copy of it is cached from before, evictable. The new copy takes that one's place in the chain, and the
    old one is freed: else, once the pool evicts the old copy, the chain would lose a block a running
    sequence holds, and a longer prompt arriving meanwhile would compute it a third time."""
    blocks = caching_manager(pages=8)
    doc = list(range(100, 112))  # 3 blocks
    old = Sequence("old", doc, SamplingParams())
    blocks.allocate(old, 12)
    old.num_cached = 12
    old_last = old.pages[2]
    blocks.free(old)
    again = Sequence("again", doc, SamplingParams())
    hit = blocks.allocate(again, 12)
    assert hit.num_tokens == 8 and again.pages[:2] == hit.pages  # the last block is computed again
    again.num_cached = 12
    blocks.cache_computed(again)
    digest = again.block_hashes[2]
    assert blocks.prefix.page_of[digest] == again.pages[2] != old_last
    assert old_last in blocks.free_pages and old_last not in blocks.prefix.evictable
    longer = Sequence("longer", doc + [7], SamplingParams())
    assert blocks.lookup(longer).num_tokens == 12  # while `again` still runs


def test_snapshot_slots_cost_their_bytes_and_never_hold_a_live_sequence() -> None:
    probe = HeadSplitCache(SPLIT, HEAD_DIM, CacheConfig(page_size=PAGE, sink=SINK, window=WINDOW, memory_bytes=1 << 20))
    memory = 48 * probe.bytes_per_page + 5 * probe.bytes_per_slot  # slots within half the memory
    cache = HeadSplitCache(SPLIT, HEAD_DIM, CacheConfig(page_size=PAGE, sink=SINK, window=WINDOW, memory_bytes=memory,
                                                        max_num_seqs=3, snapshot_slots=2))
    assert (cache.num_pages, cache.num_seq_slots, cache.num_slots) == (48, 3, 5)  # the memory formula, to the byte
    blocks = BlockManager(cache, prefix_caching=True)
    live = [seq(f"s{i}", 4) for i in range(3)]
    for s in live:
        assert blocks.can_allocate(s)
        blocks.allocate(s, 4)
    assert len(blocks.free_slots) == 2 and not blocks.can_allocate(seq("fourth", 4))  # free, but not for it
    assert blocks.usage().bytes_capacity == 48 * cache.bytes_per_page + 5 * cache.bytes_per_slot == memory
    blocks.free(live[0])
    assert blocks.can_allocate(seq("fourth", 4))
