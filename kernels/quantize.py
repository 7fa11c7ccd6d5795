"""Quantize-on-demote (Triton): float or model-dtype KV rows of all layers -> packed codes + fp16 scale / zero.

One launch covers a batch of tokens for every layer and head of one part of
a packed tier (its keys, or its values: each has its own format, keys may
carry more bits). Each program quantizes ``BLOCK_R`` (token, head) rows of
one layer; the rows are gathered from ``src`` (``src_rows``, e.g. fp16 pool
slots) and scattered into the packed store (``dst_rows``). Key codes that
spill into the value half of a record (``SPLIT`` < packed row) are stored
in two pieces.

Optionally fused on the way: the rotation (``x @ R``, one ieee-fp32 tl.dot per
program, R shared by all the program's rows) and the key centering (``K -=
k_center[layer, head]``), i.e. exactly the pool's ``_to_packed_space``.

Exactness vs :func:`fade_sglang.quant.quantize` (same float32 input):
  * no clip search: bit-exact (same min / max, fp16 rounding of scale and zero,
    correctly rounded division, round-half-to-even, clamp);
  * fused rotation: the matmul sums in a different order than torch, so inputs
    differ by float rounding; codes then agree except for values that sit
    within rounding of a code boundary (off by one code), scale / zero within
    one fp16 ulp;
  * clip search (``fmt.clip_search``): the same 8 candidate ranges; per group
    the candidate with the smallest squared error wins. The error sums run in
    a different order (and may use FMA), so when two candidates' errors agree
    to float rounding the kernel may keep the other one: either is a valid
    choice with the same error up to rounding.

Head dims: every multiple of 16 in [16, 256]. A non-power-of-two D runs in
rows padded to ``BLOCK_D = next_power_of_2(D)`` channels (natural order; the
padding is whole groups, read as 0 and never stored; a group that is the
whole row, GROUP == D, is one masked BLOCK_D-wide group). Planar packing of a
padded row cannot be a reshape (the planes are ``D / P`` channels wide), so
plane p of byte j is gathered from code ``p * D / P + j`` with ``tl.gather``.
Power-of-two D compiles to the same code as without padding support.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fade_sglang.pool.view import PackedPart
from fade_sglang.quant.formats import _CLIP_CANDIDATES

__all__ = ["launch_quantize"]

_BLOCK_R = 32


@triton.jit
def _round_half_even(y):
    """torch.round semantics (ties to even), exact in float32."""
    f = tl.floor(y)
    frac = y - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    return f + ((frac > 0.5) | ((frac == 0.5) & odd)).to(tl.float32)


@triton.jit
def _range_params(lo, hi, LEVELS: tl.constexpr):
    """fp16 (scale, zero) of a [lo, hi] range, rounded before coding like the torch quantizer."""
    zero = tl.minimum(tl.maximum(lo, -65504.0), 65504.0).to(tl.float16)
    scale = tl.math.div_rn(hi - zero.to(tl.float32), LEVELS * 1.0)
    # Clamped where it is made (to the smallest normal fp16 for a constant group): what is stored is what
    # the codes were computed with, and no reader ever divides by or multiplies with a zero / subnormal scale.
    scale = tl.minimum(tl.maximum(scale, 6.103515625e-05), 65504.0).to(tl.float16)
    return scale, zero


@triton.jit
def _code(x, scale, zero, LEVELS: tl.constexpr):
    """Codes (float32) of grouped values x [R, NG, G] under per-group fp16 scale / zero [R, NG]."""
    y = tl.math.div_rn(x - zero.to(tl.float32)[:, :, None], tl.broadcast_to(scale.to(tl.float32)[:, :, None], x.shape))
    return tl.minimum(tl.maximum(_round_half_even(y), 0.0), LEVELS)


@triton.jit
def _sq_error(x, codes, scale, zero, ch_mask, MASKED: tl.constexpr):
    recon = zero.to(tl.float32)[:, :, None] + codes * scale.to(tl.float32)[:, :, None]
    err = (recon - x) * (recon - x)
    if MASKED:
        err = tl.where(ch_mask, err, 0.0)
    return tl.sum(err, 2)


@triton.jit
def _store_plane(codes, a_rows, b_rows, head, valid, START: tl.constexpr, BITS: tl.constexpr, SPLIT: tl.constexpr,
                 DP: tl.constexpr, D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Pack ``codes`` [BLOCK_R, BLOCK_D] (< 2**BITS, channel order) planar and store them at bytes
    START.. of each head's code row: bytes < SPLIT in the K half (``a_rows``), the rest in ``b_rows``."""
    PER: tl.constexpr = 8 // BITS
    W: tl.constexpr = D // PER  # bytes of this plane
    WP: tl.constexpr = BLOCK_D // PER  # bytes of the (padded) plane tile
    offs_j = tl.arange(0, WP)
    if PER == 1:
        packed = codes
    elif BLOCK_D != D:
        # Planar with planes W wide (not a reshape of the padded row): plane p of byte j is
        # code[p * W + j], gathered across the row's registers (bytes j >= W are masked off at the store).
        packed = tl.zeros([BLOCK_R, WP], tl.int32)
        for p in tl.static_range(PER):
            src_c = tl.minimum(p * W + offs_j, BLOCK_D - 1)
            idx = tl.broadcast_to(src_c[None, :], [BLOCK_R, WP])
            packed |= tl.gather(codes, idx, 1) << (p * BITS)
    else:
        # Planar: byte j = sum_p code[j + p * W] << (p * BITS).
        planes = tl.reshape(codes, [BLOCK_R, PER, W])
        packed = tl.sum(planes << (tl.arange(0, PER) * BITS)[None, :, None], 1)
    mask = valid[:, None] & (offs_j < W)[None, :]
    packed = packed.to(tl.uint8)
    b = START + offs_j[None, :]
    if SPLIT == DP:
        tl.store(a_rows[:, None] + head[:, None] * DP + b, packed, mask=mask)
    else:
        tl.store(a_rows[:, None] + head[:, None] * SPLIT + b, packed, mask=mask & (b < SPLIT))
        tl.store(b_rows[:, None] + head[:, None] * (DP - SPLIT) + (b - SPLIT), packed, mask=mask & (b >= SPLIT))


@triton.jit
def _quantize_kernel(
    Src, SrcRows, DstData, DstDataB, DstScale, DstZero, DstRows, R, Center, n_tokens, heads,
    s_sl, s_srow, s_sh,
    d_sl, d_srow, b_sl, b_srow,
    q_sl, q_srow,
    c_sl, c_sh,
    BITS: tl.constexpr, GROUP: tl.constexpr, SPLIT: tl.constexpr, D: tl.constexpr, BLOCK_R: tl.constexpr,
    HAS_SRC_ROWS: tl.constexpr, ROTATE: tl.constexpr, CENTER: tl.constexpr,
    CLIP: tl.constexpr, CLIP_RATIOS: tl.constexpr, NUM_CLIP: tl.constexpr, BLOCK_D: tl.constexpr,
):
    DP: tl.constexpr = D * BITS // 8
    NG: tl.constexpr = D // GROUP
    PADDED: tl.constexpr = BLOCK_D != D
    # A non-power-of-two group is the whole row (GROUP == D, from QuantFormat.group_size_for when the
    # configured group exceeds D): one BLOCK_D-wide tile group whose padding channels are masked out of
    # the range and the clip-search error.
    ROW_GROUP: tl.constexpr = (GROUP & (GROUP - 1)) != 0
    GT: tl.constexpr = BLOCK_D if ROW_GROUP else GROUP
    NGP: tl.constexpr = BLOCK_D // GT  # == NG unless padded
    LEVELS: tl.constexpr = (1 << BITS) - 1
    layer = tl.program_id(1).to(tl.int64)  # layer * layer_stride can pass 2**31 in a large pool
    # int32 (row) division: int64 division is a slow called subroutine on NVIDIA GPUs.
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    tok = r // heads
    head = r % heads
    valid = tok < n_tokens
    if HAS_SRC_ROWS:
        src_row = tl.load(SrcRows + tok, mask=valid, other=0).to(tl.int64)
    else:
        src_row = tok
    dst_row = tl.load(DstRows + tok, mask=valid, other=0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    if PADDED:
        row_mask = valid[:, None] & (offs_d < D)[None, :]
    else:
        row_mask = valid[:, None]
    src_ptrs = Src + layer * s_sl + src_row[:, None] * s_srow + head[:, None] * s_sh
    if ROTATE:
        # x @ R over K-chunks so the R slice in flight stays <= 64 KiB (head_dim 256).
        KC: tl.constexpr = 64 if BLOCK_D > 64 else BLOCK_D
        offs_k = tl.arange(0, KC)
        x = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
        for kc in tl.static_range(0, D, KC):
            if PADDED:
                k_in = (kc + offs_k) < D
                xk = tl.load(src_ptrs + kc + offs_k[None, :], mask=valid[:, None] & k_in[None, :],
                             other=0.0).to(tl.float32)
                rk = tl.load(R + (kc + offs_k)[:, None] * D + offs_d[None, :],
                             mask=k_in[:, None] & (offs_d < D)[None, :], other=0.0)
            else:
                xk = tl.load(src_ptrs + kc + offs_k[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
                rk = tl.load(R + (kc + offs_k)[:, None] * D + offs_d[None, :])
            x += tl.dot(xk, rk, input_precision="tf32x3")
    else:
        x = tl.load(src_ptrs + offs_d[None, :], mask=row_mask, other=0.0).to(tl.float32)
    if CENTER:  # keys only: the caller passes no center for values
        x -= tl.load(Center + layer * c_sl + head[:, None] * c_sh + offs_d[None, :], mask=row_mask, other=0.0)

    # Padded rows: channels D.. are 0 and form whole groups (GROUP divides D), or are masked out of the
    # row's single group (ROW_GROUP); they are never stored.
    g = tl.reshape(x, [BLOCK_R, NGP, GT])
    ch_mask = (offs_d < D)[None, None, :]  # used only for a whole-row group (ROW_GROUP)
    if ROW_GROUP:
        lo = tl.min(tl.where(ch_mask, g, float("inf")), 2)
        hi = tl.max(tl.where(ch_mask, g, float("-inf")), 2)
    else:
        lo = tl.min(g, 2)
        hi = tl.max(g, 2)
    scale, zero = _range_params(lo, hi, LEVELS)
    codes = _code(g, scale, zero, LEVELS)
    if CLIP:
        best = _sq_error(g, codes, scale, zero, ch_mask, ROW_GROUP)
        mid = (hi + lo) * 0.5
        half = (hi - lo) * 0.5
        for i in tl.static_range(1, NUM_CLIP):
            c_scale, c_zero = _range_params(mid - half * CLIP_RATIOS[i], mid + half * CLIP_RATIOS[i], LEVELS)
            c_codes = _code(g, c_scale, c_zero, LEVELS)
            err = _sq_error(g, c_codes, c_scale, c_zero, ch_mask, ROW_GROUP)
            better = err < best
            best = tl.where(better, err, best)
            scale = tl.where(better, c_scale, scale)
            zero = tl.where(better, c_zero, zero)
            codes = tl.where(better[:, :, None], c_codes, codes)

    codes = tl.reshape(codes.to(tl.int32), [BLOCK_R, BLOCK_D])
    # [rows, H, X] blocks are contiguous: head strides are SPLIT, DP - SPLIT and NG.
    a_rows = DstData + layer * d_sl + dst_row * d_srow
    b_rows = DstDataB + layer * b_sl + dst_row * b_srow
    if BITS == 3:  # a 2-bit plane of the low bits, then a 1-bit plane of the high bit
        _store_plane(codes & 3, a_rows, b_rows, head, valid, 0, 2, SPLIT, DP, D, BLOCK_R, BLOCK_D)
        _store_plane(codes >> 2, a_rows, b_rows, head, valid, D // 4, 1, SPLIT, DP, D, BLOCK_R, BLOCK_D)
    else:
        _store_plane(codes, a_rows, b_rows, head, valid, 0, BITS, SPLIT, DP, D, BLOCK_R, BLOCK_D)
    q_base = layer * q_sl + dst_row * q_srow + head * NG
    if NGP == 1:
        tl.store(DstScale + q_base, tl.reshape(scale, [BLOCK_R]), mask=valid)
        tl.store(DstZero + q_base, tl.reshape(zero, [BLOCK_R]), mask=valid)
    else:
        offs_g = tl.arange(0, NGP)
        if PADDED:
            g_mask = valid[:, None] & (offs_g < NG)[None, :]
        else:
            g_mask = valid[:, None]
        tl.store(DstScale + q_base[:, None] + offs_g[None, :], scale, mask=g_mask)
        tl.store(DstZero + q_base[:, None] + offs_g[None, :], zero, mask=g_mask)


def launch_quantize(src: torch.Tensor, src_rows: torch.Tensor | None, dst: PackedPart, dst_rows: torch.Tensor,
                    rotation: torch.Tensor | None, k_center: torch.Tensor | None) -> None:
    """Unvalidated launcher (see :func:`fade_sglang.kernels.quantize_rows`)."""
    layers, _, heads, d = src.shape
    n = dst_rows.numel()
    if n == 0 or layers == 0:
        return
    fmt = dst.fmt
    group = fmt.group_size_for(d)
    bd = triton.next_power_of_2(d)  # tile width (== d for a power of two)
    block_r = _BLOCK_R if bd <= 128 else _BLOCK_R // 2
    dummy = dst_rows
    data_b = dst.data if dst.data_b is None else dst.data_b
    grid = (triton.cdiv(n * heads, block_r), layers)  # the grid must use the kernel's BLOCK_R
    _quantize_kernel[grid](
        src, src_rows if src_rows is not None else dummy, dst.data, data_b, dst.scale, dst.zero, dst_rows,
        rotation if rotation is not None else src, k_center if k_center is not None else src, n, heads,
        src.stride(0), src.stride(1), src.stride(2),
        dst.data.stride(0), dst.data.stride(1), data_b.stride(0), data_b.stride(1),
        dst.scale.stride(0), dst.scale.stride(1),
        k_center.stride(0) if k_center is not None else 0, k_center.stride(1) if k_center is not None else 0,
        BITS=fmt.bits, GROUP=group, SPLIT=dst.split, D=d, BLOCK_R=block_r,
        HAS_SRC_ROWS=src_rows is not None, ROTATE=rotation is not None, CENTER=k_center is not None,
        CLIP=fmt.clip_search, CLIP_RATIOS=tuple(float(c) for c in _CLIP_CANDIDATES),
        NUM_CLIP=len(_CLIP_CANDIDATES), BLOCK_D=bd,
        num_warps=8,
        # No FMA contraction: the clip-search errors then round like torch's separate mul / add.
        enable_fp_fusion=False,
    )
