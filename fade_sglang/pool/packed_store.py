"""Packed K/V records of one quantized tier, for all layers, as views into the shared byte arena.

The arena is ``uint8 [layers, 2, pages * page_bytes]`` (the K half at index 1 = 0, the V half at 1).
Row ``r`` of a packed tier is ``record_bytes`` at offset ``r * record_bytes`` of *both* halves, and one
row holds one token's K and V of one layer:

    K half:  K codes [H, split]  | K scale [H, D / gk] | K zero [H, D / gk]
    V half:  V codes [H, D * bv / 8] | V scale [H, D / gv] | V zero [H, D / gv] | K codes [H, rest]

Keys may carry more bits than values (keys hold most of the quantization error on real models); the
key codes that do not fit the K half spill into the V half, so both halves of a row are the same size
and a slot's address stays arithmetic on its index. With equal formats nothing spills (``split`` is the
whole packed row). The views are strided (row stride = record bytes), so a demotion is one batched
write and kernels read records in place. Values are stored in the rotated (and, for K, centered) space;
the pool owns the rotation and the key centers and undoes them when it reads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..quant import QuantFormat
from .view import PackedPart

__all__ = ["PackedRecordLayout", "PackedTierStore"]


@dataclass(frozen=True)
class PackedRecordLayout:
    """Byte layout of one packed record row (one token, one layer) in the K and the V half."""

    key: QuantFormat
    value: QuantFormat
    heads: int
    head_dim: int

    def __post_init__(self) -> None:
        self.key.check_head_dim(self.head_dim)
        self.value.check_head_dim(self.head_dim)

    def _params(self, fmt: QuantFormat) -> int:
        return 4 * fmt.num_groups(self.head_dim)  # fp16 scale + fp16 zero per group, per head

    @property
    def key_split(self) -> int:
        """Key code bytes per head kept in the K half: as many as balance the two halves (even, for the
        fp16 scales that follow them), the rest spill into the V half."""
        kc, vc = self.key.packed_dim(self.head_dim), self.value.packed_dim(self.head_dim)
        balanced = (vc + self._params(self.value) + kc - self._params(self.key)) // 2
        return max(0, min(kc, balanced - balanced % 2))

    @property
    def half_payloads(self) -> tuple[int, int]:
        """Used bytes of the K half and of the V half of one row."""
        kc, vc, a = self.key.packed_dim(self.head_dim), self.value.packed_dim(self.head_dim), self.key_split
        return (self.heads * (a + self._params(self.key)),
                self.heads * (vc + self._params(self.value) + kc - a))

    @property
    def payload(self) -> int:
        """Bytes a row needs in each half (the larger half, even)."""
        p = max(self.half_payloads)
        return p + p % 2

    @property
    def token_bytes(self) -> int:
        """Natural bytes of one token's K and V of one layer (codes, scales, zeros; no row padding)."""
        return self.heads * (self.key.bytes_per_token_head(self.head_dim) + self.value.bytes_per_token_head(self.head_dim))

    def views(self, arena: torch.Tensor, rows: int, record_bytes: int) -> tuple[PackedPart, PackedPart]:
        """(key, value) parts over ``rows`` rows of ``record_bytes`` of ``arena [layers, 2, bytes]``."""
        if record_bytes % 2 or record_bytes < self.payload:
            raise ValueError(f"record of {record_bytes} bytes cannot hold {self.payload}")
        layers, h, d = arena.shape[0], self.heads, self.head_dim
        rec = arena[:, :, :rows * record_bytes].view(layers, 2, rows, record_bytes)

        def take(half: int, start: int, width: int, dtype: torch.dtype = torch.uint8) -> tuple[torch.Tensor, int]:
            size = h * width * (2 if dtype == torch.float16 else 1)
            t = rec[:, half, :, start:start + size]
            if dtype == torch.float16:
                t = t.view(torch.float16)
            return t.view(layers, rows, h, width), start + size

        kc, a = self.key.packed_dim(d), self.key_split
        k_data, off = take(0, 0, a)
        k_scale, off = take(0, off, self.key.num_groups(d), torch.float16)
        k_zero, _ = take(0, off, self.key.num_groups(d), torch.float16)
        v_data, off = take(1, 0, self.value.packed_dim(d))
        v_scale, off = take(1, off, self.value.num_groups(d), torch.float16)
        v_zero, off = take(1, off, self.value.num_groups(d), torch.float16)
        k_rest = take(1, off, kc - a)[0] if a < kc else None
        return (PackedPart(self.key, k_data, k_scale, k_zero, k_rest),
                PackedPart(self.value, v_data, v_scale, v_zero))


class PackedTierStore:
    """The key and value parts of one packed tier, all layers (``[layers, rows, H, X]`` views)."""

    def __init__(self, layout: PackedRecordLayout, arena: torch.Tensor, rows: int, record_bytes: int):
        self.layout = layout
        self.head_dim = layout.head_dim
        self.rows = rows
        self.key, self.value = layout.views(arena, rows, record_bytes)

    def write(self, rows: torch.Tensor, values: torch.Tensor, layer: int | None = None,
              key_feedback: torch.Tensor | None = None) -> None:
        """Quantize ``values`` ([layers, 2, n, H, D], or [2, n, H, D] with ``layer``) into ``rows``; keys with
        the rounding factors ``key_feedback`` ([layers, 1, H, D, D], or [1, H, D, D]) when given."""
        key, value = (self.key, self.value) if layer is None else (self.key.layer(layer), self.value.layer(layer))
        key.write(rows, values[..., 0, :, :, :], key_feedback)
        value.write(rows, values[..., 1, :, :, :])

    def read(self, rows: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        """Dequantize ``rows`` to float32: [layers, 2, n, H, D] (or [2, n, H, D] for one layer)."""
        key, value = (self.key, self.value) if layer is None else (self.key.layer(layer), self.value.layer(layer))
        return torch.stack((key.read(rows), value.read(rows)), dim=-4)
