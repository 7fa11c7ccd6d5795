"""Query-aware rounding of keys: the factor that makes :func:`~.formats.quantize` minimize the logit error.

A key's quantization error e shifts the attention logit of query q by q.e, so the mean squared logit error
over the queries that read it is e^T H e with H = E[q q^T] (per layer and KV head, its query heads pooled).
Rounding every channel to its nearest code minimizes |e|^2, not that; rounding channel by channel and pushing
each error onto the channels not yet rounded (the update of GPTQ, here along head_dim, with the upper
Cholesky factor of H^-1) minimizes it greedily, on the same grid and at the same bytes. On SmolLM2 it
cuts the error of INT4 in groups of 32 by two thirds and of INT3 by a third, and leaves INT4 in groups of 64
unchanged (benchmarks/RESULTS.md, "Query-aware key rounding").
"""

from __future__ import annotations

import torch

__all__ = ["rounding_factor", "DEFAULT_DAMPING"]

# Added to H's diagonal, as a share of its mean: keeps H^-1 well conditioned where the observed queries
# never point, and hedges against later queries that do (GPTQ uses the same 1%).
DEFAULT_DAMPING = 0.01


def rounding_factor(second_moment: torch.Tensor, damping: float = DEFAULT_DAMPING) -> torch.Tensor:
    """Upper Cholesky factor U of (H + damping * mean(diag H) * I)^-1 for each ``[D, D]`` matrix H of
    ``second_moment [..., D, D]`` (float32 result; math in float64). H must not be all zero; one that is not
    positive semi-definite (or not finite) raises ``torch.linalg.LinAlgError``."""
    h = second_moment.double()
    h = (h + h.transpose(-1, -2)) / 2
    d = h.shape[-1]
    mean_diag = h.diagonal(dim1=-2, dim2=-1).mean(-1)
    if bool((mean_diag <= 0).any()):
        raise ValueError("rounding_factor: a query second moment is zero (no queries observed)")
    h = h + (damping * mean_diag)[..., None, None] * torch.eye(d, dtype=h.dtype, device=h.device)
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(inverse, upper=True).float()
