"""The sensitivity diagnostic compresses exactly the part of the history it names, through fade's store."""

from __future__ import annotations

import pytest
import torch

from fade_sglang.config import FadeConfig
from fade_sglang.eval.sensitivity import (Variant, compress_history, diagnostic_base, heavy_hitter_variants,
                                          key_clip_variants, per_channel_variants, protected_variants,
                                          recommend_protected_layers, standard_variants, VariantResult)
from fade_sglang.eval.synthetic import synthetic_kv


def _history(layers: int = 3, heads: int = 2, n: int = 80, dim: int = 64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for l in range(layers):
        k, v = synthetic_kv(n, heads, dim, seed=l)
        out.append((k.transpose(0, 1).contiguous(), v.transpose(0, 1).contiguous()))  # [H, T, D] as HF caches
    return out


def test_compress_history_touches_only_the_named_layer_part_and_heads():
    kv = _history()
    cfg = FadeConfig.from_preset("safe")
    out = compress_history(kv, cfg, Variant("v of layer 1 head 0", layers=(1,), heads=(0,), parts="v"), keep_first=16)
    for l, ((k, v), (k2, v2)) in enumerate(zip(kv, out)):
        assert torch.equal(k, k2)
        if l != 1:
            assert torch.equal(v, v2)
    v, v2 = kv[1][1], out[1][1]
    assert torch.equal(v[:, :16], v2[:, :16])  # sinks stay exact
    assert torch.equal(v[1], v2[1])  # other head untouched
    err = float((v2[0, 16:] - v[0, 16:]).norm() / v[0, 16:].norm())
    assert 1e-3 < err < 0.2  # really quantized (INT4), and close
    # A layer quantized alone gets exactly the values it gets when every layer is quantized.
    alone = compress_history(kv, cfg, Variant("layer 1", layers=(1,)), keep_first=16)[1]
    together = compress_history(kv, cfg, Variant("all"), keep_first=16)[1]
    assert torch.equal(alone[0], together[0]) and torch.equal(alone[1], together[1])


def test_int2_is_coarser_than_int4_and_int8_finer():
    kv = _history(layers=1)
    cfg = FadeConfig()  # the knobs' defaults: INT4 warm, INT2 cold
    errs = {}
    for variant in (Variant("int8", (("warm_bits", 8),)), Variant("int4"), Variant("int2", tier="cold"),
                    Variant("k8v4", (("warm_key_bits", 8),))):
        (k2, v2), = compress_history(kv, variant.config(cfg), variant, keep_first=16)
        errs[variant.name] = float((k2 - kv[0][0]).norm() / kv[0][0].norm())
        errs[variant.name + " v"] = float((v2 - kv[0][1]).norm() / kv[0][1].norm())
    assert errs["int8"] < errs["int4"] / 8 and errs["int4"] < errs["int2"] / 2
    # keys at 8 bits in the k8v4 tier; its values are the INT4 tier's, bit for bit
    assert errs["k8v4"] < errs["int4"] / 8 and errs["k8v4 v"] == errs["int4 v"]
    assert len(standard_variants(30, 3, per_layer=True, per_head=True)) == 14 + 30 + 3


def test_protected_variant_goes_through_the_store_and_sharpens_only_those_layers():
    kv = _history(layers=3)
    base = FadeConfig.from_preset("aggressive")
    (variant,) = [v for v in protected_variants((1,)) if v.name == "int4 protect 1"]
    plain = compress_history(kv, base, Variant("int4"), keep_first=16)
    prot = compress_history(kv, variant.config(base), variant, keep_first=16)

    def err(out, l):
        return float((out[l][0] - kv[l][0]).norm() / kv[l][0].norm())

    assert err(prot, 1) < err(plain, 1) / 4  # 8-bit keys in the protected layer
    for l in (0, 2):  # the other layers are stored exactly as without protection
        assert torch.equal(prot[l][0], plain[l][0]) and torch.equal(prot[l][1], plain[l][1])


def test_heavy_hitters_keep_exactly_the_top_scored_tokens():
    kv = _history(layers=2, n=116)
    scores = torch.rand(116, generator=torch.Generator().manual_seed(0))
    scores[:16] = 10.0  # sinks are never counted: they stay exact anyway
    (variant,) = [v for v in heavy_hitter_variants() if v.name == "int4 keep top 5%"]
    out = compress_history(kv, FadeConfig(), variant, keep_first=16, scores=scores)
    top = 16 + scores[16:].topk(5).indices  # 5% of 100 history tokens
    for (k, v), (k2, v2) in zip(kv, out):
        same = (k2 == k).all(-1).all(0)  # [T]: positions every head kept exactly
        assert set(torch.nonzero(same[16:]).flatten().add(16).tolist()) == set(top.tolist())
        assert torch.equal(v2[:, top], v[:, top])
    with pytest.raises(ValueError, match="attention scores"):
        compress_history(kv, FadeConfig(), variant, keep_first=16)


@pytest.mark.parametrize("preset", ["safe", "balanced", "aggressive"])
def test_variant_names_are_their_formats_whatever_the_preset(preset):
    base = diagnostic_base(preset)
    variants = {v.name: v for v in standard_variants(4, 2, False, False) + protected_variants((1,)) + key_clip_variants()}

    def formats(name):
        cfg = variants[name].config(base)
        tier = variants[name].tier
        key, value = (cfg.warm_key_format, cfg.warm_format) if tier == "warm" else (cfg.cold_key_format, cfg.cold_format)
        return key.bits, value.bits

    assert formats("int4 kv") == formats("int4 protect 1") == (4, 4)
    assert formats("k8v4") == (8, 4) and formats("int2 kv") == (2, 2) and formats("k4v2") == (4, 2)
    assert formats("int8 kv") == (8, 8) and formats("k4v3") == (4, 3) and formats("int3 kv") == (3, 3)
    assert variants["k4v3"].config(base).cold_format.group_size == 64  # k4v2's bytes (group 32) in 3-bit values
    lists = [standard_variants(4, 2, False, False), protected_variants((1,)), key_clip_variants(),
             heavy_hitter_variants(), per_channel_variants()]
    for name in {v.name for vs in lists for v in vs}:  # a name shared by two lists is the same variant
        assert len({(v.config(base).to_json(), v.tier, v.parts, v.keep_top, v.key_channel_block)
                    for vs in lists for v in vs if v.name == name}) == 1, name
    assert formats("int4 keys clipped") == formats("int4 (k only)") == (4, 4) and formats("k4v2 keys clipped") == (4, 2)
    for name, v in variants.items():  # the key-clip pairs differ in that knob only, whatever the preset's default
        if "keys clipped" in name:
            plain = variants[name.replace(" keys clipped", "")]
            assert v.config(base).with_overrides({"key_clip_search": False}) == plain.config(base)
            assert v.config(base).warm_key_format.clip_search and not plain.config(base).warm_key_format.clip_search
            assert (v.tier, v.parts) == (plain.tier, plain.parts)


def test_per_channel_keys_quantize_along_tokens_and_follow_channel_outliers():
    from fade_sglang.eval.sensitivity import per_channel_keys
    from fade_sglang.quant import QuantFormat, dequantize, quantize

    k = _history(layers=1, n=150)[0][0]  # [H, T, D], outlier channels; 150 tokens: a ragged last block
    fmt = QuantFormat(4, 64)
    pc = per_channel_keys(k, fmt, 64)
    assert pc.shape == k.shape
    per_token = dequantize(quantize(k, fmt), fmt)
    err = lambda x: float((x - k).norm() / k.norm())  # noqa: E731
    assert 0 < err(pc) < err(per_token) / 2  # a channel's own range, not the outlier channel's
    for b in (0, 1):  # each (block, channel) group spans its tokens' range: min and max come back (fp16 scale / zero)
        blk = k[:, 64 * b:64 * (b + 1)]
        got = pc[:, 64 * b:64 * (b + 1)]
        assert torch.allclose(got.amax(1), blk.amax(1), rtol=2e-3, atol=5e-3)
        assert torch.allclose(got.amin(1), blk.amin(1), rtol=2e-3, atol=5e-3)
    kv = _history()
    v = next(v for v in per_channel_variants() if v.name == "int4 per-channel b64 (k only)")
    out = compress_history(kv, diagnostic_base("safe"), v, keep_first=16)
    for (k0, v0), (k1, v1) in zip(kv, out):
        assert torch.equal(v0, v1) and torch.equal(k0[:, :16], k1[:, :16])
        assert torch.allclose(k1[:, 16:], per_channel_keys(k0[:, 16:], QuantFormat(4, 64), 64))


def _per_layer(deltas: list[float]) -> list[VariantResult]:
    return [VariantResult("int4 kv", sum(deltas), 0.0, 0, 6)] + [
        VariantResult(f"int4 layer {l}", d, 0.0, 0, 6) for l, d in enumerate(deltas)]


def test_recommended_layers_are_the_few_that_dominate_and_none_when_the_error_is_spread():
    # SmolLM2's measured shape (benchmarks/RESULTS.md): two of 30 layers hold about 70% of the error
    deltas = [0.0005] * 30
    deltas[18], deltas[23], deltas[7] = 0.019, 0.0106, -0.001
    layers, held, measured = recommend_protected_layers(_per_layer(deltas))
    assert layers == (18, 23) and measured == 30 and 0.66 < held < 0.8
    # evenly spread error: the top 4 (15% of 30) hold far from two thirds, so nothing is recommended
    layers, held, _ = recommend_protected_layers(_per_layer([0.002 + 0.0001 * (l % 3) for l in range(30)]))
    assert layers == () and held < 0.2
    # no per-layer run, or nothing positive: no recommendation
    assert recommend_protected_layers([VariantResult("int4 kv", 0.01, 0.0, 0, 6)])[0] == ()
    assert recommend_protected_layers(_per_layer([-0.001] * 4))[0] == ()


def test_captured_queries_reproduce_the_models_attention() -> None:
    """The harness hands the store the queries the model attends with: softmax(q k^T / sqrt(D)) from the
    captured (rotary-embedded) queries and the cached keys equals the model's own attention weights."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    from fade_sglang.eval.sensitivity import _prefill

    path = Path(__file__).resolve().parents[1] / "models" / "fade-tiny-llama"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    ids = list(range(5, 45))
    prefill = _prefill(model, ids)
    with torch.no_grad():
        attentions = model(torch.tensor([ids]), output_attentions=True).attentions
    cfg = model.config
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    for layer, (q, (k, _)) in enumerate(zip(prefill.queries, prefill.kv)):
        assert q.shape == (len(ids), cfg.num_attention_heads, cfg.head_dim)
        keys = k.repeat_interleave(group, dim=0)  # [Hq, T, D]
        logits = torch.einsum("thd,hsd->hts", q, keys) / cfg.head_dim**0.5
        logits = logits.masked_fill(torch.ones(len(ids), len(ids), dtype=torch.bool).triu(1), float("-inf"))
        torch.testing.assert_close(logits.softmax(-1), attentions[layer][0], atol=1e-5, rtol=1e-4)
