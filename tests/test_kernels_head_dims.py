"""Triton kernels at the head_dims models use, power-of-two or not (64, 80, 96, 128, 256).

Non-power-of-two head_dims run in tiles padded to the next power of two with the real D
masked (see "Head dims" in kernels/decode.py); the packed planes are D / P channels wide
(INT4 at D = 80: 40, groups of 16; D = 96: groups of 32), so these tests are what checks that
the padded tiles map the planar codes back to the right channels.

Same oracles and tolerances as tests/test_kernels.py (its docstring): float64 dense attention
over ``gather_kv`` (the dequantized math) for mixed tiers, over the original K/V for fp16-only
slots; max |err| / max |oracle| < 2e-4 for fp32 KV, < 1e-2 for fp16 KV. Quantize: bit-exact vs
fade_sglang.quant.quantize without clip search. Every case mixes fp16 / INT4 / INT2 slots in
shuffled order, uses GQA (4 query heads per KV head), ragged request lengths (one empty) and
K with outlier channels (fade_sglang.eval.synthetic.synthetic_kv, through build_case).
Sizes are small: the interpreter runs on CPU.
"""

from __future__ import annotations

import importlib
import os

os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of triton (see test_kernels._kernels)

import pytest
import torch

from fade_sglang.config import FadeConfig
from fade_sglang.eval.synthetic import synthetic_kv
from fade_sglang.patches.pool import TieredKVPool
from fade_sglang.pool.layout import Tier
from fade_sglang.pool.view import PackedPart
from fade_sglang.quant import QuantFormat, QuantizedKV, dequantize, quantize, rotation_matrix, unpack_codes
from test_attention_reference import (
    _Layer,
    _extend_inputs,
    build_case,
    dense_decode,
    dense_extend,
    rel_err,
    request_queries,
)
from test_kernels import TOL, _kernels

pytestmark = pytest.mark.triton

K = _kernels()
HEAD_DIMS = (64, 80, 96, 128, 256)
DTYPES = (torch.float16, torch.float32)
GQA = 4


def test_dense_rotation_is_contiguous():
    assert rotation_matrix(80).is_contiguous() and rotation_matrix(96).is_contiguous()


def _lens(head_dim: int) -> list[int]:
    """Ragged requests, one empty; fewer tokens at 256 (the interpreter's cost grows with the tile)."""
    return [1, 14, 0, 6] if head_dim == 256 else [1, 29, 0, 11]


def test_supported_head_dims():
    for d in HEAD_DIMS + (16, 32, 112, 144, 160, 176, 192, 208, 224, 240):
        assert K.supported_head_dim(d), d
    for d in (0, 8, 24, 40, 72, 100, 264, 512):
        assert not K.supported_head_dim(d), d


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "fp32"])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_decode_mixed_tiers(head_dim, dtype):
    case = build_case(_lens(head_dim), head_dim=head_dim, dtype=dtype, seed=head_dim)
    view = case.view
    assert view.warm.key.fmt.group_size_for(head_dim) == QuantFormat(4, 64).group_size_for(head_dim)  # 80 -> 16, 96 -> 32
    assert view.cold.value.fmt.group_size_for(head_dim) == QuantFormat(2, 32).group_size_for(head_dim)
    tiers = case.pool.tier_of(case.kv_indices)
    assert {0, 1, 2} <= set(tiers[1:1 + _lens(head_dim)[1]].tolist())  # one request mixes all tiers
    q = request_queries(case, GQA).to(dtype)
    scale = head_dim ** -0.5
    out = K.decode_attention(q, view, case.kv_indptr, case.kv_indices, scale, num_kv_splits=2)
    assert rel_err(out, dense_decode(q.double(), case, scale, dequantized=True)) < TOL[dtype]
    assert torch.equal(out[2], torch.zeros_like(out[2]))  # empty request -> zeros


@pytest.mark.parametrize("head_dim", [80, 96])
def test_decode_padded_fp16_only_and_unrotated(head_dim):
    """fp16-only slots vs the original K/V, and packed tiers (INT8 warm here) without rotation (the epilogue's
    plain path)."""
    case = build_case([9, 17], head_dim=head_dim, shares="fp16_only", seed=3)
    q = request_queries(case, GQA)
    out = K.decode_attention(q, case.view, case.kv_indptr, case.kv_indices, 0.1, num_kv_splits=3)
    assert rel_err(out, dense_decode(q.double(), case, 0.1, dequantized=False)) < TOL[torch.float32]
    case = build_case([9, 17], head_dim=head_dim, seed=4, rotation=False, warm_bits=8)
    assert case.view.rotation is None and case.view.warm.key.fmt.bits == 8
    q = request_queries(case, GQA)
    out = K.decode_attention(q, case.view, case.kv_indptr, case.kv_indices, 0.1, num_kv_splits=2)
    assert rel_err(out, dense_decode(q.double(), case, 0.1, dequantized=True)) < TOL[torch.float32]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "fp32"])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_extend_over_mixed_prefix(head_dim, dtype):
    case = build_case([19, 0, 8] if head_dim < 256 else [11, 0, 5], head_dim=head_dim, dtype=dtype,
                      seed=head_dim + 1)
    q, kn, vn, qo = _extend_inputs(case, [3, 2, 4], GQA)
    q, kn, vn = q.to(dtype), kn.to(dtype), vn.to(dtype)
    out = K.extend_attention(q, kn, vn, case.view, qo, case.kv_indptr, case.kv_indices, 0.1)
    assert rel_err(out, dense_extend(q, kn, vn, qo, case, 0.1, dequantized=True)) < TOL[dtype]


@pytest.mark.parametrize("head_dim", [80, 96])
def test_extend_padded_fp16_prefix_direct_path(head_dim):
    """No packed tier: the extend kernel writes the output itself (masked past D)."""
    case = build_case([0, 7, 5], head_dim=head_dim, shares="fp16_only", seed=5)
    q, kn, vn, qo = _extend_inputs(case, [18, 1, 3], GQA)  # 16 tokens per block at GQA 4: 18 spans two
    out = K.extend_attention(q, kn, vn, case.view, qo, case.kv_indptr, case.kv_indices, 0.125)
    assert rel_err(out, dense_extend(q, kn, vn, qo, case, 0.125, dequantized=False)) < TOL[torch.float32]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "fp32"])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_quantize_bit_exact_vs_torch(head_dim, dtype):
    k, v = synthetic_kv(9, 2, head_dim, seed=head_dim)
    for fmt in (QuantFormat(4, 64), QuantFormat(2, 32), QuantFormat(8, 64), QuantFormat(2, 16), QuantFormat(3, 64)):
        for x in (k.to(dtype), v.to(dtype)):
            got, want = K.quantize(x, fmt), quantize(x, fmt)
            for a, b in zip(got, want):
                assert a.dtype == b.dtype and torch.equal(a, b), (fmt, head_dim)


@pytest.mark.parametrize("head_dim", [80, 96])
def test_quantize_clip_search_matches_torch_choice(head_dim):
    k, _ = synthetic_kv(32, 2, head_dim, seed=head_dim)
    for fmt in (QuantFormat(4, 64, clip_search=True), QuantFormat(2, 32, clip_search=True),
                QuantFormat(3, 32, clip_search=True)):
        got, want = K.quantize(k, fmt), quantize(k, fmt)
        same = (got.scale == want.scale) & (got.zero == want.zero)
        assert float(same.float().mean()) > 0.98  # a group may differ only when two candidates tie to rounding
        err_k = (dequantize(got, fmt) - k).square().sum()
        err_t = (dequantize(want, fmt) - k).square().sum()
        assert float(err_k) <= float(err_t) * 1.001


@pytest.mark.parametrize("head_dim", [80, 96])
def test_quantize_rows_fused_rotation_matches_pool_demotion(head_dim):
    """All layers in one launch from fp16 pool slots, dense rotation + key centering fused, vs the pool's
    torch path, into the INT4 and the INT2 store (groups 16 / 16 at 80, 32 / 32 at 96)."""
    cfg = FadeConfig(clip_search=False)  # INT4 and INT2 on; the tiers share the arena
    pool = TieredKVPool(600, 1, torch.float16, 2, head_dim, 2, "cpu", False, fade_config=cfg)
    n = 12
    slots = pool.alloc(2 * n)
    for layer in range(2):
        k, v = synthetic_kv(2 * n, 2, head_dim, seed=layer)
        _Layer.layer_id = layer
        pool.set_kv_buffer(_Layer, slots, k.half(), v.half())
    _Layer.layer_id = 0
    for part, tier, base in ((slots[:n], Tier.WARM, pool.layout.warm_base),
                             (slots[n:], Tier.COLD, pool.layout.cold_base)):
        new = pool.demote(part, tier)  # torch path; freezes the key centers (freed fp16 rows keep their data)
        store = pool.stores[tier]
        rows = new - base
        for kv, want in enumerate((store.key, store.value)):
            bits = want.fmt.bits
            got = PackedPart.zeros(want.fmt, 2, want.data.shape[1], 2, head_dim, "cpu")
            K.quantize_rows(pool.kv_fp16[:, kv], got, rows, src_rows=part, rotation=pool.rotation,
                            k_center=pool.k_center if kv == 0 else None)
            diff = (unpack_codes(got.codes(rows), bits).int() - unpack_codes(want.codes(rows), bits).int()).abs()
            assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 0.01
            for a, b in ((got.scale, want.scale), (got.zero, want.zero)):
                assert torch.allclose(a[:, rows].float(), b[:, rows].float(), rtol=2e-3, atol=1e-4)
            assert rel_err(got.read(rows), want.read(rows)) < 0.1  # a code step at most, on a few values


def test_whole_row_group_kernels_via_launchers():
    """A configured group larger than a non-power-of-two D gives one group of D channels
    (QuantFormat.group_size_for: 80 with group 128 -> 80). The dispatch accepts only power-of-two
    groups, so this drives the launchers directly: quantize (clip search too) and decode."""
    quantize_mod = importlib.import_module("fade_sglang.kernels.quantize")
    decode_mod = importlib.import_module("fade_sglang.kernels.decode")
    d = 80
    k, _ = synthetic_kv(10, 2, d, seed=1)
    for fmt in (QuantFormat(4, 128), QuantFormat(2, 128, clip_search=True)):
        assert fmt.group_size_for(d) == d
        n = k.shape[0] * k.shape[1]
        dst = PackedPart.zeros(fmt, 1, n, 1, d, "cpu")
        quantize_mod.launch_quantize(k.reshape(1, n, 1, d), None, dst, torch.arange(n), None, None)
        got = QuantizedKV(dst.data[0, :, 0], dst.scale[0, :, 0], dst.zero[0, :, 0])
        want = quantize(k.reshape(n, d), fmt)
        if fmt.clip_search:  # as test_quantize_clip_search_matches_torch_choice
            assert float(((got.scale == want.scale) & (got.zero == want.zero)).float().mean()) > 0.9
            err_k = (dequantize(got, fmt) - k.reshape(n, d)).square().sum()
            err_t = (dequantize(want, fmt) - k.reshape(n, d)).square().sum()
            assert float(err_k) <= float(err_t) * 1.001
        else:
            assert torch.equal(got.data, want.data)
            assert torch.equal(got.scale, want.scale) and torch.equal(got.zero, want.zero)

    case = build_case([1, 21, 0, 9], head_dim=d, seed=9, warm_group_size=128, cold_group_size=128)
    view = case.view
    assert view.warm.key.fmt.group_size_for(d) == d and view.cold.value.fmt.group_size_for(d) == d
    q = request_queries(case, GQA)
    batch, hq = q.shape[0], q.shape[1]
    part = decode_mod.partition_by_tier(case.kv_indptr, case.kv_indices, view.warm_base, view.cold_base)
    ws = decode_mod.DecodeWorkspace.allocate(batch, hq, d, 2, "cpu")
    out = decode_mod.launch_decode(q, view, part, 0.1, torch.empty_like(q), 2, ws)
    assert rel_err(out, dense_decode(q.double(), case, 0.1, dequantized=True)) < TOL[torch.float32]
