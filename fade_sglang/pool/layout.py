"""Slot index space of the tiered pool.

One int64 slot space is shared by SGLang's radix tree, req_to_token rows and
every attention backend's kv_indices. fade gives each tier a contiguous range,
so the tier of a slot is a pure function of its index (two compares, no lookup
table on the hot path) and a radix node split never needs tier bookkeeping:

    [0, page_size)                   padding (slot 0 absorbs dummy writes)
    [page_size, warm_base)           FP16 tier  (fp16_slots slots)
    [warm_base, cold_base)           warm tier  (packed, INT4 by default)
    [cold_base, end)                 cold tier  (packed, INT2 by default)

The ranges are address spaces, not memory: each spans the whole byte arena
(:mod:`.pages`), and only the rows of pages a tier owns are live.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import torch

__all__ = ["Tier", "TierLayout"]


class Tier(IntEnum):
    FP16 = 0
    WARM = 1
    COLD = 2


@dataclass(frozen=True)
class TierLayout:
    fp16_slots: int
    warm_slots: int
    cold_slots: int
    page_size: int = 1

    def __post_init__(self) -> None:
        for name in ("fp16_slots", "warm_slots", "cold_slots"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.fp16_slots < 1:
            raise ValueError("the fp16 tier needs at least one slot (new tokens always land there)")

    @property
    def warm_base(self) -> int:
        return self.page_size + self.fp16_slots

    @property
    def cold_base(self) -> int:
        return self.warm_base + self.warm_slots

    @property
    def end(self) -> int:
        return self.cold_base + self.cold_slots

    @property
    def total_slots(self) -> int:
        return self.fp16_slots + self.warm_slots + self.cold_slots

    def base(self, tier: Tier) -> int:
        return (self.page_size, self.warm_base, self.cold_base)[tier]

    def capacity(self, tier: Tier) -> int:
        return (self.fp16_slots, self.warm_slots, self.cold_slots)[tier]

    def tier_of(self, slots: torch.Tensor) -> torch.Tensor:
        """Tier id (int64) of every slot; pure arithmetic on the index."""
        return (slots >= self.warm_base).long() + (slots >= self.cold_base).long()

    def local_index(self, slots: torch.Tensor, tier: Tier) -> torch.Tensor:
        """Row of each slot inside its tier's buffers (the fp16 buffer keeps SGLang's global rows)."""
        return slots if tier == Tier.FP16 else slots - self.base(tier)
