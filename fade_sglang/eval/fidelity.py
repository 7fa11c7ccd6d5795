"""Fidelity report: every KV format on the same seeded synthetic data, against an fp64 reference.

    python -m fade_sglang.eval.fidelity            # table
    python -m fade_sglang.eval.fidelity --json     # {"formats": [...]}

Rows: ``fp16``; the project's tiers (``tier-int4*``, ``tier-int2*``, including
``tier-int2-via-int4`` which measures the INT4 -> INT2 demotion path that goes
through INT4 values); and anchors computed in the same run on the same data:
``kivi-int4`` / ``kivi-int2`` (K per channel over 32-token groups, V per token
over 32-channel groups, asymmetric) and ``symmetric-per-channel-int4``.
Bytes include scales and zeros (fp16 each).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from typing import Callable

import torch

from ..config import FadeConfig
from ..quant import QuantFormat, dequantize, quantize, rotation_matrix
from .synthetic import correlated_queries, synthetic_kv

__all__ = ["FidelityRow", "fidelity_report", "main"]

KVI_GROUP = 32  # KIVI's group size (tokens for K, channels for V)
CENTER_CALIBRATION_TOKENS = 256  # tokens seen before the first demotion freezes the key center


@dataclass
class FidelityRow:
    name: str
    bits: float
    bytes_per_token_head: float
    compression: float
    k_rel_err: float
    v_rel_err: float
    attn_out_rel_err: float


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref).norm() / ref.norm())


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """fp64 GQA attention of queries ``[nq, Hq, D]`` over all tokens ``[T, Hkv, D]``."""
    group = q.shape[1] // k.shape[1]
    kk = k.double().repeat_interleave(group, 1)
    vv = v.double().repeat_interleave(group, 1)
    probs = (torch.einsum("qhd,thd->qht", q.double(), kk) / q.shape[-1] ** 0.5).softmax(-1)
    return torch.einsum("qht,thd->qhd", probs, vv)


# ----------------------------------------------------------------------------- tier formats
@dataclass(frozen=True)
class TierVariant:
    """How a tier stores KV: format, rotation, and K centering (as TieredKVPool does it), one format for K and
    V: the pool's separate key bits and key clipping are not modelled here (synthetic data; the real-model
    measurements are :mod:`.sensitivity` and :mod:`.doc_qa`)."""

    fmt: QuantFormat
    rotate: bool = True
    center_keys: bool = True


def _to_space(x: torch.Tensor, rot: torch.Tensor | None, center: torch.Tensor | None) -> torch.Tensor:
    y = x @ rot if rot is not None else x
    return y - center if center is not None else y


def _from_space(y: torch.Tensor, rot: torch.Tensor | None, center: torch.Tensor | None) -> torch.Tensor:
    y = y + center if center is not None else y
    return y @ rot.T if rot is not None else y


def _tier_kv(k: torch.Tensor, v: torch.Tensor, chain: list[TierVariant], rot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K, V after storage in ``chain[-1]``, reached through the earlier formats of ``chain`` (demotion path).

    The key center is frozen from the first CENTER_CALIBRATION_TOKENS tokens only, like the pool
    freezes it at its first demotion (it never sees the future).
    """
    first = chain[0]
    r = rot if first.rotate else None
    center = _to_space(k[:CENTER_CALIBRATION_TOKENS], r, None).mean(0) if first.center_keys else None
    out = []
    for x, c in ((k, center), (v, None)):
        y = _to_space(x, r, c)
        for variant in chain:  # each tier change quantizes once, from the previous tier's values
            y = dequantize(quantize(y, variant.fmt), variant.fmt)
        out.append(_from_space(y, r, c))
    return out[0], out[1]


# ----------------------------------------------------------------------------- anchors
def _asym_along(x: torch.Tensor, bits: int, dim: int, group: int) -> torch.Tensor:
    """Asymmetric min/max fake-quant with groups of ``group`` elements along ``dim`` (fp16 scale/zero)."""
    moved = x.movedim(dim, -1)
    n = moved.shape[-1]
    pad = (-n) % group
    padded = torch.nn.functional.pad(moved, (0, pad), mode="replicate") if pad else moved
    fmt = QuantFormat(bits, group)
    y = dequantize(quantize(padded, fmt), fmt)[..., :n]
    return y.movedim(-1, dim)


def _kivi(k: torch.Tensor, v: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _asym_along(k, bits, dim=0, group=KVI_GROUP), _asym_along(v, bits, dim=-1, group=KVI_GROUP)


def _symmetric_per_channel_int4(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    def fake(x: torch.Tensor, reduce_dim: int) -> torch.Tensor:
        scale = (x.abs().amax(reduce_dim, keepdim=True) / 7).to(torch.float16).float().clamp_min(1e-8)
        return torch.round(x / scale).clamp(-8, 7) * scale

    return fake(k, 0), fake(v, -1)


def _kivi_bytes(bits: int, d: int) -> float:
    # K: data + (scale, zero) per channel per 32 tokens; V: data + (scale, zero) per 32 channels.
    return d * bits / 8 + 4 * d / KVI_GROUP


# ----------------------------------------------------------------------------- report
def fidelity_report(
    num_tokens: int = 2048,
    num_kv_heads: int = 8,
    q_per_kv: int = 4,
    head_dim: int = 128,
    num_queries: int = 64,
    seed: int = 0,
    config: FadeConfig | None = None,
) -> list[FidelityRow]:
    k, v = synthetic_kv(num_tokens, num_kv_heads, head_dim, seed=seed)
    q = correlated_queries(k, q_per_kv, num_queries, seed=seed)
    ref_out = _attention(q, k.double(), v.double())
    config = config or FadeConfig()
    rot = rotation_matrix(head_dim, config.rotation_seed)
    fp16_bytes = 2.0 * head_dim

    def row(name: str, bits: float, nbytes: float, fn: Callable[[], tuple[torch.Tensor, torch.Tensor]]) -> FidelityRow:
        kh, vh = fn()
        return FidelityRow(
            name, bits, nbytes, fp16_bytes / nbytes,
            _rel(kh, k.double()), _rel(vh, v.double()), _rel(_attention(q, kh, vh), ref_out),
        )

    rows = [row("fp16", 16, fp16_bytes, lambda: (k.half().float(), v.half().float()))]
    for name, chain in tier_variants(config).items():
        rows.append(row(name, chain[-1].fmt.bits, chain[-1].fmt.bytes_per_token_head(head_dim),
                        lambda chain=chain: _tier_kv(k, v, chain, rot)))
    for bits in (4, 2):
        rows.append(row(f"kivi-int{bits}", bits, _kivi_bytes(bits, head_dim), lambda bits=bits: _kivi(k, v, bits)))
    sym_bytes = head_dim / 2 + (2 + 2 * head_dim / num_tokens) / 2  # V: 2 B/token; K: 2 B/channel amortized
    rows.append(row("symmetric-per-channel-int4", 4, sym_bytes, lambda: _symmetric_per_channel_int4(k, v)))
    return rows


def tier_variants(config: FadeConfig) -> dict[str, list[TierVariant]]:
    """The configured tiers (first row of each kind) plus ablations that show what each choice buys."""
    warm = TierVariant(config.warm_format, config.rotation, config.center_keys)
    cold = TierVariant(config.cold_format, config.rotation, config.center_keys)

    def tag(v: TierVariant) -> str:
        parts = [f"g{v.fmt.group_size}", "rot" if v.rotate else "norot"]
        parts += ["ctr"] if v.center_keys else []
        parts += ["clip"] if v.fmt.clip_search else []
        return "-".join(parts)

    def variant(bits: int, group: int, rotate: bool = True, center: bool = True, clip: bool = True) -> TierVariant:
        return TierVariant(QuantFormat(bits, group, clip), rotate, center)

    ablations = [variant(4, 128), variant(4, 64, center=False, clip=False), variant(4, 128, rotate=False, center=False, clip=False),
                 variant(2, 64), variant(2, 32, center=False), variant(2, 32, rotate=False, center=False)]
    out: dict[str, list[TierVariant]] = {}
    for v in [warm, cold] + ablations:
        out.setdefault(f"tier-int{v.fmt.bits}-{tag(v)}", [v])
    out[f"tier-int{cold.fmt.bits}-via-int{warm.fmt.bits}-{tag(cold)}"] = [warm, cold]
    return out


def _print_table(rows: list[FidelityRow], file=sys.stdout) -> None:
    cols = ("name", "bits", "B/tok/head", "compress", "k_rel_err", "v_rel_err", "attn_out_rel_err")
    print(f"{cols[0]:<38}{cols[1]:>5}{cols[2]:>12}{cols[3]:>10}{cols[4]:>11}{cols[5]:>11}{cols[6]:>18}", file=file)
    for r in rows:
        print(f"{r.name:<38}{r.bits:>5g}{r.bytes_per_token_head:>12.1f}{r.compression:>9.2f}x"
              f"{r.k_rel_err:>11.4f}{r.v_rel_err:>11.4f}{r.attn_out_rel_err:>18.4f}", file=file)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fade_sglang.eval.fidelity", description=__doc__.split("\n")[0])
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--q-per-kv", type=int, default=4, help="GQA ratio (query heads per KV head)")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    for name in ("tokens", "kv_heads", "q_per_kv", "head_dim"):
        if getattr(a, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    try:
        rows = fidelity_report(a.tokens, a.kv_heads, a.q_per_kv, a.head_dim, seed=a.seed)
    except ValueError as e:
        p.error(str(e))
    if a.json:
        print(json.dumps({"formats": [r.__dict__ for r in rows]}, indent=2))
    else:
        _print_table(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
