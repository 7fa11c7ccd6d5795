"""CPU serving attention over the tiered pool, numerically matched to SGLang's ``torch_native`` backend.

The fade torch backend serves with these functions. They call ``scaled_dot_product_attention`` in
the model dtype with exactly the tensor shapes, layouts and arguments of SGLang 0.5.23's
``TorchNativeAttnBackend`` (one call per request; extend runs a causal call over the whole sequence
with the query placed in its last rows), so a request whose KV is all in the fp16 tier gives
bit-for-bit the output plain SGLang gives: every difference fade makes is the compression's, never
the backend's arithmetic. Packed slots are dequantized (float32) and cast to the model dtype,
which is what a full-precision cache would have held.

The float32/float64 oracle the kernels are checked against stays in :mod:`.reference`.
"""

from __future__ import annotations

import torch
from torch.nn.functional import scaled_dot_product_attention

from ..pool.view import TieredLayerKV, gather_kv

__all__ = ["decode_attention_sdpa", "extend_attention_sdpa"]


def _heads_first(x: torch.Tensor) -> torch.Tensor:
    """[n, H, D] -> [H, n, D] as a view (the layout torch_native hands to SDPA)."""
    return x.movedim(0, 1)


def decode_attention_sdpa(q: torch.Tensor, view: TieredLayerKV, kv_indptr: torch.Tensor,
                          kv_indices: torch.Tensor, sm_scale: float) -> torch.Tensor:
    """Decode ``q [B, Hq, D]`` over each request's mixed-tier slots -> ``[B, Hq, Dv]`` in ``q.dtype``."""
    bounds = kv_indptr.tolist()
    if len(bounds) != q.shape[0] + 1:
        raise ValueError(f"kv_indptr has {len(bounds)} entries, expected B + 1 = {q.shape[0] + 1}")
    gqa = q.shape[1] != view.k_fp16.shape[1]
    k_all, v_all = gather_kv(view, kv_indices[bounds[0]:bounds[-1]], q.dtype)
    out = torch.zeros(q.shape[0], q.shape[1], view.v_fp16.shape[2], dtype=q.dtype, device=q.device)
    query = _heads_first(q)  # [Hq, B, D]
    for b in range(q.shape[0]):
        s, e = bounds[b] - bounds[0], bounds[b + 1] - bounds[0]
        if e == s:
            continue
        o = scaled_dot_product_attention(query[:, b:b + 1, :].unsqueeze(0), _heads_first(k_all[s:e]).unsqueeze(0),
                                         _heads_first(v_all[s:e]).unsqueeze(0), enable_gqa=gqa, scale=sm_scale,
                                         is_causal=False)
        out[b:b + 1] = o.squeeze(0).movedim(1, 0)
    return out


def extend_attention_sdpa(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, view: TieredLayerKV,
                          qo_indptr: torch.Tensor, kv_indptr: torch.Tensor, kv_indices: torch.Tensor,
                          sm_scale: float) -> torch.Tensor:
    """Extend ``q [T, Hq, D]`` (new tokens, K/V in ``k_new`` / ``v_new``) over each request's cached prefix
    plus its causal new chunk -> ``[T, Hq, Dv]`` in ``q.dtype``."""
    qo, kv = qo_indptr.tolist(), kv_indptr.tolist()
    if len(qo) != len(kv):
        raise ValueError(f"qo_indptr ({len(qo)}) and kv_indptr ({len(kv)}) must both have B + 1 entries")
    gqa = q.shape[1] != view.k_fp16.shape[1]
    k_pre, v_pre = gather_kv(view, kv_indices[kv[0]:kv[-1]], q.dtype)
    # torch_native reads the new chunk back from the cache: round it through the cache dtype first.
    k_new = k_new.to(view.k_fp16.dtype).to(q.dtype)
    v_new = v_new.to(view.v_fp16.dtype).to(q.dtype)
    out = torch.zeros(q.shape[0], q.shape[1], view.v_fp16.shape[2], dtype=q.dtype, device=q.device)
    query = _heads_first(q)  # [Hq, T, D]
    for b in range(len(qo) - 1):
        q0, q1 = qo[b], qo[b + 1]
        p0, p1 = kv[b] - kv[0], kv[b + 1] - kv[0]
        if q1 == q0:
            continue
        prefix = p1 - p0
        keys = torch.cat((k_pre[p0:p1], k_new[q0:q1]))
        values = torch.cat((v_pre[p0:p1], v_new[q0:q1]))
        # One causal call over the whole sequence, the new queries in its last rows (rows of the prefix
        # are computed and dropped, as torch_native does).
        padded = torch.zeros(q.shape[1], prefix + q1 - q0, q.shape[2], dtype=q.dtype, device=q.device)
        padded[:, prefix:, :] = query[:, q0:q1, :]
        o = scaled_dot_product_attention(padded.unsqueeze(0), _heads_first(keys).unsqueeze(0),
                                         _heads_first(values).unsqueeze(0), enable_gqa=gqa, scale=sm_scale,
                                         is_causal=True)
        out[q0:q1] = o.squeeze(0).movedim(1, 0)[prefix:]
    return out
