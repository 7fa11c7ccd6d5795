"""TieredRadixCache: SGLang's classic ``RadixCache`` whose cached KV ages from fp16 to INT4 to INT2.

The SGLang side of the radix policy: which tokens may move is decided by the SGLang-free
``fade_sglang.radix.policy``; this class applies it to SGLang's tree.

Tiers are encoded in the slot index (``TieredKVPool``), so demoting a node is
"quantize into a lower-tier slot, rewrite ``node.value``": splits, matching and
locking of the base tree keep working unchanged. Token counts
(``evictable_size`` / ``protected_size``) never change on demotion; they count
tree tokens of every tier, as the base class does.

All public policy methods run between scheduler steps (no forward in flight).
"""

from __future__ import annotations

import heapq
import logging
import time
from collections import Counter
from typing import Any, Iterable, Iterator

import torch
from sglang.srt.mem_cache.base_prefix_cache import EvictParams, EvictResult
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.radix_cache import RadixCache, TreeNode

from fade_sglang.config import FadeConfig
from fade_sglang.pool import Tier
from fade_sglang.radix.policy import NodeView, iter_candidates, movable_positions, walk_tree

from .pool import TieredKVPool
from .running_demotion import RunningDemoter

__all__ = ["TieredRadixCache"]

logger = logging.getLogger(__name__)

_TIER_KEYS = ("fp16", "warm", "cold")


class TieredRadixCache(RadixCache):
    """``RadixCache`` (page size 1) over a :class:`TieredKVPool` with demote-before-evict policy."""

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
        self._reset_counters()  # before super().__init__, which calls reset()
        super().__init__(params)
        self._running = RunningDemoter(self)

    # ------------------------------------------------------------------ bookkeeping
    def _reset_counters(self) -> None:
        self.demoted = Counter()  # (reason, "src->dst") -> tokens
        self.evicted = Counter()  # tier name -> tokens

    def reset(self) -> None:
        super().reset()
        self._reset_counters()

    def _tier_enabled(self, tier: Tier) -> bool:
        return self.pool.layout.capacity(tier) > 0

    def _views(self) -> list[NodeView]:
        return walk_tree(self.root_node, self.fade_config.shared_prefix_min_hits)

    # ------------------------------------------------------------------ demotion core
    def _apply_demotion(self, picks: list[tuple[TreeNode, torch.Tensor]], dst: Tier, reason: str) -> int:
        """Demote the picked positions of each node in one pool call and rewrite the nodes' values."""
        picks = [(n, p) for n, p in picks if p.numel()]
        if not picks:
            return 0
        slots = torch.cat([n.value[p] for n, p in picks])
        src_tiers = self.pool.tier_of(slots)
        new = self.pool.demote(slots, dst)
        off = 0
        for node, pos in picks:
            value = node.value.clone()  # never mutate a tensor someone may still hold
            value[pos] = new[off:off + pos.numel()]
            node.value = value
            off += pos.numel()
        self._count_demotion(reason, src_tiers, dst)
        return slots.numel()

    def _count_demotion(self, reason: str, src_tiers: torch.Tensor, dst: Tier) -> None:
        for src in (Tier.FP16, Tier.WARM):
            n = int((src_tiers == src).sum())
            if n:
                self.demoted[(reason, f"{_TIER_KEYS[src]}->{_TIER_KEYS[dst]}")] += n

    def _pick(self, views: Iterable[NodeView], srcs: tuple[int, ...], budget: int,
              recent: int = 0) -> list[tuple[TreeNode, torch.Tensor]]:
        """Greedily take movable positions of ``views`` (already ordered coldest first) up to ``budget``."""
        picks: list[tuple[TreeNode, torch.Tensor]] = []
        sink = self.fade_config.sink_tokens
        for view in views:
            if budget <= 0:
                break
            pos = movable_positions(view, self.pool.tier_of(view.node.value), sink, srcs, recent)[:budget]
            if pos.numel():
                picks.append((view.node, pos))
                budget -= pos.numel()
        return picks

    def _pressure_order(self) -> list[NodeView]:
        """Unlocked nodes in the order memory pressure demotes them: unshared nodes coldest first,
        then shared prefixes coldest first. Idle aging never moves a shared prefix, but under
        pressure demoting it beats evicting it (and beats evicting packed leaves, which frees no
        fp16 slot): a small fp16 tier cannot hold every shared system prompt."""
        return sorted(self._unlocked_views(), key=lambda v: (v.shared, self.eviction_strategy.get_priority(v.node)))

    def _unlocked_views(self) -> list[NodeView]:
        return [v for v in self._views() if v.node.lock_ref == 0]

    def _demote_coldest(self, srcs: tuple[int, ...], dst: Tier, want: int, reason: str) -> int:
        """Pressure demotion: up to ``want`` (at least ``demote_chunk``) movable tokens, in
        :meth:`_pressure_order`."""
        if want <= 0 or not self._tier_enabled(dst):
            return 0
        budget = min(max(want, self.fade_config.demote_chunk), self.pool.available(dst))
        if budget <= 0:
            return 0
        return self._apply_demotion(self._pick(self._pressure_order(), srcs, budget), dst, reason)

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
        now = time.monotonic() if now is None else now
        order = sorted(iter_candidates(self._views()), key=lambda v: v.node.last_access_time)
        moved = 0
        if self._tier_enabled(Tier.COLD):  # cold first: it frees warm room the warm pass can use
            cold = [v for v in order if now - v.node.last_access_time >= cfg.cold_idle_seconds]
            moved += self._apply_demotion(self._pick(cold, (Tier.FP16, Tier.WARM), self.pool.available(Tier.COLD),
                                                     recent), Tier.COLD, "idle")
        if self._tier_enabled(Tier.WARM):
            warm = [v for v in order if now - v.node.last_access_time >= cfg.warm_idle_seconds]
            moved += self._apply_demotion(self._pick(warm, (Tier.FP16,), self.pool.available(Tier.WARM), recent),
                                          Tier.WARM, "idle")
        return moved

    def evict(self, params: EvictParams) -> EvictResult:
        """Free ``params.num_tokens`` fp16 slots: demote first, evict leaves only if still short.

        ``num_tokens_evicted`` reports fp16 slots freed (by demotion or eviction), the
        quantity the allocator's ``available_size`` gains.
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
                       include_prompt: bool = False) -> int:
        """Demote running requests' generated fp16 tokens older than the recent window to warm.

        Positions below ``sink_tokens`` never move; prompt positions only with ``include_prompt``
        (fp16 pressure: cached prompts are otherwise aged by the radix policy, which sees sharing).
        Rewrites each request's ``req_to_token`` row and the tree nodes locked by that request
        alone; returns tokens moved. Between scheduler steps only.
        """
        if self.disable or not self.fade_config.demote_running or not self._tier_enabled(Tier.WARM):
            return 0
        return self._running.demote(list(reqs), req_to_token_pool or self.req_to_token_pool,
                                    recent_window, demote_chunk, include_prompt)

    # ------------------------------------------------------------------ demote-before-evict helpers
    def _make_fp16_room(self, want: int) -> int:
        """Free fp16 slots by demotion alone, cascading warm -> cold when the warm tier is full."""
        freed = 0
        if self._tier_enabled(Tier.WARM):
            short = want - self.pool.available(Tier.WARM)
            if short > 0:
                self._demote_coldest((Tier.WARM,), Tier.COLD, short, "evict")
            freed += self._demote_coldest((Tier.FP16,), Tier.WARM, want, "evict")
        if freed < want:  # warm full of pinned tokens (or disabled): straight to cold
            freed += self._demote_coldest((Tier.FP16,), Tier.COLD, want - freed, "evict")
        return freed

    def _demotable_fp16_per_node(self) -> Iterator[int]:
        """fp16 tokens pressure demotion can move, node by node (unlocked nodes, sinks excluded)."""
        if not (self._tier_enabled(Tier.WARM) or self._tier_enabled(Tier.COLD)):
            return
        sink = self.fade_config.sink_tokens
        for v in self._unlocked_views():  # no order needed: callers count
            yield movable_positions(v, self.pool.tier_of(v.node.value), sink, (Tier.FP16,)).numel()

    def _has_demotable_fp16(self) -> bool:
        return any(self._demotable_fp16_per_node())

    def _evict_key(self, node: TreeNode) -> tuple:
        # Lowest tier first (a leaf entirely in cold goes before one holding fp16), then the base policy.
        best = int(self.pool.tier_of(node.value).min()) if len(node.value) else int(Tier.COLD)
        return (-best, self.eviction_strategy.get_priority(node))

    def _evict_leaves(self, want: int, lower_helps: bool) -> tuple[int, int]:
        """Evict unlocked leaves, lowest tier and coldest first; return (fp16 freed, total freed).

        Stops once ``want`` fp16 slots are free, or, when demotion can still move fp16
        tokens (``lower_helps``), once ``want`` slots of any tier are free for it.
        """
        heap = [(self._evict_key(n), n.id, n) for n in self.evictable_leaves]
        heapq.heapify(heap)
        fp16 = total = 0
        while heap and fp16 < want and not (lower_helps and total >= want):
            _, _, node = heapq.heappop(heap)
            tiers = self.pool.tier_of(node.value)
            for t in Tier:
                n = int((tiers == t).sum())
                if n:
                    self.evicted[_TIER_KEYS[t]] += n
            fp16 += int((tiers == Tier.FP16).sum())
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
        counts = dict.fromkeys(_TIER_KEYS, 0)
        for v in self._views():
            tiers = self.pool.tier_of(v.node.value)
            for t in Tier:
                counts[_TIER_KEYS[t]] += int((tiers == t).sum())
        return counts

    def fp16_evictable_size(self) -> int:
        """fp16 tokens in unlocked nodes: what demotion or eviction could hand back to new tokens."""
        return sum(int((self.pool.tier_of(v.node.value) == Tier.FP16).sum())
                   for v in self._unlocked_views())

    def fp16_demotable_size(self) -> int:
        """fp16 slots demotion alone can hand back: unlocked fp16 tokens past the sinks. The rest of
        :meth:`fp16_evictable_size` (sinks) comes back only by evicting the whole branch below it."""
        return sum(self._demotable_fp16_per_node())

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
