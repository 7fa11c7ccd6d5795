"""Focused tests of each TieredRadixCache policy rule (the harness lives in test_radix_property)."""

from __future__ import annotations

import time
from array import array

import pytest
import torch
from sglang.srt.mem_cache.base_prefix_cache import EvictParams, InsertParams, MatchPrefixParams
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.radix_cache import RadixKey

from fade_sglang.pool import Tier
from fade_sglang.patches.radix_cache import TieredRadixCache
from test_radix_property import Sim, small_config

LATER = 1e6  # seconds: far past every idle threshold


def insert(sim: Sim, tokens: list[int]) -> torch.Tensor:
    """Cache ``tokens`` as a finished request would (fresh fp16 slots for the uncached part)."""
    req = sim.start(tokens)
    assert req is not None
    sim.release(req, cache_it=True)
    return sim.cache.path_device_indices(sim.cache.match_prefix(MatchPrefixParams(key=RadixKey(array("q", tokens)))).last_device_node)


def tiers_of(sim: Sim, tokens: list[int]) -> list[int]:
    res = sim.cache.match_prefix(MatchPrefixParams(key=RadixKey(array("q", tokens))))
    return sim.pool.tier_of(sim.cache.path_device_indices(res.last_device_node)).tolist()


def test_construction_finds_pool_through_allocator_and_rejects_pages() -> None:
    sim = Sim(small_config())
    assert sim.cache.pool is sim.pool and sim.cache.fade_config is sim.cfg
    params = CacheInitParams(disable=False, req_to_token_pool=sim.rtp, token_to_kv_pool_allocator=sim.alloc, page_size=4)
    with pytest.raises(ValueError, match="page_size"):
        TieredRadixCache(params)


def test_sinks_stay_fp16_and_idle_ages_warm_then_cold() -> None:
    sim = Sim(small_config(sink_tokens=4))
    toks = list(range(100, 120))
    insert(sim, toks)
    now = time.monotonic()
    assert sim.cache.demote_idle(now) == 0  # nothing idle yet
    assert sim.cache.demote_idle(now + 2.0) == 16  # past warm_idle (1 s), before cold_idle (10 s)
    assert tiers_of(sim, toks) == [Tier.FP16] * 4 + [Tier.WARM] * 16
    node = sim.cache.match_prefix(MatchPrefixParams(key=RadixKey(array("q", toks)))).last_device_node
    assert sim.cache.demote_idle(node.last_access_time + 20.0) == 16
    assert tiers_of(sim, toks) == [Tier.FP16] * 4 + [Tier.COLD] * 16
    stats = sim.cache.tier_stats()
    assert stats["demoted_tokens"]["idle"] == {"fp16->warm": 16, "warm->cold": 16}
    assert stats["tree_tokens"] == {"fp16": 4, "warm": 0, "cold": 16}
    sim.check()


def test_shared_prefixes_stay_fp16() -> None:
    sim = Sim(small_config(sink_tokens=0))
    shared = list(range(200, 210))
    insert(sim, shared + [1, 2, 3, 4, 5])
    insert(sim, shared + [6, 7, 8, 9])  # the shared part becomes a node with two children
    hot = list(range(300, 308))
    insert(sim, hot)
    insert(sim, hot)  # same sequence twice: one leaf, hit_count 2
    sim.cache.demote_idle(time.monotonic() + LATER)
    assert tiers_of(sim, shared + [1, 2, 3, 4, 5]) == [Tier.FP16] * 10 + [Tier.COLD] * 5
    assert tiers_of(sim, shared + [6, 7, 8, 9]) == [Tier.FP16] * 10 + [Tier.COLD] * 4
    assert tiers_of(sim, hot) == [Tier.FP16] * 8
    sim.check()


def test_idle_recent_tokens_keep_each_branch_tail_fp16() -> None:
    """The last N tokens of a branch's root path stay fp16, also when that tail spans two nodes."""
    sim = Sim(small_config(sink_tokens=2, idle_recent_tokens=6, shared_prefix_min_hits=0))
    long = list(range(400, 420))
    insert(sim, long)
    insert(sim, long[:16] + [7, 8, 9])  # splits `long` at 16: a shared parent and two leaves
    other = list(range(500, 512))
    insert(sim, other[:9])
    insert(sim, other)  # extends the same branch: nodes [0, 9) and [9, 12)
    sim.cache.demote_idle(time.monotonic() + LATER)
    # Shared parent stays fp16 whole; each 3-4 token leaf is inside its 6-token tail.
    assert tiers_of(sim, long) == [Tier.FP16] * 20
    assert tiers_of(sim, other) == [Tier.FP16] * 2 + [Tier.COLD] * 4 + [Tier.FP16] * 6
    sim.check()


def test_locked_nodes_are_never_demoted_or_evicted() -> None:
    sim = Sim(small_config(sink_tokens=0))
    req = sim.start(list(range(400, 430)))
    sim.checkpoint(req)  # cached in the tree, still locked by the running request
    before = sim.cache.path_device_indices(req.lock.node).clone()
    assert sim.cache.demote_idle(time.monotonic() + LATER) == 0
    res = sim.cache.evict(EvictParams(num_tokens=100))
    assert res.num_tokens_evicted == 0
    assert torch.equal(sim.cache.path_device_indices(req.lock.node), before)
    sim.check()


def fill_cache(sim: Sim, count: int, length: int = 12) -> list[list[int]]:
    seqs = [[1000 + 50 * i + j for j in range(length)] for i in range(count)]
    for s in seqs:
        insert(sim, s)
    return seqs


def occupy_fp16_but(sim: Sim, keep: int) -> None:
    """A running request holds every free fp16 slot but ``keep`` (locked, outside the tree: neither
    demoted nor evicted), so the rest of a test sees an fp16 room of exactly ``keep`` tokens."""
    n = sim.alloc.fp16_available() - keep
    assert 0 <= n < sim.rtp.max_context_len
    if n:
        assert sim.start(list(range(20_000, 20_000 + n))) is not None
    assert sim.alloc.fp16_available() == keep


def test_demote_before_evict() -> None:
    sim = Sim(small_config(sink_tokens=0, demote_chunk=1))
    occupy_fp16_but(sim, 60)
    seqs = fill_cache(sim, 5)  # 60 fp16 tokens: the arena has no fp16 room left
    assert sim.alloc.fp16_available() == 0
    res = sim.cache.evict(EvictParams(num_tokens=20))
    assert res.num_tokens_evicted == 20 and sim.alloc.fp16_available() == 20
    assert sim.cache.total_size() == 60  # nothing evicted: demoted instead
    assert sim.cache.tier_stats()["evicted_tokens"] == {}
    assert sim.cache.tier_stats()["demoted_tokens"]["evict"] == {"fp16->warm": 20}
    # Coldest first: the first-inserted sequence went to warm.
    assert set(tiers_of(sim, seqs[0])) == {Tier.WARM}
    assert set(tiers_of(sim, seqs[-1])) == {Tier.FP16}
    sim.check()


def test_pressure_demotes_shared_prefixes_instead_of_evicting() -> None:
    """An arena full of shared system prompts: pressure demotes them (unshared tails first),
    it never evicts while the warm tier has room (evicting packed leaves frees no fp16 slot)."""
    sim = Sim(small_config(sink_tokens=0, demote_chunk=1))
    occupy_fp16_but(sim, 60)
    groups = []
    for g in range(2):
        system = [3000 + 100 * g + j for j in range(24)]
        insert(sim, system + [1, 2, 3])
        insert(sim, system + [4, 5, 6])  # the system prompt becomes a shared node
        groups.append(system)
    assert sim.alloc.fp16_available() == 0
    res = sim.cache.evict(EvictParams(num_tokens=40))
    assert res.num_tokens_evicted == 40  # 40 fp16 rows freed by demotion...
    stats = sim.cache.tier_stats()
    assert stats["demoted_tokens"]["evict"] == {"fp16->warm": 40}
    # 12 unshared tail tokens went first, then the coldest shared prefix (the first group) whole.
    assert tiers_of(sim, groups[0] + [1, 2, 3]) == [Tier.WARM] * 27
    assert tiers_of(sim, groups[1] + [4, 5, 6]).count(Tier.FP16) == 20
    # ... but their INT4 records took the packed tiers' spare page, so the fp16 room gained is smaller;
    # the allocator measures it and asks again until 40 are free, still without evicting anything.
    assert sim.alloc.fp16_available() < 40
    assert sim.alloc.evict_to_free_tokens(sim.cache, 40) and sim.alloc.fp16_available() >= 40
    stats = sim.cache.tier_stats()
    assert stats["evicted_tokens"] == {} and sim.cache.total_size() == 60
    sim.check()


def test_warm_full_cascades_to_cold_then_evicts_lowest_tier() -> None:
    """Warm and cold may each own half the arena's pages (small_config): inserting until the first
    eviction fills fp16, then warm (demote-on-alloc), then cascades warm -> cold; only then evict."""
    sim = Sim(small_config(sink_tokens=0, demote_chunk=1))
    seqs: list[list[int]] = []
    while True:
        room = {t: sim.pool.available(t) for t in Tier}  # before the insert that first evicts
        seqs += fill_cache_from(sim, len(seqs))
        if sim.cache.tier_stats()["evicted_tokens"]:
            break
        assert len(seqs) < 1000
    stats = sim.cache.tier_stats()
    assert stats["demoted_tokens"]["evict"].get("warm->cold", 0) > 0, "warm tier never cascaded to cold"
    assert room[Tier.FP16] < 12 and room[Tier.WARM] < 12 and room[Tier.COLD] < 12, \
        f"evicted while demotion still had room: {room}"
    table = sim.pool.page_table
    assert table.owned[Tier.WARM] == table.max_pages[Tier.WARM]  # warm grew to its cap
    assert table.owned[Tier.COLD] >= 1 and table.free_pages() <= table.reserve_pages
    # The victims are the cold (oldest) leaves.
    evicted = stats["evicted_tokens"]
    assert evicted.get("cold", 0) > 0 and evicted.get("fp16", 0) == 0
    sim.check()


def fill_cache_from(sim: Sim, i: int) -> list[list[int]]:
    s = [5000 + 50 * i + j for j in range(12)]
    insert(sim, s)
    return [s]


def test_eviction_off_never_drops_cached_tokens() -> None:
    sim = Sim(small_config(sink_tokens=0, demote_chunk=1, eviction=False,
                           tier_max_share={"warm": 1.0, "cold": 0.0}), size=35)  # 3 pages, no cold tier
    for i in range(60):
        req = sim.start([7000 + 50 * i + j for j in range(12)])
        if req is None:
            break
        sim.release(req, cache_it=True)
    else:
        raise AssertionError("the arena never filled up")
    assert sim.pool.available(Tier.WARM) < 12  # ran out of room
    before = sim.cache.total_size()
    res = sim.cache.evict(EvictParams(num_tokens=50))
    assert res.num_tokens_evicted < 50 and sim.cache.total_size() == before
    assert sim.cache.tier_stats()["evicted_tokens"] == {}
    sim.check()


def test_demote_running_rewrites_row_and_exclusive_nodes_only() -> None:
    cfg = small_config(sink_tokens=2, recent_window=4, demote_chunk=4)
    sim = Sim(cfg)
    prompt = list(range(600, 620))
    a = sim.start(prompt + [1, 2, 3])
    sim.checkpoint(a)
    b = sim.start(prompt + [7, 8, 9, 10, 11])  # shares the 20-token prompt with a
    sim.checkpoint(b)
    sim.decode(b, [12, 13, 14, 15, 16, 17, 18, 19])
    shared_node = b.lock.node.parent
    assert shared_node.lock_ref == 2
    shared_before = shared_node.value.clone()
    # By default only generated tokens move: b's tail [25, 29) (its prompt is left to the radix policy).
    assert sim.cache.demote_running([a, b], sim.rtp) == 4
    # Under fp16 pressure prompt tokens go too. a: nothing past the shared prompt and outside the
    # sinks / recent window (3 < chunk). b: its exclusive prompt node [20, 25); the recent 4 stay.
    assert sim.cache.demote_running([a, b], sim.rtp, include_prompt=True) == 5
    assert torch.equal(shared_node.value, shared_before)
    row = sim.rtp.req_to_token[b.kv.req_pool_idx, :b.kv.kv_committed_len].to(torch.int64)
    tiers = sim.pool.tier_of(row).tolist()
    assert tiers == [Tier.FP16] * 20 + [Tier.WARM] * 9 + [Tier.FP16] * 4
    assert torch.equal(b.lock.node.value, row[20:25])
    assert sim.cache.tier_stats()["demoted_tokens"]["running"] == {"fp16->warm": 9}
    sim.check()
    # After b finishes, its (already warm) tail is cached as is: no second quantization.
    sim.release(b, cache_it=True)
    assert sim.cache.tier_stats()["pool"]["demoted_tokens"]["fp16->int4"] == 9
    sim.check()


def test_evict_result_and_size_bookkeeping() -> None:
    sim = Sim(small_config(sink_tokens=0, eviction=True, tier_max_share={"warm": 1.0, "cold": 0.0}), size=35)
    fresh = sim.alloc.fp16_available()
    fill_cache(sim, 3, length=10)
    held = sim.cache.total_size()
    fp16_held = sim.cache.tier_token_counts()["fp16"]
    assert sim.cache.evictable_size() == held and sim.cache.protected_size() == 0
    res = sim.cache.evict(EvictParams(num_tokens=10_000))  # more than exists: demote all, then evict all
    assert sim.cache.total_size() == 0 and sim.cache.evictable_size() == 0
    assert res.num_tokens_evicted == fp16_held  # fp16 slots handed back, however they were freed
    assert sim.alloc.fp16_available() == fresh  # every page back on the free list
    assert sim.pool.page_table.free_pages() == sim.pool.pages - 1  # all but page 0 (the padding slot)
    sim.check()


def test_pressure_index_refiles_a_prefix_that_stops_being_shared() -> None:
    """Pressure demotion pops a heap keyed by (shared, priority): when evicting a branch makes its parent
    an unshared node, the parent's key falls and it must be filed again (ahead of the shared ones)."""
    sim = Sim(small_config(sink_tokens=0, shared_prefix_min_hits=0, demote_chunk=4))
    shared = list(range(200, 210))
    insert(sim, shared + [1, 2, 3])
    insert(sim, shared + [4, 5, 6])
    insert(sim, list(range(300, 306)))
    sim.cache.evict(EvictParams(num_tokens=1))  # builds the heap; moves [1, 2, 3] and one of [4, 5, 6]
    assert tiers_of(sim, shared + [1, 2, 3])[-3:] == [Tier.WARM] * 3
    got_fp16, got_total = sim.cache._evict_leaves(3, lower_helps=True)  # the all-warm leaf goes first
    assert (got_fp16, got_total) == (0, 3)
    assert sim.cache.check_bookkeeping() == []  # the prefix is unshared now and filed under that key
    sim.cache.evict(EvictParams(num_tokens=8))  # verify_decisions: the same picks as the sorted walk
    assert sim.cache.check_bookkeeping() == []
    sim.check()


def test_pressure_scan_survives_a_heap_rebuild_mid_scan(monkeypatch: pytest.MonkeyPatch) -> None:
    """A node accessed since it was filed is re-filed when it surfaces; if that rebuilds the heaps in the
    middle of a scan, nodes the scan already took must not come out twice."""
    from fade_sglang.radix.policy import TreeBook

    monkeypatch.setattr(TreeBook, "P_SLACK", -10**9)  # rebuild on every filing
    sim = Sim(small_config(sink_tokens=0, shared_prefix_min_hits=0, demote_chunk=1))
    a, b, c = (list(range(k, k + 6)) for k in (100, 200, 300))
    for toks in (a, b, c):
        insert(sim, toks)
    sim.cache.evict(EvictParams(num_tokens=1))  # builds the heaps (one token of a, the coldest, moves)
    sim.cache.match_prefix(MatchPrefixParams(key=RadixKey(array("q", b))))  # b's filed key is stale now
    sim.cache.evict(EvictParams(num_tokens=12))  # a, then b surfaces stale (rebuild), then c, b
    assert [tiers_of(sim, t).count(Tier.FP16) for t in (a, b, c)] == [0, 5, 0]
    assert sim.cache.check_bookkeeping() == []
    sim.check()
