"""SGLang-facing token allocator over the tiered pool.

* ``alloc`` hands out fp16 slots only: every new token is written at full precision.
* ``free`` accepts slots of any tier (the radix tree and finished requests free
  demoted slots without knowing their tier); the pool routes them.
* ``available_size`` is the slot total (every tier's slot range) minus the slots in use: the
  scheduler's conservation check is ``available + evictable + protected + uncached ==
  max_total_num_tokens`` and the tree / request counts are in tokens of any tier. It is not
  a statement about memory (the tiers share one arena), so admission does not use it:
* prefill admission (:class:`FadePrefillBudget`) checks the immediate allocation
  against fp16 slots that are free or reclaimable (by demotion alone while requests
  run), and the lifetime demand against the arena's free *bytes*, counted at the
  precision tokens will have (sinks and recent windows fp16, the rest warm).
* fp16 shortage is handled where SGLang asks for room before allocating
  (``evict_to_free_tokens`` / ``check_decode_capacity``): the shortfall is
  measured in *fp16* slots and handed to the tree cache's ``evict``, which
  (in the tiered radix cache) demotes before it evicts.

Hook: ``sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator._build_token_to_kv_pool_allocator`` (AROUND).
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch
from sglang.srt.mem_cache.allocator.base import BaseTokenToKVPoolAllocator
from sglang.srt.mem_cache.prefill_budget import PrefillBudget

from fade_sglang.pool.layout import Tier

logger = logging.getLogger("fade_sglang")

_CONFIGURATOR = "sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator"
# evict() may free lower-tier slots only (a cold leaf); retry a few rounds before giving up.
_MAX_EVICT_ROUNDS = 8


class FadePrefillBudget(PrefillBudget):
    """Prefill admission in two currencies.

    The lifetime checks (``remaining_total`` / ``remaining_current``) count tokens of
    every tier: old tokens get demoted as requests run. What *this step* allocates
    (a prefill chunk) lands in fp16 at once, so every immediate-allocation decision
    is also bounded by the fp16 slots that are free or reclaimable from unlocked tree
    nodes; admitting on all-tier room alone would fail the allocation.
    """

    _admitted = False  # set by reserve(): this pass admitted a prefill (or a chunk)

    def _available_and_evictable(self) -> int:
        """Lifetime room in tokens: the arena's free bytes at the precision pressure demotes to, plus what
        eviction could free (SGLang's plain budget counts free slots, which here are address space)."""
        keep = self.allocator.fp16_kept_tokens(self.allocator.running_requests + 1)
        return self.allocator.pool.free_room_tokens(keep) + self.tree_cache.evictable_size()
    _fp16_chunked = False  # this pass already cut one prefill to the fp16 room

    def fp16_room(self) -> int:
        """fp16 slots this pass may still take.

        While other requests run (or this pass already admitted one), only what demotion can
        hand back counts: the rest of the unlocked fp16 tokens are sinks, and reclaiming a sink
        means evicting its whole (mostly packed) branch, hundreds of cached tokens for a few fp16
        slots. Waiting is cheaper: running requests release fp16 as they finish. For the first
        admission with nothing else running (or a chunked prefill alone, which must progress to
        release its own KV), eviction is the only way forward and every unlocked fp16 token counts.
        Both tree numbers are running totals the tree cache keeps as nodes change: no walk per call.
        """
        tree = self.tree_cache
        if self.allocator.running_requests > 0 or self._admitted:
            reclaim = tree.fp16_demotable_size()
        else:
            reclaim = tree.fp16_evictable_size()
        return self.allocator.fp16_available() + reclaim - self.current_offset

    def reserve(self, *args: Any, **kwargs: Any) -> None:
        super().reserve(*args, **kwargs)
        self._admitted = True

    def has_capacity(self) -> bool:
        return super().has_capacity() and self.fp16_room() > 0

    def check_prefill(self, *, extend_input_len: int, chunk_limit: int | None, **kwargs: Any) -> tuple[bool, int | None]:
        ok, bound = super().check_prefill(extend_input_len=extend_input_len, chunk_limit=chunk_limit, **kwargs)
        if not ok:
            return ok, bound
        room = self.fp16_room() - self.page_size
        if room <= 0:
            return False, None
        if extend_input_len <= room:
            return ok, bound
        if self._fp16_chunked:
            return False, None  # one fp16-bounded chunk per pass (SGLang tracks one chunked request)
        self._fp16_chunked = True
        return True, room if bound is None else min(bound, room)  # chunk what fp16 cannot take at once

    def can_allocate_prefill(self, *, paged_input: int, **kwargs: Any) -> bool:
        return super().can_allocate_prefill(paged_input=paged_input, **kwargs) and paged_input <= self.fp16_room()

    def available_chunk_tokens(self, chunk_limit: int) -> int | None:
        room = self.fp16_room()
        if room <= 0:
            return None  # skip the continuation this pass: running requests free or demote fp16 first
        available = min(chunk_limit, int(self.remaining_total), room)
        return available if available > 0 else chunk_limit  # a continuation must progress to release its KV


class FadeTokenAllocator(BaseTokenToKVPoolAllocator):
    def __init__(self, kvcache: Any, dtype: torch.dtype, device: str, need_sort: bool = False):
        super().__init__(kvcache.total_size, 1, dtype, device, kvcache, need_sort)
        self.pool = kvcache
        # Live requests other than a chunked prefill, set by the scheduler hook before each pass:
        # they release fp16 without more prefill, so admission waits for them rather than evict
        # packed branches (FadePrefillBudget.fp16_room).
        self.running_requests = 0
        self.clear()

    # free_pages is read by SGLang's debug census; expose every tier's free rows (of the pages it owns).
    @property
    def free_pages(self) -> torch.Tensor | None:
        pool = getattr(self, "pool", None)
        if pool is None:
            return None
        return torch.cat([a.free_slots for a in pool.allocators])

    @free_pages.setter
    def free_pages(self, value: Any) -> None:  # the base constructor assigns None
        pass

    def clear(self) -> None:
        self.pool.clear_slots()
        self.free_group = None
        self.release_pages = torch.empty((0,), dtype=torch.int64, device=self.device)

    def resize(self, config: Any) -> None:
        raise NotImplementedError("fade: resizing the tiered KV pool at runtime is not supported")

    # ------------------------------------------------------------------ capacity
    def available_size(self) -> int:
        return self.size - sum(self.pool.used(t) for t in Tier)

    def fp16_available(self) -> int:
        return self.pool.available(Tier.FP16)

    def fp16_kept_tokens(self, requests: int) -> int:
        """fp16 tokens ``requests`` keep however hard memory is pressed: sinks and recent windows."""
        cfg = self.pool.fade_config
        return requests * (cfg.sink_tokens + cfg.recent_window)

    def get_all_free_pages(self) -> torch.Tensor:
        return self.free_pages

    def merge_and_sort_free(self) -> None:
        pass  # each tier keeps its own free rows; pages go back to one free list

    def create_prefill_budget(self, tree_cache: Any, *, num_mixed_decode_tokens: int = 0) -> FadePrefillBudget:
        return FadePrefillBudget(self, tree_cache, num_mixed_decode_tokens=num_mixed_decode_tokens)

    def evict_to_free_tokens(self, tree_cache: Any, num_tokens: int) -> bool | None:
        if tree_cache is None or not tree_cache.supports_prefix_sharing():
            return None
        from sglang.srt.mem_cache.base_prefix_cache import EvictParams

        for _ in range(_MAX_EVICT_ROUNDS):
            shortfall = num_tokens - self.fp16_available()
            if shortfall <= 0:
                return True
            before = self.fp16_available()
            tree_cache.evict_for_alloc(EvictParams(num_tokens=shortfall))
            if self.fp16_available() == before:
                break  # nothing more to demote or evict
        return self.fp16_available() >= num_tokens

    def check_decode_capacity(self, *, num_tokens: int, tree_cache: Any, requests: Any = None,
                              spec_algorithm: Any = None) -> bool:
        self.evict_to_free_tokens(tree_cache, num_tokens)
        return self.fp16_available() >= num_tokens

    # ------------------------------------------------------------------ alloc / free
    def alloc(self, need_size: int) -> torch.Tensor | None:
        return self.pool.try_alloc(need_size, Tier.FP16)

    def free(self, free_index: torch.Tensor) -> None:
        if free_index.numel() == 0:
            return
        if self.free_group is not None:
            self.free_group.append(self._copy_for_free_group(free_index))
            return
        self.pool.free(free_index)

    def free_page_ids(self, page_ids: torch.Tensor) -> None:
        self.free(page_ids)

    def get_cpu_copy(self, indices: Any, mamba_indices: Any = None, req_pool_index: Any = None) -> Any:
        raise NotImplementedError("fade: KV offload (retract to host) is not supported by the tiered pool")

    def load_cpu_copy(self, kv_cache_cpu: Any, indices: Any, mamba_indices: Any = None,
                      req_pool_index: Any = None) -> Any:
        raise NotImplementedError("fade: KV offload (retract to host) is not supported by the tiered pool")


def build_allocator_hook(original: Callable[..., Any], kvc: Any, *, sizes: Any, token_to_kv_pool: Any,
                         is_dsv4_model: bool, req_to_token_pool: Any, token_to_kv_pool_allocator: Any) -> Any:
    from fade_sglang.patches.pool import TieredKVPool

    if not isinstance(token_to_kv_pool, TieredKVPool):
        return original(kvc, sizes=sizes, token_to_kv_pool=token_to_kv_pool, is_dsv4_model=is_dsv4_model,
                        req_to_token_pool=req_to_token_pool, token_to_kv_pool_allocator=token_to_kv_pool_allocator)
    if token_to_kv_pool_allocator is not None:
        raise ValueError("fade: a shared (draft) allocator is not supported with the tiered pool")
    alloc = FadeTokenAllocator(token_to_kv_pool, kvc.kv_cache_dtype, kvc.device)
    logger.info("[fade] allocator: new tokens land in fp16 (up to %d); slot ranges of all tiers: %d",
                token_to_kv_pool.layout.fp16_slots, alloc.size)
    return alloc


def register_allocator_hooks(register: Callable[[str, Callable[..., Any], Any], None], around: Any) -> None:
    register(f"{_CONFIGURATOR}._build_token_to_kv_pool_allocator", build_allocator_hook, around)
