"""Torch reference attention over the tiered pool (the kernels' oracle and the CPU serving path).

Also home of the mixed-tier test-case builder that tests/test_kernels.py imports:
pools are built through TieredKVPool (the real slot layout, real demotions) and
filled with fade_sglang.eval.synthetic data (outlier channels in K, peaked queries).

Oracles: an independent float64 dense attention (GQA by repeat_interleave) over
the original, unquantized K/V for fp16-only slots, and over ``gather_kv`` values
(the dequantized math every reader must reproduce) for packed slots.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch

if not torch.cuda.is_available():
    # Before sglang pulls in triton: on a CPU-only machine the interpreter is triton's only mode, and
    # tests/test_kernels.py (collected after this module) needs it bound from the first import.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fade_sglang.attention import attend, decode_attention_ref, extend_attention_ref
from fade_sglang.config import FadeConfig
from fade_sglang.pool.layout import Tier
from fade_sglang.patches.pool import TieredKVPool
from fade_sglang.pool.view import gather_kv
from fade_sglang.eval.synthetic import correlated_queries, synthetic_kv

# tier_max_share per case: a share of 0 disables that packed tier.
SHARES = {
    "all": {"warm": 1.0, "cold": 1.0},
    "no_cold": {"warm": 1.0, "cold": 0.0},
    "no_warm": {"warm": 0.0, "cold": 1.0},
    "fp16_only": {"warm": 0.0, "cold": 0.0},
}


class _Layer:
    layer_id = 0


# ---------------------------------------------------------------------------- case builder (shared)


@dataclass
class Case:
    pool: TieredKVPool
    k: torch.Tensor  # float32 [N, Hkv, D] original (unquantized) keys of every token
    v: torch.Tensor
    slots: torch.Tensor  # int64 [N] current slot of every token (any tier)
    tokens: list[torch.Tensor]  # per request: token ids in kv_indices order
    kv_indptr: torch.Tensor
    kv_indices: torch.Tensor

    @property
    def view(self):
        return self.pool.layer_view(0)


def build_pool(num_tokens: int, head_dim: int, kv_heads: int, dtype: torch.dtype, shares: str = "all",
               room: int = 2, **cfg: object) -> TieredKVPool:
    config = FadeConfig(tier_max_share=dict(SHARES[shares]), **cfg)
    # Room for every token in fp16 and, as free pages, for the packed copies one demotion writes
    # before it frees the fp16 rows it read (tiers share the arena's pages); protected layers' bigger
    # pages leave fewer tokens in the same bytes, so their cases ask for more ``room``.
    size = room * num_tokens + 64
    return TieredKVPool(size, 1, dtype, kv_heads, head_dim, 1, "cpu", False, fade_config=config)


def populate(pool: TieredKVPool, num_tokens: int, seed: int, warm: float, cold: float
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Write ``num_tokens`` synthetic tokens (fp16 tier), then demote random fractions to warm / cold.

    A third of the cold tokens go through warm first (the warm -> cold path).
    """
    k, v = synthetic_kv(num_tokens, pool.head_num, pool.head_dim, seed=seed)
    slots = pool.alloc(num_tokens)
    pool.set_kv_buffer(_Layer, slots, k.to(pool.dtype), v.to(pool.dtype))
    gen = torch.Generator().manual_seed(seed + 1)
    perm = torch.randperm(num_tokens, generator=gen)
    warm_on, cold_on = pool.fade_config.warm_enabled, pool.fade_config.cold_enabled
    n_warm = int(round(warm * num_tokens)) if warm_on else 0
    n_cold = int(round(cold * num_tokens)) if cold_on else 0
    to_warm, to_cold = perm[:n_warm], perm[n_warm:n_warm + n_cold]
    via_warm = to_cold[: len(to_cold) // 3] if warm_on else to_cold[:0]
    if len(to_warm) + len(via_warm):
        both = torch.cat((to_warm, via_warm))
        slots[both] = pool.demote(slots[both], Tier.WARM)
    if len(to_cold):
        slots[to_cold] = pool.demote(slots[to_cold], Tier.COLD)
    return k, v, slots


def build_case(lens: list[int], head_dim: int = 64, kv_heads: int = 2, dtype: torch.dtype = torch.float32,
               shares: str = "all", warm: float = 0.45, cold: float = 0.3, seed: int = 0, room: int = 2,
               **cfg: object) -> Case:
    """Requests of ``lens`` tokens over a shared pool; each request's kv_indices are shuffled (tiers mixed)."""
    n = sum(lens)
    pool = build_pool(n, head_dim, kv_heads, dtype, shares, room, **cfg)
    k, v, slots = populate(pool, n, seed, warm, cold)
    gen = torch.Generator().manual_seed(seed + 2)
    tokens, start = [], 0
    for length in lens:
        tokens.append(start + torch.randperm(length, generator=gen))
        start += length
    indptr = torch.tensor([0] + lens).cumsum(0)
    indices = slots[torch.cat(tokens)] if n else torch.zeros(0, dtype=torch.int64)
    return Case(pool, k, v, slots, tokens, indptr, indices)


def request_queries(case: Case, group: int, seed: int = 0, per_request: int = 1) -> torch.Tensor:
    """Queries aimed at a few keys of each request (random for empty requests): [B * per_request, Hq, D]."""
    qs = []
    for b, toks in enumerate(case.tokens):
        if len(toks):
            qs.append(correlated_queries(case.k[toks], group, per_request, seed=seed + b))
        else:
            gen = torch.Generator().manual_seed(seed + b)
            qs.append(torch.randn(per_request, case.k.shape[1] * group, case.k.shape[2], generator=gen))
    return torch.cat(qs)


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float) -> torch.Tensor:
    """Independent float64 oracle: ``m`` queries over ``n`` keys, the last ``m`` keys being the queries' own (causal)."""
    q, k, v = q.double(), k.double(), v.double()
    m, hq, _ = q.shape
    n = k.shape[0]
    if n == 0:
        return torch.zeros_like(q)
    group = hq // k.shape[1]
    kx, vx = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    s = torch.einsum("mhd,nhd->hmn", q, kx) * sm_scale
    visible = torch.arange(n)[None, :] <= (n - m + torch.arange(m))[:, None]
    s = s.masked_fill(~visible, float("-inf"))
    return torch.einsum("hmn,nhd->mhd", torch.softmax(s, dim=-1), vx)


def dense_decode(q: torch.Tensor, case: Case, sm_scale: float, dequantized: bool) -> torch.Tensor:
    """Per-request float64 decode oracle over original K/V, or over gather_kv (dequantized) values."""
    out = torch.zeros(q.shape, dtype=torch.float64)
    for b, toks in enumerate(case.tokens):
        if dequantized:
            k, v = gather_kv(case.view, case.slots[toks])
        else:
            k, v = case.k[toks], case.v[toks]
        out[b:b + 1] = dense_attention(q[b:b + 1], k, v, sm_scale)
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12))


# ---------------------------------------------------------------------------- tests


def test_attend_matches_dense_oracle_causal_gqa():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(5, 8, 16, generator=gen, dtype=torch.float64)
    k = torch.randn(9, 2, 16, generator=gen, dtype=torch.float64)
    v = torch.randn(9, 2, 16, generator=gen, dtype=torch.float64)
    assert rel_err(attend(q, k, v, 0.3), dense_attention(q, k, v, 0.3)) < 1e-12
    assert torch.equal(attend(q[:0], k, v, 0.3), q[:0])
    with pytest.raises(ValueError, match="at least as many keys"):
        attend(q, k[:3], v[:3], 0.3)


@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode_ref_fp16_tier_matches_original_kv(group, dtype):
    case = build_case([1, 23, 0, 40], head_dim=64, dtype=dtype, shares="fp16_only", seed=group)
    assert case.view.warm is None and case.view.cold is None
    q = request_queries(case, group)
    scale = 64 ** -0.5
    out = decode_attention_ref(q, case.view, case.kv_indptr, case.kv_indices, scale)
    oracle = dense_decode(q.double(), case, scale, dequantized=False)
    # fp32 pool: the fp16 tier holds the originals exactly; fp16 pool: storage rounding only.
    assert rel_err(out, oracle) < (1e-5 if dtype == torch.float32 else 5e-3)
    assert torch.equal(out[2], torch.zeros_like(out[2]))  # empty request
    out64 = decode_attention_ref(q.double(), case.view, case.kv_indptr, case.kv_indices, scale,
                                 compute_dtype=torch.float64)
    assert out64.dtype == torch.float64
    if dtype == torch.float32:
        assert rel_err(out64, oracle) < 1e-12


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 4])
def test_decode_ref_mixed_tiers(head_dim, group):
    case = build_case([3, 50, 1], head_dim=head_dim, seed=7)
    tiers = case.pool.tier_of(case.kv_indices)
    assert {0, 1, 2} <= set(tiers.tolist())
    q = request_queries(case, group)
    scale = head_dim ** -0.5
    out = decode_attention_ref(q, case.view, case.kv_indptr, case.kv_indices, scale)
    assert rel_err(out, dense_decode(q.double(), case, scale, dequantized=True)) < 1e-5
    # The packed slots really are read compressed (no bypass), and stay in the neighbourhood of the
    # unquantized attention (a sanity bound only; quality is the fidelity report's job).
    exact = dense_decode(q.double(), case, scale, dequantized=False)
    frob = float((out.double() - exact).norm() / exact.norm())
    assert 1e-4 < frob < 0.3
    # Order of kv_indices within a request does not matter.
    rev = torch.cat([case.kv_indices[case.kv_indptr[b]:case.kv_indptr[b + 1]].flip(0) for b in range(3)])
    assert rel_err(decode_attention_ref(q, case.view, case.kv_indptr, rev, scale), out) < 1e-6


@pytest.mark.parametrize("shares", ["no_cold", "no_warm"])
def test_decode_ref_with_an_empty_tier(shares):
    case = build_case([30, 11], shares=shares, seed=3)
    q = request_queries(case, 2)
    out = decode_attention_ref(q, case.view, case.kv_indptr, case.kv_indices, 0.125)
    assert rel_err(out, dense_decode(q.double(), case, 0.125, dequantized=True)) < 1e-5


def _extend_inputs(case: Case, new_lens: list[int], group: int, seed: int = 5):
    """New chunks per request (fresh synthetic K/V) and queries aimed at prefix + chunk keys."""
    heads, d = case.k.shape[1], case.k.shape[2]
    kn, vn = synthetic_kv(sum(new_lens), heads, d, seed=seed)
    qs, start = [], 0
    for b, m in enumerate(new_lens):
        keys = torch.cat((case.k[case.tokens[b]], kn[start:start + m]))
        qs.append(correlated_queries(keys, group, m, seed=seed + b))
        start += m
    qo = torch.tensor([0] + new_lens).cumsum(0)
    return torch.cat(qs), kn, vn, qo


def dense_extend(q, kn, vn, qo, case: Case, sm_scale: float, dequantized: bool) -> torch.Tensor:
    out = torch.zeros(q.shape, dtype=torch.float64)
    for b, toks in enumerate(case.tokens):
        q0, q1 = int(qo[b]), int(qo[b + 1])
        pk, pv = gather_kv(case.view, case.slots[toks]) if dequantized else (case.k[toks], case.v[toks])
        out[q0:q1] = dense_attention(q[q0:q1], torch.cat((pk.double(), kn[q0:q1].double())),
                                     torch.cat((pv.double(), vn[q0:q1].double())), sm_scale)
    return out


@pytest.mark.parametrize("group", [1, 4, 8])
def test_extend_ref_fp16_prefix_matches_original_kv(group):
    case = build_case([0, 17, 5], shares="fp16_only", seed=11)
    q, kn, vn, qo = _extend_inputs(case, [6, 1, 9], group)
    out = extend_attention_ref(q, kn, vn, case.view, qo, case.kv_indptr, case.kv_indices, 0.125)
    assert rel_err(out, dense_extend(q, kn, vn, qo, case, 0.125, dequantized=False)) < 1e-5


@pytest.mark.parametrize("head_dim", [64, 128])
def test_extend_ref_mixed_prefix(head_dim):
    case = build_case([40, 0, 9], head_dim=head_dim, seed=13)
    q, kn, vn, qo = _extend_inputs(case, [3, 4, 1], 4)
    out = extend_attention_ref(q, kn, vn, case.view, qo, case.kv_indptr, case.kv_indices, 0.1)
    assert rel_err(out, dense_extend(q, kn, vn, qo, case, 0.1, dequantized=True)) < 1e-5


def test_extend_of_one_token_equals_decode_over_prefix_plus_token():
    case = build_case([25, 8], seed=17)
    q, kn, vn, qo = _extend_inputs(case, [1, 1], 2)
    ext = extend_attention_ref(q, kn, vn, case.view, qo, case.kv_indptr, case.kv_indices, 0.2)
    new_slots = case.pool.alloc(2)
    case.pool.set_kv_buffer(_Layer, new_slots, kn, vn)
    indices = torch.cat((case.kv_indices[:25], new_slots[:1], case.kv_indices[25:], new_slots[1:]))
    dec = decode_attention_ref(q, case.view, torch.tensor([0, 26, 35]), indices, 0.2)
    assert rel_err(ext, dec) < 1e-6


def test_reference_input_errors():
    case = build_case([4], seed=1)
    q = request_queries(case, 2)
    with pytest.raises(ValueError, match="head_dim"):
        decode_attention_ref(q[..., :32], case.view, case.kv_indptr, case.kv_indices, 0.1)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        decode_attention_ref(q[:, :3], case.view, case.kv_indptr, case.kv_indices, 0.1)
    with pytest.raises(ValueError, match="B \\+ 1"):
        decode_attention_ref(q, case.view, torch.tensor([0, 2, 4]), case.kv_indices, 0.1)
    with pytest.raises(ValueError, match="k_new"):
        extend_attention_ref(q, q[:, :1], q[:, :2], case.view, torch.tensor([0, 1]), case.kv_indptr,
                             case.kv_indices, 0.1)
