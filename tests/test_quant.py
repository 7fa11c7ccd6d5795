"""Packed formats: bit-exact packing, round-trip error vs an fp64 reference, clip search, errors."""

from __future__ import annotations

import pytest
import torch

from fade_sglang.quant import QuantFormat, QuantizedKV, dequantize, pack_codes, quantize, unpack_codes
from fade_sglang.eval.synthetic import synthetic_kv


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_unpack_is_bit_exact(bits: int) -> None:
    gen = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (7, 3, 128), generator=gen, dtype=torch.int64).to(torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (7, 3, 128 * bits // 8)
    assert torch.equal(unpack_codes(packed, bits), codes)


def test_planar_layout_matches_documented_bit_positions() -> None:
    # INT4, D=4: byte j holds channel j (low nibble) and channel j + 2 (high nibble).
    codes = torch.tensor([[1, 2, 3, 4]], dtype=torch.uint8)
    assert pack_codes(codes, 4).tolist() == [[1 | (3 << 4), 2 | (4 << 4)]]
    # INT2, D=8: byte j holds channels j, j+2, j+4, j+6 at bit offsets 0, 2, 4, 6.
    codes2 = torch.tensor([[0, 1, 2, 3, 3, 2, 1, 0]], dtype=torch.uint8)
    assert pack_codes(codes2, 2).tolist() == [[0 | (2 << 2) | (3 << 4) | (1 << 6), 1 | (3 << 2) | (2 << 4) | (0 << 6)]]
    # 3-bit, D=8: the low 2 bits as the INT2 row above, then one byte with the high bit of channel p at bit p.
    codes3 = torch.tensor([[4, 5, 6, 7, 3, 2, 1, 0]], dtype=torch.uint8)
    assert pack_codes(codes3, 3).tolist() == [pack_codes(codes2, 2).tolist()[0] + [0b1111]]


def _fp64_reference_roundtrip(x: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Independent fp64 asymmetric min/max quantizer (no packing) with fp16-rounded scale/zero."""
    g = x.double().reshape(*x.shape[:-1], -1, group)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    zero = lo.half().double()
    scale = ((hi - zero) / (2**bits - 1)).half().double()
    q = torch.round((g - zero) / scale.clamp_min(1e-30)).clamp(0, 2**bits - 1)
    return (zero + q * scale).reshape(x.shape)


@pytest.mark.parametrize("bits,group", [(8, 128), (4, 128), (4, 64), (4, 32), (3, 64), (3, 32), (2, 32), (2, 128)])
def test_roundtrip_matches_fp64_reference_and_error_bound(bits: int, group: int) -> None:
    k, _ = synthetic_kv(256, 4, 128, seed=3)
    fmt = QuantFormat(bits, group)
    q = quantize(k, fmt)
    got = dequantize(q, fmt, torch.float64)
    ref = _fp64_reference_roundtrip(k, bits, group)
    # Same codes as the independent reference except at exact rounding ties (float32 vs float64 math).
    mismatch = (got - ref).abs() > 1e-3 * ref.abs().clamp_min(1)
    assert mismatch.float().mean() < 1e-3
    # Asymmetric rounding error is at most half a step per element.
    step = q.scale.double().repeat_interleave(group, -1)
    assert ((got - k.double()).abs() <= step / 2 + 1e-3).all()
    # Storage: codes + fp16 scale + fp16 zero per group.
    assert fmt.bytes_per_token_head(128) == 128 * bits // 8 + 4 * (128 // group)


def test_clip_search_lowers_error_at_two_bits() -> None:
    x = torch.randn(512, 8, 128, generator=torch.Generator().manual_seed(0))
    plain, clipped = QuantFormat(2, 32), QuantFormat(2, 32, clip_search=True)
    err_plain = (dequantize(quantize(x, plain), plain) - x).square().sum()
    err_clip = (dequantize(quantize(x, clipped), clipped) - x).square().sum()
    assert err_clip < 0.85 * err_plain


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_accepts_model_dtypes_and_constant_groups(dtype: torch.dtype) -> None:
    x = torch.randn(4, 2, 64, generator=torch.Generator().manual_seed(1)).to(dtype)
    x[0] = 3.0  # constant vector: zero range must not divide by zero
    fmt = QuantFormat(4, 64)
    y = dequantize(quantize(x, fmt), fmt, dtype)
    assert y.dtype == dtype and torch.isfinite(y.float()).all()
    assert torch.allclose(y[0].float(), torch.full_like(y[0].float(), 3.0))


def test_bad_formats_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="bits must be one of"):
        QuantFormat(5, 32)
    with pytest.raises(ValueError, match="group_size must be positive"):
        QuantFormat(4, 0)
    with pytest.raises(ValueError, match="2-bit packing"):
        quantize(torch.randn(2, 66), QuantFormat(2, 32))
    with pytest.raises(ValueError, match="multiple of 8 \\(3-bit packing\\)"):
        quantize(torch.randn(2, 68), QuantFormat(3, 4))


@pytest.mark.parametrize("head_dim,group,expect", [(80, 64, 16), (96, 64, 32), (256, 64, 64), (64, 128, 64)])
def test_group_falls_back_for_non_power_of_two_head_dims(head_dim: int, group: int, expect: int) -> None:
    fmt = QuantFormat(4, group)
    assert fmt.group_size_for(head_dim) == expect
    x = torch.randn(3, 2, head_dim, generator=torch.Generator().manual_seed(head_dim))
    q = quantize(x, fmt)
    assert q.scale.shape[-1] == head_dim // expect and isinstance(q, QuantizedKV)
    assert ((dequantize(q, fmt) - x).norm() / x.norm()) < 0.1


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_stored_scale_is_clamped_where_it_is_computed(bits: int) -> None:
    """Constant groups (zero range) and huge ranges store a normal, finite fp16 scale, and decode exactly
    (constant) or finitely (huge)."""
    fmt = QuantFormat(bits, 32)
    x = torch.full((3, 2, 64), 1.5)
    x[1] = -7.0
    x[2, :, 32:] = 6.0e4
    x[2, :, :32] = -6.0e4
    q = quantize(x, fmt)
    assert bool((q.scale.float() >= torch.finfo(torch.float16).tiny).all())
    assert bool(torch.isfinite(q.scale.float()).all())
    out = dequantize(q, fmt)
    assert torch.equal(out[:2], x[:2])
    assert bool(torch.isfinite(out).all())
