"""Triton kernels for attention over mixed-tier (fp16 / packed INT4 / packed INT2) KV, and quantize-on-demote.

One module per kernel (:mod:`.decode`, :mod:`.extend`, :mod:`.quantize`) and :mod:`.dispatch`, the
validated public API (all checks are on shapes / dtypes / devices, none syncs the device):

* :func:`decode_attention` - split-K flash decoding over ``kv_indptr / kv_indices`` (page size 1).
* :func:`extend_attention` - new tokens over a cached mixed-tier prefix plus the causal new chunk.
* :func:`partition_by_tier` - per-step preprocessing shared by every layer (see :mod:`.decode`).
* :func:`quantize_rows` / :func:`quantize` - packed quantization, fused gather / rotation / centering.

The kernels need a CUDA device, or ``TRITON_INTERPRET=1`` on CPU (slow; fp16 / fp32
only, the interpreter mishandles bf16). The torch reference in
:mod:`fade_sglang.attention` is the CPU serving path.
"""

from .decode import DecodeWorkspace, TierPartition, default_num_kv_splits, supported_head_dim
from .dispatch import decode_attention, extend_attention, partition_by_tier, quantize, quantize_rows

__all__ = [
    "DecodeWorkspace",
    "TierPartition",
    "decode_attention",
    "default_num_kv_splits",
    "extend_attention",
    "partition_by_tier",
    "quantize",
    "quantize_rows",
    "supported_head_dim",
]
