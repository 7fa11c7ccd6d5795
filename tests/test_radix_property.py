"""Seeded random-operation tests of TieredRadixCache: slot ownership, locks, matching and KV fidelity.

A small scheduler simulation drives the cache the way SGLang 0.5.23 does
(match -> lock -> row alloc with evict-on-shortfall -> decode -> checkpoint ->
release) interleaved with demote_idle / evict / demote_running, and checks the
invariants after every operation. KV content is a deterministic function of
the token prefix, so any slot can be checked against what was written.
"""

from __future__ import annotations

import random
import time
from array import array
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from sglang.srt.mem_cache.base_prefix_cache import EvictParams, MatchPrefixParams
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.memory_pool import ReqToTokenPool
from sglang.srt.mem_cache.radix_cache import RadixKey

from fade_sglang.config import FadeConfig
from fade_sglang.pool import Tier
from fade_sglang.patches.pool import TieredKVPool
from fade_sglang.patches.allocator import FadeTokenAllocator
from fade_sglang.patches.radix_cache import TieredRadixCache
from fade_sglang.eval.synthetic import synthetic_kv
from pool_checks import check_pool_accounting

HEADS, DIM, LAYERS = 2, 64, 2
TABLE = 1024  # distinct synthetic KV rows; a token's KV row is picked by a hash of its prefix
TOL = {Tier.FP16: 0.0, Tier.WARM: 0.15, Tier.COLD: 0.6}  # max per-token relative error per tier


def small_config(**kw: Any) -> FadeConfig:
    base = dict(preset="custom", sink_tokens=4, recent_window=8, demote_chunk=4, shared_prefix_min_hits=2,
                warm_idle_seconds=1.0, cold_idle_seconds=10.0,
                tier_max_share={"warm": 0.5, "cold": 0.5})  # capped: a full packed tier is reachable
    base.update(kw)
    return FadeConfig(**base)


@dataclass
class SimReq:
    """The slice of SGLang's Req that the tree cache reads (checkpoint, demote_running)."""
    tokens: list[int]
    origin_len: int
    kv: SimpleNamespace
    lock: Any = None
    last_node: Any = None
    prefix_len: int = 0
    extra_key: Any = None
    cache_salt: Any = None
    priority: Any = None
    hashes: list[int] = field(default_factory=list)

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if name == "origin_len":  # a plain list attribute, as on SGLang's Req (tokens only ever grow)
            super().__setattr__("origin_input_ids", self.tokens[:value])

    @property
    def full_untruncated_fill_ids(self) -> array:
        return array("q", self.tokens)

    def finished(self) -> bool:  # read by the scheduler hook's live-request filter
        return False


def prefix_hashes(tokens: list[int], start: int = 0, h: int = 0) -> list[int]:
    out = []
    for t in tokens[start:]:
        h = (h * 1_000_003 + t + 1) % (1 << 61)
        out.append(h)
    return out


class Sim:
    """``size``: the pool's fp16 tokens (the arena's bytes; packed tiers take pages of it as tokens age).
    ``verify``: every demotion decision is also taken by the walk-based reference and compared."""

    def __init__(self, cfg: FadeConfig, size: int = 100, rows: int = 8, ctx: int = 160,
                 geometry: tuple[int, int, int] = (HEADS, DIM, LAYERS), dtype: torch.dtype = torch.float32,
                 verify: bool = True):
        self.cfg = cfg
        self.heads, self.dim, self.layers = geometry
        self.pool = TieredKVPool(size=size, page_size=1, dtype=dtype, head_num=self.heads, head_dim=self.dim,
                                 layer_num=self.layers, device="cpu", enable_memory_saver=False, fade_config=cfg)
        self.alloc = FadeTokenAllocator(self.pool, self.pool.dtype, self.pool.device)
        self.rtp = ReqToTokenPool(rows, ctx, "cpu", False)
        self.cache = TieredRadixCache(CacheInitParams(disable=False, req_to_token_pool=self.rtp,
                                                      token_to_kv_pool_allocator=self.alloc, page_size=1), cfg)
        self.cache.verify_decisions = verify
        self.table = [synthetic_kv(TABLE, self.heads, self.dim, seed=11 + l) for l in range(self.layers)]
        self.running: list[SimReq] = []

    # ------------------------------------------------------------------ KV content
    def ref_kv(self, hashes: list[int], layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.tensor([h % TABLE for h in hashes], dtype=torch.int64)
        k, v = self.table[layer]
        return k[idx], v[idx]

    def write_kv(self, slots: torch.Tensor, hashes: list[int]) -> None:
        for l in range(self.layers):
            k, v = self.ref_kv(hashes, l)
            self.pool.set_kv_buffer(None, slots, k, v, layer_id_override=l)

    def alloc_fp16(self, n: int) -> torch.Tensor | None:
        """SGLang's evict_to_free_tokens then alloc."""
        short = n - self.alloc.fp16_available()
        if short > 0:
            self.cache.evict(EvictParams(num_tokens=short))
        return self.alloc.alloc(n)

    # ------------------------------------------------------------------ request lifecycle
    def start(self, tokens: list[int]) -> SimReq | None:
        if not self.rtp.free_slots or len(tokens) >= self.rtp.max_context_len:
            return None
        # SGLang always recomputes at least the last prompt token.
        res = self.cache.match_prefix(MatchPrefixParams(key=RadixKey(array("q", tokens[:-1]))))
        req = SimReq(tokens, len(tokens), SimpleNamespace(req_pool_idx=None, cache_protected_len=0,
                                                         cache_inserted_len=0, kv_committed_len=0,
                                                         kv_allocated_len=0, swa_evict_floor=0))
        req.prefix_len, req.last_node = res.device_prefix_len, res.last_device_node
        req.lock = self.cache.lock(req.last_node)  # admission locks before allocating
        new = self.alloc_fp16(len(tokens) - req.prefix_len)
        if new is None:
            self.cache.unlock(req.lock)
            return None
        req.kv.req_pool_idx = self.rtp.free_slots.pop(0)
        prefix = self.cache.path_device_indices(req.last_node)[:req.prefix_len]
        self.rtp.write((req.kv.req_pool_idx, slice(0, len(tokens))), torch.cat((prefix, new)).to(torch.int32))
        req.hashes = prefix_hashes(tokens)
        self.write_kv(new, req.hashes[req.prefix_len:])
        req.kv.cache_protected_len = req.prefix_len
        req.kv.kv_committed_len = req.kv.kv_allocated_len = len(tokens)
        self.running.append(req)
        return req

    def decode(self, req: SimReq, new_tokens: list[int]) -> bool:
        n0 = len(req.tokens)
        if n0 + len(new_tokens) >= self.rtp.max_context_len:
            return False
        slots = self.alloc_fp16(len(new_tokens))
        if slots is None:
            return False
        req.tokens = req.tokens + new_tokens
        req.hashes = req.hashes + prefix_hashes(req.tokens, n0, req.hashes[-1] if req.hashes else 0)
        self.rtp.write((req.kv.req_pool_idx, slice(n0, len(req.tokens))), slots.to(torch.int32))
        self.write_kv(slots, req.hashes[n0:])
        req.kv.kv_committed_len = req.kv.kv_allocated_len = len(req.tokens)
        return True

    def checkpoint(self, req: SimReq) -> None:
        self.cache.checkpoint(req, up_to=req.kv.kv_committed_len)
        req.last_node = req.lock.node

    def release(self, req: SimReq, cache_it: bool) -> None:
        """SGLang's release_kv_cache: optionally checkpoint, free the request-owned tail, unlock, free the row."""
        if cache_it:
            self.checkpoint(req)
        row = self.rtp.req_to_token[req.kv.req_pool_idx]
        self.alloc.free(row[req.kv.cache_protected_len:req.kv.kv_allocated_len].to(torch.int64))
        self.cache.unlock(req.lock)
        self.rtp.free_slots.append(req.kv.req_pool_idx)
        self.running.remove(req)

    # ------------------------------------------------------------------ tree helpers
    def tree_nodes(self) -> list[tuple[Any, list[int]]]:
        """(node, root-path tokens through this node) for every node."""
        out, stack = [], [(c, []) for c in self.cache.root_node.children.values()]
        while stack:
            node, prefix = stack.pop()
            toks = prefix + list(node.key.token_ids)
            out.append((node, toks))
            stack.extend((c, toks) for c in node.children.values())
        return out

    def expected_match(self, query: list[int]) -> int:
        best = 0
        for _, toks in self.tree_nodes():
            n = 0
            while n < min(len(toks), len(query)) and toks[n] == query[n]:
                n += 1
            best = max(best, n)
        return best

    def locked_snapshot(self, min_lock: int = 1) -> dict[int, tuple[Any, torch.Tensor]]:
        return {id(n): (n, n.value.clone()) for n, _ in self.tree_nodes() if n.lock_ref >= min_lock}

    def assert_unchanged(self, snap: dict[int, tuple[Any, torch.Tensor]]) -> None:
        live = {id(n) for n, _ in self.tree_nodes()}
        for key, (node, value) in snap.items():
            assert key in live, "a locked node was evicted"
            # A split (by match) would shorten a value; these ops never split, so values must be identical.
            assert torch.equal(node.value, value), "a locked node was demoted"

    # ------------------------------------------------------------------ invariants
    def check(self, values: bool = True) -> None:
        cache, pool = self.cache, self.pool
        nodes = self.tree_nodes()
        tree_slots, slot_hashes, sink_slots = [], [], []
        evictable = protected = 0
        for node, toks in nodes:
            assert node.value.dtype == torch.int64 and len(node.value) == len(node.key)
            tree_slots.append(node.value)
            hashes = prefix_hashes(toks)[len(toks) - len(node.value):]
            slot_hashes.extend(hashes)
            start = len(toks) - len(node.value)
            sink_slots.append(node.value[:max(0, self.cfg.sink_tokens - start)])
            if node.lock_ref > 0:
                protected += len(node.value)
            else:
                evictable += len(node.value)
        assert (evictable, protected) == (cache.evictable_size(), cache.protected_size())
        owned, row_slots = [], []
        for req in self.running:
            row = self.rtp.req_to_token[req.kv.req_pool_idx, :req.kv.kv_allocated_len].to(torch.int64)
            cpl = req.kv.cache_protected_len
            path = cache.path_device_indices(req.lock.node)
            assert torch.equal(row[:cpl], path[:cpl]), "row prefix disagrees with the tree path"
            path_tokens = [t for n, toks in nodes if n is req.lock.node for t in toks]
            assert path_tokens[:cpl] == req.tokens[:cpl]
            owned.append(row[cpl:])
            row_slots.append(row)
            slot_hashes.extend(req.hashes[:req.kv.kv_committed_len])
            sink_slots.append(row[:self.cfg.sink_tokens])
        held = torch.cat(tree_slots + owned) if tree_slots or owned else torch.empty(0, dtype=torch.int64)
        assert torch.unique(held).numel() == held.numel(), "a slot is owned twice"
        check_pool_accounting(pool, held)  # per-tier counts, ownership, pages and caps
        if sink_slots:
            assert bool((pool.tier_of(torch.cat(sink_slots)) == Tier.FP16).all()), "a sink token left fp16"
        if values:
            self.check_values(torch.cat(tree_slots + row_slots) if tree_slots or row_slots else held, slot_hashes)

    def check_values(self, slots: torch.Tensor, hashes: list[int]) -> None:
        if not hashes:
            return
        tiers = self.pool.tier_of(slots)
        for l in range(self.layers):
            k, v = self.pool.read_kv(l, slots)
            rk, rv = self.ref_kv(hashes, l)
            for got, ref in ((k, rk), (v, rv)):
                err = (got - ref).flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1)
                for t in Tier:
                    sel = tiers == t
                    if bool(sel.any()):
                        worst = float(err[sel].max())
                        assert worst <= TOL[t], f"{t.name} relative error {worst:.3f} > {TOL[t]}"


# ---------------------------------------------------------------------- random driver
BASES = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [1, 2, 3, 4, 5, 20, 21, 22], [30, 31, 32, 33, 34, 35, 36, 37, 38, 39]]


def random_tokens(rng: random.Random) -> list[int]:
    base = list(rng.choice(BASES))[:rng.randint(2, 12)] if rng.random() < 0.8 else []
    return base + [rng.randrange(40, 60) for _ in range(rng.randint(1 if not base else 0, 14))]


def run_ops(sim: Sim, seed: int, steps: int) -> None:
    rng = random.Random(seed)
    clock = time.monotonic()
    for step in range(steps):
        op = rng.random()
        live = sim.running
        if op < 0.22 or not live:
            sim.start(random_tokens(rng))
        elif op < 0.40:
            sim.decode(rng.choice(live), [rng.randrange(40, 60) for _ in range(rng.randint(1, 6))])
        elif op < 0.47:
            sim.checkpoint(rng.choice(live))
        elif op < 0.58:
            sim.release(rng.choice(live), cache_it=rng.random() < 0.85)
        elif op < 0.68:
            snap = sim.locked_snapshot()
            clock += rng.choice([0.0, 2.0, 20.0])
            sim.cache.demote_idle(now=clock + rng.choice([0.0, 2.0, 20.0]))
            sim.assert_unchanged(snap)
        elif op < 0.78:
            snap = sim.locked_snapshot()
            sim.cache.evict(EvictParams(num_tokens=rng.randint(1, 40)))
            sim.assert_unchanged(snap)
        elif op < 0.88:
            snap = sim.locked_snapshot(min_lock=2)
            sim.cache.demote_running(list(live), sim.rtp)
            sim.assert_unchanged(snap)
        else:
            src = rng.choice(live).tokens if rng.random() < 0.5 else random_tokens(rng)
            query = src[:rng.randint(1, len(src))] + [rng.randrange(40, 60)] * rng.randint(0, 2)
            want = sim.expected_match(query)
            res = sim.cache.match_prefix(MatchPrefixParams(key=RadixKey(array("q", query))))
            assert res.device_prefix_len == want
            assert len(sim.cache.path_device_indices(res.last_device_node)) == want
        sim.check(values=step % 10 == 9)  # KV read-back is the slow part: every 10th step
        # The incremental bookkeeping (per-node tiers, totals, idle index) equals a full recount.
        assert sim.cache.check_bookkeeping() == [], f"step {step}"
    sim.check()
    # Running requests' cached prefixes are still matched in full (locked KV is never evicted).
    for req in sim.running:
        res = sim.cache.match_prefix(MatchPrefixParams(key=RadixKey(array("q", req.tokens))))
        assert res.device_prefix_len >= req.kv.cache_protected_len


@pytest.mark.parametrize("seed,overrides,size", [
    (0, {}, 100),
    (1, {"tier_max_share": {"warm": 1.0, "cold": 1.0}}, 64),  # small arena, uncapped tiers: eviction under pressure
    (2, {"eviction": False}, 76),
    (3, {"tier_max_share": {"warm": 1.0, "cold": 0.0}}, 76),  # no cold tier
    (4, {"shared_prefix_min_hits": 0, "sink_tokens": 0, "recent_window": 2, "demote_chunk": 1}, 76),
])
def test_random_operations_keep_invariants(seed: int, overrides: dict, size: int) -> None:
    sim = Sim(small_config(**overrides), size=size)
    run_ops(sim, seed, steps=100)
    stats = sim.cache.tier_stats()
    assert sum(stats["tree_tokens"].values()) == sim.cache.total_size()
    # Every demotion path got exercised somewhere in the run.
    assert stats["demoted_tokens"], stats


@pytest.mark.parametrize("seed,overrides,size,policy", [
    (5, {"idle_recent_tokens": 3}, 76, "lru"),  # recent tails: the idle index follows leaf ends
    (6, {"tier_max_share": {"warm": 0.0, "cold": 1.0}}, 76, "lru"),  # no warm tier
    (7, {"shared_prefix_min_hits": 0}, 64, "mru"),  # priorities that fall over time; small arena
    (8, {"demote_chunk": 1, "recent_window": 2}, 76, "lfu"),
])
def test_incremental_bookkeeping_matches_a_full_recount(seed: int, overrides: dict, size: int, policy: str) -> None:
    """After every random operation the cached tier counts, fp16 totals and idle index equal a full walk,
    and every demotion picks what the walk-based reference picks (``verify_decisions``)."""
    from sglang.srt.mem_cache.utils import get_eviction_strategy

    sim = Sim(small_config(**overrides), size=size)
    sim.cache.eviction_strategy = get_eviction_strategy(policy)
    run_ops(sim, seed, steps=120)
    assert sim.cache.tier_stats()["demoted_tokens"]


def test_pressure_heaps_rebuilt_mid_scan_keep_the_same_picks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pressure heaps rebuilt on every filing, so also in the middle of a scan (a node accessed since it was
    filed is re-filed when it surfaces): the picks must still be the walk-based reference's
    (``verify_decisions``) and the index complete."""
    from fade_sglang.radix.policy import TreeBook

    monkeypatch.setattr(TreeBook, "P_SLACK", -10**9)
    sim = Sim(small_config(), size=64)  # small arena: pressure demotion on most allocations
    run_ops(sim, 11, steps=100)
    assert sim.cache.demoted[("evict", "fp16->warm")] > 0


def test_running_demotion_skips_only_requests_a_full_plan_would_skip(monkeypatch: pytest.MonkeyPatch) -> None:
    """Decode-heavy random run: every running request decodes every step and ``demote_running`` runs every
    step, so the per-request memo (host-only skip) is used most of the time. With ``verify_decisions`` each
    skip is checked against a full plan; interleaved checkpoints, releases, evictions and idle passes
    change rows, locks and the tree under it."""
    from fade_sglang.patches.running_demotion import RunningDemoter

    calls = {"skipped": 0, "planned": 0}
    full_plan = RunningDemoter._full_plan

    def counting(self: Any, *args: Any) -> Any:
        calls["skipped" if args[-1] is None else "planned"] += 1  # memo_attr None: verifying a memo skip
        return full_plan(self, *args)

    monkeypatch.setattr(RunningDemoter, "_full_plan", counting)
    sim = Sim(small_config(recent_window=6, demote_chunk=8), size=176, rows=8, ctx=200)
    rng = random.Random(9)
    clock = time.monotonic()
    for step in range(160):
        if len(sim.running) < 5 or rng.random() < 0.1:
            sim.start(random_tokens(rng))
        for req in list(sim.running):
            if not sim.decode(req, [rng.randrange(40, 60)]):
                sim.release(req, cache_it=True)
        op = rng.random()
        if op < 0.05 and sim.running:
            sim.checkpoint(rng.choice(sim.running))
        elif op < 0.12 and sim.running:
            sim.release(rng.choice(sim.running), cache_it=rng.random() < 0.8)
        elif op < 0.18:
            sim.cache.evict(EvictParams(num_tokens=rng.randint(1, 30)))
        elif op < 0.24:
            clock += 20.0
            sim.cache.demote_idle(now=clock)
        snap = sim.locked_snapshot(min_lock=2)
        sim.cache.demote_running(list(sim.running), sim.rtp)
        sim.assert_unchanged(snap)
        sim.check(values=step % 20 == 19)
        assert sim.cache.check_bookkeeping() == [], f"step {step}"
    assert calls["skipped"] > 3 * calls["planned"] > 0, calls  # the memo did most of the work
    assert sim.cache.demoted[("running", "fp16->warm")] > 0
