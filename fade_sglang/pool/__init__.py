"""The tiered KV pool: one byte arena in pages owned by tiers, slot-range tier layout, packed stores, demotion."""

from .allocator import PoolExhaustedError, SlotError
from .layout import Tier, TierLayout
from .pages import PagedRows, PageGeometry, PageTable, choose_page_geometry

__all__ = ["PagedRows", "PageGeometry", "PageTable", "PoolExhaustedError", "SlotError", "Tier",
           "TierLayout", "choose_page_geometry"]
# TieredKVStore (.tiered_store) is the pool itself; SGLang's view of it is fade_sglang.patches.pool.TieredKVPool.
