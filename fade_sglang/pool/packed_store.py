"""Packed K/V storage of one quantized tier for all layers.

Tensors (one allocation each, so a demotion is one batched write):
    data  uint8   [layers, 2, slots, heads, head_dim * bits / 8]   (K at index 0, V at 1)
    scale float16 [layers, 2, slots, heads, head_dim / group]
    zero  float16 [layers, 2, slots, heads, head_dim / group]
Values are stored in the rotated (and, for K, centered) space; the pool owns
the rotation and the key centers and undoes them when it reads.
"""

from __future__ import annotations

import torch

from ..quant import QuantFormat, QuantizedKV, dequantize, quantize

__all__ = ["PackedTierStore"]


class PackedTierStore:
    def __init__(self, fmt: QuantFormat, layers: int, slots: int, heads: int, head_dim: int,
                 device: torch.device | str):
        fmt.check_head_dim(head_dim)
        self.fmt = fmt
        self.head_dim = head_dim
        lead = (layers, 2, slots, heads)
        self.data = torch.zeros(*lead, fmt.packed_dim(head_dim), dtype=torch.uint8, device=device)
        self.scale = torch.zeros(*lead, fmt.num_groups(head_dim), dtype=torch.float16, device=device)
        self.zero = torch.zeros_like(self.scale)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.data, self.scale, self.zero))

    def write(self, rows: torch.Tensor, values: torch.Tensor, layer: int | None = None) -> None:
        """Quantize ``values`` ([layers, 2, n, H, D], or [2, n, H, D] with ``layer``) into ``rows``."""
        q = quantize(values, self.fmt)
        if layer is None:
            self.data[:, :, rows], self.scale[:, :, rows], self.zero[:, :, rows] = q
        else:
            self.data[layer][:, rows], self.scale[layer][:, rows], self.zero[layer][:, rows] = q

    def read(self, rows: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        """Dequantize ``rows`` to float32: [layers, 2, n, H, D] (or [2, n, H, D] for one layer)."""
        if layer is None:
            q = QuantizedKV(self.data[:, :, rows], self.scale[:, :, rows], self.zero[:, :, rows])
        else:
            q = QuantizedKV(self.data[layer][:, rows], self.scale[layer][:, rows], self.zero[layer][:, rows])
        return dequantize(q, self.fmt, torch.float32)
