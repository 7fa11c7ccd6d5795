"""The tiered KV pool: slot-range tier layout, per-tier allocators, packed stores, demotion."""

from .allocator import PoolExhaustedError, SlotError, TierAllocator
from .layout import Tier, TierLayout, effective_bytes_per_token, split_token_budget

__all__ = ["PoolExhaustedError", "SlotError", "Tier", "TierAllocator", "TierLayout",
           "effective_bytes_per_token", "split_token_budget"]
# TieredKVStore (.tiered_store) is the pool itself; SGLang's view of it is fade_sglang.patches.pool.TieredKVPool.
