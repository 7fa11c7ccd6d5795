"""One byte arena shared by every tier, handed out in fixed-size pages that a tier owns while it lives.

Each layer's K (and V) memory is one byte range cut into pages of ``page_bytes``. A page holds
``rows_per_page[t]`` records of whichever tier owns it: fp16 rows of ``H * D * elem`` bytes, or packed
records (codes, scales, zeros) of a quantized tier. Tier ``t``'s slot row ``r`` lives at bytes
``[r * record_bytes[t], (r + 1) * record_bytes[t])`` of the arena, so a slot's address is arithmetic
on its index (no page table on the read path) and page ``r // rows_per_page[t]`` owns it. Every tier's
slot range spans the whole arena; only the pages a tier owns hold live rows. A page that empties goes
back to one free list and can serve any tier next: precision follows content and pressure, not a split
fixed at start-up.

Page 0 always belongs to the fp16 tier: its row 0 is SGLang's padding slot (dummy writes land there).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .allocator import PoolExhaustedError, SlotError

__all__ = ["PageGeometry", "PagedRows", "PageTable", "choose_page_geometry", "grow_page_geometry"]

# A page holds between these many fp16 tokens (small pages fragment less; the search stops at the
# first size whose packed records waste at most _GOOD_WASTE of a page).
_MIN_FP16_ROWS, _MAX_FP16_ROWS = 16, 256
_GOOD_WASTE = 0.005


@dataclass(frozen=True)
class PageGeometry:
    """Bytes of a page and, per tier (fp16, warm, cold), rows per page and bytes per record (one layer, K or V)."""

    page_bytes: int
    rows_per_page: tuple[int, ...]
    record_bytes: tuple[int, ...]
    payload_bytes: tuple[int, ...]  # the record's used bytes; the rest is padding that aligns rows to the page

    def waste(self, tier: int) -> float:
        """Fraction of a page of ``tier`` that is padding."""
        return 1.0 - self.rows_per_page[tier] * self.payload_bytes[tier] / self.page_bytes


def _rows_for(page_bytes: int, payload: int, align: int = 2) -> int:
    """Most records of at least ``payload`` bytes (sizes a multiple of ``align``, at least even for the fp16
    scale views) that tile the page exactly."""
    rows = page_bytes // payload
    while rows > 0 and (page_bytes % rows or (page_bytes // rows) % align):
        rows -= 1
    return rows


def choose_page_geometry(fp16_row_bytes: int, packed_payloads: tuple[int, ...], record_align: int = 2) -> PageGeometry:
    """Smallest page (a whole number of fp16 rows) whose packed records tile it with little padding.

    ``packed_payloads``: natural bytes of one packed record per packed tier (0 = tier disabled).
    ``record_align``: every record size is a multiple of it (8 lets :func:`grow_page_geometry` scale the
    page by any number of quarters)."""
    if fp16_row_bytes <= 0 or fp16_row_bytes % record_align:
        raise ValueError(f"fp16 row bytes must be positive and a multiple of {record_align}, got {fp16_row_bytes}")
    best: tuple[float, PageGeometry] | None = None
    for fp16_rows in range(_MIN_FP16_ROWS, _MAX_FP16_ROWS + 1):
        page = fp16_rows * fp16_row_bytes
        rows = [fp16_rows]
        for payload in packed_payloads:
            rows.append(_rows_for(page, payload, record_align) if payload else 0)
        if any(p and r == 0 for p, r in zip(packed_payloads, rows[1:])):
            continue
        geom = PageGeometry(page, tuple(rows), tuple(page // r if r else 0 for r in rows),
                            (fp16_row_bytes, *packed_payloads))
        waste = max((geom.waste(t) for t in range(1, len(rows)) if rows[t]), default=0.0)
        if waste <= _GOOD_WASTE:
            return geom
        if best is None or waste < best[0] - 1e-12:
            best = (waste, geom)
    if best is None:
        raise ValueError(f"no page size tiles records of {packed_payloads} bytes with fp16 rows of "
                         f"{fp16_row_bytes} bytes")
    return best[1]


def grow_page_geometry(geometry: PageGeometry, packed_payloads: tuple[int, ...]) -> tuple[int, PageGeometry]:
    """The same rows per page in pages a whole number of quarters bigger, so that packed records of
    ``packed_payloads`` bytes (0 = tier disabled) fit: a protected layer's pages. A slot keeps one page
    and row index in every layer; only that layer's bytes per page grow (its fp16 rows get padding).

    Returns (quarters, geometry); 4 quarters = the geometry unchanged. Needs a geometry chosen with
    ``record_align=8`` (every record a multiple of 8 bytes, so any quarter step keeps them even)."""
    if any(r % 8 for r in geometry.record_bytes if r):
        raise ValueError(f"records of {geometry.record_bytes} bytes are not all multiples of 8")
    need = [-(-4 * p // r) for p, r in zip(packed_payloads, geometry.record_bytes[1:]) if p and r]
    quarters = max([4, *need])
    grown = PageGeometry(geometry.page_bytes * quarters // 4, geometry.rows_per_page,
                         tuple(r * quarters // 4 for r in geometry.record_bytes),
                         (geometry.payload_bytes[0], *(p if r else 0 for p, r in
                                                       zip(packed_payloads, geometry.rows_per_page[1:]))))
    return quarters, grown


class PageTable:
    """Which tier owns each page, how many rows of it are live, and the free pages.

    ``reserve_pages``: free pages only the packed tiers may claim, so demotion always finds room to
    write into even when fp16 holds every other page (demoting frees the fp16 rows it reads)."""

    FREE = -1

    def __init__(self, pages: int, device: torch.device | str, reserve_pages: int = 0,
                 max_pages: tuple[int, ...] | None = None):
        if pages < 1:
            raise ValueError(f"the arena needs at least one page, got {pages}")
        self.pages = pages
        self.device = torch.device(device)
        self.reserve_pages = min(reserve_pages, pages - 1)
        self.max_pages = max_pages
        self.clear()

    def clear(self) -> None:
        self.owner = [self.FREE] * self.pages  # host: page -> tier (or FREE)
        self.live = torch.zeros(self.pages, dtype=torch.int32, device=self.device)  # live rows per page
        self.free_list: list[int] = list(range(self.pages - 1, -1, -1))  # pop() takes the lowest page
        self.owned = [0, 0, 0]

    def free_pages(self) -> int:
        return len(self.free_list)

    def claimable(self, tier: int) -> int:
        """Pages ``tier`` may claim now (fp16 leaves the reserve to the packed tiers; packed tiers stop at their cap)."""
        n = len(self.free_list) - (self.reserve_pages if tier == 0 else 0)
        if self.max_pages is not None:
            n = min(n, self.max_pages[tier] - self.owned[tier])
        return max(0, n)

    def claim(self, tier: int, n: int) -> list[int]:
        """fp16 takes the lowest free pages, packed tiers the highest: fp16 fills from the bottom of the
        arena, so pages near the top drain as their tokens are demoted and come back for packed records."""
        if n > self.claimable(tier):
            raise PoolExhaustedError(f"cannot claim {n} pages for tier {tier}: {self.claimable(tier)} claimable")
        if tier == 0:
            got = [self.free_list.pop() for _ in range(n)]
        else:
            got, self.free_list = self.free_list[:n], self.free_list[n:]
        for p in got:
            self.owner[p] = tier
        self.owned[tier] += n
        return got

    def release(self, pages: list[int]) -> None:
        for p in pages:
            if self.owner[p] == self.FREE:
                raise SlotError(f"page {p} released twice")
            self.owned[self.owner[p]] -= 1
            self.owner[p] = self.FREE
        self.free_list.extend(pages)
        self.free_list.sort(reverse=True)  # descending: pop() is the lowest page, [0] the highest

    def owner_tensor(self) -> torch.Tensor:
        return torch.tensor(self.owner, dtype=torch.int8)


class PagedRows:
    """Row allocator of one tier over the shared :class:`PageTable`.

    Slots of this tier are ``[base, base + pages * rows_per_page)``; slot ``s`` is row ``s - base`` on
    page ``(s - base) // rows_per_page``. Free rows are kept only for pages this tier owns; a page
    whose last row is freed goes back to the table. ``strict`` verifies every free (host syncs)."""

    def __init__(self, name: str, tier: int, base: int, rows_per_page: int, table: PageTable,
                 strict: bool = True, pinned_rows: int = 0):
        self.name, self.tier, self.base, self.rows_per_page = name, tier, base, rows_per_page
        self.table = table
        self.device = table.device
        self.strict = strict
        self.pinned_rows = pinned_rows  # rows at the start of this tier's first page never handed out (padding)
        self.capacity = table.pages * rows_per_page if rows_per_page else 0
        self.clear()

    def clear(self) -> None:
        """Forget every row (the caller clears the shared table first)."""
        self.free_slots = torch.empty(0, dtype=torch.int64, device=self.device)
        self._unsorted = False
        self._owned = torch.zeros(self.capacity, dtype=torch.bool, device=self.device)
        self._used = 0
        if self.pinned_rows and self.capacity:
            self._claim_pages(1)  # page 0 carries the padding rows: owned by this tier for good
            pinned = torch.arange(self.base, self.base + self.pinned_rows, device=self.device)
            self.free_slots = self.free_slots[self.pinned_rows:]
            self.table.live[0] += self.pinned_rows
            self._owned[pinned - self.base] = True

    # ------------------------------------------------------------------ sizes
    def available(self) -> int:
        """Rows this tier can hand out now: free rows of its pages plus the pages it may claim."""
        if not self.capacity:
            return 0
        return int(self.free_slots.numel()) + self.table.claimable(self.tier) * self.rows_per_page

    def used(self) -> int:
        return self._used

    def owned_pages(self) -> int:
        return self.table.owned[self.tier]

    # ------------------------------------------------------------------ alloc / free
    def _claim_pages(self, n: int) -> None:
        pages = self.table.claim(self.tier, n)
        rows = torch.arange(self.rows_per_page, dtype=torch.int64, device=self.device)
        new = torch.cat([self.base + p * self.rows_per_page + rows for p in pages])
        self.free_slots = torch.cat((self.free_slots, new))
        self._unsorted = True

    def try_alloc(self, n: int) -> torch.Tensor | None:
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of slots ({n})")
        if n > self.available():
            return None
        short = n - int(self.free_slots.numel())
        if short > 0:  # every claimed page gets at least one live row: pages are taken only as needed
            self._claim_pages(math.ceil(short / self.rows_per_page))
        if self._unsorted:  # lowest rows first: holes low in the arena fill, pages high up drain and free
            self.free_slots = torch.sort(self.free_slots).values
            self._unsorted = False
        out, self.free_slots = self.free_slots[:n], self.free_slots[n:]
        if n:
            self.table.live.index_add_(0, (out - self.base) // self.rows_per_page,
                                       torch.ones_like(out, dtype=torch.int32))
            self._owned[out - self.base] = True
            self._used += n
        return out

    def alloc(self, n: int) -> torch.Tensor:
        out = self.try_alloc(n)
        if out is None:
            raise PoolExhaustedError(f"{self.name} tier exhausted: need {n} slots, {self.available()} available")
        return out

    def free(self, slots: torch.Tensor, checked: bool = False) -> None:
        """``checked``: the caller already ran :meth:`check_owned` on ``slots``."""
        if slots.numel() == 0:
            return
        slots = slots.to(torch.int64)
        if self.strict and not checked:
            self.check_owned(slots)
        local = slots - self.base
        self._owned[local] = False
        pages = local // self.rows_per_page
        self.table.live.index_add_(0, pages, torch.full_like(pages, -1, dtype=torch.int32))
        self.free_slots = torch.cat((self.free_slots, slots))
        self._unsorted = True
        self._used -= int(slots.numel())
        touched = torch.unique(pages)
        emptied = touched[self.table.live[touched] == 0]
        if emptied.numel():  # one host sync per free that empties pages
            keep = self.table.live[(self.free_slots - self.base) // self.rows_per_page] > 0
            self.free_slots = self.free_slots[keep]
            self.table.release(emptied.tolist())

    def check_owned(self, slots: torch.Tensor) -> None:
        local = slots.to(torch.int64) - self.base
        if bool(((local < 0) | (local >= self.capacity)).any()):
            raise SlotError(f"slots outside the {self.name} tier range [{self.base}, {self.base + self.capacity})")
        if self.pinned_rows and bool((local < self.pinned_rows).any()):
            raise SlotError(f"the padding slot{'s' if self.pinned_rows > 1 else ''} below {self.base + self.pinned_rows} "
                            "are never allocated")
        if not bool(self._owned[local].all()):
            raise SlotError(f"freeing {self.name} slots that are not allocated (double free?)")
        if torch.unique(local).numel() != local.numel():
            raise SlotError(f"the same {self.name} slot appears twice in one free")

    def owned_mask(self) -> torch.Tensor:
        return self._owned.clone()
