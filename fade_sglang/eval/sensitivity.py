"""Where does the compression error come from? Per-layer / per-head / K-vs-V sensitivity on a real model
(``python -m fade_sglang.eval.sensitivity``).

A diagnostic, not a quality claim: it runs the model in HF transformers (float32) on the document-QA
conversations of :mod:`.doc_qa`, prefills turn 1 (report + question + the full-precision answer), and
replaces the cached K/V of the history (all but the attention sinks) by what fade's own store gives back
after demotion: the real :class:`~fade_sglang.pool.tiered_store.TieredKVStore` (same quantizer,
rotation, key centering, clip search, bytes; it sees the history's prefill queries first, as the
server's attention backend shows them to it, for query-aware key rounding), applied to a chosen subset
of layers, heads, K or V. It then
teacher-forces the next question and its full-precision answer and reports the NLL delta (nats/token)
and how often the argmax token flips. Quality claims come from :mod:`.doc_qa` (real SGLang servers
reading the compressed pool).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from ..config import FadeConfig
from ..pool.layout import Tier
from ..pool.tiered_store import TieredKVStore
from ..pool.view import gather_kv
from ..quant import QuantFormat, dequantize, quantize
from . import doc_qa
from .real_model import ensure_smollm2

__all__ = ["Variant", "Conversation", "run_variants", "recommend_protected_layers", "main"]

ANSWER_TOKENS = 40


def _say(msg: str) -> None:
    print(f"[sensitivity {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Variant:
    """Compress the history with ``config``'s ``tier`` format on ``layers`` (None: all), ``heads`` (None:
    all), and ``parts`` ("kv", "k" or "v"); everything else stays full precision. ``keep_top``: share of
    the history kept in full precision in every layer, the tokens with the most attention received
    (H2O-style heavy hitters: attention summed over layers, heads and the history's own queries, divided
    by the number of queries that see the token). ``key_channel_block``: the keys quantized per channel
    over blocks of this many tokens (KIVI-style) instead of through the store: a harness-only quantizer
    (the pool stores per-token records), to measure what that layout would buy."""

    name: str
    overrides: tuple[tuple[str, Any], ...] = ()
    tier: str = "warm"
    layers: tuple[int, ...] | None = None
    heads: tuple[int, ...] | None = None
    parts: str = "kv"
    keep_top: float = 0.0
    key_channel_block: int = 0


    def config(self, base: FadeConfig) -> FadeConfig:
        return base.with_overrides(dict(self.overrides)) if self.overrides else base


@dataclass
class Conversation:
    history: list[int]  # turn 1 prompt + its answer
    follow_ups: list[tuple[list[int], list[int]]]  # (next-turn tokens, reference answer) per question


@dataclass
class VariantResult:
    name: str
    nll_delta: float  # mean over answer tokens, nats/token
    flip_rate: float  # share of answer positions whose argmax differs from full precision
    answers_with_flip: int
    answers: int


def _greedy(model: Any, ids: list[int], stop: set[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=list(stop) or None)
    return [int(t) for t in out[0, len(ids):]]


def build_conversations(model: Any, tok: Any, model_path: Path, docs: Sequence[doc_qa.Doc]) -> list[Conversation]:
    stop = doc_qa._stop_ids(tok, model_path)
    convs = []
    for i, doc in enumerate(docs):
        prompt = doc_qa.turn1_ids(tok, doc)
        history = prompt + _greedy(model, prompt, stop, ANSWER_TOKENS)
        follow = []
        for q in doc.questions[1:]:
            turn = doc_qa._turn_suffix(tok, q)
            follow.append((turn, _greedy(model, history + turn, stop, ANSWER_TOKENS)))
        convs.append(Conversation(history, follow))
        _say(f"conversation {i + 1}/{len(docs)}: {len(history)} history tokens")
    return convs


@dataclass
class Prefill:
    """The history's K/V per layer ``[H, T, D]``, its queries per layer ``[T, Hq, D]`` (model space, what the
    server's attention backend hands to ``observe_queries``) and, when asked for, heavy-hitter scores."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]
    queries: list[torch.Tensor]
    scores: torch.Tensor | None = None


def _capture_queries(model: Any, out: dict[int, torch.Tensor]) -> list[Any]:
    """Forward hooks that store every layer's rotary-embedded queries in ``out`` (Llama-family attention:
    ``q_proj`` and the ``position_embeddings`` keyword)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    def hook(layer: int) -> Callable[..., None]:
        def store(module: Any, args: tuple, kwargs: dict, _: Any) -> None:
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            cos, sin = kwargs["position_embeddings"]
            q = module.q_proj(hidden).view(*hidden.shape[:-1], -1, module.head_dim).transpose(1, 2)
            q, _ = apply_rotary_pos_emb(q, q, cos, sin)
            out[layer] = q[0].transpose(0, 1).detach().clone()
        return store

    return [layer.self_attn.register_forward_hook(hook(i), with_kwargs=True)
            for i, layer in enumerate(model.model.layers)]


def _prefill(model: Any, ids: list[int], scores: bool = False) -> Prefill:
    """The history's K/V and queries per layer and, with ``scores`` (needs eager attention), the heavy-hitter
    score of every position."""
    queries: dict[int, torch.Tensor] = {}
    hooks = _capture_queries(model, queries)
    try:
        with torch.no_grad():
            out = model(torch.tensor([ids]), use_cache=True, output_attentions=scores)
    finally:
        for h in hooks:
            h.remove()
    kv = [(layer.keys[0].clone(), layer.values[0].clone()) for layer in out.past_key_values.layers]
    qs = [queries[l] for l in range(len(kv))]
    if not scores:
        return Prefill(kv, qs)
    received = sum(a[0].sum(dim=(0, 1)) for a in out.attentions)  # [T]: over heads and queries, every layer
    return Prefill(kv, qs, received / torch.arange(len(ids), 0, -1, dtype=received.dtype))


def compress_history(kv: list[tuple[torch.Tensor, torch.Tensor]], cfg: FadeConfig, variant: Variant,
                     keep_first: int, scores: torch.Tensor | None = None,
                     queries: Sequence[torch.Tensor] | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """K/V per layer after positions ``keep_first..`` went through fade's store (demoted to the variant's tier).
    ``queries`` (per layer ``[T, Hq, D]``, the history's own): observed by the store before the demotion, as
    the server's prefill does (query-aware key rounding); None: the store sees none (nearest rounding).

    Only the variant's layers are quantized (centers and scales are per layer, so a store over just those
    layers gives the same values as one over all of them; ``protected_layers`` count in that store's
    layers, which are the model's when ``variant.layers`` is None)."""
    selected = list(variant.layers) if variant.layers is not None else list(range(len(kv)))
    heads, n, dim = kv[0][0].shape
    heads_sel = list(variant.heads) if variant.heads is not None else list(range(heads))
    span = n - keep_first
    store = TieredKVStore(2 * span + 64, torch.float32, heads, dim, len(selected), "cpu", fade_config=cfg)
    slots = store.alloc(span)
    for i, l in enumerate(selected):
        k, v = kv[l]
        store.write_kv(i, slots, k[:, keep_first:].transpose(0, 1), v[:, keep_first:].transpose(0, 1))
        if queries is not None:
            store.observe_queries(i, queries[l])
    packed = store.demote(slots, Tier.WARM if variant.tier == "warm" else Tier.COLD)
    out = list(kv)
    for i, l in enumerate(selected):
        qk, qv = (x.transpose(0, 1) for x in gather_kv(store.layer_view(i), packed))  # [H, span, D]
        k2, v2 = kv[l][0].clone(), kv[l][1].clone()
        if "k" in variant.parts:
            k2[heads_sel, keep_first:] = qk[heads_sel]
        if "v" in variant.parts:
            v2[heads_sel, keep_first:] = qv[heads_sel]
        out[l] = (k2, v2)
    if variant.key_channel_block and "k" in variant.parts:
        fmt = cfg.warm_key_format if variant.tier == "warm" else cfg.cold_key_format
        for l in selected:
            k2 = out[l][0]
            k2[heads_sel, keep_first:] = per_channel_keys(kv[l][0][heads_sel, keep_first:], fmt, variant.key_channel_block)
    if variant.keep_top > 0:
        if scores is None:
            raise ValueError(f"variant {variant.name!r} keeps heavy hitters: run with attention scores")
        top = keep_first + scores[keep_first:].topk(int(round(variant.keep_top * span))).indices
        for l in selected:
            for full, packed in zip(kv[l], out[l]):
                packed[:, top] = full[:, top]
    return out


def per_channel_keys(k: torch.Tensor, fmt: QuantFormat, block: int) -> torch.Tensor:
    """Keys ``[H, T, D]`` quantized per channel over blocks of ``block`` consecutive tokens (fmt's bits; scale
    and zero per channel and block, so the same bytes as per-token groups of ``block`` channels), in the
    model's space (no rotation or centering: the per-channel zero point takes each channel's offset)."""
    heads, n, dim = k.shape
    pad = (-n) % block
    x = torch.cat((k, k[:, -1:].expand(heads, pad, dim)), dim=1) if pad else k  # repeat the last token
    blocks = x.reshape(heads, -1, block, dim).transpose(-1, -2)  # [H, blocks, D, block]: groups run over tokens
    per_tokens = QuantFormat(fmt.bits, block, fmt.clip_search)
    back = dequantize(quantize(blocks, per_tokens), per_tokens).reshape_as(blocks)
    return back.transpose(-1, -2).reshape(heads, -1, dim)[:, :n]


def _answer_logprobs(model: Any, kv: list[tuple[torch.Tensor, torch.Tensor]], turn: list[int],
                     answer: list[int]) -> torch.Tensor:
    """Log-softmax over the vocabulary at each answer position, the history read from ``kv``."""
    from transformers import DynamicCache

    cache = DynamicCache()
    for l, (k, v) in enumerate(kv):
        cache.update(k[None].clone(), v[None].clone(), l)
    ids = turn + answer
    with torch.no_grad():
        logits = model(torch.tensor([ids]), past_key_values=cache, use_cache=True).logits[0]
    return torch.log_softmax(logits[len(turn) - 1:len(ids) - 1].float(), -1)


def run_variants(model: Any, convs: Sequence[Conversation], variants: Iterable[Variant], base: FadeConfig,
                 keep_first: int, on_result: Callable[[list[VariantResult]], None] | None = None
                 ) -> list[VariantResult]:
    """Every variant over every conversation; ``on_result`` sees the results so far after each variant."""
    variants = list(variants)
    prefills = [_prefill(model, c.history, any(v.keep_top for v in variants)) for c in convs]
    refs = [[_answer_logprobs(model, p.kv, t, a) for t, a in c.follow_ups] for c, p in zip(convs, prefills)]
    results = []
    for variant in variants:
        cfg = variant.config(base)
        nll_sum = flips = count = answers_flipped = answers = 0
        for c, p, ref in zip(convs, prefills, refs):
            squeezed = compress_history(p.kv, cfg, variant, keep_first, p.scores, p.queries)
            for (turn, answer), lp_ref in zip(c.follow_ups, ref):
                lp = _answer_logprobs(model, squeezed, turn, answer)
                target = torch.tensor(answer)[:, None]
                nll_sum += float((lp_ref.gather(1, target) - lp.gather(1, target)).sum())
                flipped = int((lp.argmax(-1) != lp_ref.argmax(-1)).sum())
                flips += flipped
                answers_flipped += flipped > 0
                count += len(answer)
                answers += 1
        r = VariantResult(variant.name, nll_sum / count, flips / count, answers_flipped, answers)
        _say(f"{r.name:<28} dNLL {r.nll_delta:+.4f}  flips {r.flip_rate:.3f} ({r.answers_with_flip}/{r.answers} answers)")
        results.append(r)
        if on_result is not None:
            on_result(results)
    return results


def diagnostic_base(preset: str) -> FadeConfig:
    """The preset's windows and quantizer options with both packed tiers on at the knobs' default formats
    (warm INT4 group 64, cold INT2 group 32, keys at their tier's bits), so a variant's name is its format
    ("int4 kv" is INT4 keys and values even where the preset stores 8-bit keys)."""
    return FadeConfig.from_preset(preset).with_overrides(
        {"tier_max_share": {"warm": 1.0, "cold": 1.0}, "warm_bits": 4, "warm_group_size": 64, "cold_bits": 2,
         "cold_group_size": 32, "warm_key_bits": 0, "cold_key_bits": 0})


def protected_variants(layers: tuple[int, ...]) -> list[Variant]:
    """The INT4 / k4v2 histories with ``layers`` protected (``protected_layers``: more bits in bigger pages)."""
    p = (("protected_layers", layers),)
    tag = ",".join(map(str, layers))
    return [Variant(f"int4 protect {tag}", p), Variant(f"int4 g32 protect {tag}", (("warm_group_size", 32), *p)),
            Variant(f"k4v2 protect {tag}", (("cold_key_bits", 4), *p), tier="cold"),
            Variant(f"k8v4 protect {tag} v8", (("warm_key_bits", 8), ("protected_value_bits", 8), *p))]


def heavy_hitter_variants() -> list[Variant]:
    """The INT4 / k4v2 histories with the top 2% / 5% heavy hitters kept in full precision."""
    return [Variant(f"{name} keep top {share:.0%}", o, tier=t, keep_top=share)
            for name, o, t in (("int4", (), "warm"), ("k4v2", (("cold_key_bits", 4),), "cold"))
            for share in (0.02, 0.05)]


def key_clip_variants() -> list[Variant]:
    """Each format with 4-bit keys, keys quantized with and without the clip search (``key_clip_search``)."""
    formats = (("int4", (), "warm"), ("int4 g32", (("warm_group_size", 32),), "warm"),
               ("k4v2", (("cold_key_bits", 4),), "cold"))
    return [Variant(f"{name}{' keys clipped' if clip else ''}{' (k only)' if part == 'k' else ''}",
                    (*o, ("key_clip_search", clip)), tier=t, parts=part)
            for name, o, t in formats for part in ("k", "kv") for clip in (True, False)]


def per_channel_variants() -> list[Variant]:
    """4-bit keys per channel over 64 / 128-token blocks (harness-only, KIVI-style) beside the store's per-token
    keys, keys only and with the store's values."""
    return [Variant(f"int4 per-channel b{b}{' (k only)' if part == 'k' else ''}", parts=part, key_channel_block=b)
            for b in (64, 128) for part in ("k", "kv")]


def nearest_rounding_variants() -> list[Variant]:
    """The main formats with keys rounded to nearest (``query_aware_keys`` off), to set beside the default
    (query-aware rounding from the history's own prefill queries)."""
    formats = [v for v in standard_variants(0, 0, False, False)
               if v.name in ("int4 kv", "int4 k", "int4 g32 kv", "k8v4", "k4v3", "k4v2", "int3 kv", "int2 kv")]
    return [Variant(f"{v.name} nearest", (*v.overrides, ("query_aware_keys", False)), v.tier, parts=v.parts)
            for v in formats]


def standard_variants(layers: int, heads: int, per_layer: bool, per_head: bool) -> list[Variant]:
    vs = [Variant("int4 kv"), Variant("int4 k", parts="k"), Variant("int4 v", parts="v"),
          Variant("int4 g32 kv", (("warm_group_size", 32),)),
          Variant("int4 no-rotation", (("rotation", False),)),
          Variant("int8 kv", (("warm_bits", 8),)),
          Variant("int2 kv", tier="cold"), Variant("int2 k", tier="cold", parts="k"),
          Variant("int2 v", tier="cold", parts="v"),
          # keys at more bits than values (the warm_key_bits / cold_key_bits knobs)
          Variant("k8v4", (("warm_key_bits", 8),)),
          Variant("k4v2", (("cold_key_bits", 4),), tier="cold"),
          Variant("k8v2", (("warm_key_bits", 8), ("cold_key_bits", 8)), tier="cold"),
          # 3-bit values in groups of 64: the bytes of k4v2 in groups of 32 (64 B per token and head at D = 64)
          Variant("k4v3", (("cold_bits", 3), ("cold_key_bits", 4), ("cold_group_size", 64)), tier="cold"),
          Variant("int3 kv", (("cold_bits", 3), ("cold_group_size", 64)), tier="cold")]
    if per_layer:
        vs += [Variant(f"int4 layer {l}", layers=(l,)) for l in range(layers)]
    if per_head:
        vs += [Variant(f"int4 head {h}", heads=(h,)) for h in range(heads)]
    return vs


def recommend_protected_layers(results: Sequence[VariantResult], share: float = 2 / 3,
                               max_share_of_layers: float = 0.15) -> tuple[tuple[int, ...], float, int]:
    """From the one-layer-at-a-time INT4 results ("int4 layer N"): the fewest layers, most sensitive first,
    that hold ``share`` of the summed single-layer error, if that many are at most ``max_share_of_layers``
    of the model's layers (protection pays only where a few layers dominate). Returns (layers, the share
    they hold, layers measured); layers is empty when no such few layers exist."""
    per_layer = {int(r.name.rsplit(" ", 1)[1]): r.nll_delta for r in results if r.name.startswith("int4 layer ")}
    total = sum(max(d, 0.0) for d in per_layer.values())
    if not per_layer or total <= 0:
        return (), 0.0, len(per_layer)
    cap = max(1, int(len(per_layer) * max_share_of_layers))
    chosen: list[int] = []
    held = 0.0
    for layer, delta in sorted(per_layer.items(), key=lambda kv: -kv[1]):
        if held >= share * total or len(chosen) == cap or delta <= 0:
            break
        chosen.append(layer)
        held += delta
    if held < share * total:
        return (), held / total, len(per_layer)
    return tuple(sorted(chosen)), held / total, len(per_layer)


def _say_recommendation(results: Sequence[VariantResult]) -> None:
    layers, held, measured = recommend_protected_layers(results)
    if not measured:
        return
    if layers:
        _say(f"protect: --fade-set protected_layers={','.join(map(str, layers))} ({len(layers)} of {measured} "
             f"layers hold {held:.0%} of the single-layer INT4 error)")
    else:
        _say(f"no few layers dominate the INT4 error (the most sensitive ones hold {held:.0%}): "
             "protected layers would not pay on this model")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fade_sglang.eval.sensitivity", description=__doc__.split("\n")[0])
    ap.add_argument("--model-path", type=Path, default=None, help="HF directory (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--docs", type=int, default=4)
    ap.add_argument("--doc-tokens", type=int, default=1400)
    ap.add_argument("--seed", type=int, default=0, help="document generator seed (another seed: other documents)")
    ap.add_argument("--preset", default="safe")
    ap.add_argument("--per-layer", action="store_true",
                    help="INT4 on one layer at a time; prints the protected_layers worth setting, if any")
    ap.add_argument("--per-head", action="store_true")
    ap.add_argument("--protect", default=None, metavar="L1,L2",
                    help="also run the INT4 / k4v2 / k8v4 histories with these layers protected")
    ap.add_argument("--heavy-hitters", action="store_true",
                    help="also run INT4 / k4v2 with the top 2%% / 5%% attended tokens kept full precision")
    ap.add_argument("--key-clip", action="store_true",
                    help="also run the 4-bit-key formats with keys clipped (the clip search) and unclipped")
    ap.add_argument("--per-channel", action="store_true",
                    help="also run INT4 keys quantized per channel over token blocks (KIVI-style, harness only)")
    ap.add_argument("--nearest", action="store_true",
                    help="also run the main formats with keys rounded to nearest (query_aware_keys off)")
    ap.add_argument("--only", nargs="+", default=None, metavar="NAME",
                    help="run only the variants with these names (e.g. 'int4 kv' k8v4)")
    ap.add_argument("--out", type=Path, default=None, help="write results JSON here")
    args = ap.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = args.model_path or ensure_smollm2()
    tok = AutoTokenizer.from_pretrained(path)
    attn = {"attn_implementation": "eager"} if args.heavy_hitters else {}  # attention weights for the scores
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **attn).eval()
    base = diagnostic_base(args.preset)
    docs = doc_qa.make_docs(tok, args.docs, args.doc_tokens, seed=args.seed)
    convs = build_conversations(model, tok, path, docs)
    n_layers, heads = model.config.num_hidden_layers, model.config.num_key_value_heads
    variants = standard_variants(n_layers, heads, args.per_layer, args.per_head)
    if args.protect:
        try:
            protect = tuple(int(x) for x in args.protect.split(","))
        except ValueError:
            ap.error(f"--protect {args.protect!r}: expected comma separated layer indices")
        variants += protected_variants(protect)
    if args.heavy_hitters:
        variants += heavy_hitter_variants()
    if args.key_clip:
        variants += key_clip_variants()
    if args.per_channel:
        variants += per_channel_variants()
    if args.nearest:
        variants += nearest_rounding_variants()
    variants = list({v.name: v for v in variants}.values())  # a name in two lists is one variant (same config)
    if args.only:
        unknown = set(args.only) - {v.name for v in variants}
        if unknown:
            ap.error(f"unknown variants {sorted(unknown)} (known: {', '.join(v.name for v in variants)})")
        variants = [v for v in variants if v.name in args.only]
    def write(results: list[VariantResult]) -> None:  # after every variant: a stopped run keeps what it measured
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps([asdict(r) for r in results], indent=1))

    results = run_variants(model, convs, variants, base, base.sink_tokens, on_result=write)
    _say_recommendation(results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
