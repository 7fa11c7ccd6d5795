"""``fade_torch`` / ``fade_triton``: attention backends that read every tier of the tiered KV pool.

Registered with ``sglang.srt.layers.attention.attention_registry.register_attention_backend``
and added to the ``--attention-backend`` choices. Under ``--kv-compression fade`` the
default is ``fade_triton`` on CUDA (the fused mixed-tier Triton kernels in ``kernels/``)
and ``fade_torch`` on CPU (the torch reference: gather + dequantize per request).
``fade_triton`` also runs on CPU under ``TRITON_INTERPRET=1`` (slow; used by tests).

One seam for the compute: ``decode_impl(q, view, kv_indptr, kv_indices, sm_scale)``
and ``extend_impl(q, k_new, v_new, view, qo_indptr, kv_indptr, kv_indices, sm_scale)``
over a ``TieredLayerKV`` (``pool.layer_view(layer_id)``) and a FlashInfer-style page
table (page size 1: slot = page). Decode tables cover the whole sequence; extend
tables cover only the cached prefix, the new chunk's K/V come in full precision.
CUDA graphs are not captured for these backends yet (fade turns them off).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional

import torch
from sglang.srt.layers.attention.base_attn_backend import AttentionBackend

from fade_sglang.pool.layout import Tier
from fade_sglang.pool.view import TieredLayerKV

logger = logging.getLogger("fade_sglang")

TORCH_BACKEND = "fade_torch"
TRITON_BACKEND = "fade_triton"
BACKEND_NAMES = (TORCH_BACKEND, TRITON_BACKEND)
DecodeImpl = Callable[[torch.Tensor, TieredLayerKV, torch.Tensor, torch.Tensor, float], torch.Tensor]
ExtendImpl = Callable[..., torch.Tensor]


def default_backend(device: str | None) -> str:
    """The Triton kernels where they run natively (CUDA), the torch reference elsewhere."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return TRITON_BACKEND if str(device).startswith("cuda") else TORCH_BACKEND


# ----------------------------------------------------------------------------- backend


class _Metadata:
    __slots__ = ("kv_indptr", "kv_indices", "qo_indptr", "partition", "max_extend_len")

    def __init__(self, kv_indptr: torch.Tensor, kv_indices: torch.Tensor, qo_indptr: Optional[torch.Tensor],
                 partition: Any = None, max_extend_len: Optional[int] = None):
        self.kv_indptr, self.kv_indices, self.qo_indptr = kv_indptr, kv_indices, qo_indptr
        self.partition, self.max_extend_len = partition, max_extend_len


def _indptr(lens: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(lens.numel() + 1, dtype=torch.int64, device=lens.device)
    out[1:] = torch.cumsum(lens, 0)
    return out


class FadeAttnBackend(AttentionBackend):
    def __init__(self, model_runner: Any, use_triton: bool):
        super().__init__()
        from fade_sglang.patches.pool import TieredKVPool

        self.name = TRITON_BACKEND if use_triton else TORCH_BACKEND
        self.use_triton = use_triton
        self.device = model_runner.device
        self.req_to_token_pool = model_runner.req_to_token_pool
        self.pool = model_runner.token_to_kv_pool
        if not isinstance(self.pool, TieredKVPool):
            raise ValueError(f"--attention-backend {self.name} needs --kv-compression fade "
                             f"(the KV pool is a {type(self.pool).__name__})")
        self.forward_metadata: Optional[_Metadata] = None
        self.drop_packed = self.pool.fade_config.evict_instead_of_demote
        logger.info("[fade] attention backend %s (%s)", self.name,
                    "Triton mixed-tier kernels" if use_triton else "torch reference")

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
        if self.drop_packed:
            kv_indptr, kv_indices = self._keep_fp16_only(kv_lens, kv_indices)
        qo_indptr = None if mode.is_decode() else _indptr(forward_batch.extend_seq_lens.to(torch.int64))
        partition = max_extend_len = None
        if self.use_triton:  # one tier partition per step, shared by every layer
            from fade_sglang.kernels import partition_by_tier

            partition = partition_by_tier(kv_indptr, kv_indices, self.pool.layer_view(self.pool.start_layer))
            if not mode.is_decode():
                lens = getattr(forward_batch, "extend_seq_lens_cpu", None)
                max_extend_len = max(lens) if lens else None
        self.forward_metadata = _Metadata(kv_indptr, kv_indices, qo_indptr, partition, max_extend_len)

    def _keep_fp16_only(self, kv_lens: torch.Tensor, kv_indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Eviction baseline (``evict_instead_of_demote``): attention skips every packed slot."""
        keep = self.pool.tier_of(kv_indices) == Tier.FP16
        owner = torch.repeat_interleave(torch.arange(kv_lens.numel(), device=kv_lens.device), kv_lens)
        kept_lens = torch.zeros_like(kv_lens).index_add_(0, owner[keep], torch.ones_like(owner[keep]))
        return _indptr(kept_lens), kv_indices[keep]

    def _decode(self, q: torch.Tensor, view: TieredLayerKV, md: _Metadata, scale: float) -> torch.Tensor:
        if self.use_triton:
            from fade_sglang.kernels import decode_attention

            return decode_attention(q, view, md.kv_indptr, md.kv_indices, scale, partition=md.partition)
        from fade_sglang.attention.reference import decode_attention_ref

        return decode_attention_ref(q, view, md.kv_indptr, md.kv_indices, scale)

    def _extend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, view: TieredLayerKV, md: _Metadata,
                scale: float) -> torch.Tensor:
        if self.use_triton:
            from fade_sglang.kernels import extend_attention

            return extend_attention(q, k, v, view, md.qo_indptr, md.kv_indptr, md.kv_indices, scale,
                                    partition=md.partition, max_extend_len=md.max_extend_len)
        from fade_sglang.attention.reference import extend_attention_ref

        return extend_attention_ref(q, k, v, view, md.qo_indptr, md.kv_indptr, md.kv_indices, scale)

    def _save(self, layer: Any, forward_batch: Any, k: Optional[torch.Tensor], v: Optional[torch.Tensor],
              save_kv_cache: bool) -> None:
        if save_kv_cache and k is not None and v is not None:
            self.pool.set_kv_buffer(layer, forward_batch.out_cache_loc, k, v)

    def _check_layer(self, layer: Any) -> None:
        if layer.is_cross_attention or (layer.sliding_window_size is not None and layer.sliding_window_size > -1):
            raise NotImplementedError(f"{self.name}: cross attention / sliding window are not supported")
        if layer.logit_cap and layer.logit_cap > 0:
            raise NotImplementedError(f"{self.name}: attention logit soft-capping is not supported")

    def forward_decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: Any, forward_batch: Any,
                       save_kv_cache: bool = True, **kwargs: Any) -> torch.Tensor:
        self._check_layer(layer)
        self._save(layer, forward_batch, k, v, save_kv_cache)
        md = self.forward_metadata
        q3 = q.reshape(-1, layer.tp_q_head_num, layer.qk_head_dim)
        out = self._decode(q3, self.pool.layer_view(layer.layer_id), md, layer.scaling)
        return out.to(q.dtype).reshape(-1, layer.tp_q_head_num * layer.v_head_dim)

    def forward_extend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: Any, forward_batch: Any,
                       save_kv_cache: bool = True, **kwargs: Any) -> torch.Tensor:
        self._check_layer(layer)
        if k is None or v is None:
            raise NotImplementedError(f"{self.name}: extend without the new chunk's K/V is not supported")
        self._save(layer, forward_batch, k, v, save_kv_cache)
        md = self.forward_metadata
        q3 = q.reshape(-1, layer.tp_q_head_num, layer.qk_head_dim)
        out = self._extend(q3, k.reshape(-1, layer.tp_k_head_num, layer.qk_head_dim),
                           v.reshape(-1, layer.tp_v_head_num, layer.v_head_dim),
                           self.pool.layer_view(layer.layer_id), md, layer.scaling)
        return out.to(q.dtype).reshape(-1, layer.tp_q_head_num * layer.v_head_dim)

    def support_triton(self) -> bool:
        return False


def _creator(use_triton: bool) -> Callable[[Any], FadeAttnBackend]:
    def create(runner: Any) -> FadeAttnBackend:
        if runner.use_mla_backend:
            raise ValueError(f"--attention-backend {TRITON_BACKEND if use_triton else TORCH_BACKEND} "
                             "does not support MLA models")
        return FadeAttnBackend(runner, use_triton)

    return create


def register_attention_backend() -> None:
    """Register the backends and their CLI choices; must run before SGLang builds its argument parser."""
    from sglang.srt.arg_groups.choices import ATTENTION_BACKEND_CHOICES, add_attention_backend_choices
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
    from sglang.srt.layers.attention.attention_registry import register_attention_backend as _register

    for name, use_triton in ((TORCH_BACKEND, False), (TRITON_BACKEND, True)):
        if name not in ATTENTION_BACKENDS:
            _register(name)(_creator(use_triton))
    missing = [n for n in BACKEND_NAMES if n not in ATTENTION_BACKEND_CHOICES]
    if missing:
        add_attention_backend_choices(missing)
