"""TieredRadixCache: SGLang's classic ``RadixCache`` whose cached KV ages from fp16 to INT4 to INT2.

The SGLang side of the radix policy: which tokens may move is decided by the SGLang-free
``fade_sglang.radix.policy``; this class applies it to SGLang's tree.

Tiers are encoded in the slot index (``TieredKVPool``), so demoting a node is
"quantize into a lower-tier slot, rewrite ``node.value``": splits, matching and
locking of the base tree keep working unchanged. Token counts
(``evictable_size`` / ``protected_size``) never change on demotion; they count
tree tokens of every tier, as the base class does.

All public policy methods run between scheduler steps (no forward in flight).

Bookkeeping scales with what changed, not with the tree: a host-side :class:`TreeBook` keeps each
node's tier counts (read back once per new or rewritten value, in one batch per pass), the tree
totals admission and stats read, the nodes pressure demotion may move, and an age index of the nodes
idle demotion may move. SGLang's tree changes reach it through the overridden ``_insert_helper``,
``_split_node``, ``_delete_leaf``, ``inc_lock_ref`` and ``dec_lock_ref``; fade's own demotions tell it
the new tiers. :meth:`check_bookkeeping` recounts everything from a full walk (tests, benchmarks), and
``verify_decisions`` makes every demotion also run the walk-based reference and compare the picks.
"""

from __future__ import annotations

import heapq
import logging
import time
from collections import Counter
from typing import Any, Callable, Iterable

import torch
from sglang.srt.mem_cache.base_prefix_cache import EvictParams, EvictResult
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.evict_policy import (FIFOStrategy, LFUStrategy, LRUStrategy, PriorityStrategy,
                                               SLRUStrategy)
from sglang.srt.mem_cache.radix_cache import RadixCache, TreeNode

from fade_sglang.config import FadeConfig
from fade_sglang.pool import Tier
from fade_sglang.radix.clock import StepClock
from fade_sglang.radix.policy import (NodeView, TreeBook, iter_candidates, movable_positions, tier_positions,
                                     walk_sorted, walk_tree)

from .pool import TieredKVPool
from .running_demotion import RunningDemoter

__all__ = ["TieredRadixCache"]

logger = logging.getLogger(__name__)

_TIER_KEYS = ("fp16", "warm", "cold")
# Eviction priorities that never decrease over a node's life (access time, hit count, creation time,
# request priority only grow): pressure demotion keeps a lazy heap for these, and sorts for the others.
_MONOTONE_PRIORITY = (LRUStrategy, LFUStrategy, FIFOStrategy, PriorityStrategy, SLRUStrategy)


Picks = list[tuple[TreeNode, list[int]]]  # nodes and the (host) positions of their value to demote


class TieredRadixCache(RadixCache):
    """``RadixCache`` (page size 1) over a :class:`TieredKVPool` with demote-before-evict policy."""

    # Tests: run the walk-based reference next to every demotion decision and assert the same picks.
    verify_decisions = False

    def __init__(self, params: CacheInitParams, fade_config: FadeConfig | None = None,
                 pool: TieredKVPool | None = None):
        if params.page_size != 1:
            raise ValueError(f"TieredRadixCache supports page_size 1 only (got {params.page_size})")
        if pool is None and params.token_to_kv_pool_allocator is not None:
            pool = params.token_to_kv_pool_allocator.get_kvcache()
        if not isinstance(pool, TieredKVPool):
            raise TypeError(f"TieredRadixCache needs a TieredKVPool, got {type(pool).__name__}")
        self.pool = pool
        self.fade_config = fade_config or pool.fade_config
        # What idle demotion calls "now"; the scheduler ticks it once per step (and shares it across TP ranks).
        self.clock = StepClock()
        self._reset_counters()  # before super().__init__, which calls reset()
        super().__init__(params)
        self._running = RunningDemoter(self)

    # ------------------------------------------------------------------ bookkeeping
    def _reset_counters(self) -> None:
        self.demoted = Counter()  # (reason, "src->dst") -> tokens
        self.evicted = Counter()  # tier name -> tokens
        cfg = self.fade_config
        self._book = TreeBook(self._host_tiers, cfg.sink_tokens, cfg.shared_prefix_min_hits, cfg.idle_recent_tokens,
                              cfg.warm_idle_seconds if self._tier_enabled(Tier.WARM) else None,
                              cfg.cold_idle_seconds if self._tier_enabled(Tier.COLD) else None)

    def reset(self) -> None:
        super().reset()
        self._reset_counters()

    def _tier_enabled(self, tier: Tier) -> bool:
        return self.pool.layout.capacity(tier) > 0

    def _host_tiers(self, values: list[torch.Tensor]) -> list[bytes]:
        """Tier bytes of each value, read back to the host in one copy."""
        flat = self.pool.tier_of(torch.cat(values)).to(torch.uint8).cpu().numpy().tobytes()
        out, off = [], 0
        for v in values:
            out.append(flat[off:off + len(v)])
            off += len(v)
        return out

    def _sync(self) -> TreeBook:
        """The book with every changed node read back (call before reading it)."""
        self._book.flush()
        return self._book

    def _node_value_changed(self, node: TreeNode) -> None:
        """``node.value`` was rewritten outside this class (running demotion): re-read its tiers lazily."""
        self._book.on_value(node, None)

    # SGLang's tree mutations, observed for the book (the base implementations stay authoritative).
    def _insert_helper(self, node: TreeNode, *args: Any, **kwargs: Any) -> Any:
        result = super()._insert_helper(node, *args, **kwargs)
        last = result[1]
        if last is not self.root_node and self._book.rec(last) is None:
            self._book.on_insert(last)
        return result

    def _split_node(self, key: Any, child: TreeNode, split_len: int) -> TreeNode:
        new_node = super()._split_node(key, child, split_len)
        self._book.on_split(new_node, child, split_len)
        return new_node

    def _delete_leaf(self, node: TreeNode) -> None:
        parent = node.parent
        super()._delete_leaf(node)
        self._book.on_delete(node, parent)

    def _path_at_lock(self, node: TreeNode, lock_ref: int) -> list[TreeNode]:
        out = []
        while node is not None and node is not self.root_node:
            if node.lock_ref == lock_ref:
                out.append(node)
            node = node.parent
        return out

    def inc_lock_ref(self, node: TreeNode) -> Any:
        turning = [] if self.disable else self._path_at_lock(node, 0)
        result = super().inc_lock_ref(node)
        self._book.on_lock(turning, locked=True)
        return result

    def dec_lock_ref(self, node: TreeNode, params: Any = None) -> Any:
        turning = [] if self.disable else self._path_at_lock(node, 1)
        result = super().dec_lock_ref(node, params)
        self._book.on_lock(turning, locked=False)
        return result

    # Walk-based reference (checks only).
    def _views(self) -> list[NodeView]:
        return walk_tree(self.root_node, self.fade_config.shared_prefix_min_hits)

    # ------------------------------------------------------------------ demotion core
    def _apply_demotion(self, picks: Picks, dst: Tier, reason: str) -> int:
        """Demote the picked positions of each node in one pool call and rewrite the nodes' values."""
        picks = [(n, p) for n, p in picks if p]
        if not picks:
            return 0
        book = self._book
        lengths = [len(n.value) for n, _ in picks]
        index, off = [], 0
        for (_, pos), length in zip(picks, lengths):
            index += [off + p for p in pos] if off else pos
            off += length
        flat = torch.cat([n.value for n, _ in picks])  # a fresh tensor: nobody else holds it
        index_t = torch.tensor(index, dtype=torch.int64, device=flat.device)
        slots = flat[index_t]
        flat[index_t] = self.pool.demote(slots, dst)
        moved = [0, 0, 0]
        for (node, pos), value in zip(picks, torch.split(flat, lengths)):
            node.value = value
            tiers = bytearray(book.rec(node).tiers)
            for p in pos:
                moved[tiers[p]] += 1
                tiers[p] = dst
            book.on_value(node, tiers)
        for src in (Tier.FP16, Tier.WARM):
            if moved[src] and src != dst:
                self.demoted[(reason, f"{_TIER_KEYS[src]}->{_TIER_KEYS[dst]}")] += moved[src]
        return slots.numel()

    def _pick(self, nodes: Iterable[TreeNode], srcs: tuple[int, ...], budget: int, recent: int = 0) -> Picks:
        """Greedily take movable positions of ``nodes`` (already ordered coldest first) up to ``budget``."""
        book = self._book

        def movable(node: TreeNode) -> tuple[TreeNode, list[int]]:
            keep, stop = book.movable_range(node, recent)
            return node, tier_positions(book.rec(node).tiers, keep, stop, srcs)

        return self._greedy(nodes, budget, movable)

    @staticmethod
    def _greedy(items: Iterable[Any], budget: int, movable: Callable[[Any], tuple[TreeNode, Any]]) -> list:
        """(node, positions) of ``items`` in order, positions cut so that they sum to at most ``budget``."""
        picks = []
        items = iter(items)
        while budget > 0:  # check first: an item pulled is an item popped (pressure heaps)
            item = next(items, None)
            if item is None:
                break
            node, pos = movable(item)
            pos = pos[:budget]
            if len(pos):
                picks.append((node, pos))
                budget -= len(pos)
        return picks

    def _pressure_order(self, srcs: tuple[int, ...]) -> list[TreeNode]:
        """Unlocked nodes holding ``srcs`` tokens past their sinks, in the order memory pressure demotes
        them: unshared nodes coldest first, then shared prefixes coldest first. Idle aging never moves a
        shared prefix, but under pressure demoting it beats evicting it (and beats evicting packed
        leaves, which frees no fp16 slot): a small fp16 tier cannot hold every shared system prompt.
        (A sort of those nodes; :meth:`_demote_coldest` pops the same order off a heap for the usual
        priorities.)"""
        book = self._sync()
        nodes = {n for t in srcs for n in book.movable[t] if n.lock_ref == 0}
        return walk_sorted(nodes, lambda n: (book.shared(n), self.eviction_strategy.get_priority(n)), book.walk_key)

    def _demote_coldest(self, srcs: tuple[int, ...], dst: Tier, want: int, reason: str) -> int:
        """Pressure demotion: up to ``want`` (at least ``demote_chunk``) movable tokens, in
        :meth:`_pressure_order`."""
        if want <= 0 or not self._tier_enabled(dst):
            return 0
        budget = min(max(want, self.fade_config.demote_chunk), self.pool.available(dst))
        if budget <= 0:
            return 0
        strategy = self.eviction_strategy
        scan = None
        if len(srcs) == 1 and type(strategy) in _MONOTONE_PRIORITY:
            scan = self._sync().pressure_scan(srcs[0], strategy, strategy.get_priority)
        try:
            picks = self._pick(scan if scan is not None else self._pressure_order(srcs), srcs, budget)
            if self.verify_decisions:
                views = [v for v in self._views() if v.node.lock_ref == 0]
                ref = sorted(views, key=lambda v: (v.shared, strategy.get_priority(v.node)))
                self._check_picks(picks, self._reference_pick(ref, srcs, budget), f"pressure {srcs}->{dst}")
            return self._apply_demotion(picks, dst, reason)
        finally:
            if scan is not None:
                scan.restore()  # nodes taken but not rewritten go back on the heap

    # Walk-based reference of the picks (verify_decisions).
    def _reference_pick(self, views: Iterable[NodeView], srcs: tuple[int, ...], budget: int,
                        recent: int = 0) -> list[tuple[TreeNode, torch.Tensor]]:
        sink = self.fade_config.sink_tokens
        return self._greedy(views, budget, lambda v: (
            v.node, movable_positions(v, self.pool.tier_of(v.node.value), sink, srcs, recent)))

    @staticmethod
    def _check_picks(picks: Picks, ref: list[tuple[TreeNode, torch.Tensor]], what: str) -> None:
        got = [(n.id, list(p)) for n, p in picks]
        want = [(n.id, p.tolist()) for n, p in ref]
        if got != want:
            raise AssertionError(f"{what}: incremental picks {got} != reference {want}")

    # ------------------------------------------------------------------ public policy
    def demote_idle(self, now: float | None = None) -> int:
        """Demote unlocked, unshared branches by idle time (``last_access_time``); returns tokens moved.

        Idle >= cold_idle_seconds: fp16/warm -> cold (fp16 goes straight to cold: one quantization);
        idle >= warm_idle_seconds: fp16 -> warm. Bounded by free room in the target tier, coldest first.
        The last ``idle_recent_tokens`` of every branch stay where they are.
        """
        if self.disable:
            return 0
        cfg = self.fade_config
        recent = cfg.idle_recent_tokens
        now = self.clock.now() if now is None else now
        book = self._sync()
        due = book.pop_idle(now)  # only nodes idle long enough to have work: not the whole tree
        order = walk_sorted(due, lambda n: n.last_access_time, book.walk_key)
        ref = None
        if self.verify_decisions:
            ref = sorted(iter_candidates(self._views()), key=lambda v: v.node.last_access_time)
        moved = 0
        # Cold first: it frees warm room the warm pass can use.
        for dst, idle_s, srcs in ((Tier.COLD, cfg.cold_idle_seconds, (Tier.FP16, Tier.WARM)),
                                  (Tier.WARM, cfg.warm_idle_seconds, (Tier.FP16,))):
            if not self._tier_enabled(dst):
                continue
            nodes = [n for n in order if now - n.last_access_time >= idle_s]
            picks = self._pick(nodes, srcs, self.pool.available(dst), recent)
            if ref is not None:
                self._check_picks(picks, self._reference_pick(
                    [v for v in ref if now - v.node.last_access_time >= idle_s], srcs, self.pool.available(dst),
                    recent), f"idle -> {dst.name}")
            moved += self._apply_demotion(picks, dst, "idle")
        for node in due:
            book.requeue_exact(node)
        return moved

    def evict(self, params: EvictParams) -> EvictResult:
        """Free ``params.num_tokens`` fp16 slots: demote first, evict leaves only if still short.

        ``num_tokens_evicted`` reports fp16 slots freed (by demotion or eviction). Demoted tokens' packed
        records take arena pages, so the fp16 room gained can be smaller: the allocator
        (``FadeTokenAllocator.evict_to_free_tokens``) measures it and asks again while short.
        """
        if self.disable or params.num_tokens <= 0:
            return EvictResult()
        start_time = time.perf_counter()
        need, freed = params.num_tokens, 0
        while freed < need:
            freed += self._make_fp16_room(need - freed)
            if freed >= need or not self.fade_config.eviction:
                break
            got_fp16, got_total = self._evict_leaves(need - freed, lower_helps=self._has_demotable_fp16())
            freed += got_fp16
            if got_total == 0:
                break
        self.update_eviction_metrics(freed, start_time)
        return EvictResult(num_tokens_evicted=freed)

    def demote_running(self, reqs: Iterable[Any], req_to_token_pool: Any | None = None,
                       recent_window: int | None = None, demote_chunk: int | None = None,
                       include_prompt: bool = False, limit: int | None = None) -> int:
        """Demote running requests' generated fp16 tokens older than the recent window to warm (at most
        ``limit``).

        Positions below ``sink_tokens`` never move; prompt positions only with ``include_prompt``
        (fp16 pressure: cached prompts are otherwise aged by the radix policy, which sees sharing).
        Rewrites each request's ``req_to_token`` row and the tree nodes locked by that request
        alone; returns tokens moved. Between scheduler steps only.
        """
        if self.disable or not self.fade_config.demote_running or not self._tier_enabled(Tier.WARM):
            return 0
        return self._running.demote(list(reqs), req_to_token_pool or self.req_to_token_pool,
                                    recent_window, demote_chunk, include_prompt, limit)

    def demote_for_room(self, want: int) -> int:
        """Pressure relief: free up to ``want`` fp16 slots by demoting idle branches (nothing evicted)."""
        if self.disable or want <= 0:
            return 0
        return self._make_fp16_room(int(want))

    # ------------------------------------------------------------------ demote-before-evict helpers
    def _drain_fp16_pages(self, max_pages: int) -> int:
        """Demote every fp16 token on up to ``max_pages`` fp16 pages whose live rows all belong to unlocked
        tree nodes (past their sinks), highest pages first; returns tokens moved.

        Demoting the coldest tokens frees fp16 *rows*, which new tokens fill again, while a packed tier can
        only grow by whole *pages*: under steady pressure no page would ever empty and the packed tiers
        would stay as small as they started. Draining whole pages hands them back (packed tiers claim from
        the top of the arena, so the top pages go first)."""
        dst = Tier.WARM if self._tier_enabled(Tier.WARM) else Tier.COLD
        if max_pages <= 0 or not self._tier_enabled(dst):
            return 0
        book = self._sync()
        nodes = [n for n in book.movable[Tier.FP16] if n.lock_ref == 0]
        cand = []
        for node in nodes:
            keep, stop = book.movable_range(node, 0)
            pos = tier_positions(book.rec(node).tiers, keep, stop, (Tier.FP16,))
            if pos:
                cand.append((node, pos))
        if not cand:
            return 0
        rows = self.pool.geometry.rows_per_page[Tier.FP16]
        slots = torch.cat([n.value[torch.tensor(p, dtype=torch.int64, device=n.value.device)] for n, p in cand])
        pages = slots // rows
        movable = torch.bincount(pages, minlength=self.pool.pages)
        live = self.pool.page_table.live.to(movable.device)
        drainable = torch.nonzero((movable > 0) & (movable == live)).reshape(-1).flip(0)
        room_pages = self.pool.available(dst) // rows
        chosen = drainable[:min(max_pages, room_pages)]
        if chosen.numel() == 0:
            return 0
        take = torch.isin(pages, chosen).tolist()
        picks, off = [], 0
        for node, pos in cand:
            sel = [p for p, t in zip(pos, take[off:off + len(pos)]) if t]
            off += len(pos)
            if sel:
                picks.append((node, sel))
        return self._apply_demotion(picks, dst, "evict")

    def _make_fp16_room(self, want: int) -> int:
        """Free fp16 slots by demotion alone, cascading warm -> cold when the warm tier is full."""
        if self.pool.page_table.free_pages() == 0:  # the packed tiers' spare page is taken: win pages back
            self._drain_fp16_pages(2)
        freed = 0
        if self._tier_enabled(Tier.WARM):
            short = want - self.pool.available(Tier.WARM)
            if short > 0:
                self._demote_coldest((Tier.WARM,), Tier.COLD, short, "evict")
            freed += self._demote_coldest((Tier.FP16,), Tier.WARM, want, "evict")
        if freed < want:  # warm full of pinned tokens (or disabled): straight to cold
            freed += self._demote_coldest((Tier.FP16,), Tier.COLD, want - freed, "evict")
        if freed < want:  # no packed room left: whole fp16 pages give some back
            freed += self._drain_fp16_pages(-(-(want - freed) // self.pool.geometry.rows_per_page[Tier.FP16]) + 1)
        return freed

    def _has_demotable_fp16(self) -> bool:
        return self.fp16_demotable_size() > 0

    def _evict_key(self, node: TreeNode) -> tuple:
        # Lowest tier first (a leaf entirely in cold goes before one holding fp16), then the base policy.
        counts = self._book.rec(node).counts
        best = next((t for t in Tier if counts[t]), Tier.COLD)
        return (-int(best), self.eviction_strategy.get_priority(node))

    def _evict_leaves(self, want: int, lower_helps: bool) -> tuple[int, int]:
        """Evict unlocked leaves, lowest tier and coldest first; return (fp16 freed, total freed).

        Stops once ``want`` fp16 slots are free, or, when demotion can still move fp16
        tokens (``lower_helps``), once ``want`` slots of any tier are free for it.
        """
        book = self._sync()
        heap = [(self._evict_key(n), n.id, n) for n in self.evictable_leaves]
        heapq.heapify(heap)
        fp16 = total = 0
        while heap and fp16 < want and not (lower_helps and total >= want):
            _, _, node = heapq.heappop(heap)
            counts = book.rec(node).counts
            for t in Tier:
                if counts[t]:
                    self.evicted[_TIER_KEYS[t]] += counts[t]
            fp16 += counts[Tier.FP16]
            total += len(node.value)
            self.token_to_kv_pool_allocator.free_segment(node.value, start_pos=0)
            self._delete_leaf(node)
            self.kv_events.record_remove(node)
            parent = node.parent
            if parent is not self.root_node and parent in self.evictable_leaves:
                heapq.heappush(heap, (self._evict_key(parent), parent.id, parent))
        return fp16, total

    # ------------------------------------------------------------------ stats
    def tier_token_counts(self) -> dict[str, int]:
        """Tokens held by the tree per tier."""
        return dict(zip(_TIER_KEYS, self._sync().counts))

    def fp16_evictable_size(self) -> int:
        """fp16 tokens in unlocked nodes: what demotion or eviction could hand back to new tokens."""
        return self._sync().unlocked[Tier.FP16]

    def fp16_demotable_size(self) -> int:
        """fp16 slots demotion alone can hand back: unlocked fp16 tokens past the sinks. The rest of
        :meth:`fp16_evictable_size` (sinks) comes back only by evicting the whole branch below it."""
        if not (self._tier_enabled(Tier.WARM) or self._tier_enabled(Tier.COLD)):
            return 0
        book = self._sync()
        return book.unlocked[Tier.FP16] - book.unlocked_sink[Tier.FP16]

    def tier_stats(self) -> dict[str, Any]:
        demoted: dict[str, dict[str, int]] = {}
        for (reason, move), n in sorted(self.demoted.items()):
            demoted.setdefault(reason, {})[move] = n
        return {
            "tree_tokens": self.tier_token_counts(),
            "evictable_tokens": self.evictable_size(),
            "protected_tokens": self.protected_size(),
            "fp16_evictable_tokens": self.fp16_evictable_size(),
            "fp16_demotable_tokens": self.fp16_demotable_size(),
            "demoted_tokens": demoted,
            "evicted_tokens": dict(self.evicted),
            "pool": self.pool.tier_stats(),
        }

    # ------------------------------------------------------------------ checks
    def check_bookkeeping(self) -> list[str]:
        """Every incremental number against a full walk with device tier reads; returns the mismatches."""
        book = self._sync()
        cfg, bad = self.fade_config, []
        sink, lower = cfg.sink_tokens, self._tier_enabled(Tier.WARM) or self._tier_enabled(Tier.COLD)
        totals, unlocked, evictable, demotable = [0, 0, 0], [0, 0, 0], 0, 0
        in_min, in_any = book.index_snapshot()
        views = self._views()
        for v in views:
            node, rec = v.node, book.rec(v.node)
            name = f"node {node.id}"
            if rec is None or not rec.alive or not rec.accounted:
                bad.append(f"{name}: no live, accounted record")
                continue
            tiers = self.pool.tier_of(node.value)
            if rec.value is not node.value:
                bad.append(f"{name}: value replaced behind the book's back")
            if list(rec.tiers) != tiers.tolist():
                bad.append(f"{name}: tiers {list(rec.tiers)} != {tiers.tolist()}")
            if rec.start != v.start:
                bad.append(f"{name}: start {rec.start} != {v.start}")
            if book.shared(node) != v.shared:
                bad.append(f"{name}: shared {book.shared(node)} != {v.shared}")
            counts = [int((tiers == t).sum()) for t in Tier]
            keep = v.sink_keep(sink)
            head = [int((tiers[:keep] == t).sum()) for t in Tier]
            if rec.counts != counts or rec.sink != head:
                bad.append(f"{name}: counts {rec.counts}/{rec.sink} != {counts}/{head}")
            for t in (Tier.FP16, Tier.WARM):
                if (node in book.movable[t]) != (counts[t] > head[t]):
                    bad.append(f"{name}: movable[{t.name}] membership wrong")
            for t in Tier:
                totals[t] += counts[t]
                if node.lock_ref == 0:
                    unlocked[t] += counts[t]
            if node.lock_ref == 0 and book._p_owner is not None:
                for t in (Tier.FP16, Tier.WARM):
                    if counts[t] > head[t] and not (book._p_in(rec, t) and rec.p_entry[t][0] <= book.pressure_key(node)):
                        bad.append(f"{name}: holds {t.name} past its sinks but is not in the pressure index")
            if node.lock_ref == 0:
                evictable += counts[Tier.FP16]
                if lower:
                    demotable += movable_positions(v, tiers, sink, (Tier.FP16,)).numel()
                if not v.shared:
                    fp16_work, warm_work = book.idle_work(node)
                    t = node.last_access_time
                    if fp16_work and not in_min.get(id(node), t + 1) <= t:
                        bad.append(f"{name}: holds fp16 idle work but is not in the idle index")
                    if warm_work and not min(in_min.get(id(node), t + 1), in_any.get(id(node), t + 1)) <= t:
                        bad.append(f"{name}: holds warm idle work but is not in the idle index")
        for v in views:
            seqs = [book.rec(c).seq for c in v.node.children.values() if book.rec(c) is not None]
            if seqs != sorted(seqs):
                bad.append(f"node {v.node.id}: children's walk ranks out of order")
        if book.live != len(views):
            bad.append(f"book holds {book.live} live nodes, the tree {len(views)}")
        if book.counts != totals or book.unlocked != unlocked:
            bad.append(f"totals {book.counts}/{book.unlocked} != {totals}/{unlocked}")
        if self.fp16_evictable_size() != evictable or self.fp16_demotable_size() != demotable:
            bad.append(f"fp16 evictable/demotable {self.fp16_evictable_size()}/{self.fp16_demotable_size()} "
                       f"!= {evictable}/{demotable}")
        return bad
