"""TieredKVStore: one byte arena holding three precision tiers (the SGLang-free core of the pool).

The pool SGLang serves from (``fade_sglang.patches.pool.TieredKVPool``) is this store behind
SGLang's ``MHATokenToKVPool`` interface; everything here runs without SGLang.

* One ``uint8 [layers, 2, pages * page_bytes]`` arena, handed out in pages that one tier owns
  while they hold live rows (:mod:`.pages`). Nothing is partitioned at start-up: a fresh pool
  can hold as many fp16 tokens as a plain pool of the same bytes.
* FP16 tier: the arena viewed as ``[layers, 2, rows, H, D]`` (model dtype); its per-layer views
  are SGLang's ``k_buffer`` / ``v_buffer``, so every write path SGLang has keeps working; new
  tokens always land here.
* Warm / cold tiers: :class:`PackedTierStore` strided views of the same arena (packed INT4 / INT2
  by default) in the rotated space, K additionally centered by a per-(layer, head)
  mean frozen at the first demotion (a fixed shift of every key leaves softmax
  unchanged; readers add it back, so results do not depend on its value).
* ``demote(slots, tier)`` moves tokens down a tier for all layers in one batched
  pass, quantizing each token once per tier change from its highest-precision
  copy (warm -> cold necessarily starts from the warm values; the fidelity report
  measures that path as ``tier-int2-via-int4``).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import torch

from ..config import FadeConfig
from ..quant import rotation_matrix, rounding_factor
from .allocator import PoolExhaustedError, SlotError
from .layout import Tier, TierLayout
from .layer_groups import GroupPlan, LayerGroup, group_tier_bytes, plan_layer_groups, record_layouts
from .packed_store import PackedTierStore
from .pages import PagedRows, PageTable
from .view import PackedLayerKV, TieredLayerKV, gather_kv

__all__ = ["PackedLayerKV", "QuantizeRowsFn", "TieredKVStore", "TieredLayerKV",
           "record_layouts", "tier_bytes_per_token"]  # record_layouts: re-exported from .layer_groups

logger = logging.getLogger(__name__)
# Upper bound of the float32 temporaries of one demotion chunk ([layers, 2, n, H, D]).
_DEMOTE_CHUNK_ELEMS = 1 << 24
# The fused quantize launch (``fade_sglang.kernels.quantize_rows``); the adapter injects it where it runs.
QuantizeRowsFn = Callable[..., None]


def tier_bytes_per_token(cfg: FadeConfig, layers: int, heads: int, head_dim: int,
                         dtype: torch.dtype | int) -> tuple[int, int, int]:
    """Storage bytes of one token (all layers, K and V) in each tier, scales and zeros included (protected
    layers count their whole grown record). ``dtype``: the fp16 tier's dtype, or its element size in bytes."""
    return group_tier_bytes(plan_layer_groups(cfg, layers, heads, head_dim, dtype))


def arena_pages(size: int, plans: list[GroupPlan], page_size: int = 1, reserve_pages: int = 0) -> int:
    """Pages of the bytes of ``size`` plain fp16 tokens plus SGLang's padding slot (rounded up to a whole
    page), plus the pages fp16 may not claim. Without protected layers the fp16 tier alone holds at least
    ``size`` tokens; protected layers' bigger pages leave correspondingly fewer at the same bytes."""
    if len(plans) == 1 and not plans[0].protected:  # every page holds rows_per_page[0] plain fp16 rows
        return -(-(size + page_size) // plans[0].geometry.rows_per_page[0]) + reserve_pages
    plain = (size + page_size) * plans[0].geometry.payload_bytes[Tier.FP16] * sum(len(p.layers) for p in plans)
    per_page = sum(len(p.layers) * p.geometry.page_bytes for p in plans)
    return -(-plain // per_page) + reserve_pages


class TieredKVStore:
    """``size``: fp16 tokens of the same bytes (SGLang sizes it as for plain KV); the arena holds that
    many fp16 rows (rounded up to whole pages), or up to ``rows_per_page`` times more packed ones.

    ``quantize_rows_fn``: the fused quantize kernel used for demotion (the adapter passes it on CUDA);
    None quantizes with the torch reference. ``allocate_fp16=False`` leaves the fp16 buffer to a
    subclass whose base class allocates buffers later (it calls :meth:`_allocate_fp16` then).
    """

    def __init__(self, size: int, dtype: torch.dtype, head_num: int, head_dim: int, layer_num: int,
                 device: str | torch.device, fade_config: FadeConfig | None = None, strict: bool | None = None,
                 quantize_rows_fn: QuantizeRowsFn | None = None, page_size: int = 1, allocate_fp16: bool = True):
        cfg = fade_config or FadeConfig()
        if page_size != 1:
            raise ValueError(f"fade KV compression supports page_size 1 only (got {page_size})")
        self.fade_config = cfg
        self.head_num, self.head_dim, self.layer_num = head_num, head_dim, layer_num
        self.start_layer = 0
        self.group_plans = plan_layer_groups(cfg, layer_num, head_num, head_dim, dtype)  # checks the formats too
        self.tier_bytes = group_tier_bytes(self.group_plans)
        # Rows per page (and the ratios of record sizes) are the same in every group: the first group's
        # geometry is the pool's row structure; only page bytes differ per group.
        self.geometry = self.group_plans[0].geometry
        # One free page kept for the packed tiers: demotion needs somewhere to write before it frees fp16 rows.
        reserve = 1 if cfg.compresses else 0
        self.pages = arena_pages(size, self.group_plans, page_size, reserve)
        rows = [self.pages * r for r in self.geometry.rows_per_page]
        self.layout = TierLayout(rows[0] - page_size, rows[1], rows[2], page_size=page_size)
        self.total_size = self.layout.total_slots
        self.strict = (torch.device(device).type == "cpu") if strict is None else strict
        self.quantize_rows_fn = quantize_rows_fn
        self.rotation = rotation_matrix(head_dim, cfg.rotation_seed, torch.float32, device) if cfg.rotation else None
        self.k_center = torch.zeros(layer_num, head_num, head_dim, dtype=torch.float32, device=device)
        self._center_frozen = [not cfg.center_keys] * layer_num
        self._init_query_aware(cfg.query_aware_keys and cfg.compresses, layer_num, head_num, head_dim, device)
        self._dtype, self._device = dtype, torch.device(device)
        max_pages = tuple(int(self.pages * share) for share in cfg.max_shares)
        self.page_table = PageTable(self.pages, device, reserve_pages=reserve, max_pages=max_pages)
        # fp16 rows are global slots (row 0 is SGLang's padding, pinned); packed rows start at their range's base.
        self.allocators = [PagedRows(t.name.lower(), int(t), 0 if t == Tier.FP16 else self.layout.base(t),
                                     self.geometry.rows_per_page[t], self.page_table, self.strict,
                                     pinned_rows=page_size if t == Tier.FP16 else 0)
                           for t in Tier]
        self.groups: list[LayerGroup] = []
        self._where: list[tuple[LayerGroup, int]] = []  # layer -> (its group, its index there)
        self.demoted_tokens = {(Tier.FP16, Tier.WARM): 0, (Tier.FP16, Tier.COLD): 0, (Tier.WARM, Tier.COLD): 0}
        if allocate_fp16:
            self._allocate_fp16(dtype, device)

    def fp16_buffer_shape(self) -> tuple[int, int, int]:
        """Rows of one fp16 K (or V) layer: the whole arena as fp16 rows (slot 0 is the padding)."""
        return (self.layout.fp16_slots + self.layout.page_size, self.head_num, self.head_dim)

    def _allocate_fp16(self, dtype: torch.dtype, device: str | torch.device) -> None:
        """Each layer group's arena, and every tier's view of it: fp16 ``[layers, 2, rows, H, D]`` and the
        packed stores; SGLang's per-layer K / V buffers are the fp16 views."""
        rows = {t: self.layout.capacity(t) for t in (Tier.WARM, Tier.COLD)}
        self.groups = [LayerGroup(p, self.pages, dtype, self.head_num, self.head_dim, device, rows)
                       for p in self.group_plans]
        self._where = [None] * self.layer_num  # type: ignore[list-item]
        for g in self.groups:
            for i, l in enumerate(g.layers):
                self._where[l] = (g, i)
        self.k_buffer = [g.kv_fp16[i, 0] for g, i in self._where]
        self.v_buffer = [g.kv_fp16[i, 1] for g, i in self._where]

    def _single_group(self) -> LayerGroup:
        if len(self.groups) != 1:
            raise AttributeError("this pool has protected layers: its arena is one tensor per layer group (.groups)")
        return self.groups[0]

    @property
    def arena(self) -> torch.Tensor:
        """The byte arena ``[layers, 2, bytes]`` (pools without protected layers; else see ``groups``)."""
        return self._single_group().arena

    @property
    def kv_fp16(self) -> torch.Tensor:
        """The fp16 view ``[layers, 2, rows, H, D]`` (pools without protected layers; else see ``groups``)."""
        return self._single_group().kv_fp16

    @property
    def stores(self) -> dict[Tier, PackedTierStore]:
        """The packed stores of every layer (pools without protected layers; else see ``groups``)."""
        return self._single_group().stores if self.groups else {}

    @property
    def protected_layers(self) -> tuple[int, ...]:
        """Layers stored at more bits in bigger pages (empty when protection changes nothing)."""
        return tuple(l for p in self.group_plans if p.protected for l in p.layers)

    def protection_summary(self) -> str:
        """One line on the protected layers' formats and page cost ("" when no layer is protected)."""
        plans = [p for p in self.group_plans if p.protected]
        if not plans:
            return ""
        p = plans[0]
        on = (self.fade_config.warm_enabled, self.fade_config.cold_enabled)
        formats = ", ".join(f"{name} -> k{p.formats[t].key.bits}v{p.formats[t].value.bits}"
                            for name, t, enabled in zip(self.fade_config.tier_display_names()[1:],
                                                        (Tier.WARM, Tier.COLD), on) if enabled)
        return (f"protected layers {','.join(map(str, p.layers))}: {formats}, in pages "
                f"{p.page_growth:.2f}x the size (fp16 rows padded)")

    def arena_nbytes(self) -> int:
        """Bytes of the arena (all tiers, K and V, all layers)."""
        return self.pages * self.page_group_bytes()

    def page_group_bytes(self) -> int:
        """Bytes of one page across all layers, K and V."""
        return sum(2 * len(p.layers) * p.geometry.page_bytes for p in self.group_plans)

    def clear_slots(self) -> None:
        """Free every slot of every tier (the pages go back to the free list; page 0 keeps the padding)."""
        self.page_table.clear()
        for a in self.allocators:
            a.clear()

    # ------------------------------------------------------------------ slots
    def tier_of(self, slots: torch.Tensor) -> torch.Tensor:
        return self.layout.tier_of(slots)

    def _as_slots(self, slots: torch.Tensor) -> torch.Tensor:
        if slots.dtype not in (torch.int32, torch.int64):
            raise SlotError(f"slot indices must be int32/int64, got {slots.dtype}")
        return slots.to(device=self._device, dtype=torch.int64).reshape(-1)

    def _check_slots(self, slots: torch.Tensor) -> None:
        if slots.numel() and bool(((slots < self.layout.page_size) | (slots >= self.layout.end)).any()):
            raise SlotError(f"slot index out of range [{self.layout.page_size}, {self.layout.end})")

    def try_alloc(self, n: int, tier: Tier = Tier.FP16) -> torch.Tensor | None:
        return self.allocators[_tier(tier)].try_alloc(n)

    def alloc(self, n: int, tier: Tier = Tier.FP16) -> torch.Tensor:
        return self.allocators[_tier(tier)].alloc(n)

    def free(self, slots: torch.Tensor) -> None:
        """Free slots of any tiers (SGLang frees radix/request slots without knowing their tier)."""
        if slots.numel() == 0:
            return
        slots = self._as_slots(slots)
        if self.strict:
            self._check_slots(slots)
        tiers = self.tier_of(slots)
        parts = [(t, slots[tiers == t]) for t in Tier]
        if self.strict:  # check every part before freeing any: a bad free changes nothing
            for t, part in parts:
                if part.numel():
                    self.allocators[t].check_owned(part)
        for t, part in parts:
            if part.numel():
                self.allocators[t].free(part, checked=True)

    def available(self, tier: Tier = Tier.FP16) -> int:
        return self.allocators[_tier(tier)].available()

    def used(self, tier: Tier) -> int:
        return self.allocators[_tier(tier)].used()

    # ------------------------------------------------------------------ rotated / centered space
    def _to_packed_space(self, kv: torch.Tensor, layers: int | Sequence[int]) -> torch.Tensor:
        """Model-space [2, n, H, D] of one layer (or [len(layers), 2, n, H, D]) -> float32 rotated space,
        K centered (freezing centers first)."""
        x = kv.float()
        if self.rotation is not None:
            x = x @ self.rotation
        layer_ids = [layers] if isinstance(layers, int) else list(layers)
        self._freeze_centers(x if x.dim() == 5 else x[None], layer_ids)
        if isinstance(layers, int):
            x[0] -= self.k_center[layers][None]
        else:
            x[:, 0] -= self.k_center[layer_ids][:, None]
        return x

    def _freeze_centers(self, x: torch.Tensor, layer_ids: list[int]) -> None:
        for i, l in enumerate(layer_ids):
            if not self._center_frozen[l] and x.shape[2] > 0:
                self.k_center[l] = x[i, 0].mean(0)
                self._center_frozen[l] = True

    # ------------------------------------------------------------------ query-aware key rounding
    def _init_query_aware(self, enabled: bool, layers: int, heads: int, head_dim: int,
                          device: str | torch.device) -> None:
        """``key_feedback [layers, H, D, D]``: each layer's rounding factor (identity = nearest rounding until
        queries were seen), fixed at the layer's first demotion from the query moment gathered until then."""
        self.key_feedback: torch.Tensor | None = None
        self._rounding_frozen = [True] * layers
        if not enabled:
            return
        eye = torch.eye(head_dim, dtype=torch.float32, device=device)
        self.key_feedback = eye.expand(layers, heads, head_dim, head_dim).clone()
        self._query_moment = torch.zeros(layers, heads, head_dim, head_dim, dtype=torch.float32, device=device)
        self._query_count = [0] * layers
        self._rounding_frozen = [False] * layers

    def observe_queries(self, layer_id: int, q: torch.Tensor) -> None:
        """Add the queries ``q [n, Hq, D]`` (model space) of one layer to its moment, until its first demotion
        fixes its rounding factor (a no-op after that, and when query-aware rounding is off)."""
        l = layer_id - self.start_layer
        if self._rounding_frozen[l] or q.shape[0] == 0:
            return
        n, q_heads, d = q.shape
        x = q.float() @ self.rotation if self.rotation is not None else q.float()
        # GQA: the query heads of one KV head read the same keys, so their moments pool.
        x = x.reshape(n, self.head_num, q_heads // self.head_num, d).transpose(0, 1).reshape(self.head_num, -1, d)
        self._query_moment[l] += x.transpose(1, 2) @ x
        self._query_count[l] += x.shape[1]

    def _freeze_rounding(self, layer_ids: Sequence[int]) -> None:
        for l in layer_ids:
            if self._rounding_frozen[l]:
                continue
            if self._query_count[l]:
                try:
                    self.key_feedback[l] = rounding_factor(self._query_moment[l] / self._query_count[l])
                except torch.linalg.LinAlgError:  # non-finite queries: this layer keeps nearest rounding
                    logger.warning("[fade] layer %d: query moment not usable, its keys round to nearest", l)
                    self._query_count[l] = 0
            self._rounding_frozen[l] = True
        if all(self._rounding_frozen):
            self._query_moment = None  # every factor is fixed: the moments are not read again

    def _key_feedback(self, layer_ids: Sequence[int]) -> torch.Tensor | None:
        """The rounding factors of ``layer_ids`` as ``[layers, 1, H, D, D]`` (fixing unfixed ones first); None
        where none of them saw a query (nearest rounding, the Triton quantize kernel may take it)."""
        if self.key_feedback is None:
            return None
        self._freeze_rounding(layer_ids)
        if not any(self._query_count[l] for l in layer_ids):
            return None
        return self.key_feedback[list(layer_ids)][:, None]

    # ------------------------------------------------------------------ writes
    def write_kv(self, layer_idx: int, loc: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor) -> None:
        """Write K/V of one layer (counted from 0); slots in packed tiers are quantized on write."""
        loc, cache_k, cache_v = self.write_packed_part(layer_idx, loc, cache_k, cache_v)
        if loc.numel():
            self.k_buffer[layer_idx][loc] = cache_k.to(self._dtype)
            self.v_buffer[layer_idx][loc] = cache_v.to(self._dtype)

    def write_packed_part(self, layer_idx: int, loc: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Quantize the rows of ``loc`` that fall in packed tiers and return the fp16 rest.

        Only in strict mode: serving only ever writes fp16 slots, so the GPU path skips the check."""
        if not self.strict:
            return loc, cache_k, cache_v
        self._check_write(loc, cache_k, cache_v)
        packed = loc >= self.layout.warm_base
        if not bool(packed.any()):
            return loc, cache_k, cache_v
        self._write_packed(layer_idx, loc[packed], cache_k[packed], cache_v[packed])
        keep = ~packed
        return loc[keep], cache_k[keep], cache_v[keep]

    def _check_write(self, loc: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor) -> None:
        want = (loc.shape[0], self.head_num, self.head_dim)
        for name, t in (("cache_k", cache_k), ("cache_v", cache_v)):
            if tuple(t.shape) != want:
                raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {want}")
            if not t.is_floating_point():
                raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if loc.numel() and bool(((loc < 0) | (loc >= self.layout.end)).any()):
            raise SlotError(f"write slot out of range [0, {self.layout.end})")

    def _write_packed(self, layer_idx: int, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        tiers = self.tier_of(loc)
        x = self._to_packed_space(torch.stack((k, v)), layer_idx)
        group, i = self._where[layer_idx]
        feedback = self._key_feedback([layer_idx])
        for t in (Tier.WARM, Tier.COLD):
            sel = tiers == t
            if bool(sel.any()):
                group.stores[t].write(self.layout.local_index(loc[sel], t), x[:, sel], layer=i,
                                      key_feedback=None if feedback is None else feedback[0])

    # ------------------------------------------------------------------ demotion
    def demote(self, slots: torch.Tensor, to_tier: Tier | int) -> torch.Tensor:
        """Move ``slots`` down to ``to_tier`` for all layers; return the new slot of every input slot.

        Slots already in ``to_tier`` are returned unchanged. Atomic: on error nothing changes.
        """
        to = _tier(to_tier)
        if to == Tier.FP16:
            raise SlotError("cannot demote to the fp16 tier (it is the top tier)")
        slots = self._as_slots(slots)
        self._check_slots(slots)
        tiers = self.tier_of(slots)
        if bool((tiers > to).any()):
            raise SlotError(f"cannot promote slots to the {to.name.lower()} tier (demote only moves down)")
        move = tiers < to
        n_move = int(move.sum())
        out = slots.clone()
        if n_move == 0:
            return out
        if not self.groups or to not in self.groups[0].stores:
            raise PoolExhaustedError(f"the {to.name.lower()} tier is disabled (tier_max_share 0)")
        if self.strict and torch.unique(slots).numel() != slots.numel():
            raise SlotError("demote got the same slot twice")
        new = self.allocators[to].try_alloc(n_move)
        if new is None:
            raise PoolExhaustedError(f"{to.name.lower()} tier exhausted: need {n_move} slots, "
                                     f"{self.available(to)} free")
        src, src_tiers = slots[move], tiers[move]
        moved = {}
        try:  # all-or-nothing: the copies only write the new slots, so undoing is freeing them
            for t in (Tier.FP16, Tier.WARM):
                sel = src_tiers == t
                if bool(sel.any()):
                    self._copy_down(src[sel], t, new[sel], to)
                    moved[t] = int(sel.sum())
        except BaseException:
            self.allocators[to].free(new)
            raise
        for t, n in moved.items():
            self.demoted_tokens[(t, to)] += n
        self.free(src)
        out[move] = new
        return out

    def _copy_down(self, src: torch.Tensor, src_tier: Tier, dst: torch.Tensor, dst_tier: Tier) -> None:
        for group in self.groups:
            self._copy_down_group(group, src, src_tier, dst, dst_tier)

    def _copy_down_group(self, group: LayerGroup, src: torch.Tensor, src_tier: Tier, dst: torch.Tensor,
                         dst_tier: Tier) -> None:
        per_token = len(group.layers) * 2 * self.head_num * self.head_dim
        step = max(1, _DEMOTE_CHUNK_ELEMS // per_token)
        store = group.stores[dst_tier]
        feedback = self._key_feedback(group.layers)
        # Query-aware keys round in torch (the Triton quantize kernel rounds to nearest).
        kernel = self.quantize_rows_fn is not None and feedback is None
        for i in range(0, src.numel(), step):  # bounded temporaries; chunks of many tokens, not a token loop
            s, d = src[i:i + step], self.layout.local_index(dst[i:i + step], dst_tier)
            if src_tier == Tier.FP16 and kernel and all(self._center_frozen):
                self._quantize_kernel(group, group.kv_fp16, d, store, src_rows=s, fused=True)
                continue
            if src_tier == Tier.FP16:
                x = self._to_packed_space(group.kv_fp16[:, :, s], group.layers)  # freezes centers on first use
            else:
                x = group.stores[src_tier].read(self.layout.local_index(s, src_tier))
            if kernel:
                self._quantize_kernel(group, x, d, store)
            else:
                store.write(d, x, key_feedback=feedback)

    def _quantize_kernel(self, group: LayerGroup, src: torch.Tensor, rows: torch.Tensor, store: PackedTierStore,
                         src_rows: torch.Tensor | None = None, fused: bool = False) -> None:
        """One launch for all of a group's layers per part (K, V); ``fused`` gathers model-space rows and
        rotates / centers in-kernel."""
        center = self.k_center[list(group.layers)] if fused and self.fade_config.center_keys else None
        for kv, part in enumerate((store.key, store.value)):
            self.quantize_rows_fn(src[:, kv], part, rows, src_rows=src_rows, rotation=self.rotation if fused else None,
                                  k_center=center if kv == 0 else None)

    # ------------------------------------------------------------------ reads
    def read_kv(self, layer_id: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gather K, V (float32, model space) of ``slots`` for one layer, dequantizing packed tiers."""
        slots = self._as_slots(slots)
        if self.strict and slots.numel() and bool(((slots < 0) | (slots >= self.layout.end)).any()):
            raise SlotError(f"slot index out of range [0, {self.layout.end})")
        return gather_kv(self.layer_view(layer_id), slots)

    def layer_view(self, layer_id: int) -> TieredLayerKV:
        l = layer_id - self.start_layer

        group, i = self._where[l]

        def packed(t: Tier) -> PackedLayerKV | None:
            s = group.stores.get(t)
            if s is None:
                return None
            return PackedLayerKV(s.key.layer(i), s.value.layer(i), self.layout.base(t))

        return TieredLayerKV(self.k_buffer[l], self.v_buffer[l], packed(Tier.WARM), packed(Tier.COLD),
                             self.layout.warm_base, self.layout.cold_base, self.rotation, self.k_center[l])

    # ------------------------------------------------------------------ accounting
    def held_bytes_per_token(self, tier: Tier) -> int:
        """Bytes a held token of ``tier`` counts for: 0 for packed tiers in the eviction
        baseline (``evict_instead_of_demote``), whose attention never reads them."""
        if tier != Tier.FP16 and self.fade_config.evict_instead_of_demote:
            return 0
        return self.tier_bytes[tier]

    def compressed_storage_bytes(self) -> int:
        """Bytes that the tokens currently held occupy (used slots x exact per-tier bytes/token)."""
        return sum(self.used(t) * self.held_bytes_per_token(t) for t in Tier)

    def free_room_tokens(self, keep_fp16: int = 0) -> int:
        """Tokens the arena could still take at the precision pressure demotes to (warm; fp16 when nothing
        compresses), counting every fp16 token but ``keep_fp16`` (sinks, recent windows) as demotable."""
        dst = Tier.WARM if self.fade_config.warm_enabled else (Tier.COLD if self.fade_config.cold_enabled else Tier.FP16)
        rec = self.geometry.record_bytes
        free = (self.pages - self.page_table.reserve_pages) * self.geometry.page_bytes
        free -= sum(self.used(t) * rec[t] for t in Tier if rec[t])
        free -= self.layout.page_size * rec[Tier.FP16]  # the padding slot
        convertible = max(0, self.used(Tier.FP16) - keep_fp16) * (rec[Tier.FP16] - rec[dst])
        return max(0, (free + convertible) // rec[dst])

    def max_request_tokens(self) -> int:
        """Most tokens one request can hold in an empty arena: its sinks and recent window in fp16, the rest
        at the precision running demotion writes (warm), with a tenth left for partly filled pages and the
        prefill chunk in flight."""
        cfg = self.fade_config
        if not cfg.warm_enabled:
            return self.layout.fp16_slots - self.page_table.reserve_pages * self.geometry.rows_per_page[Tier.FP16]
        rec = self.geometry.record_bytes
        keep = cfg.sink_tokens + cfg.recent_window
        room = (self.pages - self.page_table.reserve_pages - 1) * self.geometry.page_bytes - keep * rec[Tier.FP16]
        return int(0.9 * (keep + room // rec[Tier.WARM]))

    def fp16_gain_per_demoted_token(self) -> float:
        """fp16 room one fp16 -> warm demotion frees, net of the warm record it takes (0 when warm is off)."""
        if not self.fade_config.warm_enabled:
            return 0.0
        return 1.0 - self.geometry.record_bytes[Tier.WARM] / self.geometry.record_bytes[Tier.FP16]

    def max_tokens(self) -> int:
        """Most tokens the arena can hold: pages filled densest tier first, within each tier's cap
        (the fp16 tier keeps page 0 for the padding slot)."""
        pages_left, tokens = self.pages - 1, self.geometry.rows_per_page[Tier.FP16] - self.layout.page_size
        for t in sorted(Tier, key=lambda t: -self.geometry.rows_per_page[t]):
            take = min(pages_left, self.page_table.max_pages[t] - (t == Tier.FP16))
            tokens += max(0, take) * self.geometry.rows_per_page[t]
            pages_left -= max(0, take)
        return tokens

    def tier_stats(self) -> dict[str, Any]:
        names = self.fade_config.tier_display_names()
        page_bytes = self.page_group_bytes()
        tiers = {}
        for t in Tier:
            used = self.used(t)
            tiers[names[t]] = {"used": used, "available": self.available(t), "pages": self.allocators[t].owned_pages(),
                               "page_bytes": self.allocators[t].owned_pages() * page_bytes,
                               "bytes_per_token": self.tier_bytes[t], "used_bytes": used * self.held_bytes_per_token(t)}
        tokens = sum(v["used"] for v in tiers.values())
        stored = self.compressed_storage_bytes()
        # Ratios against 16-bit KV (what a GPU user compares with), also on a float32 CPU pool.
        elems = 2 * self.layer_num * self.head_num * self.head_dim  # K and V of one token, all layers
        bytes16, natural = elems * 2, elems * torch.empty((), dtype=self._dtype).element_size()
        return {
            "tiers": tiers,
            "tokens": tokens,
            "stored_bytes": stored,
            "arena_bytes": self.arena_nbytes(),
            "pages": {"total": self.pages, "free": self.page_table.free_pages(), "page_bytes": page_bytes,
                      "rows_per_page": dict(zip(names, self.geometry.rows_per_page))},
            "compression_ratio": (tokens * natural / stored) if stored else 1.0,
            "compression_vs_16bit": (tokens * bytes16 / stored) if stored else 1.0,
            "capacity_tokens": self.max_tokens(),
            "fp16_capacity_tokens": self.layout.fp16_slots,
            "capacity_vs_fp16": self.max_tokens() / self.layout.fp16_slots,
            "demoted_tokens": {f"{names[a]}->{names[b]}": n for (a, b), n in self.demoted_tokens.items()},
            "query_aware_key_layers": self.query_aware_layers(),
        }

    def query_aware_layers(self) -> int:
        """Layers whose keys round for the queries they saw (their factor fixed at their first demotion)."""
        if self.key_feedback is None:
            return 0
        return sum(1 for l, frozen in enumerate(self._rounding_frozen) if frozen and self._query_count[l])


def _tier(tier: Tier | int) -> Tier:
    try:
        return Tier(int(tier))
    except (ValueError, TypeError):
        raise SlotError(f"unknown tier {tier!r} (tiers: {', '.join(f'{t.value}={t.name.lower()}' for t in Tier)})") from None
