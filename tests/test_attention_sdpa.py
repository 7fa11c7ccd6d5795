"""The CPU serving attention (``fade_sglang.attention.sdpa``) against SGLang's own ``torch_native`` code
and against the float64 oracle.

Bit-identity with SGLang 0.5.23's ``TorchNativeAttnBackend`` for KV held entirely at full precision is
what makes fade's "control" (nothing compressed) indistinguishable from plain SGLang, so that every
quality difference measured on a real model is the compression's.
"""

from __future__ import annotations

import types

import pytest
import torch

from fade_sglang.attention.sdpa import decode_attention_sdpa, extend_attention_sdpa
from test_attention_reference import (_extend_inputs, build_case, dense_decode, dense_extend, rel_err,
                                      request_queries)

torch_native = pytest.importorskip("sglang.srt.layers.attention.torch_native_backend")


def _req_to_token(case) -> tuple[torch.Tensor, torch.Tensor]:
    """A req_to_token table holding each request's slots (row b = request b) and the request lengths."""
    lens = (case.kv_indptr[1:] - case.kv_indptr[:-1]).to(torch.int64)
    table = torch.zeros(len(lens), max(1, int(lens.max())) + 16, dtype=torch.int32)
    for b in range(len(lens)):
        table[b, :lens[b]] = case.kv_indices[case.kv_indptr[b]:case.kv_indptr[b + 1]].to(torch.int32)
    return table, lens


def _sglang(method: str, *args, **kwargs) -> None:
    fake_self = types.SimpleNamespace(_make_sliding_window_mask=None)
    getattr(torch_native.TorchNativeAttnBackend, method)(fake_self, *args, **kwargs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("group", [1, 3])
def test_decode_is_bit_identical_to_sglang_torch_native_at_full_precision(dtype, group):
    case = build_case([37, 1, 300, 64], head_dim=64, kv_heads=3, dtype=dtype, shares="fp16_only", seed=group)
    q = request_queries(case, group).to(dtype)
    table, lens = _req_to_token(case)
    want = torch.empty_like(q)
    _sglang("_run_sdpa_forward_decode", q, want, case.view.k_fp16, case.view.v_fp16, table,
            torch.arange(len(lens)), lens, scaling=0.125, enable_gqa=group > 1, causal=False)
    got = decode_attention_sdpa(q, case.view, case.kv_indptr, case.kv_indices, 0.125)
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_extend_is_bit_identical_to_sglang_torch_native_at_full_precision(dtype):
    case = build_case([40, 0, 129], head_dim=64, kv_heads=3, dtype=dtype, shares="fp16_only", seed=5)
    new_lens = [7, 12, 1]
    q, kn, vn, qo = _extend_inputs(case, new_lens, 3)
    q, kn, vn = q.to(dtype), kn.to(dtype), vn.to(dtype)
    # SGLang reads the new chunk back from the cache: write it there and extend each row.
    prefix_table, prefix_lens = _req_to_token(case)
    new_slots = case.pool.alloc(sum(new_lens))
    case.pool.set_kv_buffer(types.SimpleNamespace(layer_id=0), new_slots, kn, vn)
    table = torch.zeros(3, prefix_table.shape[1] + 16, dtype=torch.int32)
    for b in range(3):
        p, m = int(prefix_lens[b]), new_lens[b]
        table[b, :p] = prefix_table[b, :p]
        table[b, p:p + m] = new_slots[int(qo[b]):int(qo[b + 1])].to(torch.int32)
    want = torch.empty_like(q)
    _sglang("_run_sdpa_forward_extend", q, want, case.view.k_fp16, case.view.v_fp16, table, torch.arange(3),
            prefix_lens + torch.tensor(new_lens), prefix_lens, torch.tensor(new_lens), scaling=0.125,
            enable_gqa=True, causal=True)
    got = extend_attention_sdpa(q, kn, vn, case.view, qo, case.kv_indptr, case.kv_indices, 0.125)
    assert torch.equal(got, want)


@pytest.mark.parametrize("group", [1, 4])
def test_decode_over_mixed_tiers_matches_float64_oracle(group):
    case = build_case([3, 50, 0, 1], head_dim=64, seed=7)
    assert {0, 1, 2} <= set(case.pool.tier_of(case.kv_indices).tolist())
    q = request_queries(case, group)
    out = decode_attention_sdpa(q, case.view, case.kv_indptr, case.kv_indices, 0.125)
    assert rel_err(out, dense_decode(q.double(), case, 0.125, dequantized=True)) < 1e-5
    assert torch.equal(out[2], torch.zeros_like(out[2]))  # a request with no slots
    with pytest.raises(ValueError, match="B \\+ 1"):
        decode_attention_sdpa(q, case.view, torch.tensor([0, 2, 4]), case.kv_indices, 0.1)


def test_extend_over_mixed_prefix_matches_float64_oracle():
    case = build_case([40, 0, 9], head_dim=128, seed=13)
    q, kn, vn, qo = _extend_inputs(case, [3, 4, 1], 4)
    out = extend_attention_sdpa(q, kn, vn, case.view, qo, case.kv_indptr, case.kv_indices, 0.1)
    assert rel_err(out, dense_extend(q, kn, vn, qo, case, 0.1, dequantized=True)) < 1e-5
