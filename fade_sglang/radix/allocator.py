"""A minimal SGLang token allocator over a :class:`TieredKVPool` (reference for the integration, used by tests).

The tree cache frees evicted slots of *any* tier through the SGLang allocator and
``TieredKVPool.demote`` frees fp16 slots straight into the pool's own per-tier
allocators, so the SGLang-facing allocator must not keep a free list of its own:
it delegates to the pool. ``available_size`` is fp16 capacity only, because every
new token is written to an fp16 slot.
"""

from __future__ import annotations

import torch
from sglang.srt.mem_cache.allocator.base import BaseTokenToKVPoolAllocator

from ..pool import Tier
from ..pool.tiered_pool import TieredKVPool

__all__ = ["TieredTokenAllocator"]


class TieredTokenAllocator(BaseTokenToKVPoolAllocator):
    def __init__(self, pool: TieredKVPool, dtype: torch.dtype | None = None):
        super().__init__(pool.layout.fp16_slots, 1, dtype or pool.dtype, pool.device, pool, need_sort=False)
        self.pool = pool
        self.free_group = None

    def clear(self) -> None:
        # The pool owns the free lists; clearing them here would orphan packed slots.
        self.free_group = None

    def available_size(self) -> int:
        return self.pool.available(Tier.FP16)

    def get_all_free_pages(self) -> torch.Tensor:
        return self.pool.allocators[Tier.FP16].free_slots

    def alloc(self, need_size: int) -> torch.Tensor | None:
        return self.pool.try_alloc(need_size, Tier.FP16)

    def free(self, free_index: torch.Tensor) -> None:
        if free_index.numel() == 0:
            return
        if self.free_group is not None:
            self.free_group.append(self._copy_for_free_group(free_index))
            return
        self.pool.free(free_index)
