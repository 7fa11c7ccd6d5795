"""Extend / prefill attention (Triton) of new tokens over a cached mixed-tier prefix plus the new fp16 chunk.

The cached prefix (a radix hit) is fully visible to every new token and is read
through the same per-tier loops as decode (:mod:`.decode`): partitioned into
[fp16 | warm | cold] runs, packed slots dequantized in registers against the
rotated queries. The new chunk is read from ``k_new`` / ``v_new`` (what
SGLang's ``forward_extend`` has in hand; whether it is already written to the
pool does not matter) with a causal mask.

One program owns ``BLOCK_M`` new tokens of one request and one KV head, for all
query heads of that KV head: its rows are (token, head-in-group) pairs, so each
K/V tile is loaded once per GQA group. Without packed tiers the program writes
the output directly; with them it writes the fp16 and rotated partials and the
shared epilogue (:func:`.decode.launch_merge_unrotate`, one split) un-rotates.

Any head_dim that :func:`.decode.supported_head_dim` accepts: tiles are padded to
the next power of two with the padding channels masked (see "Head dims" in :mod:`.decode`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fade_sglang.pool.view import TieredLayerKV

from .decode import (
    LOG2E,
    DecodeWorkspace,
    TierPartition,
    dot_precision,
    packed_args,
    tier_constexprs,
    tile_mask,
    attend_fp_range,
    attend_packed_range,
    block_d,
    launch_merge_unrotate,
    load_fp_tile,
    load_rotated_query,
    rotate_queries,
    safe_reciprocal,
    softmax_step,
    store_partial,
)

__all__ = ["launch_extend"]

# Rows of one program = BLOCK_M tokens x (padded) GQA group; >= 16 for tl.dot. Untuned.
_ROWS = 64
_BLOCK_N = 32


@triton.jit
def _extend_kernel(
    Q, QR, KN, VN, KF, VF,
    KWa, KWb, KWs, KWz, VWd, VWs, VWz,
    KCa, KCb, KCs, KCz, VCd, VCs, VCz,
    Center, Idx, TierPtr, QoPtr, Out, MidF, MidR, MidL,
    stride_qt, stride_qh, stride_qrt, stride_qrh,
    kn_st, kn_sh, vn_st, vn_sh,
    kf_srow, kf_shead, vf_srow, vf_shead,
    w_dsrow, w_ssrow, c_dsrow, c_ssrow,
    stride_ot, stride_oh, stride_mt, stride_mh, stride_lt, stride_lh,
    warm_base, cold_base, qk_scale,
    GROUP: tl.constexpr, GP: tl.constexpr, BLOCK_M: tl.constexpr, D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_WARM: tl.constexpr, WK_BITS: tl.constexpr, WK_GROUP: tl.constexpr, WK_SPLIT: tl.constexpr,
    WV_BITS: tl.constexpr, WV_GROUP: tl.constexpr,
    HAS_COLD: tl.constexpr, CK_BITS: tl.constexpr, CK_GROUP: tl.constexpr, CK_SPLIT: tl.constexpr,
    CV_BITS: tl.constexpr, CV_GROUP: tl.constexpr,
    PREC: tl.constexpr, BLOCK_D: tl.constexpr,
):
    HAS_PACKED: tl.constexpr = HAS_WARM or HAS_COLD
    ROWS: tl.constexpr = BLOCK_M * GP
    b = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    m_start = tl.program_id(2) * BLOCK_M
    qo_start = tl.load(QoPtr + b).to(tl.int64)
    ext_len = tl.load(QoPtr + b + 1).to(tl.int64) - qo_start
    if m_start < ext_len:
        r = tl.arange(0, ROWS)
        tok = m_start + r // GP  # position inside the new chunk
        h_in_group = r % GP
        valid = (tok < ext_len) & (h_in_group < GROUP)
        heads = kv_head * GROUP + h_in_group
        offs_d = tl.arange(0, BLOCK_D)
        q = tl.load(Q + (qo_start + tok)[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                    mask=tile_mask(valid, offs_d, D, BLOCK_D), other=0.0).to(KF.dtype.element_ty)
        t0 = tl.load(TierPtr + b * 4).to(tl.int64)
        t1 = tl.load(TierPtr + b * 4 + 1).to(tl.int64)
        t2 = tl.load(TierPtr + b * 4 + 2).to(tl.int64)
        t3 = tl.load(TierPtr + b * 4 + 3).to(tl.int64)

        m_f = tl.full([ROWS], float("-inf"), tl.float32)
        l_f = tl.zeros([ROWS], tl.float32)
        acc_f = tl.zeros([ROWS, BLOCK_D], tl.float32)
        m_f, l_f, acc_f = attend_fp_range(q, m_f, l_f, acc_f, Idx, t0, t1, KF, VF, kv_head,
                                          kf_srow, kf_shead, vf_srow, vf_shead, qk_scale, D, BLOCK_N, PREC, BLOCK_D)
        # New chunk, causal: token i sees new tokens 0..i (key 0 is visible to every row, so no row is all -inf).
        for start in range(0, tl.minimum(ext_len, m_start + BLOCK_M), BLOCK_N):
            j = start + tl.arange(0, BLOCK_N)
            k_valid = j < ext_len
            k = load_fp_tile(KN, qo_start + j, k_valid, kv_head, kn_st, kn_sh, D, BLOCK_D)
            qk = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=PREC) * qk_scale
            qk = tl.where(k_valid[None, :] & (j[None, :] <= tok[:, None]), qk, float("-inf"))
            p, alpha, m_f, l_f = softmax_step(qk, m_f, l_f)
            v = load_fp_tile(VN, qo_start + j, k_valid, kv_head, vn_st, vn_sh, D, BLOCK_D)
            acc_f = acc_f * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=PREC)

        if HAS_PACKED:
            m_p = tl.full([ROWS], float("-inf"), tl.float32)
            l_p = tl.zeros([ROWS], tl.float32)
            acc_p = tl.zeros([ROWS, BLOCK_D], tl.float32)
            q_rot, q_c = load_rotated_query(QR, Center, (qo_start + tok) * stride_qrt + heads * stride_qrh, valid,
                                            kv_head, D, KF.dtype.element_ty, BLOCK_D)
            if HAS_WARM:
                m_p, l_p, acc_p = attend_packed_range(q_rot, q_c, m_p, l_p, acc_p, Idx, t1, t2, warm_base,
                                                      KWa, KWb, KWs, KWz, VWd, VWs, VWz, kv_head,
                                                      w_dsrow, w_ssrow, qk_scale, WK_BITS, WK_GROUP, WK_SPLIT,
                                                      WV_BITS, WV_GROUP, D, BLOCK_N, PREC, BLOCK_D)
            if HAS_COLD:
                m_p, l_p, acc_p = attend_packed_range(q_rot, q_c, m_p, l_p, acc_p, Idx, t2, t3, cold_base,
                                                      KCa, KCb, KCs, KCz, VCd, VCs, VCz, kv_head,
                                                      c_dsrow, c_ssrow, qk_scale, CK_BITS, CK_GROUP, CK_SPLIT,
                                                      CV_BITS, CV_GROUP, D, BLOCK_N, PREC, BLOCK_D)
            store_partial(m_f, l_f, acc_f, m_p, l_p, acc_p, MidF, MidR, MidL,
                          (qo_start + tok) * stride_mt + heads * stride_mh,
                          (qo_start + tok) * stride_lt + heads * stride_lh, valid, D, True, BLOCK_D)
        else:
            out = acc_f * safe_reciprocal(l_f)[:, None]
            tl.store(Out + (qo_start + tok)[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
                     out.to(Out.dtype.element_ty), mask=tile_mask(valid, offs_d, D, BLOCK_D))


def launch_extend(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, view: TieredLayerKV,
                  qo_indptr: torch.Tensor, partition: TierPartition, sm_scale: float, out: torch.Tensor,
                  max_extend_len: int, workspace: DecodeWorkspace | None = None) -> torch.Tensor:
    """Unvalidated launcher (see :func:`fade_sglang.kernels.extend_attention`)."""
    tokens, q_heads, d = q.shape
    kv_heads = view.k_fp16.shape[1]
    group = q_heads // kv_heads
    batch = qo_indptr.numel() - 1
    if tokens == 0 or batch == 0 or max_extend_len <= 0:
        return out
    has_packed = view.warm is not None or view.cold is not None
    ws = workspace
    if has_packed:
        if ws is None:
            ws = DecodeWorkspace.allocate(tokens, q_heads, d, 1, q.device)
        rotate_queries(q, view, ws.q_rot[:tokens])
        mid_f, mid_r, mid_l, q_rot = ws.mid_fp, ws.mid_rot, ws.mid_lse, ws.q_rot
    else:
        mid_f = mid_r = q_rot = out
        mid_l = out
    w_ptrs, w_strides, w_meta = packed_args(view.warm, view.k_fp16)
    c_ptrs, c_strides, c_meta = packed_args(view.cold, view.k_fp16)
    gp = triton.next_power_of_2(group)
    bd = block_d(d)
    block_m = max(1, (_ROWS if bd <= 128 else _ROWS // 2) // gp)  # two fp32 [rows, BLOCK_D] accumulators
    grid = (batch, kv_heads, triton.cdiv(max_extend_len, block_m))
    _extend_kernel[grid](
        q, q_rot, k_new, v_new, view.k_fp16, view.v_fp16, *w_ptrs, *c_ptrs,
        view.k_center, partition.indices, partition.tier_indptr, qo_indptr, out, mid_f, mid_r, mid_l,
        q.stride(0), q.stride(1), q_rot.stride(0), q_rot.stride(1),
        k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1),
        view.k_fp16.stride(0), view.k_fp16.stride(1), view.v_fp16.stride(0), view.v_fp16.stride(1),
        *w_strides, *c_strides,
        out.stride(0), out.stride(1), mid_f.stride(0), mid_f.stride(1), mid_l.stride(0), mid_l.stride(1),
        view.warm_base, view.cold_base, sm_scale * LOG2E,
        GROUP=group, GP=gp, BLOCK_M=block_m, D=d, BLOCK_N=_BLOCK_N,
        **tier_constexprs("W", view.warm, w_meta), **tier_constexprs("C", view.cold, c_meta),
        PREC=dot_precision(view.k_fp16.dtype), BLOCK_D=bd,
        num_warps=4 if bd <= 64 else 8, num_stages=2,
    )
    if has_packed:
        launch_merge_unrotate(mid_f[:tokens], mid_r[:tokens], mid_l[:tokens], view, out, 1, True)
    return out
