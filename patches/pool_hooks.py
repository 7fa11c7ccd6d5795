"""Hooks that make SGLang size and build the tiered KV pool (scheduler process).

Hook points (all on ``sglang.srt``):

* ``mem_cache.kv_cache_configurator.KVCacheConfigurator._build_token_to_kv_pool`` (AROUND):
  rejects setups fade cannot serve with one clear message, then checks that the
  pool SGLang built really is a :class:`TieredKVPool`.
* ``mem_cache.kv_cache_configurator.KVCacheConfigurator._resolve_kv_pool_class`` (AROUND):
  ``kind="mha"`` resolves to a TieredKVPool subclass bound to this server's config,
  constructed by SGLang with its usual kwargs.
* ``model_executor.pool_configurator.DefaultPoolConfigurator._compute_cell_size`` (AROUND):
  bytes/token of the tier *mix*, so ``max_total_num_tokens = available_bytes // cell``
  counts tokens over all tiers and the same memory holds more tokens than fp16.
* ``mem_cache.kv_cache_configurator.KVCacheConfigurator.configure`` (AROUND):
  reports the pool's exact slot total (the per-tier split rounds down) as
  ``max_total_num_tokens`` so the scheduler's conservation check adds up, and
  logs the tier split.

``--max-total-tokens N`` therefore means N tokens *across all tiers* (the same
unit SGLang uses everywhere: a token is a token whatever its precision).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable

import torch

from fade_sglang.config import FadeConfig

from .cli import fade_config_from_server_args

logger = logging.getLogger("fade_sglang")

_CONFIGURATOR = "sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator"
_POOL_CONFIGURATOR = "sglang.srt.model_executor.pool_configurator.DefaultPoolConfigurator"

# Model-precision KV dtypes the fp16 tier can hold (quantized KV formats are a different design).
_FP_KV_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class FadeSetupError(ValueError):
    """A model / server setup the tiered KV cache cannot serve (raised at startup)."""


def _cfg_of(kvc: Any) -> FadeConfig | None:
    return fade_config_from_server_args(getattr(kvc, "server_args", None))


def bound_pool_class(cfg: FadeConfig) -> type:
    """A TieredKVPool subclass carrying ``cfg``, so SGLang's own constructor call needs no extra kwargs."""
    from fade_sglang.patches.pool import TieredKVPool

    return type("FadeTieredKVPool", (TieredKVPool,), {"fade_config": cfg, "__module__": __name__})


def check_model_supported(kvc: Any, cfg: FadeConfig) -> None:
    """Raise FadeSetupError naming the first reason this model/setup cannot use tiered KV."""
    problems = []
    if kvc.use_mla_backend:
        problems.append("MLA attention (latent KV) is not supported; fade needs per-head K/V (MHA/GQA)")
    if kvc.is_hybrid_swa or kvc.sliding_window_size is not None:
        problems.append("sliding-window / hybrid-SWA models are not supported")
    if getattr(kvc, "mambaish_config", None) is not None:
        problems.append("hybrid linear-attention (Mamba/GDN) models are not supported")
    if kvc.page_size != 1:
        problems.append(f"page size must be 1 (got {kvc.page_size}); tiers are assigned per token slot")
    if kvc.kv_cache_dtype not in _FP_KV_DTYPES:
        problems.append(f"KV cache dtype {kvc.kv_cache_dtype} is already quantized; use --kv-cache-dtype auto")
    if getattr(kvc, "kv_shard_size", 1) > 1:
        problems.append("KV-cache sharding is not supported")
    if not kvc.spec_algorithm.is_none():
        problems.append("speculative decoding is not supported")
    mc = kvc.model_config
    if getattr(mc, "v_head_dim", mc.head_dim) != mc.head_dim:
        problems.append(f"K and V head dims differ ({mc.head_dim} vs {mc.v_head_dim})")
    for fmt in (cfg.warm_format, cfg.cold_format):
        try:
            fmt.check_head_dim(mc.head_dim)
        except ValueError as e:
            problems.append(str(e))
    if problems:
        raise FadeSetupError("--kv-compression fade cannot serve this setup: " + problems[0])


def tier_mix_ratio(cfg: FadeConfig, head_dim: int, dtype: torch.dtype) -> float:
    """Effective bytes/token of the tier mix divided by the full-precision bytes/token."""
    from fade_sglang.pool.layout import effective_bytes_per_token
    from fade_sglang.pool.tiered_store import tier_bytes_per_token

    per_tier = tier_bytes_per_token(cfg, 1, 1, head_dim, dtype)  # the ratio is independent of layers/heads
    return effective_bytes_per_token(cfg.budget, per_tier) / per_tier[0]


# ----------------------------------------------------------------------------- hooks


def build_token_to_kv_pool_hook(original: Callable[..., Any], kvc: Any, *args: Any, **kwargs: Any) -> Any:
    cfg = _cfg_of(kvc)
    if cfg is None:
        return original(kvc, *args, **kwargs)
    check_model_supported(kvc, cfg)
    pool = original(kvc, *args, **kwargs)
    from fade_sglang.patches.pool import TieredKVPool

    if not isinstance(pool, TieredKVPool):
        raise FadeSetupError(f"--kv-compression fade: SGLang built a {type(pool).__name__} instead of the "
                             "tiered pool (an option selected another KV layout)")
    return pool


def resolve_kv_pool_class_hook(original: Callable[..., Any], kvc: Any, *, kind: str, default: type) -> type:
    cfg = _cfg_of(kvc)
    if cfg is None or kind != "mha":
        return original(kvc, kind=kind, default=default)
    return bound_pool_class(cfg)


def compute_cell_size_hook(original: Callable[..., Any], configurator: Any, kvc: Any, num_layers: int) -> int:
    cell = original(configurator, kvc, num_layers)
    cfg = _cfg_of(kvc)
    if cfg is None or cell == 0 or kvc.use_mla_backend:
        return cell  # MLA is rejected with a clear message when the pool is built
    ratio = tier_mix_ratio(cfg, kvc.model_config.head_dim, kvc.kv_cache_dtype)
    fade_cell = max(1, math.ceil(cell * ratio))  # round up: never promise bytes we do not have
    logger.info("[fade] KV cell size %d -> %d bytes/token (tier mix = %.3fx of full precision, %.2fx tokens)",
                cell, fade_cell, ratio, cell / fade_cell)
    return fade_cell


def configure_hook(original: Callable[..., Any], kvc: Any, *args: Any, **kwargs: Any) -> Any:
    result = original(kvc, *args, **kwargs)
    if _cfg_of(kvc) is None:
        return result
    import msgspec

    pool = result.token_to_kv_pool
    total = pool.total_size
    if total != result.max_total_num_tokens:
        # The per-tier split floors each tier; capacity is what the tiers really hold.
        result = msgspec.structs.replace(result, max_total_num_tokens=total)
        if result.memory_pool_config is not None:
            result.memory_pool_config.max_total_num_tokens = total
    log_tier_split(pool)
    return result


def log_tier_split(pool: Any) -> None:
    names = pool.fade_config.tier_display_names()
    fp_bytes = pool.tier_bytes[0]
    parts = []
    for t, name in enumerate(names):
        cap = pool.layout.capacity(t)
        if cap:
            parts.append(f"{name}={cap} tok x {pool.tier_bytes[t]} B ({cap * pool.tier_bytes[t] / 2**20:.2f} MiB)")
    k, v = pool.get_kv_size_bytes()
    logger.info("[fade] tiered KV pool: %d tokens over tiers [%s]; %.2f MiB total; %.2fx the tokens of a "
                "full-precision pool of the same bytes (%s)", pool.total_size, ", ".join(parts), (k + v) / 2**20,
                fp_bytes / pool.effective_bytes_per_token(), pool.fade_config.summary())


def register_pool_hooks(register: Callable[[str, Callable[..., Any], Any], None], around: Any) -> None:
    register(f"{_CONFIGURATOR}._build_token_to_kv_pool", build_token_to_kv_pool_hook, around)
    register(f"{_CONFIGURATOR}._resolve_kv_pool_class", resolve_kv_pool_class_hook, around)
    register(f"{_CONFIGURATOR}.configure", configure_hook, around)
    register(f"{_POOL_CONFIGURATOR}._compute_cell_size", compute_cell_size_hook, around)
