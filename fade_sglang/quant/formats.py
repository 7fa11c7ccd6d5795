"""Packed asymmetric low-bit formats for KV vectors (torch reference implementation).

Layout, per token and per KV head, along head_dim (D channels):
  * channels are split into groups of ``group_size``; each group has its own
    fp16 ``scale`` and fp16 ``zero`` (the group minimum): x ~= zero + q * scale,
    q in [0, 2**bits - 1] (asymmetric: 4 levels at 2 bits, 16 at 4 bits);
  * codes are packed "planar": with P = 8 // bits codes per byte, byte j holds
    channel j + p * (D / P) in bits [p * bits, (p + 1) * bits). Unpacking one
    byte-row therefore yields P contiguous channel blocks, which is what the
    Triton kernels want (no interleave in registers);
  * 3-bit codes are two such planes back to back: their low 2 bits packed as
    2-bit codes (D / 4 bytes), then their high bit packed as 1-bit codes (D / 8
    bytes), 3 * D / 8 bytes in all, so the kernels reuse the same unpacking.

Everything is vectorized over arbitrary leading dimensions (slots, layers,
heads): no Python loop over tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

__all__ = ["QuantFormat", "QuantizedKV", "quantize", "dequantize", "pack_codes", "unpack_codes"]

SUPPORTED_BITS = (2, 3, 4, 8)
# 3-bit codes: a 2-bit plane of their low bits, then a 1-bit plane of their high bit.
_SPLIT_PLANES = {3: (2, 1)}
_FP16_MAX = 65504.0
_FP16_TINY = torch.finfo(torch.float16).tiny  # smallest normal fp16
# Candidate shrink factors of the [min, max] range for the clip search; the one
# with the lowest squared error is kept per group.
_CLIP_CANDIDATES = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65)


@dataclass(frozen=True)
class QuantFormat:
    """A packed format: ``bits`` per value, one (scale, zero) pair per ``group_size`` channels."""

    bits: int
    group_size: int
    clip_search: bool = False

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits}")
        if self.group_size <= 0:
            raise ValueError(f"group_size must be positive, got {self.group_size}")

    @property
    def channel_multiple(self) -> int:
        """head_dim must be a multiple of this: the codes of the densest plane in one byte."""
        return 8 // min(_SPLIT_PLANES.get(self.bits, (self.bits,)))

    def check_head_dim(self, head_dim: int) -> None:
        if head_dim <= 0 or head_dim % self.channel_multiple:
            raise ValueError(f"head_dim {head_dim} is not a multiple of {self.channel_multiple} ({self.bits}-bit packing)")

    def group_size_for(self, head_dim: int) -> int:
        """The configured group, halved until it divides head_dim (documented fallback: 80 -> 16, 96 -> 32)."""
        g = min(self.group_size, head_dim)
        while head_dim % g:
            g //= 2
        return g

    def packed_dim(self, head_dim: int) -> int:
        return head_dim * self.bits // 8

    def head_dim_of(self, packed_dim: int) -> int:
        """Inverse of :meth:`packed_dim`."""
        return packed_dim * 8 // self.bits

    def num_groups(self, head_dim: int) -> int:
        return head_dim // self.group_size_for(head_dim)

    def bytes_per_token_head(self, head_dim: int) -> int:
        """Storage of one token of one head for K or V: codes + fp16 scale + fp16 zero per group."""
        return self.packed_dim(head_dim) + 4 * self.num_groups(head_dim)


class QuantizedKV(NamedTuple):
    data: torch.Tensor  # uint8 [..., D * bits // 8]
    scale: torch.Tensor  # fp16 [..., D // group]
    zero: torch.Tensor  # fp16 [..., D // group]


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes ``[..., D]`` (each < 2**bits) into ``[..., D * bits // 8]`` bytes (planar layout)."""
    if bits in _SPLIT_PLANES:
        low, high = _SPLIT_PLANES[bits]
        return torch.cat((pack_codes(codes & ((1 << low) - 1), low), pack_codes(codes >> low, high)), dim=-1)
    per_byte = 8 // bits
    if per_byte == 1:
        return codes.to(torch.uint8)
    d = codes.shape[-1]
    planes = codes.to(torch.int32).reshape(*codes.shape[:-1], per_byte, d // per_byte)
    shifts = torch.arange(per_byte, device=codes.device, dtype=torch.int32) * bits
    return (planes << shifts[:, None]).sum(dim=-2).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: ``[..., Dp]`` bytes -> ``[..., Dp * 8 // bits]`` uint8 codes."""
    if bits in _SPLIT_PLANES:
        low, high = _SPLIT_PLANES[bits]
        cut = packed.shape[-1] * low // bits
        return unpack_codes(packed[..., :cut], low) | (unpack_codes(packed[..., cut:], high) << low)
    per_byte = 8 // bits
    if per_byte == 1:
        return packed
    shifts = torch.arange(per_byte, device=packed.device, dtype=torch.int32) * bits
    planes = (packed.to(torch.int32)[..., None, :] >> shifts[:, None]) & ((1 << bits) - 1)
    return planes.reshape(*packed.shape[:-1], -1).to(torch.uint8)


def _fp16_params(lo: torch.Tensor, hi: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero rounded to fp16 *before* coding, so the decoder sees exactly what the coder used."""
    zero = lo.clamp(-_FP16_MAX, _FP16_MAX).to(torch.float16)
    # Clamped where it is made (to the smallest normal fp16 for a constant group): the stored scale is the
    # one the codes were computed with, and no reader divides by or multiplies with a zero / subnormal scale.
    scale = ((hi - zero.float()) / levels).clamp(_FP16_TINY, _FP16_MAX).to(torch.float16)
    return scale, zero


def _code(groups: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, levels: int) -> torch.Tensor:
    return torch.round((groups - zero.float()[..., None]) / scale.float()[..., None]).clamp_(0, levels)


def _group_error(groups, codes, scale, zero) -> torch.Tensor:
    recon = zero.float()[..., None] + codes * scale.float()[..., None]
    return (recon - groups).square().sum(-1)


def _feedback_codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, levels: int, g: int,
                    feedback: torch.Tensor) -> torch.Tensor:
    """Codes on the given grid, rounded channel by channel with each channel's rounding error pushed onto the
    channels after it (GPTQ's update, here along head_dim): ``feedback`` is the upper Cholesky factor U of
    H^-1, so the codes minimize the error e^T H e greedily instead of |e|^2 per channel. For keys with H the
    second moment of the queries that read them, e^T H e is the mean squared attention-logit error."""
    d = x.shape[-1]
    w = x.clone()
    codes = torch.empty_like(w)
    pivot = feedback.diagonal(dim1=-2, dim2=-1)
    for j in range(d):
        s, z = scale[..., j // g].float(), zero[..., j // g].float()
        c = torch.round((w[..., j] - z) / s).clamp_(0, levels)
        codes[..., j] = c
        err = (w[..., j] - (z + c * s)) / pivot[..., j]
        w[..., j + 1:] -= err[..., None] * feedback[..., j, j + 1:]
    return codes


def quantize(x: torch.Tensor, fmt: QuantFormat, feedback: torch.Tensor | None = None) -> QuantizedKV:
    """Quantize ``x [..., D]`` (any float dtype) to ``fmt``; math in float32.

    ``feedback`` (optional, broadcasts to ``[..., D, D]``): the upper Cholesky factor of H^-1 for a weighted
    error e^T H e; the grid (scale, zero) is chosen as without it, the codes then minimize that error
    (:func:`_feedback_codes`)."""
    d = x.shape[-1]
    fmt.check_head_dim(d)
    g = fmt.group_size_for(d)
    levels = (1 << fmt.bits) - 1
    groups = x.float().reshape(*x.shape[:-1], d // g, g)
    lo, hi = groups.amin(-1), groups.amax(-1)
    scale, zero = _fp16_params(lo, hi, levels)
    codes = _code(groups, scale, zero, levels)
    if fmt.clip_search:
        best_err = _group_error(groups, codes, scale, zero)
        mid, half = (hi + lo) * 0.5, (hi - lo) * 0.5
        for ratio in _CLIP_CANDIDATES[1:]:
            c_scale, c_zero = _fp16_params(mid - half * ratio, mid + half * ratio, levels)
            c_codes = _code(groups, c_scale, c_zero, levels)
            err = _group_error(groups, c_codes, c_scale, c_zero)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            scale = torch.where(better, c_scale, scale)
            zero = torch.where(better, c_zero, zero)
            codes = torch.where(better[..., None], c_codes, codes)
    if feedback is not None:
        codes = _feedback_codes(x.float(), scale, zero, levels, g, feedback.float()).reshape_as(groups)
    packed = pack_codes(codes.reshape(*x.shape[:-1], d).to(torch.uint8), fmt.bits)
    return QuantizedKV(packed, scale, zero)


def dequantize(q: QuantizedKV, fmt: QuantFormat, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Decode a :class:`QuantizedKV` back to ``[..., D]`` in ``dtype`` (math in float32)."""
    codes = unpack_codes(q.data, fmt.bits).float()
    d = codes.shape[-1]
    g = fmt.group_size_for(d)
    groups = codes.reshape(*codes.shape[:-1], d // g, g)
    out = q.zero.float()[..., None] + groups * q.scale.float()[..., None]
    return out.reshape(*codes.shape[:-1], d).to(dtype)
