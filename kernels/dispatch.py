"""Validated entry points of the Triton kernels: shape / dtype / device checks (none syncs the device),
workspaces, and the per-step tier partition, then one launch of the kernel module that does the work."""

from __future__ import annotations

import os

import torch

from fade_sglang.pool.view import PackedLayerKV, PackedPart, TieredLayerKV
from fade_sglang.quant import QuantFormat, QuantizedKV

from .decode import (
    SUPPORTED_HEAD_DIMS,
    DecodeWorkspace,
    TierPartition,
    default_num_kv_splits,
    launch_decode,
    supported_head_dim,
)
from .decode import partition_by_tier as _partition
from .extend import launch_extend
from .quantize import launch_quantize

__all__ = ["decode_attention", "extend_attention", "partition_by_tier", "quantize", "quantize_rows"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INDEX_DTYPES = (torch.int32, torch.int64)


# ---------------------------------------------------------------------------- validation helpers


def _fail(msg: str) -> None:
    raise ValueError(f"fade kernels: {msg}")


def _check_device(device: torch.device) -> None:
    if device.type == "cuda":
        return
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return
    _fail(f"tensors are on {device}; the Triton kernels need a CUDA device (or TRITON_INTERPRET=1 on CPU). "
          "Use fade_sglang.attention.decode_attention_ref / extend_attention_ref on CPU.")


def _check_tensor(name: str, t: torch.Tensor, device: torch.device, dim: int | None = None,
                  dtypes: tuple[torch.dtype, ...] | None = None, inner_contiguous: bool = True) -> None:
    if not isinstance(t, torch.Tensor):
        _fail(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device != device:
        _fail(f"{name} is on {t.device}, expected {device} (where the KV pool lives)")
    if dim is not None and t.dim() != dim:
        _fail(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        _fail(f"{name} has dtype {t.dtype}, expected one of {', '.join(str(d) for d in dtypes)}")
    if inner_contiguous and t.numel() and t.stride(-1) != 1:
        _fail(f"{name} must be contiguous in its last dimension")


def _check_part(name: str, part: PackedPart, lead: tuple[int, ...], head_dim: int, device: torch.device) -> None:
    """A packed part's tensors are ``[*lead, H, X]`` with contiguous ``[H, X]`` blocks (the kernels derive
    head strides from the format); scale and zero share strides."""
    fmt = part.fmt
    fmt.check_head_dim(head_dim)
    group = fmt.group_size_for(head_dim)
    if group & (group - 1):
        _fail(f"{name} group_size {group} must be a power of two")
    dp, split = fmt.packed_dim(head_dim), part.split
    pieces = [("data", part.data, torch.uint8, split), ("scale", part.scale, torch.float16, head_dim // group),
              ("zero", part.zero, torch.float16, head_dim // group)]
    if split > dp:
        _fail(f"{name}.data has shape {tuple(part.data.shape)}: more than the {dp} code bytes per head of "
              f"{fmt.bits}-bit codes at head_dim {head_dim}")
    if part.data_b is not None:
        pieces.append(("data_b", part.data_b, torch.uint8, dp - split))
    elif split != dp:
        _fail(f"{name}.data holds {split} of {dp} code bytes per head and there is no data_b")
    for pname, t, dtype, width in pieces:
        _check_tensor(f"{name}.{pname}", t, device, len(lead) + 1, (dtype,))
        if tuple(t.shape) != (*lead, width):
            _fail(f"{name}.{pname} has shape {tuple(t.shape)}, expected {(*lead, width)}")
        if t.numel() and t.stride(-2) != width:
            _fail(f"{name}.{pname} must have contiguous [H, {width}] blocks")
    if part.scale.stride() != part.zero.stride():
        _fail(f"{name}.scale and zero must share strides")


def _check_packed(name: str, p: PackedLayerKV, heads: int, head_dim: int, device: torch.device) -> None:
    rows = p.key.data.shape[0]
    for pname, part in (("key", p.key), ("value", p.value)):
        _check_part(f"{name}.{pname}", part, (rows, heads), head_dim, device)
    # One code-byte row stride and one scale row stride per tier are passed to the attention kernels.
    data = [p.key.data, p.value.data] + ([p.key.data_b] if p.key.data_b is not None else [])
    if len({t.stride(0) for t in data}) > 1 or p.key.scale.stride(0) != p.value.scale.stride(0):
        _fail(f"{name} tier: K and V codes (and scales) must share their row strides (views of one record row)")


def _check_view(view: TieredLayerKV, device: torch.device | None = None) -> tuple[int, int]:
    """Validate a layer view; returns (kv_heads, head_dim)."""
    if not isinstance(view, TieredLayerKV):
        _fail(f"view must be a TieredLayerKV, got {type(view).__name__}")
    device = device or view.k_fp16.device
    _check_device(device)
    _check_tensor("view.k_fp16", view.k_fp16, device, 3, _FLOAT_DTYPES)
    _check_tensor("view.v_fp16", view.v_fp16, device, 3, (view.k_fp16.dtype,))
    if view.k_fp16.shape != view.v_fp16.shape:
        _fail(f"view.k_fp16 {tuple(view.k_fp16.shape)} and view.v_fp16 {tuple(view.v_fp16.shape)} differ")
    heads, head_dim = view.k_fp16.shape[1], view.k_fp16.shape[2]
    if not supported_head_dim(head_dim):
        _fail(f"head_dim {head_dim} is not supported by the Triton kernels ({SUPPORTED_HEAD_DIMS})")
    for name, p in (("warm", view.warm), ("cold", view.cold)):
        if p is not None:
            _check_packed(name, p, heads, head_dim, device)
    if view.warm is not None or view.cold is not None:
        _check_tensor("view.k_center", view.k_center, device, 2, (torch.float32,))
        if tuple(view.k_center.shape) != (heads, head_dim) or not view.k_center.is_contiguous():
            _fail(f"view.k_center must be a contiguous float32 [{heads}, {head_dim}] tensor")
        if view.rotation is not None:
            _check_tensor("view.rotation", view.rotation, device, 2, (torch.float32,))
            if tuple(view.rotation.shape) != (head_dim, head_dim) or not view.rotation.is_contiguous():
                _fail(f"view.rotation must be a contiguous float32 [{head_dim}, {head_dim}] tensor")
    return heads, head_dim


def _check_q_and_view(q: torch.Tensor, view: TieredLayerKV, device: torch.device) -> tuple[int, int]:
    kv_heads, head_dim = _check_view(view, device)
    _check_tensor("q", q, device, 3, _FLOAT_DTYPES)
    if q.shape[2] != head_dim:
        _fail(f"q head_dim {q.shape[2]} != KV head_dim {head_dim}")
    if q.shape[1] % kv_heads:
        _fail(f"q heads ({q.shape[1]}) must be a multiple of KV heads ({kv_heads})")
    return kv_heads, head_dim


def _check_indptr(name: str, t: torch.Tensor, device: torch.device, entries: int | None = None) -> None:
    _check_tensor(name, t, device, 1, _INDEX_DTYPES, inner_contiguous=False)
    if not t.is_contiguous():
        _fail(f"{name} must be contiguous")
    if entries is not None and t.numel() != entries:
        _fail(f"{name} has {t.numel()} entries, expected B + 1 = {entries}")


def _check_out(out: torch.Tensor | None, shape: tuple[int, ...], device: torch.device,
               default_dtype: torch.dtype) -> torch.Tensor:
    if out is None:
        return torch.empty(shape, dtype=default_dtype, device=device)
    _check_tensor("out", out, device, len(shape), _FLOAT_DTYPES)
    if tuple(out.shape) != shape:
        _fail(f"out has shape {tuple(out.shape)}, expected {shape}")
    return out


def _check_partition(partition: TierPartition, kv_indices: torch.Tensor, batch: int) -> None:
    if partition.indices.shape != kv_indices.shape or partition.indices.device != kv_indices.device:
        _fail("partition.indices must match kv_indices in shape and device (was it built from these indices?)")
    if tuple(partition.tier_indptr.shape) != (batch, 4) or partition.tier_indptr.dtype != torch.int32:
        _fail(f"partition.tier_indptr must be int32 [{batch}, 4]")
    if not partition.tier_indptr.is_contiguous():
        _fail("partition.tier_indptr must be contiguous")


# ---------------------------------------------------------------------------- public API


def partition_by_tier(kv_indptr: torch.Tensor, kv_indices: torch.Tensor, view: TieredLayerKV,
                      out: TierPartition | None = None) -> TierPartition:
    """Reorder each request's ``kv_indices`` into [fp16 | warm | cold] runs (no host sync).

    ``kv_indices`` are shared by all layers of a step: call this once per forward
    step and pass the result to every layer's :func:`decode_attention` /
    :func:`extend_attention`. ``out`` (preallocated, e.g. for CUDA graphs) is filled in place.
    """
    device = kv_indices.device
    _check_indptr("kv_indptr", kv_indptr, device)
    _check_indptr("kv_indices", kv_indices, device)
    if out is not None:
        _check_partition(out, kv_indices, kv_indptr.numel() - 1)
    return _partition(kv_indptr, kv_indices, view.warm_base, view.cold_base, out)


def decode_attention(q: torch.Tensor, view: TieredLayerKV, kv_indptr: torch.Tensor, kv_indices: torch.Tensor,
                     sm_scale: float, out: torch.Tensor | None = None, *, partition: TierPartition | None = None,
                     num_kv_splits: int | None = None, workspace: DecodeWorkspace | None = None) -> torch.Tensor:
    """Decode attention of ``q [B, Hq, D]`` over each request's mixed-tier slots -> ``out [B, Hq, D]``.

    Request ``b`` reads slots ``kv_indices[kv_indptr[b]:kv_indptr[b + 1]]`` in any tier
    mix and order (a request with no slots gets zeros). GQA: ``Hq % Hkv == 0``.
    ``q`` may be fp16 / bf16 / fp32 (cast to the KV dtype for the dots, fp32
    accumulation); ``out`` defaults to ``q.dtype``.

    ``partition``: :func:`partition_by_tier` of these indices (computed here when
    omitted). ``num_kv_splits``: split-K factor (default: :func:`default_num_kv_splits`
    from host-known sizes). ``workspace``: preallocated scratch with at least
    ``B`` rows and ``num_kv_splits`` splits (CUDA graphs).
    """
    device = view.k_fp16.device
    kv_heads, head_dim = _check_q_and_view(q, view, device)
    batch, q_heads = q.shape[0], q.shape[1]
    _check_indptr("kv_indptr", kv_indptr, device, batch + 1)
    _check_indptr("kv_indices", kv_indices, device)
    out = _check_out(out, (batch, q_heads, head_dim), device, q.dtype)
    if num_kv_splits is None:
        num_kv_splits = default_num_kv_splits(batch, kv_heads, kv_indices.numel(), device)
    if not isinstance(num_kv_splits, int) or num_kv_splits < 1:
        _fail(f"num_kv_splits must be a positive int, got {num_kv_splits!r}")
    if workspace is None:
        workspace = DecodeWorkspace.allocate(batch, q_heads, head_dim, num_kv_splits, device)
    else:
        ws = workspace
        if (ws.mid_fp.shape[0] < batch or ws.mid_fp.shape[1] != q_heads or ws.mid_fp.shape[2] < num_kv_splits
                or ws.mid_fp.shape[3] != head_dim or ws.mid_rot.shape != ws.mid_fp.shape
                or ws.mid_lse.shape != ws.mid_fp.shape[:3] or ws.q_rot.shape[0] < batch
                or ws.q_rot.shape[1:] != (q_heads, head_dim)):
            _fail(f"workspace too small or mis-shaped for B={batch}, Hq={q_heads}, D={head_dim}, "
                  f"splits={num_kv_splits} (use DecodeWorkspace.allocate)")
        for name in ("mid_fp", "mid_rot", "mid_lse", "q_rot"):
            _check_tensor(f"workspace.{name}", getattr(ws, name), device, None, (torch.float32,))
    if partition is None:
        partition = _partition(kv_indptr, kv_indices, view.warm_base, view.cold_base)
    else:
        _check_partition(partition, kv_indices, batch)
    return launch_decode(q, view, partition, float(sm_scale), out, num_kv_splits, workspace)


def extend_attention(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, view: TieredLayerKV,
                     qo_indptr: torch.Tensor, kv_indptr: torch.Tensor, kv_indices: torch.Tensor, sm_scale: float,
                     out: torch.Tensor | None = None, *, partition: TierPartition | None = None,
                     max_extend_len: int | None = None) -> torch.Tensor:
    """Extend attention: new tokens over a cached mixed-tier prefix (all visible) plus the new chunk (causal).

    ``q [T, Hq, D]``; ``k_new / v_new [T, Hkv, D]`` are the new tokens' K / V, read
    from these tensors (not from the pool: writing them to the pool first or
    later does not matter). Request ``b`` owns rows ``qo_indptr[b]:qo_indptr[b + 1]``
    and the prefix slots ``kv_indices[kv_indptr[b]:kv_indptr[b + 1]]`` (may be empty).
    Rows of ``out`` outside every request are left untouched.
    ``max_extend_len``: longest new chunk (host int; computed with one device sync when omitted).
    """
    device = view.k_fp16.device
    kv_heads, head_dim = _check_q_and_view(q, view, device)
    tokens, q_heads = q.shape[0], q.shape[1]
    for name, t in (("k_new", k_new), ("v_new", v_new)):
        _check_tensor(name, t, device, 3, _FLOAT_DTYPES)
        if tuple(t.shape) != (tokens, kv_heads, head_dim):
            _fail(f"{name} has shape {tuple(t.shape)}, expected {(tokens, kv_heads, head_dim)}")
    _check_indptr("qo_indptr", qo_indptr, device)
    _check_indptr("kv_indptr", kv_indptr, device, qo_indptr.numel())
    _check_indptr("kv_indices", kv_indices, device)
    out = _check_out(out, (tokens, q_heads, head_dim), device, q.dtype)
    batch = qo_indptr.numel() - 1
    if max_extend_len is None:
        max_extend_len = int((qo_indptr[1:] - qo_indptr[:-1]).max()) if batch > 0 else 0
    if partition is None:
        partition = _partition(kv_indptr, kv_indices, view.warm_base, view.cold_base)
    else:
        _check_partition(partition, kv_indices, batch)
    return launch_extend(q, k_new, v_new, view, qo_indptr, partition, float(sm_scale), out, int(max_extend_len))


def quantize_rows(src: torch.Tensor, dst: PackedPart, dst_rows: torch.Tensor, *,
                  src_rows: torch.Tensor | None = None, rotation: torch.Tensor | None = None,
                  k_center: torch.Tensor | None = None) -> None:
    """Quantize a batch of tokens for all layers of one part (keys or values) of a packed store, one launch.

    ``src [L, N, H, D]`` (any float dtype): token ``i`` is ``src[:, src_rows[i]]`` (``i`` itself when
    ``src_rows`` is None) and lands in row ``dst_rows[i]`` of ``dst`` (a :class:`PackedPart` whose tensors are
    ``[L, R, H, X]``, e.g. ``PackedTierStore.key``) in ``dst.fmt``. Optional fusions: ``rotation [D, D]``
    (``x @ R``) and ``k_center [L, H, D]`` (subtracted after rotating; keys only).
    ``fmt.clip_search`` runs the clip search in the kernel. Exactness: see :mod:`fade_sglang.kernels.quantize`.
    """
    if not isinstance(dst, PackedPart):
        _fail(f"dst must be a PackedPart, got {type(dst).__name__}")
    device = dst.data.device
    _check_device(device)
    _check_tensor("src", src, device, 4, _FLOAT_DTYPES)
    layers, _, heads, head_dim = src.shape
    if not supported_head_dim(head_dim):
        _fail(f"head_dim {head_dim} is not supported by the quantize kernel ({SUPPORTED_HEAD_DIMS})")
    rows = dst.data.shape[1] if dst.data.dim() == 4 else 0
    _check_part("dst", dst, (layers, rows, heads), head_dim, device)
    _check_indptr("dst_rows", dst_rows, device)
    if dst_rows.numel() * heads >= 2**31:
        _fail(f"too many (token, head) rows in one call ({dst_rows.numel() * heads}); split the batch")
    if src_rows is not None:
        _check_indptr("src_rows", src_rows, device, dst_rows.numel())
    elif src.shape[1] < dst_rows.numel():
        _fail(f"src has {src.shape[1]} rows but {dst_rows.numel()} dst_rows (pass src_rows to gather)")
    if rotation is not None:
        _check_tensor("rotation", rotation, device, 2, (torch.float32,))
        if tuple(rotation.shape) != (head_dim, head_dim) or not rotation.is_contiguous():
            _fail(f"rotation must be a contiguous float32 [{head_dim}, {head_dim}] tensor")
    if k_center is not None:
        _check_tensor("k_center", k_center, device, 3, (torch.float32,))
        if tuple(k_center.shape) != (layers, heads, head_dim):
            _fail(f"k_center has shape {tuple(k_center.shape)}, expected {(layers, heads, head_dim)}")
    launch_quantize(src, src_rows, dst, dst_rows, rotation, k_center)


def quantize(x: torch.Tensor, fmt: QuantFormat) -> QuantizedKV:
    """Kernel twin of :func:`fade_sglang.quant.quantize` for ``x [..., D]`` (bit-exact without clip search)."""
    d = x.shape[-1]
    fmt.check_head_dim(d)
    lead = x.shape[:-1]
    flat = x.reshape(1, -1, 1, d)
    n = flat.shape[1]
    part = PackedPart.zeros(fmt, 1, n, 1, d, x.device)
    quantize_rows(flat, part, torch.arange(n, device=x.device))
    return QuantizedKV(part.data[0, :, 0].reshape(*lead, -1), part.scale[0, :, 0].reshape(*lead, -1),
                       part.zero[0, :, 0].reshape(*lead, -1))
