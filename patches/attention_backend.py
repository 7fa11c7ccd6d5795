"""``fade_torch``: an attention backend that reads every tier of the tiered KV pool.

Registered with ``sglang.srt.layers.attention.attention_registry.register_attention_backend``
and added to the ``--attention-backend`` choices; it is the default under
``--kv-compression fade``. It works with ``--device cpu``.

One seam for the compute: ``decode_impl(q, view, kv_indptr, kv_indices, sm_scale)``
and ``extend_impl(q, k_new, v_new, view, qo_indptr, kv_indptr, kv_indices, sm_scale)``
(``fade_sglang.attention.reference`` conventions) over a ``TieredLayerKV``
(``pool.layer_view(layer_id)``) and a FlashInfer-style page table (page size 1:
slot = page). Decode tables cover the whole sequence; extend tables cover only the
cached prefix, the new chunk's K/V come in full precision. The pair is chosen
once at init (:func:`select_impls`): the torch reference (gather + dequantize per
request) now; the Triton kernels plug in there with the same calling convention.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional

import torch
from sglang.srt.layers.attention.base_attn_backend import AttentionBackend

from fade_sglang.pool.view import TieredLayerKV

logger = logging.getLogger("fade_sglang")

BACKEND_NAME = "fade_torch"
DecodeImpl = Callable[[torch.Tensor, TieredLayerKV, torch.Tensor, torch.Tensor, float], torch.Tensor]
ExtendImpl = Callable[..., torch.Tensor]


def select_impls(device: str) -> tuple[DecodeImpl, ExtendImpl, str]:
    """The compute used by this backend; the only place a kernel choice is made."""
    from fade_sglang.attention.reference import decode_attention_ref, extend_attention_ref

    return decode_attention_ref, extend_attention_ref, "torch-reference"


# ----------------------------------------------------------------------------- backend


class _Metadata:
    __slots__ = ("kv_indptr", "kv_indices", "qo_indptr")

    def __init__(self, kv_indptr: torch.Tensor, kv_indices: torch.Tensor, qo_indptr: Optional[torch.Tensor]):
        self.kv_indptr, self.kv_indices, self.qo_indptr = kv_indptr, kv_indices, qo_indptr


def _indptr(lens: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(lens.numel() + 1, dtype=torch.int64, device=lens.device)
    out[1:] = torch.cumsum(lens, 0)
    return out


class FadeTorchAttnBackend(AttentionBackend):
    def __init__(self, model_runner: Any):
        super().__init__()
        from fade_sglang.pool.tiered_pool import TieredKVPool

        self.device = model_runner.device
        self.req_to_token_pool = model_runner.req_to_token_pool
        self.pool = model_runner.token_to_kv_pool
        if not isinstance(self.pool, TieredKVPool):
            raise ValueError(f"--attention-backend {BACKEND_NAME} needs --kv-compression fade "
                             f"(the KV pool is a {type(self.pool).__name__})")
        self.decode_impl, self.extend_impl, impl_name = select_impls(str(self.device))
        self.forward_metadata: Optional[_Metadata] = None
        logger.info("[fade] attention backend %s (%s)", BACKEND_NAME, impl_name)

    def init_forward_metadata(self, forward_batch: Any) -> None:
        mode = forward_batch.forward_mode
        if mode.is_idle():
            self.forward_metadata = None
            return
        # Decode reads the whole sequence from the pool; extend reads the cached prefix
        # from the pool and takes the new chunk's K/V directly.
        kv_lens = (forward_batch.seq_lens if mode.is_decode() else forward_batch.extend_prefix_lens).to(torch.int64)
        rows = self.req_to_token_pool.req_to_token[forward_batch.req_pool_indices.to(torch.int64)]
        kv_indptr = _indptr(kv_lens)
        # Row-major mask keeps each request's slots contiguous in kv_indices.
        mask = torch.arange(rows.shape[1], device=rows.device)[None, :] < kv_lens[:, None]
        kv_indices = rows[mask].to(torch.int64)
        qo_indptr = None if mode.is_decode() else _indptr(forward_batch.extend_seq_lens.to(torch.int64))
        self.forward_metadata = _Metadata(kv_indptr, kv_indices, qo_indptr)

    def _save(self, layer: Any, forward_batch: Any, k: Optional[torch.Tensor], v: Optional[torch.Tensor],
              save_kv_cache: bool) -> None:
        if save_kv_cache and k is not None and v is not None:
            self.pool.set_kv_buffer(layer, forward_batch.out_cache_loc, k, v)

    @staticmethod
    def _check_layer(layer: Any) -> None:
        if layer.is_cross_attention or (layer.sliding_window_size is not None and layer.sliding_window_size > -1):
            raise NotImplementedError(f"{BACKEND_NAME}: cross attention / sliding window are not supported")
        if layer.logit_cap and layer.logit_cap > 0:
            raise NotImplementedError(f"{BACKEND_NAME}: attention logit soft-capping is not supported")

    def forward_decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: Any, forward_batch: Any,
                       save_kv_cache: bool = True, **kwargs: Any) -> torch.Tensor:
        self._check_layer(layer)
        self._save(layer, forward_batch, k, v, save_kv_cache)
        md = self.forward_metadata
        q3 = q.reshape(-1, layer.tp_q_head_num, layer.qk_head_dim)
        out = self.decode_impl(q3, self.pool.layer_view(layer.layer_id), md.kv_indptr, md.kv_indices, layer.scaling)
        return out.to(q.dtype).reshape(-1, layer.tp_q_head_num * layer.v_head_dim)

    def forward_extend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: Any, forward_batch: Any,
                       save_kv_cache: bool = True, **kwargs: Any) -> torch.Tensor:
        self._check_layer(layer)
        if k is None or v is None:
            raise NotImplementedError(f"{BACKEND_NAME}: extend without the new chunk's K/V is not supported")
        self._save(layer, forward_batch, k, v, save_kv_cache)
        md = self.forward_metadata
        q3 = q.reshape(-1, layer.tp_q_head_num, layer.qk_head_dim)
        out = self.extend_impl(q3, k, v, self.pool.layer_view(layer.layer_id), md.qo_indptr, md.kv_indptr,
                               md.kv_indices, layer.scaling)
        return out.to(q.dtype).reshape(-1, layer.tp_q_head_num * layer.v_head_dim)

    def support_triton(self) -> bool:
        return False


def create_fade_torch_backend(runner: Any) -> FadeTorchAttnBackend:
    if runner.use_mla_backend:
        raise ValueError(f"--attention-backend {BACKEND_NAME} does not support MLA models")
    return FadeTorchAttnBackend(runner)


def register_attention_backend() -> None:
    """Register the backend and its CLI choice; must run before SGLang builds its argument parser."""
    from sglang.srt.arg_groups.choices import ATTENTION_BACKEND_CHOICES, add_attention_backend_choices
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
    from sglang.srt.layers.attention.attention_registry import register_attention_backend as _register

    if BACKEND_NAME not in ATTENTION_BACKENDS:
        _register(BACKEND_NAME)(create_fade_torch_backend)
    if BACKEND_NAME not in ATTENTION_BACKEND_CHOICES:
        add_attention_backend_choices([BACKEND_NAME])
