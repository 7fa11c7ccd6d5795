"""Triton kernels (run under TRITON_INTERPRET=1 on CPU: fp16 / fp32 only, the interpreter breaks bf16).

Oracles (float64): dense attention over the original K/V for fp16-only slots, and
over ``gather_kv`` values (the dequantized math) when packed slots are involved.
Tolerances, as max |err| / max |oracle| over the whole output:
  * fp32 KV: < 2e-4 (fp16-only and packed slots alike: the kernel matches the dequantized math);
  * fp16 KV: < 1e-2 (fp16 dot operands, as SGLang's decode kernel).
Quantize: bit-exact vs fade_sglang.quant.quantize without clip search; with the fused
rotation (different summation order) codes may move by one at boundaries.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of triton (see _kernels)

import pytest
import torch

from fade_sglang.config import FadeConfig
from fade_sglang.pool.layout import Tier
from fade_sglang.patches.pool import TieredKVPool
from fade_sglang.pool.view import PackedPart, TieredLayerKV
from fade_sglang.quant import QuantFormat, dequantize, quantize, unpack_codes
from fade_sglang.eval.synthetic import synthetic_kv
from test_attention_reference import (
    _Layer,
    _extend_inputs,
    build_case,
    dense_decode,
    dense_extend,
    rel_err,
    request_queries,
)

pytestmark = pytest.mark.triton


def _kernels():
    """fade_sglang.kernels bound to the Triton interpreter.

    The interpreter needs TRITON_INTERPRET=1 before *triton* is first imported (triton.language's
    own jit helpers, tl.max / tl.sum / tl.cdiv, are bound then). A test module imported earlier may
    already have pulled triton in through sglang: then skip with the fix instead of failing.
    """
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(tl.standard.max, InterpretedFunction):
        pytest.skip("triton was imported before TRITON_INTERPRET=1 was set: export it, or set it at the top of "
                    "tests/conftest.py", allow_module_level=True)
    import fade_sglang.kernels as kernels

    if not isinstance(kernels.decode._decode_stage1, InterpretedFunction):
        for name in ("decode", "extend", "quantize", "dispatch"):
            importlib.reload(importlib.import_module(f"fade_sglang.kernels.{name}"))
        kernels = importlib.reload(kernels)
    return kernels


K = _kernels()
TOL = {torch.float32: 2e-4, torch.float16: 1e-2}


def _check_partition(part, indptr, indices, warm_base, cold_base):
    tiers = (indices >= warm_base).long() + (indices >= cold_base).long()
    for b in range(indptr.numel() - 1):
        s, e = int(indptr[b]), int(indptr[b + 1])
        mine = indices[s:e]
        order = torch.sort(tiers[s:e], stable=True).indices
        assert torch.equal(part.indices[s:e], mine[order])  # stable within a tier
        counts = torch.bincount(tiers[s:e], minlength=3).tolist()
        assert part.tier_indptr[b].tolist() == [s, s + counts[0], s + counts[0] + counts[1], e]


def test_partition_by_tier_stable_with_padding_and_empty_requests():
    gen = torch.Generator().manual_seed(0)
    warm_base, cold_base = 50, 80
    lens = [0, 7, 1, 30, 0, 12]
    indptr = torch.tensor([0] + lens).cumsum(0)
    n = int(indptr[-1])
    indices = torch.randint(1, 120, (n + 9,), generator=gen, dtype=torch.int32)  # 9 padding entries (CUDA graphs)
    view_like = TieredLayerKV(torch.zeros(1, 1, 16), torch.zeros(1, 1, 16), None, None, warm_base, cold_base,
                              None, torch.zeros(1, 16))
    part = K.partition_by_tier(indptr, indices, view_like)
    assert part.indices.dtype == torch.int32 and part.tier_indptr.dtype == torch.int32
    _check_partition(part, indptr, indices[:n], warm_base, cold_base)
    assert torch.equal(part.indices[n:], indices[n:])
    again = K.partition_by_tier(indptr, indices, view_like, out=part)  # in place (preallocated buffers)
    assert again is part
    empty = K.partition_by_tier(torch.zeros(1, dtype=torch.int64), indices[:0].long(), view_like)
    assert empty.tier_indptr.shape == (0, 4)


@pytest.mark.parametrize("dtype,group,head_dim", [(torch.float32, 4, 64), (torch.float16, 8, 128)])
def test_decode_fp16_only_matches_dense_attention_of_original_kv(dtype, group, head_dim):
    case = build_case([1, 37, 0, 20], head_dim=head_dim, dtype=dtype, shares="fp16_only", seed=1)
    q = request_queries(case, group).to(dtype)
    scale = head_dim ** -0.5
    out = K.decode_attention(q, case.view, case.kv_indptr, case.kv_indices, scale, num_kv_splits=2)
    assert out.dtype == dtype
    oracle = dense_decode(q.double(), case, scale, dequantized=False)
    assert rel_err(out, oracle) < TOL[dtype]
    assert torch.equal(out[2], torch.zeros_like(out[2]))  # empty request -> zeros


@pytest.mark.parametrize("head_dim,group,dtype,splits", [
    (64, 1, torch.float32, 1),
    (64, 4, torch.float16, 3),
    (128, 8, torch.float16, 2),
    (128, 4, torch.float32, 2),
])
def test_decode_mixed_tiers_shuffled(head_dim, group, dtype, splits):
    case = build_case([1, 45, 0, 70], head_dim=head_dim, dtype=dtype, seed=head_dim + group)
    tiers = case.pool.tier_of(case.kv_indices)
    assert {0, 1, 2} <= set(tiers[1:46].tolist())  # one request really mixes all tiers
    q = request_queries(case, group).to(dtype)
    scale = head_dim ** -0.5
    out = K.decode_attention(q, case.view, case.kv_indptr, case.kv_indices, scale, num_kv_splits=splits)
    assert rel_err(out, dense_decode(q.double(), case, scale, dequantized=True)) < TOL[dtype]
    assert torch.equal(out[2], torch.zeros_like(out[2]))


@pytest.mark.parametrize("shares", ["no_cold", "no_warm"])
def test_decode_with_an_empty_tier(shares):
    case = build_case([33, 9], dtype=torch.float16, shares=shares, seed=4)
    assert (case.view.cold is None) == (shares == "no_cold") and (case.view.warm is None) == (shares == "no_warm")
    q = request_queries(case, 4).half()
    out = K.decode_attention(q, case.view, case.kv_indptr, case.kv_indices, 0.125, num_kv_splits=2)
    assert rel_err(out, dense_decode(q.double(), case, 0.125, dequantized=True)) < TOL[torch.float16]


def test_decode_without_rotation_and_with_wide_gqa_group():
    # rotation off (no un-rotation in the epilogue); 80 query heads per KV head: non-power-of-two
    # group, more than one head tile per KV head; fp32 q against the same-dtype pool.
    case = build_case([5, 33], kv_heads=1, seed=6, rotation=False)
    assert case.view.rotation is None
    q = request_queries(case, 80)
    out = K.decode_attention(q, case.view, case.kv_indptr, case.kv_indices, 0.125, num_kv_splits=2)
    assert rel_err(out, dense_decode(q.double(), case, 0.125, dequantized=True)) < TOL[torch.float32]


def test_decode_preallocated_buffers_padded_int32_indices():
    """CUDA-graph style: precomputed partition, oversized workspace, out= buffer, padded int32 indices."""
    case = build_case([20, 3, 41], dtype=torch.float16, seed=8)
    q = request_queries(case, 4).half()
    n = case.kv_indices.numel()
    padded = torch.cat((case.kv_indices, torch.full((13,), 5))).to(torch.int32)
    indptr = case.kv_indptr.to(torch.int32)
    part = K.partition_by_tier(indptr, padded, case.view)
    ws = K.DecodeWorkspace.allocate(8, q.shape[1], 64, 4, "cpu")
    out = torch.full_like(q, float("nan"))
    res = K.decode_attention(q, case.view, indptr, padded, 0.125, out, partition=part, num_kv_splits=3,
                             workspace=ws)
    assert res is out
    assert rel_err(out, dense_decode(q.double(), case, 0.125, dequantized=True)) < TOL[torch.float16]
    assert torch.equal(part.indices[n:], padded[n:])


@pytest.mark.parametrize("head_dim,group,dtype", [(64, 4, torch.float16), (128, 8, torch.float32)])
def test_extend_over_mixed_prefix(head_dim, group, dtype):
    case = build_case([40, 0, 9], head_dim=head_dim, dtype=dtype, seed=21)
    q, kn, vn, qo = _extend_inputs(case, [3, 4, 17], group)  # 17 new tokens span two query blocks
    q, kn, vn = q.to(dtype), kn.to(dtype), vn.to(dtype)
    out = K.extend_attention(q, kn, vn, case.view, qo, case.kv_indptr, case.kv_indices, 0.1)
    assert rel_err(out, dense_extend(q, kn, vn, qo, case, 0.1, dequantized=True)) < TOL[dtype]


def test_extend_fp16_prefix_direct_path():
    case = build_case([0, 17, 6], shares="fp16_only", seed=23)
    q, kn, vn, qo = _extend_inputs(case, [70, 1, 5], 1)  # MHA: 64 tokens per block, 70 spans two
    out = K.extend_attention(q, kn, vn, case.view, qo, case.kv_indptr, case.kv_indices, 0.125, max_extend_len=70)
    assert rel_err(out, dense_extend(q, kn, vn, qo, case, 0.125, dequantized=False)) < TOL[torch.float32]


def _decode_and_extend_match_the_dequantized_math(case, head_dim: int, group: int, dtype: torch.dtype) -> None:
    q = request_queries(case, group).to(dtype)
    scale = head_dim ** -0.5
    out = K.decode_attention(q, case.view, case.kv_indptr, case.kv_indices, scale, num_kv_splits=2)
    assert rel_err(out, dense_decode(q.double(), case, scale, dequantized=True)) < TOL[dtype]
    q, kn, vn, qo = _extend_inputs(case, [3, 4, 1, 17], group)
    q, kn, vn = q.to(dtype), kn.to(dtype), vn.to(dtype)
    out = K.extend_attention(q, kn, vn, case.view, qo, case.kv_indptr, case.kv_indices, 0.1)
    assert rel_err(out, dense_extend(q, kn, vn, qo, case, 0.1, dequantized=True)) < TOL[dtype]


@pytest.mark.parametrize("head_dim,group,dtype,key_bits", [
    (64, 3, torch.float16, {"warm_key_bits": 8, "cold_key_bits": 4}),  # K codes spill into the V half
    (128, 4, torch.float32, {"warm_key_bits": 8}),
    (80, 2, torch.float16, {"warm_key_bits": 8, "cold_key_bits": 4}),  # padded tiles read the split too
])
def test_decode_and_extend_with_keys_at_more_bits(head_dim, group, dtype, key_bits):
    case = build_case([1, 45, 0, 70], head_dim=head_dim, dtype=dtype, seed=head_dim + group, **key_bits)
    warm = case.view.warm
    assert warm.key.fmt.bits == 8 and warm.value.fmt.bits == 4 and warm.key.data_b is not None
    _decode_and_extend_match_the_dequantized_math(case, head_dim, group, dtype)


@pytest.mark.parametrize("head_dim,group,dtype,formats", [
    # aggressive's cold tier: k4v3 in groups of 64 (key codes spill into the V half)
    (64, 3, torch.float16, {"cold_bits": 3, "cold_key_bits": 4, "cold_group_size": 64}),
    (128, 4, torch.float32, {"warm_bits": 3, "cold_bits": 3}),  # 3-bit K and V in both tiers
    (80, 2, torch.float16, {"cold_bits": 3, "cold_key_bits": 4}),  # padded tiles: both planes gathered
    (96, 3, torch.float32, {"warm_bits": 3, "cold_bits": 2}),
])
def test_decode_and_extend_over_3_bit_codes(head_dim, group, dtype, formats):
    """3-bit codes (a 2-bit plane of the low bits, a 1-bit plane of the high bit) read in place by both kernels."""
    case = build_case([1, 45, 0, 70], head_dim=head_dim, dtype=dtype, seed=head_dim + group, **formats)
    tier = case.view.warm if formats.get("warm_bits") == 3 else case.view.cold
    assert tier.value.fmt.bits == 3 and tier.value.data.shape[-1] == head_dim * 3 // 8
    _decode_and_extend_match_the_dequantized_math(case, head_dim, group, dtype)


@pytest.mark.parametrize("head_dim,group,dtype", [(64, 3, torch.float16), (128, 4, torch.float32)])
def test_decode_and_extend_over_a_protected_layer(head_dim, group, dtype):
    """A protected layer: padded fp16 rows (row stride past H * D) and the grown records' formats (8-bit keys,
    spilled key codes) read in place by both kernels."""
    case = build_case([1, 45, 0, 70], head_dim=head_dim, dtype=dtype, seed=head_dim + group, room=6,
                      protected_layers=(0,))
    view = case.view
    assert case.pool.protected_layers == (0,) and not view.k_fp16.is_contiguous()
    assert view.k_fp16.stride(0) > view.k_fp16.shape[1] * head_dim
    assert view.warm.key.fmt.bits == 8 and view.cold.key.fmt.bits == 8 and view.cold.value.fmt.bits >= 4
    _decode_and_extend_match_the_dequantized_math(case, head_dim, group, dtype)


def _fill_layers(pool: TieredKVPool, n: int) -> torch.Tensor:
    """``n`` new fp16 slots holding synthetic K/V (outlier channels) in every layer, written through SGLang's path."""
    slots = pool.alloc(n)
    for layer in range(pool.layer_num):
        k, v = synthetic_kv(n, pool.head_num, pool.head_dim, seed=layer)
        _Layer.layer_id = layer
        pool.set_kv_buffer(_Layer, slots, k.half(), v.half())
    _Layer.layer_id = 0
    return slots


def test_fused_demotion_per_layer_group_matches_torch_path():
    """The pool's fused quantize launch runs once per layer group (protected layers: their own formats and
    padded fp16 rows); what it stores reads back like the torch path's."""
    cfg = FadeConfig(clip_search=False, protected_layers=(1,))
    pools = [TieredKVPool(600, 1, torch.float16, 2, 64, 3, "cpu", False, fade_config=cfg, demote_kernel=on)
             for on in (False, True)]
    assert pools[1].quantize_rows_fn is not None and len(pools[1].groups) == 2
    n = 48
    new = []
    for pool in pools:
        slots = _fill_layers(pool, n)
        first = pool.demote(slots[:8], Tier.WARM)  # torch path on both: freezes the key centers
        rest = pool.demote(slots[8:], Tier.WARM)  # fused kernel on the second pool
        new.append(torch.cat((first, pool.demote(rest[:20], Tier.COLD), rest[20:])))
    assert torch.equal(new[0], new[1])
    for layer in range(3):
        (k0, v0), (k1, v1) = (p.read_kv(layer, s) for p, s in zip(pools, new))
        assert rel_err(k1, k0) < 0.05 and rel_err(v1, v0) < 0.1  # a code step at most, on a few values


@pytest.mark.parametrize("bits,group,head_dim,src_dtype", [
    (4, 64, 64, torch.float32), (2, 32, 128, torch.float32), (8, 64, 128, torch.float16), (2, 16, 64, torch.float16),
    (3, 64, 64, torch.float32), (3, 32, 128, torch.float16),
])
def test_quantize_bit_exact_vs_torch(bits, group, head_dim, src_dtype):
    k, v = synthetic_kv(29, 3, head_dim, seed=bits)
    fmt = QuantFormat(bits, group)
    for x in (k.to(src_dtype), v.to(src_dtype)):
        got, want = K.quantize(x, fmt), quantize(x, fmt)
        for a, b in zip(got, want):
            assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("bits,key_bits", [(4, 0), (4, 8), (3, 0), (3, 4)])
def test_quantize_rows_fused_rotation_matches_pool_demotion(bits, key_bits):
    """All layers in one launch per part from fp16 pool slots, rotation + key centering fused, vs the pool's
    torch path (keys at more bits than values: the key codes are stored in two pieces)."""
    cfg = FadeConfig(clip_search=False, warm_bits=bits, warm_key_bits=key_bits)  # the tiers share the arena
    pool = TieredKVPool(2000, 1, torch.float16, 2, 64, 3, "cpu", False, fade_config=cfg)
    n = 40
    slots = _fill_layers(pool, n)
    new = pool.demote(slots, Tier.WARM)  # torch path; freezes the key centers (freed fp16 rows keep their data)
    store = pool.stores[Tier.WARM]
    rows = new - pool.layout.warm_base
    assert (store.key.data_b is not None) == (key_bits > bits)
    for kv, want in enumerate((store.key, store.value)):
        got = PackedPart.zeros(want.fmt, 3, want.data.shape[1], 2, 64, "cpu", split=want.split)
        K.quantize_rows(pool.kv_fp16[:, kv], got, rows, src_rows=slots, rotation=pool.rotation,
                        k_center=pool.k_center if kv == 0 else None)
        bits = want.fmt.bits
        diff = (unpack_codes(got.codes(rows), bits).int() - unpack_codes(want.codes(rows), bits).int()).abs()
        assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 0.01
        for a, b in ((got.scale, want.scale), (got.zero, want.zero)):
            assert torch.allclose(a[:, rows].float(), b[:, rows].float(), rtol=2e-3, atol=1e-4)  # ~1 fp16 ulp
        assert rel_err(got.read(rows), want.read(rows)) < 0.1  # a code step at most, on a few values


def test_quantize_clip_search_matches_torch_choice():
    k, _ = synthetic_kv(64, 2, 64, seed=3)
    fmt = QuantFormat(2, 32, clip_search=True)
    got, want = K.quantize(k, fmt), quantize(k, fmt)
    same = (got.scale == want.scale) & (got.zero == want.zero)
    assert float(same.float().mean()) > 0.98  # a group may differ only when two candidates tie to rounding
    err_k = (dequantize(got, fmt) - k).square().sum()
    err_t = (dequantize(want, fmt) - k).square().sum()
    assert float(err_k) <= float(err_t) * 1.001


def test_input_validation_errors(monkeypatch):
    case = build_case([6], seed=2)
    view = case.view
    q = request_queries(case, 2)
    args = (case.kv_indptr, case.kv_indices, 0.1)
    with pytest.raises(ValueError, match="q must be 3-D"):
        K.decode_attention(q[0], view, *args)
    with pytest.raises(ValueError, match="dtype"):
        K.decode_attention(q.to(torch.int32), view, *args)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        K.decode_attention(q[:, :3], view, *args)
    with pytest.raises(ValueError, match="expected cpu"):
        K.decode_attention(q.to("meta"), view, *args)
    with pytest.raises(ValueError, match="B \\+ 1"):
        K.decode_attention(q, view, torch.tensor([0, 3, 6]), case.kv_indices, 0.1)
    with pytest.raises(ValueError, match="kv_indices has dtype"):
        K.decode_attention(q, view, case.kv_indptr, case.kv_indices.float(), 0.1)
    with pytest.raises(ValueError, match="out has shape"):
        K.decode_attention(q, view, *args, out=q[:, :2])
    with pytest.raises(ValueError, match="workspace"):
        K.decode_attention(q, view, *args, num_kv_splits=4, workspace=K.DecodeWorkspace.allocate(1, 4, 64, 2, "cpu"))
    with pytest.raises(ValueError, match="partition"):
        other = K.partition_by_tier(torch.tensor([0, 3]), case.kv_indices[:3], view)
        K.decode_attention(q, view, *args, partition=other)
    odd = TieredLayerKV(torch.zeros(4, 2, 72), torch.zeros(4, 2, 72), None, None, 4, 4, None, torch.zeros(2, 72))
    with pytest.raises(ValueError, match="head_dim 72"):
        K.decode_attention(torch.zeros(1, 2, 72), odd, torch.tensor([0, 1]), torch.tensor([1]), 0.1)
    with pytest.raises(ValueError, match="k_new"):
        K.extend_attention(q, q[:, :2, :32], q[:, :2], view, torch.tensor([0, 1]), case.kv_indptr,
                           case.kv_indices, 0.1)
    fmt = QuantFormat(4, 64)
    wrong = PackedPart.zeros(QuantFormat(8, 64), 1, 3, 2, 64, "cpu")  # 64 code bytes per head where INT4 has 32
    with pytest.raises(ValueError, match="dst.data has shape"):
        K.quantize_rows(torch.zeros(1, 3, 2, 64), type(wrong)(fmt, wrong.data, wrong.scale, wrong.zero), torch.arange(3))
    with pytest.raises(ValueError, match="no data_b"):
        K.quantize_rows(torch.zeros(1, 3, 2, 64), type(wrong)(fmt, wrong.data[..., :16], wrong.scale, wrong.zero),
                        torch.arange(3))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="need a CUDA device"):
        K.decode_attention(q, view, *args)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # SGLang's kernel computes NaN in padded head rows
def test_benchmark_smoke_mode(capsys):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "kernels.py"
    spec = importlib.util.spec_from_file_location("fade_bench_kernels", path)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)
    rows = bench.main(["--smoke"])
    impls = {r.impl for r in rows if r.time_ms is not None}
    assert {"fade-int4", "fade-int2", "fade-mix", "fade-fp16"} <= impls
    assert "fade-mix" in capsys.readouterr().out
