"""Hooks that make SGLang size and build the tiered KV pool (scheduler process).

Hook points (all on ``sglang.srt``):

* ``mem_cache.kv_cache_configurator.KVCacheConfigurator._build_token_to_kv_pool`` (AROUND):
  rejects setups fade cannot serve with one clear message, then checks that the
  pool SGLang built really is a :class:`TieredKVPool`.
* ``mem_cache.kv_cache_configurator.KVCacheConfigurator._resolve_kv_pool_class`` (AROUND):
  ``kind="mha"`` resolves to a TieredKVPool subclass bound to this server's config,
  constructed by SGLang with its usual kwargs.
* ``mem_cache.kv_cache_configurator.KVCacheConfigurator.configure`` (AROUND):
  reports the pool's slot total (every tier's slot range) as ``max_total_num_tokens``
  so the scheduler's token-conservation check adds up, and logs the arena.

SGLang sizes the pool exactly as for plain KV (the cell size is the full-precision one):
the byte arena holds what a plain pool of the same memory holds at full precision, and
more as tokens are demoted. ``--max-total-tokens N`` therefore means "the bytes of N
full-precision tokens", so plain SGLang and fade given the same N get the same KV bytes.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch

from fade_sglang.config import FadeConfig

from .cli import fade_config_from_server_args

logger = logging.getLogger("fade_sglang")

_CONFIGURATOR = "sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator"

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
    layers = getattr(getattr(kvc, "layer_info", None), "num_effective_layers", None)
    bad = cfg.protected_out_of_range(layers) if layers is not None else []
    if bad:
        problems.append(f"protected_layers {bad} out of range (the model has {layers} layers)")
    if problems:
        raise FadeSetupError("--kv-compression fade cannot serve this setup: " + problems[0])


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


def configure_hook(original: Callable[..., Any], kvc: Any, *args: Any, **kwargs: Any) -> Any:
    result = original(kvc, *args, **kwargs)
    if _cfg_of(kvc) is None:
        return result
    import msgspec

    pool = result.token_to_kv_pool
    total = pool.total_size
    if total != result.max_total_num_tokens:
        # SGLang's token accounting counts slots of every tier; the arena's bytes stay those of a plain pool.
        result = msgspec.structs.replace(result, max_total_num_tokens=total)
        if result.memory_pool_config is not None:
            result.memory_pool_config.max_total_num_tokens = total
    log_tier_split(pool)
    return result


def log_tier_split(pool: Any) -> None:
    names = pool.fade_config.tier_display_names()
    geom = pool.geometry
    rows = ", ".join(f"{n}={r}" for n, r in zip(names, geom.rows_per_page) if r)
    k, v = pool.get_kv_size_bytes()
    logger.info("[fade] tiered KV arena: %.2f MiB in %d pages of %d B/layer (tokens per page: %s); holds %d tokens at "
                "full precision and up to %d compressed (%.2fx); pages go to whichever tier needs them (%s)",
                (k + v) / 2**20, pool.pages, geom.page_bytes, rows, pool.layout.fp16_slots, pool.max_tokens(),
                pool.max_tokens() / pool.layout.fp16_slots, pool.fade_config.summary())
    protection = pool.protection_summary()
    if protection:
        logger.info("[fade] %s", protection)


def register_pool_hooks(register: Callable[[str, Callable[..., Any], Any], None], around: Any) -> None:
    register(f"{_CONFIGURATOR}._build_token_to_kv_pool", build_token_to_kv_pool_hook, around)
    register(f"{_CONFIGURATOR}._resolve_kv_pool_class", resolve_kv_pool_class_hook, around)
    register(f"{_CONFIGURATOR}.configure", configure_hook, around)
