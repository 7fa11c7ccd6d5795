"""Read-side view of one layer of the tiered pool, shared by the torch reference path and the kernels."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..quant import QuantFormat, QuantizedKV, dequantize

__all__ = ["PackedLayerKV", "TieredLayerKV", "gather_kv"]


@dataclass(frozen=True)
class PackedLayerKV:
    """One layer of a packed tier as kernels read it: row = slot - base; planar-packed codes, fp16 scale/zero."""

    k_data: torch.Tensor  # uint8 [rows, H, D * bits / 8]
    k_scale: torch.Tensor  # fp16 [rows, H, D / group]
    k_zero: torch.Tensor
    v_data: torch.Tensor
    v_scale: torch.Tensor
    v_zero: torch.Tensor
    base: int
    bits: int
    group_size: int

    @property
    def format(self) -> QuantFormat:
        return QuantFormat(self.bits, self.group_size)

    def dequantize_rows(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 K, V of ``rows`` in the packed (rotated, K-centered) space."""
        fmt = self.format
        k = dequantize(QuantizedKV(self.k_data[rows], self.k_scale[rows], self.k_zero[rows]), fmt)
        v = dequantize(QuantizedKV(self.v_data[rows], self.v_scale[rows], self.v_zero[rows]), fmt)
        return k, v


@dataclass(frozen=True)
class TieredLayerKV:
    """Everything needed to read one layer of the tiered pool.

    Slot s is fp16 if s < warm_base (row s of k_fp16/v_fp16), warm if
    warm_base <= s < cold_base, else cold. Packed K decodes to
    ``(dequant + k_center) @ rotation.T``; packed V to ``dequant @ rotation.T``.
    Equivalently, attention over packed slots uses ``q @ rotation`` for scores
    and un-rotates the accumulated output once.
    """

    k_fp16: torch.Tensor  # [fp16 rows, H, D], model dtype, row = global slot
    v_fp16: torch.Tensor
    warm: PackedLayerKV | None
    cold: PackedLayerKV | None
    warm_base: int
    cold_base: int
    rotation: torch.Tensor | None  # [D, D] float32, packed = x @ rotation
    k_center: torch.Tensor  # [H, D] float32, rotated space


def gather_kv(view: TieredLayerKV, slots: torch.Tensor,
              dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """K, V (``dtype``, model space, ``[n, H, D]``) of arbitrary mixed-tier ``slots``.

    fp16-tier rows are copied as stored (exact in any dtype at least as wide as the pool's); packed
    rows are dequantized and un-rotated in float32, then cast to ``dtype``."""
    slots = slots.to(device=view.k_fp16.device, dtype=torch.int64).reshape(-1)
    n, heads, dim = slots.numel(), view.k_fp16.shape[1], view.k_fp16.shape[2]
    k = torch.empty(n, heads, dim, dtype=dtype, device=view.k_fp16.device)
    v = torch.empty_like(k)
    is_fp = slots < view.warm_base
    k[is_fp], v[is_fp] = view.k_fp16[slots[is_fp]].to(dtype), view.v_fp16[slots[is_fp]].to(dtype)
    for store, lo, hi in ((view.warm, view.warm_base, view.cold_base), (view.cold, view.cold_base, None)):
        sel = (slots >= lo) & (slots < hi) if hi is not None else slots >= lo
        if store is None or not bool(sel.any()):
            continue
        pk, pv = store.dequantize_rows(slots[sel] - store.base)
        pk = pk + view.k_center[None]
        if view.rotation is not None:
            pk, pv = pk @ view.rotation.T, pv @ view.rotation.T
        k[sel], v[sel] = pk.to(dtype), pv.to(dtype)
    return k, v
