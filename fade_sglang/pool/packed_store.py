"""Packed K/V records of one quantized tier, for all layers, as views into the shared byte arena.

The arena is ``uint8 [layers, 2, pages * page_bytes]`` (K at index 1 = 0, V at 1). A record of this
tier is ``record_bytes`` long: ``codes [H, D * bits / 8]`` then ``scale fp16 [H, D / group]`` then
``zero fp16 [H, D / group]``, then padding. The views below are strided (row stride = record bytes),
so a demotion is still one batched write and kernels read records in place through the strides.
Values are stored in the rotated (and, for K, centered) space; the pool owns the rotation and the
key centers and undoes them when it reads.
"""

from __future__ import annotations

import torch

from ..quant import QuantFormat, QuantizedKV, dequantize, quantize

__all__ = ["PackedTierStore", "packed_record_bytes"]


def packed_record_bytes(fmt: QuantFormat, heads: int, head_dim: int) -> int:
    """Natural bytes of one packed record (one token, one layer, K or V): codes, scales, zeros."""
    return heads * fmt.bytes_per_token_head(head_dim)


class PackedTierStore:
    def __init__(self, fmt: QuantFormat, arena: torch.Tensor, rows: int, record_bytes: int, heads: int,
                 head_dim: int):
        fmt.check_head_dim(head_dim)
        if record_bytes % 2 or record_bytes < packed_record_bytes(fmt, heads, head_dim):
            raise ValueError(f"record of {record_bytes} bytes cannot hold {packed_record_bytes(fmt, heads, head_dim)}")
        self.fmt = fmt
        self.head_dim = head_dim
        self.rows = rows
        layers = arena.shape[0]
        rec = arena[:, :, :rows * record_bytes].view(layers, 2, rows, record_bytes)
        code_bytes = heads * fmt.packed_dim(head_dim)
        groups = fmt.num_groups(head_dim)
        scale_bytes = heads * groups * 2
        self.data = rec[..., :code_bytes].view(layers, 2, rows, heads, fmt.packed_dim(head_dim))
        self.scale = rec[..., code_bytes:code_bytes + scale_bytes].view(torch.float16).view(layers, 2, rows, heads, groups)
        self.zero = rec[..., code_bytes + scale_bytes:code_bytes + 2 * scale_bytes].view(torch.float16).view(
            layers, 2, rows, heads, groups)

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
