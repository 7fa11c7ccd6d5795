"""The clock the tiering policy reads: one reading per scheduler step, the same on every tensor-parallel rank.

Idle demotion compares "now" with the radix tree's access stamps. Under ``--tp N`` every rank keeps its own
tree and pool and must take the same decisions (else the ranks' slot tables diverge and the KV is corrupt),
but each rank's ``time.monotonic()`` differs. A :class:`StepClock` is ticked once per scheduler step on
every rank; ``share`` turns the local reading into the one every rank uses (rank 0's, broadcast over the
TP group), so the stamps taken and the idle tests made within a step read one common value.
"""

from __future__ import annotations

import time
from typing import Callable

__all__ = ["StepClock"]


class StepClock:
    """``source``: the local clock; ``share``: maps this rank's reading to the common one (None: one rank).

    Until the first :meth:`tick` the clock runs free (``now`` reads ``source``): a tree used outside a
    scheduler (tests, tools) sees real time. Ticked, it holds the step's reading and never goes back."""

    def __init__(self, source: Callable[[], float] = time.monotonic, share: Callable[[float], float] | None = None):
        self._source = source
        self.share = share
        self._now: float | None = None

    def tick(self) -> float:
        reading = self._source()
        if self.share is not None:
            reading = self.share(reading)  # a collective under TP: every rank ticks at the same step
        self._now = reading if self._now is None else max(self._now, reading)
        return self._now

    def now(self) -> float:
        return self._source() if self._now is None else self._now

    @property
    def ticking(self) -> bool:
        return self._now is not None
