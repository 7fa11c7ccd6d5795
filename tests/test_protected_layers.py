"""Protected layers (``protected_layers``): a few sensitive layers store every packed tier at more bits, in
pages a whole number of quarters bigger; every other layer, and the slot / page structure, is unchanged.

On SmolLM2 two of 30 layers carry three quarters of the INT4 error (benchmarks/RESULTS.md)."""

from __future__ import annotations

import pytest
import torch

from fade_sglang.config import FadeConfig, FadeConfigError
from fade_sglang.eval.synthetic import synthetic_kv
from fade_sglang.pool import Tier
from fade_sglang.pool.layer_groups import plan_layer_groups
from fade_sglang.pool.pages import choose_page_geometry, grow_page_geometry
from fade_sglang.pool.tiered_store import TieredKVStore

LAYERS, HEADS, DIM = 4, 3, 64


def _store(preset: str = "aggressive", size: int = 600, dtype: torch.dtype = torch.float16, **knobs) -> TieredKVStore:
    cfg = FadeConfig.from_preset(preset).with_overrides(knobs)
    return TieredKVStore(size, dtype, HEADS, DIM, LAYERS, "cpu", fade_config=cfg)


def test_config_parses_and_validates_protected_layers() -> None:
    cfg = FadeConfig().with_overrides({"protected_layers": "23, 18,18"})
    assert cfg.protected_layers == (18, 23) and "protected_layers=18,23" in cfg.summary()
    assert FadeConfig.from_json(cfg.to_json()).protected_layers == (18, 23)
    assert FadeConfig.from_json('{"protected_layers": [2, 0]}').protected_layers == (0, 2)
    assert FadeConfig().with_overrides({"protected_layers": ""}).protected_layers == ()
    for bad in ({"protected_layers": "x"}, {"protected_layers": [-1]}, {"protected_layers": [1.5]},
                {"protected_key_bits": 6}, {"protected_value_bits": True}):
        with pytest.raises(FadeConfigError, match="protected_"):
            FadeConfig().with_overrides(bad)
    key, value = FadeConfig.from_preset("aggressive").protected_formats(2)  # cold k4v3 -> at least k8v4
    assert (key.bits, value.bits, key.group_size) == (8, 4, 64)


def test_out_of_range_layer_is_one_clear_error() -> None:
    with pytest.raises(ValueError, match=r"protected_layers \[7\] out of range \(the model has 4 layers\)"):
        _store(protected_layers=[1, 7])


def test_grown_geometry_keeps_rows_and_scales_every_record() -> None:
    geom = choose_page_geometry(HEADS * DIM * 2, (3 * 54, 3 * 40), record_align=8)
    assert all(r % 8 == 0 for r in geom.record_bytes)
    quarters, grown = grow_page_geometry(geom, (3 * 70, 3 * 60))
    assert quarters == 6 and grown.rows_per_page == geom.rows_per_page
    assert grown.page_bytes * 4 == geom.page_bytes * quarters
    assert all(g * 4 == r * quarters for g, r in zip(grown.record_bytes, geom.record_bytes))
    assert grown.record_bytes[1] >= 3 * 70 and grown.record_bytes[2] >= 3 * 60
    assert grow_page_geometry(geom, (3 * 54, 3 * 40))[0] == 4  # fits already: unchanged
    with pytest.raises(ValueError, match="multiples of 8"):
        grow_page_geometry(choose_page_geometry(HEADS * DIM * 2, (3 * 54 + 2, 3 * 40)), (400, 400))


def test_plan_without_protection_is_the_plain_geometry() -> None:
    cfg = FadeConfig.from_preset("balanced")
    (plan,) = plan_layer_groups(cfg, LAYERS, HEADS, DIM, torch.float16)
    assert plan.layers == tuple(range(LAYERS)) and not plan.protected
    # safe's warm tier is k8v4 already, and its cold tier is off: protecting changes nothing, one group
    (same,) = plan_layer_groups(FadeConfig.from_preset("safe").with_overrides({"protected_layers": [1]}),
                                LAYERS, HEADS, DIM, torch.float16)
    assert not same.protected and same.layers == tuple(range(LAYERS))


@pytest.mark.parametrize("preset", ["balanced", "aggressive"])
def test_protected_group_formats_fill_their_records(preset: str) -> None:
    cfg = FadeConfig.from_preset(preset).with_overrides({"protected_layers": [1, 3]})
    plain, prot = plan_layer_groups(cfg, LAYERS, HEADS, DIM, torch.float16)
    assert plain.layers == (0, 2) and prot.layers == (1, 3) and prot.protected
    assert prot.geometry.rows_per_page == plain.geometry.rows_per_page
    for t in (Tier.WARM, Tier.COLD):
        lay, base = prot.formats[t], plain.formats[t]
        assert lay.key.bits >= max(8, base.key.bits) and lay.value.bits >= max(4, base.value.bits)
        assert lay.payload <= prot.geometry.record_bytes[t]
        assert lay.key.group_size == base.key.group_size
    if preset == "balanced":  # warm k8v4 gets the room its grown page has: k8v8
        assert (prot.formats[Tier.WARM].key.bits, prot.formats[Tier.WARM].value.bits) == (8, 8)


def test_arena_keeps_the_plain_bytes_and_pays_in_fp16_rows() -> None:
    size = 1000
    plain = _store(size=size)
    prot = _store(size=size, protected_layers=[1])
    plain_bytes = (size + 1) * LAYERS * 2 * HEADS * DIM * 2
    page_group = prot.page_group_bytes()
    assert prot.arena_nbytes() <= plain_bytes + 2 * page_group  # the reserve page and rounding, as unprotected
    assert sum(g.arena.nbytes for g in prot.groups) == prot.arena_nbytes()
    assert prot.layout.fp16_slots < plain.layout.fp16_slots  # protected pages are bigger: fewer of them
    ratio = prot.layout.fp16_slots / plain.layout.fp16_slots
    grow = prot.groups[1].plan.geometry.page_bytes / prot.groups[0].plan.geometry.page_bytes
    assert ratio == pytest.approx(LAYERS / (LAYERS - 1 + grow), abs=0.03)
    every = _store(size=size, protected_layers=list(range(LAYERS)))  # one group, all of it protected
    assert len(every.groups) == 1 and every.protected_layers == tuple(range(LAYERS))
    assert every.arena_nbytes() <= plain_bytes + 2 * every.page_group_bytes()
    assert every.layout.fp16_slots < prot.layout.fp16_slots
    assert prot.protection_summary().startswith("protected layers 1: int4 -> k8v")
    assert prot.protection_summary().endswith(f"in pages {grow:.2f}x the size (fp16 rows padded)")
    assert every.protection_summary().endswith(f"in pages {grow:.2f}x the size (fp16 rows padded)")
    with pytest.raises(AttributeError, match="layer group"):
        prot.arena
    k, v = prot.k_buffer[1], prot.k_buffer[0]
    assert not k.is_contiguous() and v.is_contiguous()  # protected fp16 rows are padded to the bigger record
    # tier bytes count the protected layer's whole record, the others their natural bytes
    assert prot.tier_bytes[0] == (LAYERS - 1) * 2 * HEADS * DIM * 2 + 2 * prot.groups[1].plan.geometry.record_bytes[0]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_protected_layer_round_trip_is_far_more_precise_and_nothing_overlaps() -> None:
    """Random demotions and frees over a mixed pool: every live slot of every layer keeps what it held
    (fp16 bit-exact, packed as read right after its demotion), and the protected layer's keys come back
    several times closer to the float32 originals than the others'."""
    store = _store(size=700, protected_layers=[2])
    gen = torch.Generator().manual_seed(0)
    n = 240
    kv = [synthetic_kv(n, HEADS, DIM, seed=10 + l) for l in range(LAYERS)]  # outlier channels in K
    slots = store.alloc(n)
    for l, (k, v) in enumerate(kv):
        store.write_kv(l, slots, k, v)
    expect = {l: [t.to(torch.float16).float() for t in kv[l]] for l in range(LAYERS)}
    perm = torch.randperm(n, generator=gen)
    warm, cold, freed = perm[:110], perm[110:190], perm[190:215]
    slots[warm] = store.demote(slots[warm], Tier.WARM)
    slots[cold[:30]] = store.demote(slots[cold[:30]], Tier.WARM)
    slots[cold] = store.demote(slots[cold], Tier.COLD)
    store.free(slots[freed])
    live = torch.ones(n, dtype=torch.bool)
    live[freed] = False
    snapshot = {l: store.read_kv(l, slots[live]) for l in range(LAYERS)}
    errs = {}
    for l in range(LAYERS):
        k0, v0 = (x[live] for x in expect[l])
        errs[l] = {t: _rel(snapshot[l][0][sel], k0[sel]) for t, sel in
                   (("warm", store.tier_of(slots[live]) == 1), ("cold", store.tier_of(slots[live]) == 2))}
        fp = store.tier_of(slots[live]) == 0
        assert torch.equal(snapshot[l][0][fp], k0[fp]) and torch.equal(snapshot[l][1][fp], v0[fp])
    for t in ("warm", "cold"):
        others = min(errs[l][t] for l in (0, 1, 3))
        assert errs[2][t] < others / 4, (t, errs)
    # new fp16 tokens reuse freed rows and pages; nothing already stored may change
    more = store.alloc(60)
    for l in range(LAYERS):
        k, v = synthetic_kv(60, HEADS, DIM, seed=99 + l)
        store.write_kv(l, more, k, v)
        assert torch.equal(store.read_kv(l, more)[0], k.to(torch.float16).float())
    store.demote(more[:30], Tier.COLD)
    for l in range(LAYERS):
        now = store.read_kv(l, slots[live])
        assert torch.equal(now[0], snapshot[l][0]) and torch.equal(now[1], snapshot[l][1])


def test_stats_ratio_counts_protected_bytes() -> None:
    store = _store(size=600, protected_layers=[0])
    slots = store.alloc(200)
    for l in range(LAYERS):
        store.write_kv(l, slots, *synthetic_kv(200, HEADS, DIM, seed=l))
    all_fp16 = store.tier_stats()["compression_vs_16bit"]
    assert all_fp16 < 1.0  # the protected layer's padded fp16 rows cost bytes even before anything is demoted
    store.demote(slots[:150], Tier.WARM)
    stats = store.tier_stats()
    want = 200 * 2 * LAYERS * HEADS * DIM * 2 / (50 * store.tier_bytes[0] + 150 * store.tier_bytes[1])
    assert stats["compression_vs_16bit"] == pytest.approx(want)
    assert stats["arena_bytes"] == store.arena_nbytes()
