"""Query-aware key rounding: the rounding factor, the feedback quantizer, and the store's use of them.

Inputs have real structure: keys with outlier channels (``synthetic_kv``), queries that live in a few
directions plus noise (as attention queries do), GQA (4 query heads per KV head). The logit error is
measured on held-out queries drawn like the observed ones, never on the queries the factor was built from.
"""

from __future__ import annotations

import pytest
import torch

from fade_sglang.config import FadeConfig, FadeConfigError
from fade_sglang.eval.synthetic import synthetic_kv
from fade_sglang.pool import Tier
from fade_sglang.pool.tiered_store import TieredKVStore
from fade_sglang.quant import QuantFormat, dequantize, quantize, rotation_matrix, rounding_factor

LAYERS, HEADS, GQA, DIM = 2, 2, 4, 64


def low_rank_queries(n: int, heads: int, dim: int, seed: int, rank: int = 6) -> torch.Tensor:
    """``[n, heads, dim]`` queries: a fixed rank-``rank`` subspace per head (seed 0) plus 5% isotropic noise;
    ``seed`` draws the samples, so two seeds are two batches of the same query distribution."""
    basis = torch.randn(heads, rank, dim, generator=torch.Generator().manual_seed(0)) * 3.0
    gen = torch.Generator().manual_seed(seed)
    coeff = torch.randn(n, heads, rank, generator=gen)
    return torch.einsum("nhr,hrd->nhd", coeff, basis) + 0.05 * 3.0 * torch.randn(n, heads, dim, generator=gen)


def moment(q: torch.Tensor) -> torch.Tensor:
    """Per-head second moment ``[H, D, D]`` of ``q [n, H, D]``."""
    return torch.einsum("nhd,nhe->hde", q.double(), q.double()) / q.shape[0]


def logit_mse(err: torch.Tensor, q: torch.Tensor) -> float:
    """Mean squared logit error of key errors ``err [n, H, D]`` under queries ``q [m, H, D]`` (float64)."""
    return float(torch.einsum("nhd,mhd->nmh", err.double(), q.double()).square().mean())


@pytest.mark.parametrize("bits,group", [(8, 64), (4, 64), (4, 32), (3, 64), (2, 32)])
def test_identity_factor_is_nearest_rounding(bits: int, group: int) -> None:
    k, _ = synthetic_kv(200, HEADS, DIM, seed=1)
    fmt = QuantFormat(bits, group)
    eye = torch.eye(DIM).expand(HEADS, DIM, DIM)
    plain, fed = quantize(k, fmt), quantize(k, fmt, eye)
    for a, b in zip(plain, fed):
        assert torch.equal(a, b)


def test_rounding_factor_inverts_the_damped_moment() -> None:
    h = moment(low_rank_queries(500, HEADS, DIM, seed=1))
    u = rounding_factor(h, damping=0.01).double()
    assert torch.equal(u, u.triu())
    damped = h + 0.01 * h.diagonal(dim1=-2, dim2=-1).mean(-1)[:, None, None] * torch.eye(DIM, dtype=torch.float64)
    # U^T U = (H + damping)^-1, to float32 precision of U relative to the inverse's scale.
    inv = torch.linalg.inv(damped)
    assert torch.allclose(u.transpose(-1, -2) @ u, inv, atol=1e-4 * float(inv.abs().max()))
    with pytest.raises(ValueError, match="no queries observed"):
        rounding_factor(torch.zeros(DIM, DIM))


@pytest.mark.parametrize("bits,group", [(4, 64), (4, 32), (3, 64), (2, 32)])
def test_feedback_rounding_lowers_the_logit_error_on_held_out_queries(bits: int, group: int) -> None:
    rot = rotation_matrix(DIM, 0)
    k, _ = synthetic_kv(400, HEADS, DIM, seed=2)
    x = k @ rot
    x = x - x.mean(0)  # the store's centered, rotated space
    seen, held_out = low_rank_queries(2000, HEADS, DIM, seed=1) @ rot, low_rank_queries(2000, HEADS, DIM, seed=2) @ rot
    fmt = QuantFormat(bits, group)
    plain = quantize(x, fmt)
    fed = quantize(x, fmt, rounding_factor(moment(seen)))
    # Same grid, same bytes: only the codes differ.
    assert torch.equal(plain.scale, fed.scale) and torch.equal(plain.zero, fed.zero)
    assert fed.data.shape == plain.data.shape
    err_plain = logit_mse(dequantize(plain, fmt) - x, held_out)
    err_fed = logit_mse(dequantize(fed, fmt) - x, held_out)
    assert err_fed < 0.5 * err_plain, (err_fed, err_plain)
    # It trades logit error for plain squared error, within bounds (not a broken quantizer).
    sq_plain = float((dequantize(plain, fmt) - x).square().mean())
    sq_fed = float((dequantize(fed, fmt) - x).square().mean())
    assert sq_fed < 4 * sq_plain


def make_store(aware: bool = True, **kwargs) -> TieredKVStore:
    cfg = FadeConfig.from_preset("balanced").with_overrides({"warm_key_bits": 0, "query_aware_keys": aware})
    return TieredKVStore(3000, torch.float32, HEADS, DIM, LAYERS, "cpu", cfg, **kwargs)


def fill(store: TieredKVStore, n: int) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    slots = store.alloc(n)
    kv = [synthetic_kv(n, HEADS, DIM, seed=10 + layer) for layer in range(LAYERS)]
    for layer, (k, v) in enumerate(kv):
        store.write_kv(layer, slots, k, v)
    return slots, kv


def gqa_queries(seed: int, n: int = 300) -> torch.Tensor:
    """``[n, HEADS * GQA, DIM]`` model-space queries; the GQA query heads of a KV head share its subspace."""
    return low_rank_queries(n, HEADS, DIM, seed).repeat_interleave(GQA, dim=1)


def test_store_rounds_keys_for_the_queries_it_saw() -> None:
    stores = {aware: make_store(aware) for aware in (True, False)}
    reads = {}
    for aware, store in stores.items():
        slots, kv = fill(store, 256)
        for layer in range(LAYERS):
            store.observe_queries(layer, gqa_queries(seed=layer))
        new = store.demote(slots[16:], Tier.WARM)
        reads[aware] = [store.read_kv(layer, new) for layer in range(LAYERS)]
    held_out = low_rank_queries(500, HEADS, DIM, seed=99)
    for layer in range(LAYERS):
        exact_k, exact_v = (t[16:] for t in synthetic_kv(256, HEADS, DIM, seed=10 + layer))
        (k_fed, v_fed), (k_plain, v_plain) = reads[True][layer], reads[False][layer]
        assert torch.equal(v_fed, v_plain)  # values are untouched
        assert logit_mse(k_fed - exact_k, held_out) < 0.5 * logit_mse(k_plain - exact_k, held_out)


def test_the_factor_is_fixed_at_the_first_demotion() -> None:
    store = make_store()
    slots, _ = fill(store, 128)
    store.observe_queries(0, gqa_queries(seed=1))
    store.demote(slots[:32], Tier.WARM)
    fixed = store.key_feedback.clone()
    assert not torch.equal(fixed[0], torch.eye(DIM).expand(HEADS, DIM, DIM))
    store.observe_queries(0, gqa_queries(seed=2) * 10)  # after the first demotion: ignored
    store.demote(slots[32:64], Tier.WARM)
    assert torch.equal(store.key_feedback, fixed)
    # Layer 1 saw no query before its first demotion: nearest rounding for good.
    assert torch.equal(fixed[1], torch.eye(DIM).expand(HEADS, DIM, DIM))


def test_without_queries_the_store_rounds_to_nearest_and_may_use_the_kernel() -> None:
    calls = []

    def kernel(*args, **kwargs) -> None:
        calls.append(1)
        raise RuntimeError("kernel called")

    stored = []
    for aware in (True, False):
        store = make_store(aware)
        slots, _ = fill(store, 64)
        new = store.demote(slots[16:], Tier.WARM)
        stored.append([store.read_kv(layer, new) for layer in range(LAYERS)])
    for a, b in zip(*stored):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # With queries observed the keys need the torch quantizer: the nearest-rounding kernel is not called.
    store = make_store(quantize_rows_fn=kernel)
    slots, _ = fill(store, 64)
    store.observe_queries(0, gqa_queries(seed=1))
    store.demote(slots[16:], Tier.WARM)
    assert not calls
    with pytest.raises(RuntimeError, match="kernel called"):
        plain = make_store(aware=False, quantize_rows_fn=kernel)
        plain.demote(fill(plain, 64)[0][16:], Tier.WARM)


def test_knob_is_validated() -> None:
    with pytest.raises(FadeConfigError, match="query_aware_keys"):
        FadeConfig(query_aware_keys="yes")


def test_unusable_queries_leave_the_layer_at_nearest_rounding() -> None:
    store = make_store()
    slots, _ = fill(store, 64)
    bad = gqa_queries(seed=1)
    bad[3, 0, 5] = float("nan")
    store.observe_queries(0, bad)
    store.observe_queries(1, gqa_queries(seed=2))
    store.demote(slots[16:], Tier.WARM)  # no exception: layer 0 falls back, layer 1 is query-aware
    assert torch.equal(store.key_feedback[0], torch.eye(DIM).expand(HEADS, DIM, DIM))
    assert store.query_aware_layers() == 1
