"""TieredKVPool: SGLang's ``MHATokenToKVPool`` interface over the core :class:`TieredKVStore`.

SGLang constructs, sizes and writes the pool through ``MHATokenToKVPool``; every tier decision
lives in the core store. This class only wires the two: SGLang's K/V buffers are the store's byte
arena viewed as fp16 rows (the packed tiers live in the same bytes), SGLang's write path quantizes
the (test-only) packed-slot writes through the store, and demotion uses the fused Triton quantize
kernel on CUDA.
"""

from __future__ import annotations

from typing import Any

import torch
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

from fade_sglang.config import FadeConfig
from fade_sglang.pool.tiered_store import QuantizeRowsFn, TieredKVStore

__all__ = ["TieredKVPool"]


def demotion_kernel(device: str | torch.device, head_dim: int, enabled: bool | None = None) -> QuantizeRowsFn | None:
    """The fused quantize kernel where it runs natively (CUDA) and suits ``head_dim``; None elsewhere
    (the torch path, which is also the reference). ``enabled`` forces the choice (tests)."""
    if enabled is None:
        enabled = torch.device(device).type == "cuda"
    if not enabled:
        return None
    from fade_sglang.kernels import quantize_rows, supported_head_dim

    return quantize_rows if supported_head_dim(head_dim) else None


class TieredKVPool(TieredKVStore, MHATokenToKVPool):
    """``size``: full-precision tokens of the KV bytes (SGLang sizes it as for a plain pool)."""

    fade_config: FadeConfig | None = None  # set on a bound subclass when SGLang constructs the pool

    def __init__(self, size: int, page_size: int, dtype: torch.dtype, head_num: int, head_dim: int,
                 layer_num: int, device: str, enable_memory_saver: bool, *args: Any,
                 fade_config: FadeConfig | None = None, strict: bool | None = None,
                 demote_kernel: bool | None = None, **kwargs: Any):
        cfg = fade_config or type(self).fade_config or FadeConfig()
        if kwargs.get("v_head_dim") not in (None, head_dim):
            raise ValueError("fade KV compression needs v_head_dim == head_dim")
        # The store first: the base constructor logs get_kv_size_bytes(), which counts the packed tiers.
        TieredKVStore.__init__(self, size, dtype, head_num, head_dim, layer_num, device, cfg, strict,
                               demotion_kernel(device, head_dim, demote_kernel), page_size, allocate_fp16=False)
        MHATokenToKVPool.__init__(self, self.layout.fp16_slots, page_size, dtype, head_num, head_dim, layer_num,
                                  device, enable_memory_saver, *args, **kwargs)

    # ------------------------------------------------------------------ SGLang buffer layout
    def _create_buffers_normal(self) -> None:
        """SGLang's per-layer K/V buffers are fp16 views of the store's byte arena."""
        k_shape, v_shape = self._kv_buffer_shapes()
        if self.kv_cache_layout != "nhd" or k_shape != v_shape:
            raise ValueError("fade KV compression needs the NHD KV layout with equal K/V shapes")
        if tuple(k_shape) != self.fp16_buffer_shape():
            raise ValueError(f"SGLang's KV buffer shape {tuple(k_shape)} differs from fade's fp16 tier "
                             f"{self.fp16_buffer_shape()}")
        self._allocate_fp16(self.store_dtype, self.device)

    # ------------------------------------------------------------------ writes
    def set_kv_buffer(self, layer: Any, loc: Any, cache_k: torch.Tensor, cache_v: torch.Tensor,
                      k_scale: float | None = None, v_scale: float | None = None,
                      layer_id_override: int | None = None, dcp_kv_mask: torch.Tensor | None = None) -> None:
        """Write K/V; slots in packed tiers are quantized on write (serving only ever writes fp16 slots)."""
        layer_id = layer_id_override if layer_id_override is not None else layer.layer_id
        if isinstance(loc, torch.Tensor) and loc.numel():
            loc, cache_k, cache_v = self.write_packed_part(layer_id - self.start_layer, loc, cache_k, cache_v)
            if loc.numel() == 0:  # every row was a packed slot
                return
        super().set_kv_buffer(layer, loc, cache_k, cache_v, k_scale, v_scale, layer_id_override, dcp_kv_mask)

    def _store_kv_layer(self, layer_idx: int, loc: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor) -> None:
        """SGLang's row-copy kernels assume unpadded rows; a protected layer's fp16 rows are padded to its
        bigger page records, so its writes go through plain strided indexing."""
        k_buf, v_buf = self.k_buffer[layer_idx], self.v_buffer[layer_idx]
        if k_buf.is_contiguous():
            super()._store_kv_layer(layer_idx, loc, cache_k, cache_v)
            return
        k_buf[loc] = cache_k
        v_buf[loc] = cache_v

    def get_kv_size_bytes(self) -> tuple[int, int]:
        """(K bytes, V bytes) of the arena: the fp16 views would miss protected layers' row padding."""
        half = self.arena_nbytes() // 2
        return half, half
