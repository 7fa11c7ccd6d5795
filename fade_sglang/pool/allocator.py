"""Free list of one tier's slots, with ownership tracking so double frees and stray slots fail loudly."""

from __future__ import annotations

import torch

__all__ = ["PoolExhaustedError", "SlotError", "TierAllocator"]


class PoolExhaustedError(RuntimeError):
    """A tier has fewer free slots than requested (nothing was allocated or changed)."""


class SlotError(ValueError):
    """A slot index that is out of range, free when it should be owned, or owned twice."""


class TierAllocator:
    """Allocates slots ``[base, base + capacity)``; ``strict`` verifies every free (costs a host sync on GPU)."""

    def __init__(self, name: str, base: int, capacity: int, device: torch.device | str, strict: bool = True):
        self.name = name
        self.base = base
        self.capacity = capacity
        self.device = torch.device(device)
        self.strict = strict
        self.clear()

    def clear(self) -> None:
        self.free_slots = torch.arange(self.base, self.base + self.capacity, dtype=torch.int64, device=self.device)
        self._owned = torch.zeros(self.capacity, dtype=torch.bool, device=self.device)

    def available(self) -> int:
        return int(self.free_slots.numel())

    def used(self) -> int:
        return self.capacity - self.available()

    def try_alloc(self, n: int) -> torch.Tensor | None:
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of slots ({n})")
        if n > self.free_slots.numel():
            return None
        out, self.free_slots = self.free_slots[:n], self.free_slots[n:]
        self._owned[out - self.base] = True
        return out

    def alloc(self, n: int) -> torch.Tensor:
        out = self.try_alloc(n)
        if out is None:
            raise PoolExhaustedError(f"{self.name} tier exhausted: need {n} slots, {self.available()} free")
        return out

    def free(self, slots: torch.Tensor) -> None:
        if slots.numel() == 0:
            return
        local = slots - self.base
        if self.strict:
            self.check_owned(slots)
        self._owned[local] = False
        self.free_slots = torch.cat((self.free_slots, slots.to(torch.int64)))

    def check_owned(self, slots: torch.Tensor) -> None:
        local = slots - self.base
        if bool(((local < 0) | (local >= self.capacity)).any()):
            raise SlotError(f"slots outside the {self.name} tier range [{self.base}, {self.base + self.capacity})")
        if not bool(self._owned[local].all()):
            raise SlotError(f"freeing {self.name} slots that are not allocated (double free?)")
        if torch.unique(local).numel() != local.numel():
            raise SlotError(f"the same {self.name} slot appears twice in one free")

    def owned_mask(self) -> torch.Tensor:
        return self._owned.clone()
