"""Fixed, seeded orthogonal rotations over head_dim.

Rotating K (and q by the same matrix) leaves attention scores unchanged, and
rotating V only requires un-rotating the attention output once. The rotation
spreads channel outliers over all channels, which is what makes per-token
low-bit quantization accurate.

Power-of-two head_dim: randomized Hadamard (random signs times a normalized
Sylvester Hadamard matrix). Other head_dims (80, 96, ...): documented fallback
to a seeded random orthogonal matrix (QR of a Gaussian matrix); it has the same
outlier-spreading property, it is just not a fast transform.
"""

from __future__ import annotations

import functools

import torch

__all__ = ["rotation_matrix", "is_power_of_two"]


def is_power_of_two(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


def _sylvester_hadamard(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@functools.lru_cache(maxsize=32)
def _rotation_f64(head_dim: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if is_power_of_two(head_dim):
        signs = torch.randint(0, 2, (head_dim,), generator=gen, dtype=torch.int64) * 2 - 1
        return signs.to(torch.float64)[:, None] * _sylvester_hadamard(head_dim) / head_dim**0.5
    gauss = torch.randn(head_dim, head_dim, generator=gen, dtype=torch.float64)
    q, r = torch.linalg.qr(gauss)
    # Fix the sign ambiguity of QR so the matrix is a deterministic function of the seed; row-major like
    # the Hadamard branch (QR returns its factor column-major, and the kernels take a contiguous matrix).
    return (q * torch.sign(torch.diagonal(r))[None, :]).contiguous()


def rotation_matrix(
    head_dim: int, seed: int = 0, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Orthogonal ``[head_dim, head_dim]`` matrix R: rotate with ``x @ R``, undo with ``y @ R.T``."""
    if head_dim <= 0:
        raise ValueError(f"head_dim must be positive, got {head_dim}")
    return _rotation_f64(int(head_dim), int(seed)).to(dtype=dtype, device=device)
