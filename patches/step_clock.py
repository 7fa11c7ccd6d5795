"""The step clock on SGLang's side: the radix tree's access stamps read it, and under ``--tp`` rank 0's time
is broadcast to every rank once per scheduler step (see ``fade_sglang.radix.clock``).

SGLang's ``radix_cache`` module stamps ``TreeNode.last_access_time`` with ``time.monotonic()``; pointing
that module's ``time`` at :class:`RadixTime` makes every stamp a step-clock reading, so two ranks that see
the same requests in the same steps hold identical stamps, and identical idle decisions follow.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import sglang.srt.mem_cache.radix_cache as radix_module
import torch

from fade_sglang.radix.clock import StepClock

__all__ = ["RadixTime", "install", "tp_share"]


class RadixTime:
    """Stands in for the ``time`` module inside SGLang's ``radix_cache``: ``monotonic`` reads the step clock."""

    def __init__(self, clock: StepClock):
        self.clock = clock

    def monotonic(self) -> float:
        return self.clock.now()

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def install(clock: StepClock) -> None:
    """Make SGLang's radix access stamps read ``clock`` (one scheduler, hence one tree, per process)."""
    radix_module.time = RadixTime(clock)


def tp_share(group: Any) -> Callable[[float], float]:
    """Every rank of the TP CPU ``group`` takes the group's first rank's reading (one 8-byte broadcast a step)."""
    src = torch.distributed.get_global_rank(group, 0)

    def share(reading: float) -> float:
        t = torch.tensor([reading], dtype=torch.float64)
        torch.distributed.broadcast(t, src=src, group=group)
        return float(t[0])

    return share
