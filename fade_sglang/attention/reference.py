"""Torch reference attention over a mixed-tier :class:`TieredLayerKV`.

Two roles: the oracle the Triton kernels are tested against, and the CPU
serving path of the fade attention backend. Both gather the KV of a request
with :func:`gather_kv` (fp16 slots read as-is, packed slots dequantized and
un-rotated), so they define the exact math the kernels must reproduce.

Calling convention (FlashInfer / SGLang, page size 1):
  * ``kv_indptr [B + 1]`` / ``kv_indices``: request ``b`` reads slots
    ``kv_indices[kv_indptr[b]:kv_indptr[b + 1]]`` (any mix of tiers, any order);
  * GQA: ``Hq = group * Hkv``; query head ``h`` reads KV head ``h // group``;
  * extend: ``qo_indptr [B + 1]`` delimits the new tokens of each request in
    ``q`` / ``k_new`` / ``v_new``. The new chunk is read from ``k_new`` / ``v_new``
    (as SGLang's ``forward_extend`` has them in hand), never from the pool, so it
    does not matter whether it has already been written there. The cached
    prefix (``kv_indptr`` / ``kv_indices``) is fully visible; inside the chunk,
    new token ``i`` sees new tokens ``0..i`` (causal).

Work is vectorized per request (one Python iteration per request, plus a loop
over query blocks that bounds the score matrix for long chunks).
"""

from __future__ import annotations

import torch

from ..pool.view import TieredLayerKV, gather_kv

__all__ = ["decode_attention_ref", "extend_attention_ref", "attend"]

# Upper bound on the elements of one request's score block ([Hq, m_block, n]).
_MAX_SCORE_ELEMS = 1 << 24


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float) -> torch.Tensor:
    """Attention of ``m`` queries ``[m, Hq, D]`` over ``n`` keys ``[n, Hkv, D]`` in ``q.dtype``.

    The last ``m`` keys are the queries' own tokens: query ``i`` sees keys
    ``0 .. n - m + i`` (so ``m == 1`` is plain decode over all keys). ``n == 0``
    gives zeros.
    """
    m, hq, d = q.shape
    n, hkv = k.shape[0], k.shape[1]
    if n < m:
        raise ValueError(f"need at least as many keys as queries (got {n} keys, {m} queries)")
    out = torch.zeros(m, hq, v.shape[-1], dtype=q.dtype, device=q.device)
    if m == 0 or n == 0:
        return out
    group = hq // hkv
    kt = k.permute(1, 2, 0)  # [Hkv, D, n]
    vt = v.permute(1, 0, 2)  # [Hkv, n, D]
    block = max(1, _MAX_SCORE_ELEMS // max(1, hq * n))
    keys = torch.arange(n, device=q.device)
    for i0 in range(0, m, block):  # query blocks, not tokens: bounds the score matrix for long chunks
        qb = q[i0:i0 + block]
        mb = qb.shape[0]
        # [Hkv, G * mb, D]: every query head of a KV group shares one matmul against that head's keys.
        qg = qb.reshape(mb, hkv, group, d).permute(1, 2, 0, 3).reshape(hkv, group * mb, d)
        s = torch.matmul(qg, kt) * sm_scale  # [Hkv, G * mb, n]
        last_visible = (n - m + i0) + torch.arange(mb, device=q.device)  # per query row
        hidden = keys[None, :] > last_visible[:, None]  # [mb, n]
        if bool(hidden.any()):
            s = s.reshape(hkv, group, mb, n).masked_fill(hidden, float("-inf")).reshape(hkv, group * mb, n)
        o = torch.matmul(torch.softmax(s, dim=-1), vt)  # [Hkv, G * mb, D]
        out[i0:i0 + mb] = o.reshape(hkv, group, mb, -1).permute(2, 0, 1, 3).reshape(mb, hq, -1)
    return out


def _check_common(q: torch.Tensor, view: TieredLayerKV, indptr: torch.Tensor, what: str) -> None:
    if q.dim() != 3:
        raise ValueError(f"q must be [{what}, Hq, D], got shape {tuple(q.shape)}")
    hkv, d = view.k_fp16.shape[1], view.k_fp16.shape[2]
    if q.shape[2] != d:
        raise ValueError(f"q head_dim {q.shape[2]} != KV head_dim {d}")
    if q.shape[1] % hkv:
        raise ValueError(f"q heads ({q.shape[1]}) must be a multiple of KV heads ({hkv})")
    if indptr.dim() != 1 or indptr.numel() < 1:
        raise ValueError("indptr tensors must be 1-D with B + 1 entries")


def _out(result: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        return result
    if out.shape != result.shape:
        raise ValueError(f"out has shape {tuple(out.shape)}, expected {tuple(result.shape)}")
    out.copy_(result)
    return out


def decode_attention_ref(q: torch.Tensor, view: TieredLayerKV, kv_indptr: torch.Tensor, kv_indices: torch.Tensor,
                         sm_scale: float, out: torch.Tensor | None = None,
                         compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Decode attention ``q [B, Hq, D]`` over each request's mixed-tier slots -> ``[B, Hq, D]`` in ``q.dtype``.

    A request with no slots gets zeros. ``compute_dtype`` float64 turns this into a test oracle.
    """
    _check_common(q, view, kv_indptr, "B")
    bounds = kv_indptr.tolist()
    if len(bounds) != q.shape[0] + 1:
        raise ValueError(f"kv_indptr has {len(bounds)} entries, expected B + 1 = {q.shape[0] + 1}")
    # One gather (one dequantization per tier) for the whole batch.
    k_all, v_all = gather_kv(view, kv_indices[bounds[0]:bounds[-1]])
    k_all, v_all = k_all.to(compute_dtype), v_all.to(compute_dtype)
    qc = q.to(compute_dtype)
    result = torch.zeros(q.shape, dtype=compute_dtype, device=q.device)
    for b in range(q.shape[0]):
        s, e = bounds[b] - bounds[0], bounds[b + 1] - bounds[0]
        if e > s:
            result[b:b + 1] = attend(qc[b:b + 1], k_all[s:e], v_all[s:e], sm_scale)
    return _out(result.to(q.dtype), out)


def extend_attention_ref(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, view: TieredLayerKV,
                         qo_indptr: torch.Tensor, kv_indptr: torch.Tensor, kv_indices: torch.Tensor,
                         sm_scale: float, out: torch.Tensor | None = None,
                         compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Extend (prefill) attention of new tokens over a cached mixed-tier prefix plus the causal new chunk.

    ``q [T, Hq, D]``, ``k_new / v_new [T, Hkv, D]`` (model dtype); request ``b`` owns
    rows ``qo_indptr[b]:qo_indptr[b + 1]`` of them and the prefix slots
    ``kv_indices[kv_indptr[b]:kv_indptr[b + 1]]`` (may be empty). Returns ``[T, Hq, D]`` in ``q.dtype``.
    """
    _check_common(q, view, qo_indptr, "T")
    hkv, d = view.k_fp16.shape[1], view.k_fp16.shape[2]
    want = (q.shape[0], hkv, d)
    for name, t in (("k_new", k_new), ("v_new", v_new)):
        if tuple(t.shape) != want:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {want}")
    qo, kv = qo_indptr.tolist(), kv_indptr.tolist()
    if len(qo) != len(kv):
        raise ValueError(f"qo_indptr ({len(qo)}) and kv_indptr ({len(kv)}) must both have B + 1 entries")
    if qo[-1] - qo[0] > q.shape[0]:
        raise ValueError(f"qo_indptr covers {qo[-1] - qo[0]} tokens but q has {q.shape[0]}")
    k_pre, v_pre = gather_kv(view, kv_indices[kv[0]:kv[-1]])
    k_pre, v_pre = k_pre.to(compute_dtype), v_pre.to(compute_dtype)
    qc, kn, vn = q.to(compute_dtype), k_new.to(compute_dtype), v_new.to(compute_dtype)
    result = torch.zeros(q.shape, dtype=compute_dtype, device=q.device)
    for b in range(len(qo) - 1):
        q0, q1 = qo[b], qo[b + 1]
        p0, p1 = kv[b] - kv[0], kv[b + 1] - kv[0]
        if q1 == q0:
            continue
        k = torch.cat((k_pre[p0:p1], kn[q0:q1]))
        v = torch.cat((v_pre[p0:p1], vn[q0:q1]))
        result[q0:q1] = attend(qc[q0:q1], k, v, sm_scale)
    return _out(result.to(q.dtype), out)
