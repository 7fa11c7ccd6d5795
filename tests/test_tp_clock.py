"""Tensor parallelism: two ranks fed the same requests take the same demotion decisions (replay test).

Under ``--tp 2`` every rank keeps its own radix tree and tiered pool and must rewrite the same slots at the
same step; a rank that demotes a different node corrupts the KV. Idle demotion compares "now" with the
tree's access stamps, and each rank's wall clock differs (skew, and the jitter of when a rank reaches a
step). Here two simulated ranks, each with its own skewed, jittering clock, replay one event sequence
step by step: with the shared step clock (rank 0's reading, as ``patches.step_clock.tp_share`` broadcasts
it) their trees, slot tables and pools stay identical; each on its own clock, they diverge (the test can
fail, and the hazard is real).
"""

from __future__ import annotations

import random
from array import array
from typing import Any

import pytest
import sglang.srt.mem_cache.radix_cache as radix_module
from sglang.srt.mem_cache.base_prefix_cache import EvictParams, MatchPrefixParams
from sglang.srt.mem_cache.radix_cache import RadixKey

from fade_sglang.patches import step_clock
from fade_sglang.radix.clock import StepClock
from test_radix_property import Sim, random_tokens, small_config

STEPS = 160


class RankClock:
    """A rank's monotonic clock: the common simulated time, plus this rank's skew and per-reading jitter."""

    def __init__(self, world: dict[str, float], skew: float, seed: int):
        self.world, self.skew, self.rng = world, skew, random.Random(seed)

    def __call__(self) -> float:
        return self.world["t"] + self.skew + self.rng.uniform(0.0, 0.05)


def make_ranks(shared: bool) -> tuple[list[Sim], dict[str, float]]:
    world = {"t": 1000.0}
    common: dict[str, float] = {}

    def share_for(rank: int):
        def share(reading: float) -> float:  # what the TP broadcast does: every rank takes rank 0's reading
            if rank == 0:
                common["t"] = reading
            return common["t"]
        return share

    ranks = []
    for rank, skew in enumerate((0.0, 0.35)):
        sim = Sim(small_config(warm_idle_seconds=1.0, cold_idle_seconds=4.0), size=100)
        sim.cache.clock = StepClock(RankClock(world, skew, seed=rank), share_for(rank) if shared else None)
        ranks.append(sim)
    return ranks, world


def snapshot(sim: Sim) -> tuple[Any, ...]:
    """Everything two ranks must agree on: the tree (paths and slot values), the requests' rows, the pool."""
    nodes = sorted((tuple(toks), tuple(n.value.tolist())) for n, toks in sim.tree_nodes())
    rows = [tuple(sim.rtp.req_to_token[r.kv.req_pool_idx, :r.kv.kv_allocated_len].tolist()) for r in sim.running]
    return tuple(nodes), tuple(rows), tuple(sim.pool.used(t) for t in range(3))


def _touch(sim: Sim, rng: random.Random) -> None:
    sim.cache.match_prefix(MatchPrefixParams(key=RadixKey(array("q", random_tokens(rng)))))  # stamps a path


# One scheduler step's request traffic: (weight, action); the between-step hooks follow it (see ``step``).
TRAFFIC = (
    (6, lambda sim, rng: sim.start(random_tokens(rng))),
    (5, lambda sim, rng: sim.decode(rng.choice(sim.running), [rng.randrange(40, 60) for _ in range(rng.randint(1, 4))])),
    (3, lambda sim, rng: sim.release(rng.choice(sim.running), cache_it=True)),
    (2, _touch),
    (1, lambda sim, rng: sim.cache.evict(EvictParams(num_tokens=rng.randint(1, 20)))),
    (3, lambda sim, rng: None),  # a step without new traffic
)


def step(sim: Sim, rng: random.Random) -> None:
    """One scheduler step on one rank: requests arrive / decode / finish, then the between-step hooks."""
    weights, actions = zip(*TRAFFIC)
    action = rng.choices(actions, weights)[0] if sim.running else TRAFFIC[0][1]
    action(sim, rng)
    sim.cache.demote_idle()  # "now" is the rank's step clock
    if sim.running and rng.random() < 0.3:
        sim.cache.demote_running(list(sim.running), sim.rtp)


@pytest.fixture(autouse=True)
def _restore_radix_time():
    """install() swaps SGLang's module-level ``time``: give the next test the real one back."""
    saved = radix_module.time
    yield
    radix_module.time = saved


def replay(shared: bool, seed: int = 0) -> int | None:
    """Run both ranks step by step; the first step after which they disagree, or None."""
    ranks, world = make_ranks(shared)
    rngs = [random.Random(seed) for _ in ranks]  # the same requests reach every rank (SGLang broadcasts them)
    advance = random.Random(seed + 1)
    for i in range(STEPS):
        world["t"] += advance.choice([0.05, 0.3, 0.6, 1.0, 2.5])
        for sim, rng in zip(ranks, rngs):
            step_clock.install(sim.cache.clock)  # one process plays both ranks: SGLang stamps with this rank's clock
            sim.cache.clock.tick()
            step(sim, rng)
        if snapshot(ranks[0]) != snapshot(ranks[1]):
            return i
    for sim in ranks:
        sim.check()
    assert sum(ranks[0].cache.demoted.values()) > 0, "the replay never demoted anything: it would prove nothing"
    return None


def test_ranks_on_the_shared_step_clock_stay_identical() -> None:
    for seed in range(3):
        assert replay(shared=True, seed=seed) is None, f"seed {seed}: ranks diverged with the shared clock"


def test_ranks_on_their_own_clocks_diverge() -> None:
    """The hazard the shared clock removes (and proof the comparison above can fail)."""
    assert any(replay(shared=False, seed=seed) is not None for seed in range(3))


def test_step_clock_holds_the_tick_and_never_goes_back() -> None:
    readings = iter([5.0, 7.0, 6.0])
    clock = StepClock(lambda: next(readings))
    assert clock.now() == 5.0 and not clock.ticking  # free-running before the first tick
    assert clock.tick() == 7.0 and clock.now() == 7.0 and clock.now() == 7.0
    assert clock.tick() == 7.0  # a lower reading (another rank's, or a skewed one) does not go back
    shared = StepClock(lambda: 1.0, share=lambda reading: reading + 100.0)
    assert shared.tick() == 101.0


def test_radix_stamps_read_the_installed_clock() -> None:
    clock = StepClock(lambda: 42.0)
    clock.tick()
    step_clock.install(clock)
    node = radix_module.TreeNode()
    assert node.last_access_time == 42.0 and radix_module.time.perf_counter() > 0  # the rest is real time


def test_step_ticks_once_before_ingest_so_new_stamps_read_this_step() -> None:
    """Under TP the clock ticks before ``ingest_requests`` (where SGLang matches and stamps new requests'
    prefixes) and between_steps reads that tick; a loop that skips the ingest hook still ticks once per step.
    One rank never ticks (real time)."""
    from types import SimpleNamespace

    from fade_sglang.patches.scheduler_hooks import FadeSchedulerState, step_now, tick_before_ingest

    t = {"now": 10.0}
    ticks: list[float] = []

    def share(reading: float) -> float:  # the collective: count it
        ticks.append(reading)
        return reading

    clock = StepClock(lambda: t["now"], share)
    state = FadeSchedulerState(cfg=None, reporter=None)
    scheduler = SimpleNamespace(_fade_state=state, tree_cache=SimpleNamespace(clock=clock))
    step_clock.install(clock)
    tick_before_ingest(scheduler)
    t["now"] = 11.0  # the step goes on: matching a new request's prefix stamps it
    stamp = radix_module.TreeNode().last_access_time
    assert stamp == 10.0 and step_now(state, clock) == 10.0 and len(ticks) == 1
    t["now"] = 12.0  # a step whose loop did not call the ingest hook ticks in between_steps
    assert step_now(state, clock) == 12.0 and len(ticks) == 2
    single = StepClock(lambda: t["now"])
    tick_before_ingest(SimpleNamespace(_fade_state=state, tree_cache=SimpleNamespace(clock=single)))
    t["now"] = 13.0
    assert not single.ticking and step_now(state, single) == 13.0
    tick_before_ingest(SimpleNamespace(tree_cache=None))  # not a fade scheduler: nothing
