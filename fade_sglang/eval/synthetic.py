"""Seeded synthetic KV with the structure real models show (used by the fidelity report, tests and benchmarks).

* K has a few large-magnitude, offset outlier channels per head (the channel
  outliers that make naive per-token quantization fail) and per-token norm drift.
* V is closer to Gaussian with per-token scale variation.
* Queries are built from a few keys of their KV head plus noise, so attention
  is peaked rather than uniform (uniform attention hides quantization error).
"""

from __future__ import annotations

import torch

__all__ = ["synthetic_kv", "correlated_queries"]


def synthetic_kv(
    num_tokens: int,
    num_kv_heads: int,
    head_dim: int,
    seed: int = 0,
    outlier_channels: int = 4,
    outlier_scale: float = 8.0,
    outlier_offset: float = 12.0,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``k, v`` of shape ``[num_tokens, num_kv_heads, head_dim]``."""
    gen = torch.Generator().manual_seed(seed)
    shape = (num_tokens, num_kv_heads, head_dim)
    token_scale = torch.exp(0.25 * torch.randn(num_tokens, num_kv_heads, 1, generator=gen))
    k = torch.randn(shape, generator=gen) * token_scale
    n_out = min(outlier_channels, head_dim)
    for h in range(num_kv_heads):  # a handful of heads; the per-token work is vectorized
        chans = torch.randperm(head_dim, generator=gen)[:n_out]
        signs = torch.randint(0, 2, (n_out,), generator=gen) * 2 - 1
        mags = outlier_scale * (0.5 + torch.rand(n_out, generator=gen))
        k[:, h, chans] = k[:, h, chans] * mags + signs * outlier_offset * (0.5 + torch.rand(n_out, generator=gen))
    v_scale = torch.exp(0.3 * torch.randn(num_tokens, num_kv_heads, 1, generator=gen))
    v = torch.randn(shape, generator=gen) * v_scale
    return k.to(dtype), v.to(dtype)


def correlated_queries(
    k: torch.Tensor,
    q_per_kv: int,
    num_queries: int,
    seed: int = 0,
    keys_per_query: int = 3,
    strength: float = 1.5,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Queries ``[num_queries, num_kv_heads * q_per_kv, head_dim]`` aimed at a few keys of their KV head."""
    gen = torch.Generator().manual_seed(seed + 7919)
    n_tok, n_kv, d = k.shape
    kf = k.float()
    idx = torch.randint(0, n_tok, (num_queries, n_kv, q_per_kv, keys_per_query), generator=gen)
    heads = torch.arange(n_kv)[None, :, None, None].expand_as(idx)
    picked = kf[idx, heads]  # [nq, n_kv, q_per_kv, keys, d]
    unit = picked / picked.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    noise = torch.randn(num_queries, n_kv, q_per_kv, d, generator=gen) / d**0.5
    q = strength * d**0.5 * unit.mean(-2) / keys_per_query**0.5 + noise * d**0.25
    return q.reshape(num_queries, n_kv * q_per_kv, d).to(dtype or k.dtype)
