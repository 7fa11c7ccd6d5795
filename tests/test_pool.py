"""Tiered pool core: layout, allocation, demotion, reads vs the original values, accounting, errors."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fade_sglang.config import FadeConfig
from fade_sglang.pool import PoolExhaustedError, SlotError, Tier, TierLayout
from fade_sglang.patches.pool import TieredKVPool
from fade_sglang.eval.synthetic import synthetic_kv
from pool_checks import check_pool_accounting, physical_pages

LAYERS, HEADS, DIM = 2, 2, 64


def make_pool(size: int = 4000, preset: str | None = None, **overrides) -> TieredKVPool:
    """``preset`` None: the knobs' defaults (INT4 warm, INT2 cold, keys as values), the layout these tests'
    byte counts are written for."""
    cfg = FadeConfig.from_preset(preset) if preset else FadeConfig()
    cfg = cfg.with_overrides(overrides) if overrides else cfg
    return TieredKVPool(size=size, page_size=1, dtype=torch.float32, head_num=HEADS, head_dim=DIM,
                        layer_num=LAYERS, device="cpu", enable_memory_saver=False, fade_config=cfg)


def write_tokens(pool: TieredKVPool, slots: torch.Tensor, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    written = []
    for layer in range(LAYERS):
        k, v = synthetic_kv(slots.numel(), HEADS, DIM, seed=seed * 31 + layer)
        pool.set_kv_buffer(SimpleNamespace(layer_id=layer), slots, k, v)
        written.append((k, v))
    return written


def rel_err_per_token(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.double() - b.double()).norm(dim=(-1, -2)) / b.double().norm(dim=(-1, -2))


def test_layout_tier_is_a_function_of_the_index() -> None:
    lay = TierLayout(fp16_slots=10, warm_slots=20, cold_slots=5)
    slots = torch.tensor([0, 1, 10, 11, 30, 31, 35])
    assert lay.tier_of(slots).tolist() == [0, 0, 0, 1, 1, 2, 2]
    assert (lay.warm_base, lay.cold_base, lay.end, lay.total_slots) == (11, 31, 36, 35)


def test_pool_has_the_bytes_of_a_plain_pool_and_more_tokens_when_packed() -> None:
    """``size`` is the fp16 tokens of a plain pool of the same bytes: every preset's arena holds ``size``
    fp16 tokens (whole pages plus, when packing is on, one reserve page) and nothing is split off at
    start-up; packed tiers only raise the most tokens the same bytes can hold."""
    plain_bytes = (4000 + 1) * 2 * LAYERS * HEADS * DIM * 4  # SGLang's MHA pool: padding row + 4000, fp32
    capacity = {}
    for preset in ("safe", "balanced", "aggressive"):
        pool = make_pool(size=4000, preset=preset)
        page = 2 * LAYERS * pool.geometry.page_bytes
        assert plain_bytes <= pool.arena_nbytes() <= plain_bytes + 2 * page
        assert pool.available(Tier.FP16) >= 4000  # a fresh pool takes `size` fp16 tokens, whatever the preset
        stats = pool.tier_stats()
        assert stats["arena_bytes"] == pool.arena_nbytes()
        capacity[preset] = stats["capacity_tokens"]
        assert capacity[preset] > stats["fp16_capacity_tokens"] >= 4000
    # densest tier: safe k8v4 (2.46x at 16 bits), balanced INT4 group 32 (3.2x), aggressive k4v3 (4x)
    assert capacity["safe"] < capacity["balanced"] < capacity["aggressive"]
    off = make_pool(size=4000, tier_max_share={"warm": 0.0, "cold": 0.0})
    assert not off.stores and off.available(Tier.WARM) == off.available(Tier.COLD) == 0
    assert off.tier_stats()["capacity_tokens"] == off.available(Tier.FP16)  # no reserve page: all fp16
    assert off.arena_nbytes() <= plain_bytes + 2 * LAYERS * off.geometry.page_bytes


def test_fp16_fills_the_arena_but_the_reserve_page() -> None:
    """fp16 may own every page except one reserve page that only packed tiers claim (demotion needs room
    to write before it frees fp16 rows); once fp16 is full, the packed tiers have just that page."""
    pool = make_pool(size=300)
    rpp = pool.geometry.rows_per_page
    n = pool.available(Tier.FP16)
    assert n >= 300 and n == (pool.pages - 1) * rpp[Tier.FP16] - 1  # all pages but the reserve, less padding
    slots = pool.alloc(n)
    assert pool.available(Tier.FP16) == 0 and pool.try_alloc(1) is None
    assert pool.available(Tier.WARM) == rpp[Tier.WARM] and pool.available(Tier.COLD) == rpp[Tier.COLD]
    warm = pool.alloc(rpp[Tier.WARM], Tier.WARM)  # the reserve page, whole
    assert pool.available(Tier.WARM) == pool.available(Tier.COLD) == 0
    check_pool_accounting(pool, torch.cat((slots, warm)))
    pool.free(warm)  # empty again: back on the free list, for either packed tier
    assert pool.available(Tier.COLD) == rpp[Tier.COLD] and pool.available(Tier.FP16) == 0
    # Demotion writes into the reserve page first, then frees the fp16 rows it read: whole fp16 pages
    # among them go back to the free list, and fp16 may take all of them but one (the new reserve).
    write_tokens(pool, slots)
    moved = pool.demote(slots[1:rpp[Tier.WARM] + 1], Tier.WARM)
    assert (pool.tier_of(moved) == Tier.WARM).all()
    held = torch.cat((slots[:1], moved, slots[rpp[Tier.WARM] + 1:]))
    check_pool_accounting(pool, held)
    free_pages = pool.page_table.free_pages()
    assert free_pages >= 2 and pool.available(Tier.COLD) == free_pages * rpp[Tier.COLD]
    fp16_free_rows = pool.page_table.owned[Tier.FP16] * rpp[Tier.FP16] - 1 - pool.used(Tier.FP16)
    assert pool.available(Tier.FP16) == (free_pages - 1) * rpp[Tier.FP16] + fp16_free_rows


def test_freeing_a_whole_page_returns_it_to_any_tier() -> None:
    pool = make_pool(size=300)
    rpp = pool.geometry.rows_per_page
    slots = pool.alloc(pool.available(Tier.FP16))
    page_of = physical_pages(pool, slots, Tier.FP16)
    target = int(page_of[-1]) - 1  # a full page that is not page 0 (the padding slot pins page 0)
    on_page = slots[page_of == target]
    assert on_page.numel() == rpp[Tier.FP16]
    pool.free(on_page[:-1])  # a partly free page stays fp16's
    assert pool.page_table.free_pages() == 1 and pool.page_table.owner[target] == Tier.FP16
    assert pool.available(Tier.FP16) == rpp[Tier.FP16] - 1
    pool.free(on_page[-1:])  # its last row: the page is free for any tier
    assert pool.page_table.free_pages() == 2 and pool.page_table.owner[target] == pool.page_table.FREE
    assert pool.available(Tier.WARM) == 2 * rpp[Tier.WARM]
    warm = pool.alloc(rpp[Tier.WARM] + 1, Tier.WARM)  # a page and a row: the freed page is the lower one
    warm_pages = set(physical_pages(pool, warm, Tier.WARM).tolist())
    assert target in warm_pages and len(warm_pages) == 2
    assert pool.available(Tier.FP16) == 0  # the free rows left are warm's
    held = torch.cat((slots[page_of != target], warm))
    check_pool_accounting(pool, held)
    pool.free(held)
    assert pool.page_table.free_pages() == pool.pages - 1  # all but page 0
    assert pool.available(Tier.FP16) == (pool.pages - 1) * rpp[Tier.FP16] - 1


def test_a_capped_tier_claims_no_more_pages_than_its_share() -> None:
    pool = make_pool(size=400, tier_max_share={"warm": 0.25, "cold": 0.0})
    rpp = pool.geometry.rows_per_page
    cap = int(pool.pages * 0.25)
    assert cap >= 1 and pool.page_table.free_pages() > cap  # room in the arena, not in warm's share
    assert pool.available(Tier.WARM) == cap * rpp[Tier.WARM]
    warm = pool.alloc(cap * rpp[Tier.WARM], Tier.WARM)
    assert pool.available(Tier.WARM) == 0 and pool.try_alloc(1, Tier.WARM) is None
    with pytest.raises(PoolExhaustedError, match="warm tier exhausted"):
        pool.alloc(1, Tier.WARM)
    assert pool.page_table.owned[Tier.WARM] == cap
    assert pool.available(Tier.FP16) > 0  # the rest of the arena is still fp16's
    pool.free(warm[:rpp[Tier.WARM]])  # one page back: warm may claim one page again
    assert pool.available(Tier.WARM) == rpp[Tier.WARM]
    check_pool_accounting(pool, warm[rpp[Tier.WARM]:])


def test_demote_and_read_back_within_tier_tolerance() -> None:
    pool = make_pool()
    slots = pool.alloc(96)
    written = write_tokens(pool, slots)
    warm = pool.demote(slots[16:80], Tier.WARM)
    assert (pool.tier_of(warm) == Tier.WARM).all()
    cold_from_warm = pool.demote(warm[32:], Tier.COLD)
    cold_from_fp16 = pool.demote(slots[80:], Tier.COLD)
    current = torch.cat([slots[:16], warm[:32], cold_from_warm, cold_from_fp16])
    for layer, (k, v) in enumerate(written):
        rk, rv = pool.read_kv(layer, current)
        assert torch.equal(rk[:16], k[:16]) and torch.equal(rv[:16], v[:16])  # fp16 tier is exact (fp32 dtype here)
        assert rel_err_per_token(rk[16:48], k[16:48]).max() < 0.12
        assert rel_err_per_token(rv[16:48], v[16:48]).max() < 0.15
        assert rel_err_per_token(rk[48:], k[48:]).max() < 0.45
        assert rel_err_per_token(rv[48:], v[48:]).max() < 0.5
        # Error must be real: packed tiers are not silently stored in full precision.
        assert rel_err_per_token(rk[16:48], k[16:48]).mean() > 1e-3
    stats = pool.tier_stats()
    assert stats["tiers"]["fp16"]["used"] == 16 and stats["tiers"]["int4"]["used"] == 32
    assert stats["tiers"]["int2"]["used"] == 48
    assert stats["demoted_tokens"] == {"fp16->int4": 64, "fp16->int2": 16, "int4->int2": 32}
    assert stats["stored_bytes"] == sum(stats["tiers"][n]["used"] * stats["tiers"][n]["bytes_per_token"]
                                        for n in ("fp16", "int4", "int2"))
    assert stats["compression_ratio"] > 1.5


def test_write_into_packed_slot_quantizes_on_write() -> None:
    pool = make_pool()
    slots = pool.alloc(8, Tier.WARM)
    (k, v), _ = write_tokens(pool, slots)
    rk, rv = pool.read_kv(0, slots)
    assert 1e-4 < rel_err_per_token(rk, k).max() < 0.12


def test_demote_is_atomic_and_rejects_bad_requests() -> None:
    pool = make_pool(size=400, tier_max_share={"warm": 0.1, "cold": 0.1})  # warm may own 10% of the pages
    assert pool.available(Tier.WARM) < pool.available(Tier.FP16)
    free_before = [pool.available(t) for t in Tier]
    slots = pool.alloc(min(pool.available(Tier.FP16), pool.available(Tier.WARM) + 5))
    write_tokens(pool, slots)
    pages_before = (list(pool.page_table.owner), pool.page_table.live.clone())
    with pytest.raises(PoolExhaustedError, match="tier exhausted"):
        pool.demote(slots, Tier.WARM)
    assert pool.available(Tier.WARM) == free_before[Tier.WARM]  # nothing half-done
    assert pool.available(Tier.FP16) == free_before[Tier.FP16] - slots.numel()
    assert pool.page_table.owner == pages_before[0] and torch.equal(pool.page_table.live, pages_before[1])
    check_pool_accounting(pool, slots)
    with pytest.raises(SlotError, match="cannot demote to the fp16 tier"):
        pool.demote(slots[:2], Tier.FP16)
    with pytest.raises(SlotError, match="unknown tier 7"):
        pool.demote(slots[:2], 7)
    cold = pool.demote(slots[:2], Tier.COLD)
    with pytest.raises(SlotError, match="cannot promote"):
        pool.demote(cold, Tier.WARM)
    with pytest.raises(SlotError, match="out of range"):
        pool.demote(torch.tensor([pool.layout.end + 3]), Tier.WARM)
    with pytest.raises(SlotError, match="int32/int64"):
        pool.demote(torch.tensor([1.0]), Tier.WARM)


def test_disabled_cold_tier_and_bad_writes() -> None:
    pool = make_pool(preset="safe")
    slots = pool.alloc(4)
    write_tokens(pool, slots)
    with pytest.raises(PoolExhaustedError, match="disabled"):
        pool.demote(slots, Tier.COLD)
    layer = SimpleNamespace(layer_id=0)
    with pytest.raises(ValueError, match="shape"):
        pool.set_kv_buffer(layer, slots, torch.randn(4, HEADS, DIM + 1), torch.randn(4, HEADS, DIM + 1))
    with pytest.raises(TypeError, match="floating-point"):
        pool.set_kv_buffer(layer, slots, torch.ones(4, HEADS, DIM, dtype=torch.int32),
                           torch.ones(4, HEADS, DIM, dtype=torch.int32))
    with pytest.raises(SlotError, match="out of range"):
        pool.set_kv_buffer(layer, torch.tensor([pool.layout.end]), torch.randn(1, HEADS, DIM),
                           torch.randn(1, HEADS, DIM))


def test_double_free_and_exhaustion_are_loud() -> None:
    pool = make_pool(size=300)
    n = pool.available(Tier.FP16)
    slots = pool.alloc(n)
    assert pool.try_alloc(1) is None
    with pytest.raises(PoolExhaustedError):
        pool.alloc(1)
    pool.free(slots[:3])
    with pytest.raises(SlotError, match="double free"):
        pool.free(slots[:1])
    with pytest.raises(SlotError, match="twice"):
        pool.free(torch.cat([slots[5:6], slots[5:6]]))


def test_storage_bytes_are_exact() -> None:
    pool = make_pool()
    fp16_bytes = 2 * LAYERS * HEADS * DIM * 4  # fp32 model dtype in this test
    warm_bytes = 2 * LAYERS * HEADS * (DIM // 2 + 4 * (DIM // 64))
    cold_bytes = 2 * LAYERS * HEADS * (DIM // 4 + 4 * (DIM // 32))
    assert pool.tier_bytes == (fp16_bytes, warm_bytes, cold_bytes)
    k_bytes, v_bytes = pool.get_kv_size_bytes()
    # One arena: the fp16 buffers and the packed stores are views of it, so its bytes are all there is.
    assert k_bytes + v_bytes == pool.arena_nbytes() == pool.arena.nbytes
    assert pool.arena_nbytes() == LAYERS * 2 * pool.pages * pool.geometry.page_bytes
    base = pool.arena.untyped_storage().data_ptr()
    views = [pool.k_buffer[0], pool.v_buffer[-1], *(t for s in pool.stores.values() for p in (s.key, s.value) for t in (p.data, p.scale, p.zero))]
    assert all(v.untyped_storage().data_ptr() == base for v in views)


ops = st.lists(st.tuples(st.sampled_from(["alloc", "free", "warm", "cold"]), st.integers(1, 40), st.integers(0, 10**6)),
               min_size=1, max_size=40)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops)
def test_random_sequences_conserve_slots(sequence) -> None:
    pool = make_pool(size=400, tier_max_share={"warm": 0.5, "cold": 0.5})  # small: pages fill, caps bind
    fresh = [pool.available(t) for t in Tier]
    live: list[int] = []  # slots we own, any tier
    for op, n, pick in sequence:
        if op == "alloc":
            got = pool.try_alloc(n)
            if got is not None:
                live += got.tolist()
        elif live:
            start = pick % len(live)
            chosen = live[start:start + n]
            if op == "free":
                pool.free(torch.tensor(chosen))
                del live[start:start + n]
            else:
                try:
                    new = pool.demote(torch.tensor(chosen), Tier.WARM if op == "warm" else Tier.COLD)
                except (PoolExhaustedError, SlotError):
                    continue  # full tier, or a promotion request: rejected without changes
                live[start:start + n] = new.tolist()
        assert len(set(live)) == len(live)  # every slot owned once
        check_pool_accounting(pool, torch.tensor(live, dtype=torch.int64))
    pool.free(torch.tensor(live, dtype=torch.int64))
    assert [pool.available(t) for t in Tier] == fresh  # every page back on the free list
    assert pool.page_table.free_pages() == pool.pages - 1


@pytest.mark.triton
def test_demotion_through_the_quantize_kernel_matches_the_torch_path() -> None:
    """The fused Triton quantize-on-demote (CUDA default; interpreter here) stores what the torch path stores."""
    from fade_sglang.kernels import quantize_rows

    pools = [make_pool(), make_pool()]
    pools[1].quantize_rows_fn = quantize_rows  # pools[0] keeps the torch path on CPU
    reads = []
    for pool in pools:
        slots = pool.alloc(80)
        write_tokens(pool, slots, seed=3)
        slots[8:40] = pool.demote(slots[8:40], Tier.WARM)  # first demotion freezes centers (torch path)
        slots[40:72] = pool.demote(slots[40:72], Tier.WARM)  # fused gather + rotate + center + pack
        slots[24:56] = pool.demote(slots[24:56], Tier.COLD)  # warm -> cold from the warm values
        reads.append([pool.read_kv(layer, slots) for layer in range(LAYERS)])
    for (k0, v0), (k1, v1) in zip(*reads):
        assert rel_err_per_token(k1, k0).max() < 0.05 and rel_err_per_token(v1, v0).max() < 0.05
        assert rel_err_per_token(k1, k0).mean() < 5e-3  # codes agree except at rounding ties
