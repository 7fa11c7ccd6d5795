"""Accounting invariants of the tiered pool's shared page arena (imported by pool and radix tests)."""

from __future__ import annotations

import torch

from fade_sglang.pool import Tier


def check_pool_accounting(pool, held: torch.Tensor) -> None:
    """``held``: every slot the caller owns (any tiers, each once). Checks that they match the pool's
    per-tier counters and ownership masks, that each live row sits on a page its tier owns, that the page
    table's live counts, owners, free list and per-tier caps agree, and what ``available`` reports."""
    table = pool.page_table
    held = held.to(torch.int64)
    tiers = pool.tier_of(held)
    live = torch.zeros(table.pages, dtype=torch.int64)
    for t in Tier:
        a = pool.allocators[t]
        mine = held[tiers == t]
        assert pool.used(t) == mine.numel(), f"{t.name}: used {pool.used(t)} but {mine.numel()} held"
        mask = a.owned_mask()
        assert int(mask.sum()) == mine.numel() + a.pinned_rows, f"leaked/unaccounted {t.name} slots"
        if mine.numel():
            assert bool(mask[mine - a.base].all())
            pages = (mine - a.base) // a.rows_per_page
            owners = {table.owner[p] for p in pages.unique().tolist()}
            assert owners == {int(t)}, f"{t.name} rows on pages owned by {owners}"
            live.index_add_(0, pages, torch.ones_like(pages))
        if a.rows_per_page:
            free_rows = table.owned[t] * a.rows_per_page - mine.numel() - a.pinned_rows
            assert pool.available(t) == free_rows + table.claimable(t) * a.rows_per_page
        else:  # disabled tier
            assert pool.available(t) == 0 and table.owned[t] == 0
    live[0] += pool.allocators[Tier.FP16].pinned_rows  # the padding slot keeps page 0 with fp16
    assert live.tolist() == table.live.tolist(), "page live-row counts disagree with the rows held"
    free = [p for p in range(table.pages) if table.owner[p] == table.FREE]
    assert sorted(table.free_list) == free, "free list disagrees with page owners"
    assert all(live[p] > 0 for p in range(table.pages) if table.owner[p] != table.FREE), \
        "an owned page without live rows was not returned to the free list"
    assert [sum(o == t for o in table.owner) for t in Tier] == list(table.owned)
    assert all(table.owned[t] <= table.max_pages[t] for t in Tier), "a tier owns more pages than its cap"
    check_rows_on_owned_pages(pool, held)


def physical_pages(pool, slots: torch.Tensor, tier: Tier) -> torch.Tensor:
    """Arena page that the bytes of each slot's record occupy, from the tier's tensor view (its data
    pointer and row stride), independent of the allocator's own page arithmetic."""
    arena = pool.arena
    if tier == Tier.FP16:
        view, rows = pool.kv_fp16[0, 0], slots
    else:
        view, rows = pool.stores[tier].key.data[0], slots - pool.layout.base(tier)
    start = view.data_ptr() - arena.data_ptr()
    row_bytes = view.stride(0) * view.element_size()
    first = (start + rows * row_bytes) // pool.geometry.page_bytes
    last = (start + (rows + 1) * row_bytes - 1) // pool.geometry.page_bytes
    assert torch.equal(first, last), f"a {tier.name} record straddles two pages"
    return first


def check_rows_on_owned_pages(pool, held: torch.Tensor) -> None:
    """Every held slot's record lies in an arena page that its tier owns (else two tiers share bytes)."""
    held = held.to(torch.int64)
    tiers = pool.tier_of(held)
    for t in Tier:
        mine = held[tiers == t]
        if mine.numel():
            pages = physical_pages(pool, mine, t).unique().tolist()
            wrong = {p: pool.page_table.owner[p] for p in pages if pool.page_table.owner[p] != int(t)}
            assert not wrong, f"{t.name} records lie on pages owned by others {{page: owner}}: {wrong}"
