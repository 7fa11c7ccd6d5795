"""Rotation: orthogonal, deterministic, invertible, score-preserving, spreads outlier channels."""

from __future__ import annotations

import pytest
import torch

from fade_sglang.quant import rotation_matrix
from fade_sglang.eval.synthetic import synthetic_kv


@pytest.mark.parametrize("head_dim", [64, 80, 96, 128, 256])
def test_orthogonal_deterministic_invertible(head_dim: int) -> None:
    r = rotation_matrix(head_dim, seed=5, dtype=torch.float64)
    assert torch.allclose(r @ r.T, torch.eye(head_dim, dtype=torch.float64), atol=1e-12)
    assert torch.equal(r, rotation_matrix(head_dim, seed=5, dtype=torch.float64))
    assert not torch.equal(r, rotation_matrix(head_dim, seed=6, dtype=torch.float64))
    x = torch.randn(10, head_dim, dtype=torch.float64)
    assert torch.allclose((x @ r) @ r.T, x, atol=1e-12)


def test_scores_unchanged_when_q_and_k_rotate_together() -> None:
    k, _ = synthetic_kv(64, 2, 128, seed=0, dtype=torch.float64)
    q = torch.randn(5, 2, 128, dtype=torch.float64)
    r = rotation_matrix(128, dtype=torch.float64)
    assert torch.allclose(torch.einsum("qhd,thd->qht", q @ r, k @ r), torch.einsum("qhd,thd->qht", q, k), atol=1e-9)


@pytest.mark.parametrize("head_dim", [96, 128])
def test_rotation_spreads_outlier_channels(head_dim: int) -> None:
    k, _ = synthetic_kv(512, 4, head_dim, seed=1)
    r = rotation_matrix(head_dim)

    def peak_to_rms(x: torch.Tensor) -> float:
        return float((x.abs().amax(-1) / x.square().mean(-1).sqrt()).mean())

    assert peak_to_rms(k @ r) < 0.6 * peak_to_rms(k)


def test_rejects_bad_head_dim() -> None:
    with pytest.raises(ValueError, match="head_dim must be positive"):
        rotation_matrix(0)
