"""Mixed-tier flash-decoding (Triton), plus the jit helpers every fade attention kernel shares.

One pass over each request's KV reads every slot in its own tier: fp16 slots
straight from the pool's model-dtype buffer, warm / cold slots as packed codes
that are unpacked and dequantized in registers (never written back as fp16).

Tier partition (design choice)
------------------------------
``kv_indices`` may mix tiers in any order. Instead of branching per block (a
block that straddles tiers would have to run every tier's code path under
masks), :func:`partition_by_tier` reorders each request's slice into
``[fp16 | warm | cold]`` runs (stable within a tier) and records the run
boundaries in ``tier_indptr [B, 4]``. Decode attention is order-invariant over
the keys, and the prefix of an extend is fully visible, so the reorder is
exact. The kernel then runs one specialized loop per tier with no per-element
tier test, and only run tails are masked. The partition is a handful of O(N)
torch ops with no host sync (CUDA-graph capturable); ``kv_indices`` are the
same for every layer of a forward step, so the backend computes it once per
step and passes it to every layer.

Split-K
-------
The sequence is split across ``num_kv_splits`` programs per (request, KV head)
by *bytes*, not tokens: an fp16 token costs ``2 * D * elem`` bytes, a packed
token ``2 * (D * bits / 8 + 4 * D / group)``, so every split reads about the
same amount of memory. The epilogue merges the splits with their log-sum-exp.

Rotation
--------
Packed K decodes to ``(deq + k_center) @ R.T`` and packed V to ``deq @ R.T``.
Scores of packed slots are ``(q @ R) . deq + (q @ R) . k_center`` (``q @ R`` is
one tiny matmul per step; the center term is one scalar per query head).
Packed V contributions accumulate in the rotated space in their own
accumulator; the epilogue un-rotates that accumulator once (``@ R.T``) and
adds the fp16 accumulator. Stage 1 keeps two online-softmax states (fp16 keys,
packed keys) so neither loop rescales the other's accumulator.

GQA: one program owns one KV head and (a tile of up to 64 of) its query heads;
every K/V tile it loads feeds all of them through ``tl.dot``.

Head dims
---------
Any multiple of 16 in [16, 256] (:func:`supported_head_dim` leaves out 48, see
there). Tiles are ``BLOCK_D = next_power_of_2(D)``
channels wide in natural channel order; channels ``D..BLOCK_D-1`` are padding,
masked on every load / store (read as 0, never written). A power-of-two D has
``BLOCK_D == D`` and takes the unpadded code (the padded branches are
``constexpr`` ifs, so its compiled kernels are unchanged). Packed tiles of a
padded D: the planes are ``D / P`` channels wide (40 for INT4 at D = 80), so a
plane-by-plane unpack would put plane p at ``p * next_power_of_2(D / P)``, not
at ``p * D / P``; instead channel c of the tile loads byte ``c % (D / P)`` and
shifts it by ``(c // (D / P)) * bits`` (each byte is read by its P channels,
from the same cache lines). The tile is then in natural order, so groups stay
a reshape ``[N, BLOCK_D / group, group]`` (``group`` divides D: the padding is
whole groups, whose scale / zero load as 0), and q, the accumulators, the
workspace and the epilogue's un-rotation all stay in natural channel order.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from fade_sglang.pool.view import PackedLayerKV, TieredLayerKV

__all__ = [
    "SUPPORTED_HEAD_DIMS",
    "DecodeWorkspace",
    "TierPartition",
    "block_d",
    "default_num_kv_splits",
    "launch_decode",
    "launch_merge_unrotate",
    "partition_by_tier",
    "supported_head_dim",
]

LOG2E = 1.4426950408889634
# Per-head tile of query heads: tl.dot needs M >= 16; more than 64 heads per KV head are tiled.
_MIN_BLOCK_H = 16
_MAX_BLOCK_H = 64
# Tokens per inner iteration. Untuned (no GPU was available), checked only by compiling for
# sm_90 offline: the fp16 loop matches SGLang's grouped kernel; packed tiles at 32 tokens keep
# the dequantized fp32 [N, D] K and V tiles in registers (64 started to spill).
_BLOCK_N_FP = 32
_BLOCK_N_PACKED = 32
# Columns of the output handled by one epilogue program: the [D, JB] fp32 slice of R.T it
# holds stays <= 32 KiB (JB = 32 at head_dim 256).
_EPILOGUE_COLS = 64
# Split-K heuristic: aim for a few waves of programs, but never splits under this many tokens.
_MIN_TOKENS_PER_SPLIT = 256
_MAX_KV_SPLITS = 64


SUPPORTED_HEAD_DIMS = "16, 32, or a multiple of 16 in [64, 256] (64 / 80 / 96 / 128 / 256 ...)"


def supported_head_dim(head_dim: int) -> bool:
    """head_dim 16, 32, or a multiple of 16 in [64, 256] (:data:`SUPPORTED_HEAD_DIMS`).

    Non-power-of-two head_dims run in tiles padded to the next power of two (see "Head dims" above).
    48 is left out: the default warm group (64) exceeds it, ``QuantFormat.group_size_for`` then
    returns 48 and the dispatch's validation accepts only power-of-two groups. The kernels
    themselves handle such a whole-row group (GROUP == D).
    """
    return 16 <= head_dim <= 256 and head_dim % 16 == 0 and (head_dim >= 64 or head_dim & (head_dim - 1) == 0)


def block_d(head_dim: int) -> int:
    """Tile width over head_dim: the next power of two (== head_dim for a power of two)."""
    return triton.next_power_of_2(head_dim)


# ============================================================================ shared jit helpers


@triton.jit
def tile_mask(valid, offs_d, D: tl.constexpr, BLOCK_D: tl.constexpr):
    """Mask of a [N, BLOCK_D] tile: rows ``valid`` and, when padded, channels < D (rows only when BLOCK_D == D)."""
    if BLOCK_D == D:
        mask = valid[:, None]
    else:
        mask = valid[:, None] & (offs_d < D)[None, :]
    return mask


@triton.jit
def load_fp_tile(ptr, rows, valid, head, stride_row, stride_head, D: tl.constexpr, BLOCK_D: tl.constexpr):
    """[N, BLOCK_D] model-dtype rows ``rows`` of one head (masked rows and padding channels read as 0)."""
    offs_d = tl.arange(0, BLOCK_D)
    return tl.load(ptr + rows[:, None] * stride_row + head * stride_head + offs_d[None, :],
                   mask=tile_mask(valid, offs_d, D, BLOCK_D), other=0.0)


@triton.jit
def load_codes(data_ptr, data_b_ptr, rows, mask, head, j, d_srow, SPLIT: tl.constexpr, DP: tl.constexpr):
    """Packed code bytes ``j`` ([1, W] byte indices < DP) of ``rows`` of one head, as int32 (masked: 0).

    Bytes ``j < SPLIT`` live in ``data`` ([rows, H, SPLIT] blocks), the rest in ``data_b`` ([rows, H, DP - SPLIT]):
    keys with more bits than values spill into the value half of the record (see ``PackedRecordLayout``)."""
    row_off = rows[:, None] * d_srow
    if SPLIT == DP:
        raw = tl.load(data_ptr + row_off + head * DP + j, mask=mask, other=0)
    else:
        raw = tl.load(data_ptr + row_off + head * SPLIT + j, mask=mask & (j < SPLIT), other=0)
        raw += tl.load(data_b_ptr + row_off + head * (DP - SPLIT) + (j - SPLIT), mask=mask & (j >= SPLIT), other=0)
    return raw.to(tl.int32)


@triton.jit
def load_plane(data_ptr, data_b_ptr, rows, valid, head, d_srow, SPLIT: tl.constexpr, DP: tl.constexpr,
               START: tl.constexpr, BITS: tl.constexpr, D: tl.constexpr, N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Codes [N, BLOCK_D] in channel order of one planar plane of ``BITS``-bit codes (D * BITS / 8 bytes from
    byte ``START`` of each head's code row; masked rows and padding channels read 0).

    Planar packing: byte j holds channel j + p * W (W = D / P, P = 8 / BITS) in bits [p * BITS, (p + 1) * BITS),
    so the P shifted copies of the byte tile, stacked on a new middle axis, are already in channel order (no
    interleave). A padded tile (BLOCK_D > D) instead loads, for channel c, byte c % W shifted by
    (c // W) * BITS: channel order again."""
    PER: tl.constexpr = 8 // BITS
    W: tl.constexpr = D // PER
    MASK: tl.constexpr = (1 << BITS) - 1
    if BLOCK_D == D:
        raw = load_codes(data_ptr, data_b_ptr, rows, valid[:, None], head, START + tl.arange(0, W)[None, :],
                         d_srow, SPLIT, DP)
        if PER > 1:
            raw = (raw[:, None, :] >> (tl.arange(0, PER) * BITS)[None, :, None]) & MASK  # [N, P, W]
        return tl.reshape(raw, [N, BLOCK_D])
    else:
        c = tl.arange(0, BLOCK_D)
        raw = load_codes(data_ptr, data_b_ptr, rows, valid[:, None] & (c < D)[None, :], head,
                         (START + c % W)[None, :], d_srow, SPLIT, DP)
        if PER > 1:
            raw = (raw >> ((c // W) * BITS)[None, :]) & MASK
        return raw


@triton.jit
def load_packed_tile(data_ptr, data_b_ptr, scale_ptr, zero_ptr, rows, valid, head, d_srow, s_srow,
                     BITS: tl.constexpr, GROUP: tl.constexpr, SPLIT: tl.constexpr, D: tl.constexpr,
                     N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Dequantized float32 [N, BLOCK_D] tile (packed space: rotated, K still centered) of rows ``rows``, one head.

    Every tensor is [rows, H, X] with contiguous [H, X] blocks: ``d_srow`` / ``s_srow`` are the row strides
    of the code bytes and of the fp16 scale / zero (head strides follow from the format). The codes come
    from :func:`load_plane` (3-bit codes: a 2-bit plane of their low bits, then a 1-bit plane of their
    high bit) and reshape to [N, groups, GROUP] for the per-group scale / zero.
    The one non-power-of-two GROUP that ``QuantFormat.group_size_for`` can produce is the whole
    row (GROUP == D < configured group): it is one BLOCK_D-wide group whose padding channels
    decode to its zero point; harmless, since q_rot is 0 there and those output channels are
    never stored.
    The int -> float conversion uses the 2**23 magic
    number (OR into the mantissa, subtract): full-rate integer / FP ops instead of
    the quarter-rate I2F instruction.
    """
    DP: tl.constexpr = D * BITS // 8
    NG: tl.constexpr = D // GROUP
    GT: tl.constexpr = GROUP if (GROUP & (GROUP - 1)) == 0 else BLOCK_D  # tile group width (see above)
    NGP: tl.constexpr = BLOCK_D // GT
    if BITS == 3:
        raw = load_plane(data_ptr, data_b_ptr, rows, valid, head, d_srow, SPLIT, DP, 0, 2, D, N, BLOCK_D)
        raw |= load_plane(data_ptr, data_b_ptr, rows, valid, head, d_srow, SPLIT, DP, D // 4, 1, D, N, BLOCK_D) << 2
    else:
        raw = load_plane(data_ptr, data_b_ptr, rows, valid, head, d_srow, SPLIT, DP, 0, BITS, D, N, BLOCK_D)
    if BLOCK_D == D:
        s_mask = valid[:, None]
    else:
        s_mask = valid[:, None] & (tl.arange(0, NGP) < NG)[None, :]
    # Channel order is row-major, so [N, BLOCK_D] -> [N, NG, GROUP] is a pure reshape.
    codes = tl.reshape(raw, [N, NGP, GT])
    codes = (codes | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
    s_offs = (rows * s_srow + head * NG)[:, None] + tl.arange(0, NGP)[None, :]
    scale = tl.load(scale_ptr + s_offs, mask=s_mask, other=0.0).to(tl.float32)
    zero = tl.load(zero_ptr + s_offs, mask=s_mask, other=0.0).to(tl.float32)
    return tl.reshape(codes * scale[:, :, None] + zero[:, :, None], [N, BLOCK_D])


@triton.jit
def safe_reciprocal(l):
    """1 / l, and 0 where l == 0 (a row that saw no keys)."""
    return tl.where(l > 0, 1.0 / tl.where(l > 0, l, 1.0), 0.0)


@triton.jit
def softmax_step(qk, m_i, l_i):
    """One online-softmax step in base 2: returns (p, rescale of the old state, new max, new sum)."""
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk - m_new[:, None])
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def attend_fp_range(q, m_i, l_i, acc, idx_ptr, lo, hi, k_ptr, v_ptr, head, k_srow, k_shead, v_srow, v_shead,
                    qk_scale, D: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr, BLOCK_D: tl.constexpr):
    """Online softmax of q [M, BLOCK_D] (KV dtype) over the fp16-tier slots idx[lo:hi]."""
    for start in range(lo, hi, BLOCK_N):
        offs = start + tl.arange(0, BLOCK_N)
        valid = offs < hi
        rows = tl.load(idx_ptr + offs, mask=valid, other=0).to(tl.int64)
        k = load_fp_tile(k_ptr, rows, valid, head, k_srow, k_shead, D, BLOCK_D)
        qk = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=PREC) * qk_scale
        qk = tl.where(valid[None, :], qk, float("-inf"))
        p, alpha, m_i, l_i = softmax_step(qk, m_i, l_i)
        v = load_fp_tile(v_ptr, rows, valid, head, v_srow, v_shead, D, BLOCK_D)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=PREC)
    return m_i, l_i, acc


@triton.jit
def attend_packed_range(q_rot, q_c, m_i, l_i, acc, idx_ptr, lo, hi, base,
                        ka_ptr, kb_ptr, ks_ptr, kz_ptr, vd_ptr, vs_ptr, vz_ptr, head, d_srow, s_srow,
                        qk_scale, K_BITS: tl.constexpr, K_GROUP: tl.constexpr, K_SPLIT: tl.constexpr,
                        V_BITS: tl.constexpr, V_GROUP: tl.constexpr, D: tl.constexpr,
                        BLOCK_N: tl.constexpr, PREC: tl.constexpr, BLOCK_D: tl.constexpr):
    """Online softmax of rotated queries q_rot [M, BLOCK_D] (dot dtype) over packed slots idx[lo:hi] of one tier.

    ``q_c [M]`` is q_rot . k_center (float32). ``acc`` accumulates in the rotated space. Keys and values
    have their own format (keys may carry more bits); the key codes may be split (``K_SPLIT``).
    """
    V_SPLIT: tl.constexpr = D * V_BITS // 8
    for start in range(lo, hi, BLOCK_N):
        offs = start + tl.arange(0, BLOCK_N)
        valid = offs < hi
        rows = tl.load(idx_ptr + offs, mask=valid, other=base).to(tl.int64) - base
        k = load_packed_tile(ka_ptr, kb_ptr, ks_ptr, kz_ptr, rows, valid, head, d_srow, s_srow,
                             K_BITS, K_GROUP, K_SPLIT, D, BLOCK_N, BLOCK_D)
        qk = tl.dot(q_rot, tl.trans(k.to(q_rot.dtype)), input_precision=PREC)
        qk = (qk + q_c[:, None]) * qk_scale
        qk = tl.where(valid[None, :], qk, float("-inf"))
        p, alpha, m_i, l_i = softmax_step(qk, m_i, l_i)
        v = load_packed_tile(vd_ptr, vd_ptr, vs_ptr, vz_ptr, rows, valid, head, d_srow, s_srow,
                             V_BITS, V_GROUP, V_SPLIT, D, BLOCK_N, BLOCK_D)
        acc = acc * alpha[:, None] + tl.dot(p.to(q_rot.dtype), v.to(q_rot.dtype), input_precision=PREC)
    return m_i, l_i, acc


@triton.jit
def load_rotated_query(qr_ptr, center_ptr, rows_off, valid, kv_head, D: tl.constexpr, DOT_DTYPE: tl.constexpr,
                       BLOCK_D: tl.constexpr):
    """Rotated queries (float32 [M, D] at ``qr_ptr + rows_off``; [M, BLOCK_D] tile) cast for the dot, and
    q_rot . k_center."""
    offs_d = tl.arange(0, BLOCK_D)
    qr = tl.load(qr_ptr + rows_off[:, None] + offs_d[None, :], mask=tile_mask(valid, offs_d, D, BLOCK_D), other=0.0)
    if BLOCK_D == D:
        center = tl.load(center_ptr + kv_head * D + offs_d)
    else:
        center = tl.load(center_ptr + kv_head * D + offs_d, mask=offs_d < D, other=0.0)
    return qr.to(DOT_DTYPE), tl.sum(qr * center[None, :], 1)


@triton.jit
def store_partial(m_f, l_f, acc_f, m_p, l_p, acc_p, midf_ptr, midr_ptr, lse_ptr, rows_off, lse_off, valid,
                  D: tl.constexpr, HAS_PACKED: tl.constexpr, BLOCK_D: tl.constexpr):
    """Merge the fp16 and packed softmax states and store both normalized accumulators and the base-2 LSE.

    An empty state (no keys) stores zeros and LSE = -inf, which the epilogue weights by 0.
    """
    offs_d = tl.arange(0, BLOCK_D)
    mask = tile_mask(valid, offs_d, D, BLOCK_D)
    if HAS_PACKED:
        m = tl.maximum(m_f, m_p)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        a_f = tl.exp2(m_f - m_safe)
        a_p = tl.exp2(m_p - m_safe)
        l = l_f * a_f + l_p * a_p
    else:
        m_safe = tl.where(m_f == float("-inf"), 0.0, m_f)
        a_f = tl.exp2(m_f - m_safe)
        l = l_f * a_f
    inv = safe_reciprocal(l)
    offs = rows_off[:, None] + offs_d[None, :]
    tl.store(midf_ptr + offs, acc_f * (a_f * inv)[:, None], mask=mask)
    if HAS_PACKED:
        tl.store(midr_ptr + offs, acc_p * (a_p * inv)[:, None], mask=mask)
    lse = tl.where(l > 0, m_safe + tl.log2(tl.where(l > 0, l, 1.0)), float("-inf"))
    tl.store(lse_ptr + lse_off, lse, mask=valid)


@triton.jit
def split_spans(lo, hi, n_f, n_w, n_c, cost_f, cost_w, cost_c):
    """Token ranges [first, last) of each tier's run whose byte cost starts inside [lo, hi).

    The runs are laid end to end in cost space (fp16, then warm, then cold); token i of
    a run starting at cost S belongs to the split whose [lo, hi) holds S + i * cost.
    """
    w_start = n_f * cost_f
    c_start = w_start + n_w * cost_w
    a_f = tl.maximum(lo, 0)
    b_f = tl.minimum(tl.maximum(hi, 0), w_start)
    a_w = tl.maximum(lo - w_start, 0)
    b_w = tl.minimum(tl.maximum(hi - w_start, 0), n_w * cost_w)
    a_c = tl.maximum(lo - c_start, 0)
    b_c = tl.minimum(tl.maximum(hi - c_start, 0), n_c * cost_c)
    return (tl.minimum(tl.cdiv(a_f, cost_f), n_f), tl.cdiv(b_f, cost_f),
            tl.minimum(tl.cdiv(a_w, cost_w), n_w), tl.cdiv(b_w, cost_w),
            tl.minimum(tl.cdiv(a_c, cost_c), n_c), tl.cdiv(b_c, cost_c))


# ============================================================================ decode stage 1


@triton.jit
def _decode_stage1(
    Q, QR, KF, VF,
    KWa, KWb, KWs, KWz, VWd, VWs, VWz,
    KCa, KCb, KCs, KCz, VCd, VCs, VCz,
    Center, Idx, TierPtr, MidF, MidR, MidL,
    stride_qb, stride_qh, stride_qrb, stride_qrh,
    kf_srow, kf_shead, vf_srow, vf_shead,
    w_dsrow, w_ssrow, c_dsrow, c_ssrow,
    stride_mb, stride_mh, stride_ms, stride_lb, stride_lh,
    warm_base, cold_base, num_splits, cost_fp, cost_warm, cost_cold, qk_scale,
    GROUP: tl.constexpr, HEAD_TILES: tl.constexpr, BLOCK_H: tl.constexpr, D: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_NP: tl.constexpr,
    HAS_WARM: tl.constexpr, WK_BITS: tl.constexpr, WK_GROUP: tl.constexpr, WK_SPLIT: tl.constexpr,
    WV_BITS: tl.constexpr, WV_GROUP: tl.constexpr,
    HAS_COLD: tl.constexpr, CK_BITS: tl.constexpr, CK_GROUP: tl.constexpr, CK_SPLIT: tl.constexpr,
    CV_BITS: tl.constexpr, CV_GROUP: tl.constexpr,
    PREC: tl.constexpr, BLOCK_D: tl.constexpr,
):
    HAS_PACKED: tl.constexpr = HAS_WARM or HAS_COLD
    b = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1) // HEAD_TILES
    split = tl.program_id(2)
    h_in_group = (tl.program_id(1) % HEAD_TILES) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_valid = h_in_group < GROUP
    heads = kv_head * GROUP + h_in_group

    # This request's [fp16 | warm | cold] runs, and this split's share of their bytes.
    t0 = tl.load(TierPtr + b * 4).to(tl.int64)
    t1 = tl.load(TierPtr + b * 4 + 1).to(tl.int64)
    t2 = tl.load(TierPtr + b * 4 + 2).to(tl.int64)
    t3 = tl.load(TierPtr + b * 4 + 3).to(tl.int64)
    total = (t1 - t0) * cost_fp + (t2 - t1) * cost_warm + (t3 - t2) * cost_cold
    per_split = tl.cdiv(total, num_splits)
    lo = per_split * split
    f_lo, f_hi, w_lo, w_hi, c_lo, c_hi = split_spans(lo, tl.minimum(lo + per_split, total), t1 - t0, t2 - t1,
                                                     t3 - t2, cost_fp, cost_warm, cost_cold)

    offs_d = tl.arange(0, BLOCK_D)
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=tile_mask(h_valid, offs_d, D, BLOCK_D), other=0.0)
    q = q.to(KF.dtype.element_ty)
    m_f = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_f = tl.zeros([BLOCK_H], tl.float32)
    acc_f = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    m_f, l_f, acc_f = attend_fp_range(q, m_f, l_f, acc_f, Idx, t0 + f_lo, t0 + f_hi, KF, VF, kv_head,
                                      kf_srow, kf_shead, vf_srow, vf_shead, qk_scale, D, BLOCK_N, PREC, BLOCK_D)

    m_p = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_p = tl.zeros([BLOCK_H], tl.float32)
    acc_p = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    if HAS_PACKED:
        q_rot, q_c = load_rotated_query(QR, Center, b * stride_qrb + heads * stride_qrh, h_valid, kv_head, D,
                                        KF.dtype.element_ty, BLOCK_D)
        if HAS_WARM:
            m_p, l_p, acc_p = attend_packed_range(q_rot, q_c, m_p, l_p, acc_p, Idx, t1 + w_lo, t1 + w_hi,
                                                  warm_base, KWa, KWb, KWs, KWz, VWd, VWs, VWz, kv_head,
                                                  w_dsrow, w_ssrow, qk_scale, WK_BITS, WK_GROUP, WK_SPLIT,
                                                  WV_BITS, WV_GROUP, D, BLOCK_NP, PREC, BLOCK_D)
        if HAS_COLD:
            m_p, l_p, acc_p = attend_packed_range(q_rot, q_c, m_p, l_p, acc_p, Idx, t2 + c_lo, t2 + c_hi,
                                                  cold_base, KCa, KCb, KCs, KCz, VCd, VCs, VCz, kv_head,
                                                  c_dsrow, c_ssrow, qk_scale, CK_BITS, CK_GROUP, CK_SPLIT,
                                                  CV_BITS, CV_GROUP, D, BLOCK_NP, PREC, BLOCK_D)

    store_partial(m_f, l_f, acc_f, m_p, l_p, acc_p, MidF, MidR, MidL,
                  b * stride_mb + heads * stride_mh + split * stride_ms,
                  b * stride_lb + heads * stride_lh + split, h_valid, D, HAS_PACKED, BLOCK_D)


# ============================================================================ epilogue (shared with extend)


@triton.jit
def _merge_unrotate(
    MidF, MidR, MidL, R, Out, num_splits, num_heads,
    stride_mb, stride_mh, stride_ms, stride_lb, stride_lh, stride_ob, stride_oh,
    D: tl.constexpr, BLOCK_H: tl.constexpr, JB: tl.constexpr,
    HAS_PACKED: tl.constexpr, ROTATED: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out[:, cols] = merged fp16 part + (merged packed part) @ R.T, over ``num_splits`` LSE-weighted partials.

    Padded head_dim (BLOCK_D > D): the last column block is partly past D (masked), and the
    un-rotation runs over BLOCK_D channels whose padding reads 0 (partials and R alike).
    """
    row = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_valid = heads < num_heads
    cols = tl.program_id(2) * JB + tl.arange(0, JB)
    offs_d = tl.arange(0, BLOCK_D)
    out_mask = tile_mask(h_valid, cols, D, BLOCK_D)
    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_H], tl.float32)
    acc_f = tl.zeros([BLOCK_H, JB], tl.float32)
    # The un-rotation mixes every channel into every output column: it needs all D channels.
    if ROTATED:
        acc_r = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
        r_cols = offs_d
        r_mask = tile_mask(h_valid, offs_d, D, BLOCK_D)
    else:
        acc_r = tl.zeros([BLOCK_H, JB], tl.float32)
        r_cols = cols
        r_mask = out_mask
    base = row * stride_mb + heads * stride_mh
    for s in range(0, num_splits):
        lse = tl.load(MidL + row * stride_lb + heads * stride_lh + s, mask=h_valid, other=float("-inf"))
        m_new = tl.maximum(m, lse)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_safe)
        w = tl.exp2(lse - m_safe)
        part = tl.load(MidF + base[:, None] + s * stride_ms + cols[None, :], mask=out_mask, other=0.0)
        acc_f = acc_f * alpha[:, None] + part * w[:, None]
        if HAS_PACKED:
            part_r = tl.load(MidR + base[:, None] + s * stride_ms + r_cols[None, :], mask=r_mask, other=0.0)
            acc_r = acc_r * alpha[:, None] + part_r * w[:, None]
        l = l * alpha + w
        m = m_new
    out = acc_f
    if HAS_PACKED:
        if ROTATED:
            # rt[d, j] = R[cols[j], d]: the R.T columns of this program's output columns.
            if BLOCK_D == D:
                rt = tl.load(R + cols[None, :] * D + offs_d[:, None])
            else:
                rt = tl.load(R + cols[None, :] * D + offs_d[:, None],
                             mask=(offs_d < D)[:, None] & (cols < D)[None, :], other=0.0)
            out += tl.dot(acc_r, rt, input_precision="tf32x3")
        else:
            out += acc_r
    out = out * safe_reciprocal(l)[:, None]
    tl.store(Out + row * stride_ob + heads[:, None] * stride_oh + cols[None, :],
             out.to(Out.dtype.element_ty), mask=out_mask)


# ============================================================================ host side


@dataclass(frozen=True)
class TierPartition:
    """``kv_indices`` reordered per request into [fp16 | warm | cold] runs.

    ``indices``: same length and dtype as the input ``kv_indices`` (entries past
    ``kv_indptr[-1]`` are copied through unchanged). ``tier_indptr [B, 4]`` int32:
    request ``b``'s fp16 run is ``indices[tier_indptr[b, 0]:tier_indptr[b, 1]]``,
    warm ``[.., 1]:[.., 2]``, cold ``[.., 2]:[.., 3]``; ``tier_indptr[b, 3] == kv_indptr[b + 1]``.
    """

    indices: torch.Tensor
    tier_indptr: torch.Tensor


def partition_by_tier(kv_indptr: torch.Tensor, kv_indices: torch.Tensor, warm_base: int, cold_base: int,
                      out: TierPartition | None = None) -> TierPartition:
    """Stable per-request partition of ``kv_indices`` by tier; O(N) torch ops, no host sync.

    ``out`` (preallocated ``indices`` / ``tier_indptr``) makes it CUDA-graph friendly.
    """
    device = kv_indices.device
    n = kv_indices.numel()
    batch = kv_indptr.numel() - 1
    indptr = kv_indptr.to(device=device, dtype=torch.int64)
    if out is None:
        out = TierPartition(torch.empty_like(kv_indices), torch.empty(batch, 4, dtype=torch.int32, device=device))
    if batch <= 0:
        out.indices.copy_(kv_indices)
        return out
    idx = kv_indices.to(torch.int64)
    tier = (idx >= warm_base).to(torch.int64) + (idx >= cold_base).to(torch.int64)
    pos = torch.arange(n, device=device)
    req = torch.searchsorted(indptr[1:], pos, right=True)  # == batch past the last request
    valid = (req < batch) & (pos >= indptr[0])
    onehot = (tier[:, None] == torch.arange(3, device=device)[None, :]).to(torch.int64) * valid[:, None]
    incl = torch.cumsum(onehot, dim=0)  # [n, 3]: tokens of each tier up to and including pos
    before = torch.cat((torch.zeros(1, 3, dtype=torch.int64, device=device), incl))[indptr]  # [B + 1, 3]
    counts = before[1:] - before[:-1]  # [B, 3]
    starts = indptr[:-1, None] + torch.cumsum(counts, dim=1) - counts  # start of each tier's run
    req_c = req.clamp(max=batch - 1)
    rank = incl.gather(1, tier[:, None])[:, 0] - before[req_c].gather(1, tier[:, None])[:, 0] - 1
    new_pos = torch.where(valid, starts[req_c].gather(1, tier[:, None])[:, 0] + rank, pos)
    out.indices.index_copy_(0, new_pos, kv_indices)
    out.tier_indptr.copy_(torch.cat((starts, indptr[1:, None]), dim=1))
    return out


@dataclass(frozen=True)
class DecodeWorkspace:
    """Scratch of one decode launch; preallocate (and slice to the batch) for CUDA graphs.

    ``mid_fp / mid_rot``: float32 [B, Hq, S, D] per-split normalized partial outputs
    (fp16-tier part, packed part in the rotated space); ``mid_lse``: float32 [B, Hq, S]
    base-2 LSE; ``q_rot``: float32 [B, Hq, D] = q @ R.
    """

    mid_fp: torch.Tensor
    mid_rot: torch.Tensor
    mid_lse: torch.Tensor
    q_rot: torch.Tensor

    @staticmethod
    def allocate(batch: int, q_heads: int, head_dim: int, num_kv_splits: int,
                 device: torch.device | str) -> "DecodeWorkspace":
        f32 = dict(dtype=torch.float32, device=device)
        return DecodeWorkspace(torch.empty(batch, q_heads, num_kv_splits, head_dim, **f32),
                               torch.empty(batch, q_heads, num_kv_splits, head_dim, **f32),
                               torch.empty(batch, q_heads, num_kv_splits, **f32),
                               torch.empty(batch, q_heads, head_dim, **f32))


@functools.lru_cache(maxsize=8)
def _multiprocessors(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def default_num_kv_splits(batch: int, kv_heads: int, total_kv_tokens: int, device: torch.device | str) -> int:
    """Split count from host-known sizes only (no sync): ~4 waves of programs, >= 256 tokens per split."""
    progs = max(1, batch * kv_heads)
    waves = triton.cdiv(4 * _multiprocessors(torch.device(device)), progs)
    by_len = triton.cdiv(max(1, total_kv_tokens // max(1, batch)), _MIN_TOKENS_PER_SPLIT)
    return int(max(1, min(waves, by_len, _MAX_KV_SPLITS)))


def tier_cost(view: TieredLayerKV) -> tuple[int, int, int]:
    """Bytes read per token per KV head for K+V in each tier (the split-K weights)."""
    d = view.k_fp16.shape[-1]
    fp = 2 * d * view.k_fp16.element_size()

    def packed(p: PackedLayerKV | None) -> int:
        return 1 if p is None else p.key.fmt.bytes_per_token_head(d) + p.value.fmt.bytes_per_token_head(d)

    return fp, packed(view.warm), packed(view.cold)


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 KV must not silently drop to TF32 (10-bit mantissa); tf32x3 keeps ~fp32 accuracy on tensor
    # cores, where "ieee" would fall back to register-heavy FMA loops. 16-bit dtypes ignore this.
    return "tf32x3" if dtype == torch.float32 else "tf32"


def packed_args(p: PackedLayerKV | None, dummy: torch.Tensor) -> tuple[tuple, tuple, dict]:
    """(pointers, row strides, constexprs) of one packed tier for the attention kernels (see
    :func:`tier_constexprs` for the constexprs' names)."""
    if p is None:  # HAS_<tier> is False: the tier's loop is not compiled, these only fill the signature
        return (dummy,) * 7, (0, 0), dict(K_BITS=2, K_GROUP=16, K_SPLIT=4, V_BITS=2, V_GROUP=16)
    k, v = p.key, p.value
    d = v.fmt.head_dim_of(v.data.shape[-1])  # value codes are never split
    return ((k.data, k.data if k.data_b is None else k.data_b, k.scale, k.zero, v.data, v.scale, v.zero),
            (k.data.stride(0), k.scale.stride(0)),
            dict(K_BITS=k.fmt.bits, K_GROUP=k.fmt.group_size_for(d), K_SPLIT=k.split,
                 V_BITS=v.fmt.bits, V_GROUP=v.fmt.group_size_for(d)))


def tier_constexprs(prefix: str, p: PackedLayerKV | None, meta: dict) -> dict:
    """Kernel constexprs of one tier: ``HAS_WARM`` and ``WK_BITS`` ... for prefix ``W`` (``C``: cold)."""
    out = {("HAS_WARM" if prefix == "W" else "HAS_COLD"): p is not None}
    out.update({f"{prefix}{k}": val for k, val in meta.items()})
    return out


def rotate_queries(q: torch.Tensor, view: TieredLayerKV, out: torch.Tensor) -> torch.Tensor:
    """q @ R in float32 into ``out`` (q itself when the pool has no rotation)."""
    if view.rotation is None:
        return out.copy_(q)
    return torch.matmul(q.float(), view.rotation, out=out)


def launch_merge_unrotate(mid_fp: torch.Tensor, mid_rot: torch.Tensor, mid_lse: torch.Tensor, view: TieredLayerKV,
                          out: torch.Tensor, num_splits: int, has_packed: bool) -> None:
    """Epilogue: merge ``num_splits`` partials of every row, un-rotate the packed part, write ``out [R, Hq, D]``."""
    rows, heads, d = out.shape
    if rows == 0:
        return
    bd = block_d(d)
    jb = min(bd, _EPILOGUE_COLS if bd <= 128 else _EPILOGUE_COLS // 2)
    rot = view.rotation if view.rotation is not None else mid_lse
    grid = (rows, triton.cdiv(heads, _MIN_BLOCK_H), triton.cdiv(d, jb))
    _merge_unrotate[grid](
        mid_fp, mid_rot, mid_lse, rot, out, num_splits, heads,
        mid_fp.stride(0), mid_fp.stride(1), mid_fp.stride(2), mid_lse.stride(0), mid_lse.stride(1),
        out.stride(0), out.stride(1),
        D=d, BLOCK_H=_MIN_BLOCK_H, JB=jb, HAS_PACKED=has_packed, ROTATED=view.rotation is not None,
        BLOCK_D=bd, num_warps=4,
    )


def head_tiling(group: int) -> tuple[int, int]:
    """(BLOCK_H, head tiles per KV head) for a GQA group."""
    block_h = min(max(_MIN_BLOCK_H, triton.next_power_of_2(group)), _MAX_BLOCK_H)
    return block_h, triton.cdiv(group, block_h)


def launch_decode(q: torch.Tensor, view: TieredLayerKV, partition: TierPartition, sm_scale: float,
                  out: torch.Tensor, num_kv_splits: int, workspace: DecodeWorkspace) -> torch.Tensor:
    """Unvalidated launcher (see :func:`fade_sglang.kernels.decode_attention`)."""
    batch, q_heads, d = q.shape
    kv_heads = view.k_fp16.shape[1]
    group = q_heads // kv_heads
    if batch == 0:
        return out
    has_packed = view.warm is not None or view.cold is not None
    ws = workspace
    if has_packed:
        rotate_queries(q, view, ws.q_rot[:batch])
    w_ptrs, w_strides, w_meta = packed_args(view.warm, view.k_fp16)
    c_ptrs, c_strides, c_meta = packed_args(view.cold, view.k_fp16)
    cost = tier_cost(view)
    block_h, head_tiles = head_tiling(group)
    bd = block_d(d)
    block_np = _BLOCK_N_PACKED if bd <= 128 else _BLOCK_N_PACKED // 2
    grid = (batch, kv_heads * head_tiles, num_kv_splits)
    _decode_stage1[grid](
        q, ws.q_rot, view.k_fp16, view.v_fp16, *w_ptrs, *c_ptrs,
        view.k_center, partition.indices, partition.tier_indptr, ws.mid_fp, ws.mid_rot, ws.mid_lse,
        q.stride(0), q.stride(1), ws.q_rot.stride(0), ws.q_rot.stride(1),
        view.k_fp16.stride(0), view.k_fp16.stride(1), view.v_fp16.stride(0), view.v_fp16.stride(1),
        *w_strides, *c_strides,
        ws.mid_fp.stride(0), ws.mid_fp.stride(1), ws.mid_fp.stride(2), ws.mid_lse.stride(0), ws.mid_lse.stride(1),
        view.warm_base, view.cold_base, num_kv_splits, cost[0], cost[1], cost[2], sm_scale * LOG2E,
        GROUP=group, HEAD_TILES=head_tiles, BLOCK_H=block_h, D=d, BLOCK_N=_BLOCK_N_FP, BLOCK_NP=block_np,
        **tier_constexprs("W", view.warm, w_meta), **tier_constexprs("C", view.cold, c_meta),
        PREC=dot_precision(view.k_fp16.dtype), BLOCK_D=bd,
        num_warps=4 if block_h <= 32 else 8, num_stages=2,
    )
    launch_merge_unrotate(ws.mid_fp, ws.mid_rot, ws.mid_lse, view, out, num_kv_splits, has_packed)
    return out
