"""Layer groups: the layers that share packed record formats and page bytes.

A slot keeps its token at the same page and row in every layer (one page table for all layers); what may
differ per layer is how many bytes a page has there. Unprotected layers use the pool's page geometry.
Protected layers (``FadeConfig.protected_layers``: the few layers that carry most of the quantization
error on a model) get pages a whole number of quarters bigger, with the same rows per page, and fill the
bigger records with more bits: at least ``protected_key_bits`` / ``protected_value_bits``, raised
further (values first, then keys, up to 8 bits) while the record still fits. Their fp16 rows are
padded to the bigger record, so each protected layer costs its extra quarters on every page, fp16
pages included; the arena holds correspondingly fewer pages for the same bytes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..config import FadeConfig
from ..quant import QuantFormat
from ..quant.formats import SUPPORTED_BITS
from .layout import Tier
from .packed_store import PackedRecordLayout, PackedTierStore
from .pages import PageGeometry, choose_page_geometry, grow_page_geometry

__all__ = ["GroupPlan", "LayerGroup", "plan_layer_groups", "group_tier_bytes", "record_layouts"]

PACKED_TIERS = (Tier.WARM, Tier.COLD)


def record_layouts(cfg: FadeConfig, heads: int, head_dim: int) -> dict[Tier, PackedRecordLayout]:
    """Byte layout of a record row of each packed tier (its key and value formats), unprotected layers."""
    return {Tier.WARM: PackedRecordLayout(cfg.warm_key_format, cfg.warm_format, heads, head_dim),
            Tier.COLD: PackedRecordLayout(cfg.cold_key_format, cfg.cold_format, heads, head_dim)}


def _enabled(cfg: FadeConfig) -> dict[Tier, bool]:
    return {Tier.WARM: cfg.warm_enabled, Tier.COLD: cfg.cold_enabled}


@dataclass(frozen=True)
class GroupPlan:
    """Layers (0-based, local to the pool) that share ``geometry`` (page and record bytes) and ``formats``."""

    layers: tuple[int, ...]
    geometry: PageGeometry
    formats: dict[Tier, PackedRecordLayout]
    protected: bool = False
    page_growth: float = 1.0  # page bytes against an unprotected layer's

    def token_bytes(self, tier: Tier) -> int:
        """Bytes one token takes in this group (all its layers, K and V). Unprotected layers count their
        natural bytes (the page geometry pads records by at most half a percent); protected layers count
        their whole grown record, padding included (the padding is what protection costs)."""
        n = len(self.layers)
        if self.protected:
            return n * 2 * self.geometry.record_bytes[tier]
        return n * (2 * self.geometry.payload_bytes[Tier.FP16] if tier == Tier.FP16 else self.formats[tier].token_bytes)


def _raised(fmt: QuantFormat, bits: int) -> QuantFormat:
    return dataclasses.replace(fmt, bits=max(fmt.bits, bits))


def _protected_layouts(cfg: FadeConfig, heads: int, head_dim: int, room: dict[Tier, int] | None
                       ) -> dict[Tier, PackedRecordLayout]:
    """Formats of protected layers: the configured minimum, then (with ``room``: record bytes per tier)
    values and then keys raised a step at a time while the record still fits."""
    out = {}
    for t in PACKED_TIERS:
        key, value = cfg.protected_formats(int(t))
        lay = PackedRecordLayout(key, value, heads, head_dim)
        if room is not None:
            for part in ("value", "key", "value", "key"):
                fmt = getattr(lay, part)
                if fmt.bits >= 8:
                    continue
                step = min(b for b in SUPPORTED_BITS if b >= 2 * fmt.bits or b == 8)  # 2 -> 4 -> 8, 3 -> 8
                better = dataclasses.replace(lay, **{part: _raised(fmt, step)})
                if better.payload <= room[t]:
                    lay = better
        out[t] = lay
    return out


def plan_layer_groups(cfg: FadeConfig, layers: int, heads: int, head_dim: int, dtype: torch.dtype | int
                      ) -> list[GroupPlan]:
    """The pool's layer groups: unprotected layers first (their geometry is the pool's row structure),
    then the protected ones. One group when no layer is protected (or protecting changes nothing)."""
    elem = dtype if isinstance(dtype, int) else torch.empty((), dtype=dtype).element_size()
    bad = cfg.protected_out_of_range(layers)
    if bad:
        raise ValueError(f"fade config: protected_layers {bad} out of range (the model has {layers} layers)")
    base = record_layouts(cfg, heads, head_dim)
    on = _enabled(cfg)
    payloads = tuple(base[t].payload if on[t] else 0 for t in PACKED_TIERS)
    protected = set(cfg.protected_layers)
    minimum = _protected_layouts(cfg, heads, head_dim, None)
    if protected and any(on[t] and minimum[t].payload > base[t].payload for t in PACKED_TIERS):
        geometry = choose_page_geometry(heads * head_dim * elem, payloads, record_align=8)
        quarters, grown = grow_page_geometry(geometry, tuple(minimum[t].payload if on[t] else 0 for t in PACKED_TIERS))
        room = {t: grown.record_bytes[t] for t in PACKED_TIERS}
        formats = _protected_layouts(cfg, heads, head_dim, room)
        grown = dataclasses.replace(grown, payload_bytes=(grown.payload_bytes[0], *(
            formats[t].payload if on[t] else 0 for t in PACKED_TIERS)))
        plans = [GroupPlan(tuple(l for l in range(layers) if l not in protected), geometry, base),
                 GroupPlan(tuple(sorted(protected)), grown, formats, protected=True, page_growth=quarters / 4)]
        return [p for p in plans if p.layers]
    return [GroupPlan(tuple(range(layers)), choose_page_geometry(heads * head_dim * elem, payloads), base)]


def group_tier_bytes(plans: list[GroupPlan]) -> tuple[int, int, int]:
    """Storage bytes of one token (all layers, K and V) in each tier, scales and zeros included."""
    return tuple(sum(p.token_bytes(t) for p in plans) for t in Tier)  # type: ignore[return-value]


class LayerGroup:
    """One group's byte arena ``uint8 [layers, 2, pages * page_bytes]`` and every tier's view of it:
    fp16 ``[layers, 2, rows, H, D]`` (rows strided by the group's fp16 record) and the packed stores."""

    def __init__(self, plan: GroupPlan, pages: int, dtype: torch.dtype, heads: int, head_dim: int,
                 device: torch.device | str, packed_rows: dict[Tier, int]):
        self.plan = plan
        self.layers = plan.layers
        geom = plan.geometry
        n = len(plan.layers)
        elem = torch.empty((), dtype=dtype).element_size()
        self.arena = torch.zeros(n, 2, pages * geom.page_bytes, dtype=torch.uint8, device=device)
        rows = pages * geom.rows_per_page[Tier.FP16]
        padded = self.arena.view(dtype).view(n, 2, rows, geom.record_bytes[Tier.FP16] // elem)
        self.kv_fp16 = padded[..., :heads * head_dim].unflatten(-1, (heads, head_dim))
        self.stores = {t: PackedTierStore(plan.formats[t], self.arena, packed_rows[t], geom.record_bytes[t])
                       for t in PACKED_TIERS if packed_rows[t] > 0}
