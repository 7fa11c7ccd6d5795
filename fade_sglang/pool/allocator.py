"""Errors of the pool's slot allocation (the allocator itself is :mod:`.pages`)."""

from __future__ import annotations

__all__ = ["PoolExhaustedError", "SlotError"]


class PoolExhaustedError(RuntimeError):
    """A tier has fewer free slots than requested (nothing was allocated or changed)."""


class SlotError(ValueError):
    """A slot index that is out of range, free when it should be owned, or owned twice."""
