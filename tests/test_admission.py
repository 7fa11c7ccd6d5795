"""Prefill admission under a full fp16 tier (FadePrefillBudget): wait for running requests
rather than evict packed branches for the few fp16 sink slots they pin."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from fade_sglang.patches.allocator import FadePrefillBudget
from fade_sglang.patches.scheduler_hooks import FadeSchedulerState, between_steps
from fade_sglang.pool import Tier
from fade_sglang.radix.clock import StepClock
from test_radix_policy import LATER, insert, tiers_of
from test_radix_property import Sim, small_config

SINKS = 4


@pytest.fixture
def full_fp16() -> tuple[Sim, list[int], list[int]]:
    """Arena nearly full: an aged branch A (4 fp16 sinks + 16 packed), a fresh unlocked branch C
    (4 sinks + 6 demotable fp16 tokens), a running request B (locked fp16 tokens: all but 6 of the
    fp16 room left)."""
    sim = Sim(small_config(sink_tokens=SINKS, demote_chunk=1))
    branch_a = list(range(100, 120))
    insert(sim, branch_a)
    sim.cache.demote_idle(LATER)
    assert tiers_of(sim, branch_a).count(Tier.FP16) == SINKS
    branch_c = list(range(300, 310))
    insert(sim, branch_c)
    b_len = sim.alloc.fp16_available() - 6
    assert 40 <= b_len < sim.rtp.max_context_len
    assert sim.start(list(range(200, 200 + b_len))) is not None  # B keeps running: its tokens are locked
    assert sim.alloc.fp16_available() == 6
    assert sim.cache.fp16_demotable_size() == 10 - SINKS
    assert sim.cache.fp16_evictable_size() == 2 * SINKS + 10 - SINKS
    return sim, branch_a, branch_c


def budget(sim: Sim, running: int) -> FadePrefillBudget:
    sim.alloc.running_requests = running
    return sim.alloc.create_prefill_budget(sim.cache)


def check(b: FadePrefillBudget, extend: int) -> tuple[bool, int | None]:
    return b.check_prefill(extend_input_len=extend, total_tokens=extend + 8, max_new_tokens=8, input_tokens=extend,
                           swa_host_hit_length=0, chunk_limit=None)


def test_while_requests_run_sinks_are_not_fp16_room(full_fp16) -> None:
    sim, _, _ = full_fp16
    free, demotable = sim.alloc.fp16_available(), sim.cache.fp16_demotable_size()
    b = budget(sim, running=1)
    assert b.fp16_room() == free + demotable
    # A prompt larger than that is cut to what demotion can free (page_size 1 kept as slack).
    assert check(b, extend=free + demotable + 4) == (True, free + demotable - 1)
    assert not b.can_allocate_prefill(paged_input=free + demotable + 1, extend_input_len=free + demotable + 1,
                                      max_new_tokens=8, chunk_limit=None)


def test_with_nothing_running_every_unlocked_fp16_token_counts(full_fp16) -> None:
    sim, _, _ = full_fp16
    b = budget(sim, running=0)
    assert b.fp16_room() == sim.alloc.fp16_available() + sim.cache.fp16_evictable_size()
    b.reserve(2, 8)  # the first admission of a pass may evict; the next ones wait for it
    assert b.fp16_room() == sim.alloc.fp16_available() + sim.cache.fp16_demotable_size() - 3


def test_admitted_allocation_demotes_and_evicts_nothing(full_fp16) -> None:
    sim, branch_a, branch_c = full_fp16
    slots = sim.alloc_fp16(budget(sim, running=1).fp16_room())
    assert slots is not None
    assert sim.cache.tier_stats()["evicted_tokens"] == {}
    assert len(tiers_of(sim, branch_a)) == len(branch_a)  # the packed branch is still cached
    assert tiers_of(sim, branch_c) == [Tier.FP16] * SINKS + [Tier.WARM] * (len(branch_c) - SINKS)
    sim.alloc.free(slots)
    sim.check()


def test_the_old_all_fp16_estimate_evicts_a_packed_branch_for_its_sinks(full_fp16) -> None:
    """Why the sinks must not count while requests run: taking them drops whole packed branches."""
    sim, branch_a, _ = full_fp16
    slots = sim.alloc_fp16(budget(sim, running=0).fp16_room())
    assert slots is not None
    evicted = sim.cache.tier_stats()["evicted_tokens"]
    assert evicted.get("warm", 0) + evicted.get("cold", 0) >= len(branch_a) - SINKS
    assert tiers_of(sim, branch_a) == []
    sim.alloc.free(slots)
    sim.check()


def _req(finished: bool = False) -> SimpleNamespace:
    return SimpleNamespace(finished=lambda: finished, origin_input_ids=[1] * 8,
                           kv=SimpleNamespace(req_pool_idx=0, kv_committed_len=4))


def test_scheduler_hook_counts_live_requests_but_not_the_chunked_prefill() -> None:
    decoding, just_prefilled, done, chunked = _req(), _req(), _req(finished=True), _req()
    # Plenty of fp16 room and free pages: no pressure relief.
    pool = SimpleNamespace(available=lambda tier: 1 << 20, fade_config=small_config(),
                           page_table=SimpleNamespace(reserve_pages=1, free_pages=lambda: 100))
    alloc = SimpleNamespace(running_requests=-1, get_kvcache=lambda: pool)
    state = FadeSchedulerState(small_config(demote_running=False), SimpleNamespace(tick=lambda *a: None))
    tree = SimpleNamespace(demote_idle=lambda now: 0, clock=StepClock())
    scheduler = SimpleNamespace(_fade_state=state, tree_cache=tree, token_to_kv_pool_allocator=alloc,
                                chunked_req=chunked, chunked_prefill_size=None, waiting_queue=[])
    between_steps(scheduler, SimpleNamespace(reqs=[decoding, done]), SimpleNamespace(reqs=[just_prefilled, chunked]))
    assert alloc.running_requests == 2
    scheduler.chunked_req = None
    between_steps(scheduler, None, SimpleNamespace(reqs=[chunked]))
    assert alloc.running_requests == 1
