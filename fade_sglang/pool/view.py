"""Read-side view of one layer of the tiered pool, shared by the torch reference path and the kernels."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..quant import QuantFormat, QuantizedKV, dequantize, quantize

__all__ = ["PackedLayerKV", "PackedPart", "TieredLayerKV", "gather_kv"]


@dataclass(frozen=True)
class PackedPart:
    """The keys (or the values) of a packed tier: planar-packed codes and fp16 scale / zero per group.

    Tensors are ``[..., rows, H, X]`` (a leading layer dim for a whole store, none for one layer's view),
    each ``[H, X]`` block contiguous. The codes of one token and head are ``fmt.packed_dim(D)`` bytes:
    the first ``split`` in ``data``, the rest in ``data_b`` (keys with more bits than values spill into the
    value half of the record, so both halves of a record row stay the same size; ``data_b`` is None when
    nothing spills)."""

    fmt: QuantFormat
    data: torch.Tensor  # uint8 [..., rows, H, split]
    scale: torch.Tensor  # fp16 [..., rows, H, D / group]
    zero: torch.Tensor
    data_b: torch.Tensor | None = None  # uint8 [..., rows, H, packed_dim - split]

    @classmethod
    def zeros(cls, fmt: QuantFormat, layers: int, rows: int, heads: int, head_dim: int,
              device: torch.device | str, split: int | None = None) -> "PackedPart":
        """Standalone zeroed tensors ``[layers, rows, heads, X]`` (codes split after ``split`` bytes per head)."""
        dp = fmt.packed_dim(head_dim)
        split = dp if split is None else split
        u8 = dict(dtype=torch.uint8, device=device)
        scale = torch.zeros(layers, rows, heads, fmt.num_groups(head_dim), dtype=torch.float16, device=device)
        return cls(fmt, torch.zeros(layers, rows, heads, split, **u8), scale, torch.zeros_like(scale),
                   torch.zeros(layers, rows, heads, dp - split, **u8) if split < dp else None)

    @property
    def split(self) -> int:
        return self.data.shape[-1]

    def layer(self, index: int) -> "PackedPart":
        """One layer of a store's part (drops the leading layer dim)."""
        return PackedPart(self.fmt, self.data[index], self.scale[index], self.zero[index],
                          None if self.data_b is None else self.data_b[index])

    def codes(self, rows: torch.Tensor) -> torch.Tensor:
        """Packed code bytes ``[..., n, H, packed_dim]`` of ``rows`` (both pieces joined)."""
        a = self.data[..., rows, :, :]
        return a if self.data_b is None else torch.cat((a, self.data_b[..., rows, :, :]), dim=-1)

    def read(self, rows: torch.Tensor) -> torch.Tensor:
        """float32 ``[..., n, H, D]`` of ``rows`` (packed space)."""
        q = QuantizedKV(self.codes(rows), self.scale[..., rows, :, :], self.zero[..., rows, :, :])
        return dequantize(q, self.fmt, torch.float32)

    def write(self, rows: torch.Tensor, x: torch.Tensor, feedback: torch.Tensor | None = None) -> None:
        """Quantize ``x [..., n, H, D]`` (packed space) into ``rows``; ``feedback`` ``[..., 1, H, D, D]``: the
        rounding factor per head (:func:`fade_sglang.quant.quantize`)."""
        q = quantize(x, self.fmt, feedback)
        s = self.split
        self.data[..., rows, :, :] = q.data[..., :s]
        if self.data_b is not None:
            self.data_b[..., rows, :, :] = q.data[..., s:]
        self.scale[..., rows, :, :] = q.scale
        self.zero[..., rows, :, :] = q.zero


@dataclass(frozen=True)
class PackedLayerKV:
    """One layer of a packed tier as kernels read it: row = slot - base."""

    key: PackedPart
    value: PackedPart
    base: int

    def dequantize_rows(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 K, V of ``rows`` in the packed (rotated, K-centered) space."""
        return self.key.read(rows), self.value.read(rows)


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
