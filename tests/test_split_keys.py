"""Keys at more bits than values (``warm_key_bits`` / ``cold_key_bits``): record layout, pool round trip, config.

Keys carry most of the quantization error on SmolLM2 (benchmarks/RESULTS.md): a tier may store them at
8 bits and values at 4. The K codes that do not fit the K half of a record row spill into its V half."""

from __future__ import annotations

import pytest
import torch

from fade_sglang.config import FadeConfig, FadeConfigError
from fade_sglang.eval.synthetic import synthetic_kv
from fade_sglang.pool import Tier
from fade_sglang.pool.packed_store import PackedRecordLayout
from fade_sglang.pool.tiered_store import TieredKVStore
from fade_sglang.quant import QuantFormat

LAYOUTS = [  # (key bits, key group, value bits, value group, heads, head_dim)
    (8, 64, 4, 64, 3, 64), (8, 64, 4, 64, 8, 128), (4, 32, 2, 32, 3, 64), (8, 32, 2, 32, 2, 128),
    (4, 64, 4, 64, 3, 64), (2, 32, 4, 64, 4, 64), (8, 16, 4, 16, 2, 80), (8, 32, 4, 32, 1, 96),
]


def _byte_offsets(t: torch.Tensor, arena: torch.Tensor) -> set[int]:
    """Arena byte offsets covered by ``t`` (a view of ``arena``)."""
    elem = t.element_size()
    base = t.storage_offset() * elem - arena.storage_offset()
    idx = torch.zeros((), dtype=torch.int64)
    for size, stride in zip(t.shape, t.stride()):
        idx = idx[..., None] + torch.arange(size) * stride * elem
    return {base + int(i) + b for i in idx.reshape(-1) for b in range(elem)}


@pytest.mark.parametrize("kb,kg,vb,vg,heads,d", LAYOUTS)
def test_record_layout_balances_halves_and_tiles_rows_without_overlap(kb, kg, vb, vg, heads, d) -> None:
    lay = PackedRecordLayout(QuantFormat(kb, kg), QuantFormat(vb, vg), heads, d)
    k_half, v_half = lay.half_payloads
    assert lay.token_bytes == heads * (QuantFormat(kb, kg).bytes_per_token_head(d)
                                       + QuantFormat(vb, vg).bytes_per_token_head(d))
    assert k_half + v_half == lay.token_bytes and lay.payload == max(k_half, v_half) + max(k_half, v_half) % 2
    if kb >= vb:  # spilling balances the halves to within the even rounding of the split
        assert abs(k_half - v_half) <= 2 * heads
    rows, rec = 3, lay.payload + 2  # a padded record, as the page geometry may choose
    arena = torch.zeros(2, 2, rows * rec + 16, dtype=torch.uint8)
    key, value = lay.views(arena, rows, rec)
    tensors = [key.data, key.scale, key.zero, value.data, value.scale, value.zero]
    tensors += [key.data_b] if key.data_b is not None else []
    assert (key.data_b is None) == (lay.key_split == QuantFormat(kb, kg).packed_dim(d))
    seen: set[int] = set()
    for t in tensors:
        assert t.shape[:3] == (2, rows, heads)
        mine = _byte_offsets(t, arena)
        assert not (mine & seen), "two parts of a record share bytes"
        seen |= mine
    half = arena.shape[2]
    for off in seen:  # every byte inside its row's record, in one of the two halves of its layer
        layer, rest = divmod(off, 2 * half)
        assert (rest % half) < rows * rec and (rest % half) % rec < lay.payload
    assert len(seen) == 2 * rows * lay.token_bytes  # every payload byte of every row is some part's


def _store(**overrides) -> TieredKVStore:
    cfg = FadeConfig().with_overrides(overrides)  # the knobs' defaults: INT4 warm, INT2 cold
    return TieredKVStore(400, torch.float16, 3, 64, 2, "cpu", fade_config=cfg)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).norm(dim=-1) / b.norm(dim=-1)).mean())


def test_keys_at_eight_bits_cut_key_error_and_keep_value_error() -> None:
    """Same tokens demoted to the warm (and cold) tier of a K4V4 / K2V2 pool and of a K8V4 / K4V2 pool."""
    k, v = synthetic_kv(64, 3, 64, seed=7)  # outlier channels in K, as real keys have
    errors = {}
    for name, over in (("same", {}), ("split", {"warm_key_bits": 8, "cold_key_bits": 4})):
        store = _store(**over)
        slots = store.alloc(64)
        for layer in range(2):
            store.write_kv(layer, slots, k.half(), v.half())
        warm = store.demote(slots[:32], Tier.WARM)
        cold = store.demote(store.demote(slots[32:], Tier.WARM), Tier.COLD)  # the warm -> cold path too
        for layer in range(2):
            kw, vw = store.read_kv(layer, warm)
            kc, vc = store.read_kv(layer, cold)
            errors[name, layer] = (_rel(kw, k[:32]), _rel(vw, v[:32]), _rel(kc, k[32:]), _rel(vc, v[32:]))
        names = store.fade_config.tier_display_names()
        assert store.tier_stats()["tiers"][names[1]]["used"] == 32 and store.tier_stats()["tiers"][names[2]]["used"] == 32
    assert _store(warm_key_bits=8, cold_key_bits=4).fade_config.tier_display_names() == ("fp16", "k8v4", "k4v2")
    for layer in range(2):
        same, split = errors["same", layer], errors["split", layer]
        assert split[0] < same[0] / 8, (same, split)  # INT8 keys: an order of magnitude closer than INT4
        assert split[1] == pytest.approx(same[1], rel=1e-6)  # values: the same INT4 format, the same bytes
        assert split[2] < same[2] / 2  # cold keys at 4 bits (via the 8-bit warm copy) beat 2-bit keys
        assert split[3] == pytest.approx(same[3], rel=0.05)  # cold values INT2 either way (their warm copy differs)


def test_split_key_tiers_cost_their_exact_bytes() -> None:
    store = _store(warm_key_bits=8)
    fp16, warm, cold = store.tier_bytes
    assert fp16 == 2 * 2 * 3 * 64 * 2
    assert warm == 2 * 3 * ((64 + 4) + (32 + 4))  # per layer and head: INT8 keys + INT4 values, group 64
    assert cold == 2 * 3 * 2 * (16 + 8)  # INT2 group 32 for both
    g = store.geometry
    assert g.record_bytes[Tier.WARM] * 2 >= warm // 2 and g.waste(Tier.WARM) < 0.05
    # fewer warm rows per page than INT4 keys would give, more than INT8 for both
    int4 = _store().geometry
    int8 = _store(warm_bits=8).geometry
    ratio = lambda geom: geom.rows_per_page[Tier.WARM] / geom.rows_per_page[Tier.FP16]  # noqa: E731
    assert ratio(int8) < ratio(g) < ratio(int4)


@pytest.mark.parametrize("overrides,match", [
    ({"warm_key_bits": 5}, "warm_key_bits"),
    ({"warm_key_bits": True}, "warm_key_bits"),
    ({"cold_key_bits": 8}, "cold_key_bits"),  # cold keys above warm keys (4)
    ({"warm_key_bits": 2, "cold_key_bits": 4}, "cold_key_bits"),
])
def test_key_bits_are_validated(overrides, match) -> None:
    with pytest.raises(FadeConfigError, match=match):
        FadeConfig().with_overrides(overrides)


def test_key_bits_default_to_the_tier_bits() -> None:
    cfg = FadeConfig()
    assert cfg.key_bits == (4, 2) and cfg.tier_display_names() == ("fp16", "int4", "int2")
    cfg = cfg.with_overrides({"warm_key_bits": "8"})  # a CLI string
    assert cfg.key_bits == (8, 2) and cfg.warm_key_format == QuantFormat(8, 64, clip_search=False)
    presets = {name: FadeConfig.from_preset(name).tier_display_names()[1:] for name in ("safe", "balanced", "aggressive")}
    assert presets == {"safe": ("k8v4", "int2"), "balanced": ("k8v4", "int4"), "aggressive": ("int4", "k4v3")}


def test_keys_skip_the_clip_search_values_keep_it() -> None:
    cfg = FadeConfig()
    assert not cfg.warm_key_format.clip_search and not cfg.cold_key_format.clip_search
    assert cfg.warm_format.clip_search and cfg.cold_format.clip_search
    assert not cfg.with_overrides({"protected_layers": [0]}).protected_formats(1)[0].clip_search
    clipped = cfg.with_overrides({"key_clip_search": "true"})  # a CLI string
    assert clipped.warm_key_format.clip_search and clipped.protected_formats(2)[0].clip_search
    with pytest.raises(FadeConfigError, match="key_clip_search"):
        cfg.with_overrides({"key_clip_search": 1})


def _packed_keys(store: TieredKVStore, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(stored, exact) keys of layer 0 in the packed space after demotion to the warm tier."""
    slots = store.alloc(k.shape[0])
    for layer in range(2):
        store.write_kv(layer, slots, k, v)
    exact = store._to_packed_space(torch.stack((k, v)), 0)[0]  # centers froze on the first write
    rows = store.layout.local_index(store.demote(slots, Tier.WARM), Tier.WARM)
    return store.groups[0].stores[Tier.WARM].key.layer(0).read(rows), exact


def test_unclipped_keys_keep_their_largest_components_clipped_keys_trade_them_for_mse() -> None:
    """The clip search lowers a key group's squared error by trimming its extremes; the attention logits
    weight exactly those (real queries align with the large key components), so keys skip it."""
    k, v = synthetic_kv(96, 3, 64, seed=3)  # outlier channels in K
    stored, exact = _packed_keys(_store(), k.half(), v.half())
    stored_c, exact_c = _packed_keys(_store(key_clip_search=True), k.half(), v.half())
    assert torch.equal(exact, exact_c)
    top = exact.abs().argmax(-1, keepdim=True)  # each token's and head's largest component (group 64 = row)
    err_top = (stored - exact).gather(-1, top).abs().mean()
    err_top_c = (stored_c - exact).gather(-1, top).abs().mean()
    assert err_top < err_top_c / 4, (err_top, err_top_c)
    mse, mse_c = (stored - exact).square().mean(), (stored_c - exact).square().mean()
    assert mse_c < mse  # what the search optimizes
