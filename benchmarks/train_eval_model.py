"""Train the tiny Llama used by the quality evaluation (``models/fade-tiny-llama``).

A small Llama (RoPE, GQA) is trained from scratch on CPU on a seeded mixture of
passkey and multi-query key-value recall documents (``fade_sglang.evaldata``) with a
curriculum of sequence lengths, so that it really performs long-range retrieval:
compressing its KV cache can then measurably hurt (or not hurt) accuracy.

Example (the shipped model; see models/fade-tiny-llama/README.md for the exact run)::

    .venv/bin/python benchmarks/train_eval_model.py --out models/fade-tiny-llama --threads 2

The schedule (LR decay, length curriculum) is driven by ``--steps`` so a run is
deterministic for a given ``--seed`` and thread count; ``--minutes`` is a hard wall-clock
cap that saves whatever has been trained when it is hit.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from fade_sglang import evaldata  # noqa: E402

# ---------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------
def build_tokenizer(seed: int, vocab_size: int):  # -> PreTrainedTokenizerFast
    """Byte-level BPE trained on the evaldata distribution.  Digits are split one per
    token (the model copies digit by digit); a BOS token is prepended to every prompt."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<bos>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(evaldata.tokenizer_corpus(random.Random(seed)), trainer)
    bos = tok.token_to_id("<bos>")
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        model_max_length=2048,
    )


# ---------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------
@dataclass
class DataConfig:
    p_passkey: float = 0.4  # rest: multi-query key-value recall
    max_pairs: int = 10
    answer_weight: float = 3.0
    context_weight: float = 1.0  # weight of every non-answer token
    filler_repeat: float = 0.2
    digits: int = 5


def _answer_suffix(answer: str) -> str:
    return f" {answer}."


@dataclass
class Doc:
    ids: list[int]
    weights: list[float]  # loss weight of predicting ids[t] (t >= 1)
    answer_mask: list[bool]
    # Attention supervision: (query position, source positions).  The token at query+1 is
    # answer digit j; sources are where that digit sits in the needle(s) stating the value.
    attn_targets: list[tuple[int, list[int]]] = field(default_factory=list)


def make_document(rng: random.Random, tokenizer, length: int, cfg: DataConfig) -> Doc:
    """One retrieval training document of exactly ``length`` tokens."""
    eos = tokenizer.eos_token_id
    suffix_len = 2 + cfg.digits + 1  # " " + digits + "." + eos
    ctx = length - suffix_len
    if rng.random() < cfg.p_passkey:
        s = evaldata.passkey_sample(
            rng, ctx, rng.random(), tokenizer, digits=cfg.digits, filler_repeat=cfg.filler_repeat
        )
    else:
        # ~12 tokens per needle + ~22 per answered query, ~25 of preamble: dense but
        # still leaves filler between the pairs.
        n_pairs = rng.randint(1, max(1, min(cfg.max_pairs, (ctx - 40) // 45)))
        n_q = rng.randint(1, n_pairs)
        s = evaldata.kv_recall_sample(
            rng, ctx, tokenizer, num_pairs=n_pairs, digits=cfg.digits, num_queries=n_q,
            filler_repeat=cfg.filler_repeat,
        )
    segs = s.segments + [(_answer_suffix(s.answer), "answer")]
    encs = tokenizer.backend_tokenizer.encode_batch([t for t, _ in segs], add_special_tokens=False)
    digit_ids = _digit_ids(tokenizer)
    doc = Doc(ids=[tokenizer.bos_token_id], weights=[0.0], answer_mask=[False])
    stated: dict[tuple[int, ...], list[int]] = {}  # digit run -> start positions in needles
    for (text, role), e in zip(segs, encs):
        base = len(doc.ids)
        toks = list(e.ids)
        runs = _digit_runs(toks, digit_ids)
        doc.ids.extend(toks)
        doc.answer_mask.extend([role == "answer"] * len(toks))
        if role == "needle":
            # The first mention of a value is random: don't train on its digits (a second
            # mention, as in the passkey needle, is a copy and keeps its weight).
            w = [cfg.context_weight] * len(toks)
            if runs:
                r0, r1 = runs[0]
                w[r0:r1] = [0.0] * (r1 - r0)
            doc.weights.extend(w)
            for r0, r1 in runs:
                stated.setdefault(tuple(toks[r0:r1]), []).append(base + r0)
        elif role == "answer":
            doc.weights.extend([cfg.answer_weight] * len(toks))
            for r0, r1 in runs:
                sources = stated.get(tuple(toks[r0:r1]), [])
                for j in range(r1 - r0):
                    if sources:
                        doc.attn_targets.append((base + r0 + j - 1, [p + j for p in sources]))
        else:
            doc.weights.extend([cfg.context_weight] * len(toks))
    doc.ids.append(eos)
    doc.weights.append(cfg.context_weight)
    doc.answer_mask.append(False)
    if len(doc.ids) != length:  # exact by construction (additive tokenization)
        raise RuntimeError(f"document has {len(doc.ids)} tokens, expected {length}")
    return doc


def _digit_runs(toks: list[int], digit_ids: frozenset[int]) -> list[tuple[int, int]]:
    runs, i = [], 0
    while i < len(toks):
        if toks[i] in digit_ids:
            j = i
            while j < len(toks) and toks[j] in digit_ids:
                j += 1
            runs.append((i, j))
            i = j
        else:
            i += 1
    return runs


_DIGIT_CACHE: dict[int, frozenset[int]] = {}


def _digit_ids(tokenizer) -> frozenset[int]:
    key = id(tokenizer)
    if key not in _DIGIT_CACHE:
        _DIGIT_CACHE[key] = frozenset(tokenizer.convert_tokens_to_ids(list("0123456789")))
    return _DIGIT_CACHE[key]


def make_batch(
    rng: random.Random, tokenizer, length: int, batch: int, cfg: DataConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[tuple[int, int, list[int]]]]:
    """ids, loss weights, answer mask and attention targets ``(row, query, sources)``."""
    docs = [make_document(rng, tokenizer, length, cfg) for _ in range(batch)]
    ids = torch.tensor([d.ids for d in docs], dtype=torch.long)
    w = torch.tensor([d.weights for d in docs], dtype=torch.float32)
    m = torch.tensor([d.answer_mask for d in docs], dtype=torch.bool)
    targets = [(b, q, src) for b, d in enumerate(docs) for q, src in d.attn_targets]
    return ids, w, m, targets


class AttentionSupervision:
    """Auxiliary loss that tells chosen heads of one layer where an answer digit is stated.

    Why: trained only on next-token loss, a small model sits on a long plateau before
    content-based retrieval (induction) heads form -- far longer than a 20-minute CPU
    budget.  The bottleneck is finding the attention pattern, so we supervise it directly:
    at the position predicting answer digit j, the head should attend to digit j of the
    needle.  The model stays a plain Llama; only the training signal is richer.

    A forward pre-hook captures the layer's (normed) input and rotary embeddings, and the
    query/key rows needed are recomputed here, so the fast SDPA path is kept for the
    model's own forward."""

    def __init__(self, attn: torch.nn.Module, heads: list[int]) -> None:
        self.attn = attn
        self.heads = heads
        self._captured: tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]] | None = None
        attn.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):  # noqa: ANN001 - torch hook signature
        hs = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        self._captured = (hs, kwargs["position_embeddings"])

    def loss(self, targets: list[tuple[int, int, list[int]]]) -> torch.Tensor:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        assert self._captured is not None, "run the model forward first"
        hs, (cos, sin) = self._captured
        self._captured = None
        if not targets:
            return hs.new_zeros(())
        bsz, T, _ = hs.shape
        hd = self.attn.head_dim
        q = self.attn.q_proj(hs).view(bsz, T, -1, hd).transpose(1, 2)
        k = self.attn.k_proj(hs).view(bsz, T, -1, hd).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        groups = self.attn.num_key_value_groups
        pos = torch.arange(T)
        losses = []
        for b in sorted({t[0] for t in targets}):
            rows = [t for t in targets if t[0] == b]
            qpos = torch.tensor([t[1] for t in rows])
            allowed = torch.zeros(len(rows), T, dtype=torch.bool)
            for i, (_, _, src) in enumerate(rows):
                allowed[i, src] = True
            causal = pos[None, :] <= qpos[:, None]
            for h in self.heads:
                logits = (q[b, h, qpos] @ k[b, h // groups].T) * self.attn.scaling
                logp = torch.log_softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)
                losses.append(-torch.logsumexp(logp.masked_fill(~allowed, float("-inf")), dim=-1))
        return torch.cat(losses).mean()


# ---------------------------------------------------------------------------------------
# Evaluation (teacher-forced: every answer token is the argmax <=> greedy decoding emits
# exactly " <digits>.", which is what evaldata.score_answer checks)
# ---------------------------------------------------------------------------------------
def heldout_passkey(tokenizer, length: int, n: int, seed: int) -> list[evaldata.EvalSample]:
    rng = random.Random(seed)
    depths = [i / max(n - 1, 1) for i in range(n)]
    return [evaldata.passkey_sample(rng, length, d, tokenizer) for d in depths]


@torch.no_grad()
def answer_accuracy(model, tokenizer, samples: list[evaldata.EvalSample], batch: int = 8) -> float:
    model.eval()
    hits = 0
    for i in range(0, len(samples), batch):
        chunk = samples[i : i + batch]
        rows, spans = [], []
        for s in chunk:
            p = evaldata.prompt_token_ids(tokenizer, s.prompt)
            a = tokenizer(_answer_suffix(s.answer), add_special_tokens=False).input_ids
            rows.append(p + a)
            spans.append((len(p), len(a)))
        width = max(len(r) for r in rows)
        x = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
        for j, r in enumerate(rows):
            x[j, : len(r)] = torch.tensor(r)  # right padding: causal, so harmless
        pred = model(input_ids=x).logits.argmax(-1)
        for j, (p0, na) in enumerate(spans):
            hits += int(torch.equal(pred[j, p0 - 1 : p0 - 1 + na], x[j, p0 : p0 + na]))
    model.train()
    return hits / len(samples)


# ---------------------------------------------------------------------------------------
# Schedule
# ---------------------------------------------------------------------------------------
def parse_curriculum(spec: str) -> list[tuple[float, int, int]]:
    """``"0:256x16,0.3:512x8,0.6:1024x4"`` -> [(start_fraction, seq_len, batch), ...]."""
    out = []
    for part in spec.split(","):
        frac, rest = part.split(":")
        length, batch = rest.split("x")
        out.append((float(frac), int(length), int(batch)))
    return sorted(out)


def stage_at(curriculum: list[tuple[float, int, int]], progress: float) -> tuple[int, int]:
    cur = curriculum[0]
    for st in curriculum:
        if progress >= st[0]:
            cur = st
    return cur[1], cur[2]


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


# ---------------------------------------------------------------------------------------
def build_model(tokenizer, args: argparse.Namespace):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim,
        max_position_embeddings=args.max_positions,
        rope_theta=args.rope_theta,
        rms_norm_eps=1e-5,
        tie_word_embeddings=not args.untie,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        attn_implementation="sdpa",
    )
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(cfg)
    if args.embed_std is not None:
        # Large input embeddings keep token identity dominant in the residual stream, so
        # a copying head can read which digit it attends to (with the default 0.02 the
        # digits' identity is swamped by context features after a few layers).
        torch.nn.init.normal_(model.model.embed_tokens.weight, std=args.embed_std)
    return model


def save(model, tokenizer, out: Path, meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config.do_sample = False
    model.generation_config.max_new_tokens = 8
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "training_meta.json").write_text(json.dumps(meta, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=1000, help="schedule length (LR decay, curriculum)")
    ap.add_argument("--minutes", type=float, default=None, help="hard wall-clock cap; saves on hit")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--intermediate", type=int, default=384)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--max-positions", type=int, default=2048)
    ap.add_argument("--rope-theta", type=float, default=10000.0)
    ap.add_argument("--untie", action="store_true", help="separate input/output embeddings")
    ap.add_argument("--embed-std", type=float, default=None, help="input embedding init std")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--curriculum", default="0:128x32,0.25:256x16,0.5:512x8,0.75:1024x4")
    ap.add_argument("--p-passkey", type=float, default=0.4)
    ap.add_argument("--answer-weight", type=float, default=3.0)
    ap.add_argument("--context-weight", type=float, default=1.0, help="loss weight of non-answer tokens")
    ap.add_argument("--max-pairs", type=int, default=10)
    ap.add_argument("--filler-repeat", type=float, default=0.2)
    ap.add_argument("--attn-sup", type=float, default=1.0, help="weight of the attention-supervision loss (0: off)")
    ap.add_argument("--attn-sup-layer", type=int, default=-1)
    ap.add_argument("--attn-sup-heads", default="0", help="comma-separated query heads")
    ap.add_argument("--ov-lr-mult", type=float, default=10.0, help="LR multiplier, supervised layer's v/o proj")
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--eval-n", type=int, default=16)
    ap.add_argument("--eval-length", type=int, default=1024)
    ap.add_argument("--log-every", type=int, default=10)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    t_start = time.time()

    tokenizer = build_tokenizer(args.seed, args.vocab)
    model = build_model(tokenizer, args)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params {n_params/1e6:.2f}M vocab {len(tokenizer)} threads {args.threads}", flush=True)

    dcfg = DataConfig(
        p_passkey=args.p_passkey, max_pairs=args.max_pairs, answer_weight=args.answer_weight,
        context_weight=args.context_weight,
        filler_repeat=args.filler_repeat,
    )
    curriculum = parse_curriculum(args.curriculum)
    # Held-out prompts use a seed stream disjoint from training's.
    heldout_long = heldout_passkey(tokenizer, args.eval_length, args.eval_n, seed=10_000 + args.seed)

    # The supervised layer's value/output projections must grow large enough to write a
    # digit against a residual stream that is already big; a higher LR there shortens
    # that phase a lot.
    sup_layer = args.attn_sup_layer % args.layers
    fast = {f"model.layers.{sup_layer}.self_attn.v_proj.weight", f"model.layers.{sup_layer}.self_attn.o_proj.weight"}
    groups: dict[tuple[float, float], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        wd = 0.0 if p.ndim < 2 else args.weight_decay
        mult = args.ov_lr_mult if (args.attn_sup > 0 and name in fast) else 1.0
        groups.setdefault((wd, mult), []).append(p)
    opt = torch.optim.AdamW(
        [{"params": ps, "weight_decay": wd, "lr_mult": mult} for (wd, mult), ps in groups.items()],
        lr=args.lr, betas=(0.9, 0.95),
    )
    sup = None
    if args.attn_sup > 0:
        layer = model.model.layers[args.attn_sup_layer].self_attn
        sup = AttentionSupervision(layer, [int(h) for h in args.attn_sup_heads.split(",")])
    data_rng = random.Random(args.seed)
    model.train()
    tokens_seen = 0
    t_log, tok_log = time.time(), 0
    history = []
    step = 0
    for step in range(args.steps):
        if args.minutes is not None and time.time() - t_start > args.minutes * 60:
            print(f"time cap hit at step {step}", flush=True)
            break
        length, batch = stage_at(curriculum, step / args.steps)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, args.warmup) * g["lr_mult"]
        ids, w, amask, targets = make_batch(data_rng, tokenizer, length, batch, dcfg)
        logits = model(input_ids=ids).logits[:, :-1]
        tgt, wt, am = ids[:, 1:], w[:, 1:], amask[:, 1:]
        ce = F.cross_entropy(logits.reshape(-1, logits.size(-1)), tgt.reshape(-1), reduction="none")
        lm_loss = (ce * wt.reshape(-1)).sum() / wt.sum()
        sup_loss = sup.loss(targets) if sup is not None else lm_loss.new_zeros(())
        loss = lm_loss + args.attn_sup * sup_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        tokens_seen += ids.numel()
        tok_log += ids.numel()
        if step % args.log_every == 0:
            with torch.no_grad():
                ans = am.reshape(-1)
                ans_loss = ce[ans].mean().item() if ans.any() else float("nan")
            now = time.time()
            print(
                f"step {step:5d} len {length:5d} loss {lm_loss.item():.3f} ans_loss {ans_loss:.3f} "
                f"attn_sup {sup_loss.item():.3f} "
                f"lr {lr_at(step, args.steps, args.lr, args.warmup):.2e} tok/s {tok_log / max(now - t_log, 1e-9):.0f} "
                f"elapsed {now - t_start:.0f}s",
                flush=True,
            )
            t_log, tok_log = now, 0
        if args.eval_every and (step + 1) % args.eval_every == 0:
            short = heldout_passkey(tokenizer, length, args.eval_n, seed=20_000 + step)
            acc_s = answer_accuracy(model, tokenizer, short)
            acc_l = answer_accuracy(model, tokenizer, heldout_long)
            history.append({"step": step + 1, f"passkey@{length}": acc_s, f"passkey@{args.eval_length}": acc_l})
            print(f"eval step {step + 1} passkey@{length} {acc_s:.2f} passkey@{args.eval_length} {acc_l:.2f}", flush=True)

    wall = time.time() - t_start
    acc_final = answer_accuracy(model, tokenizer, heldout_long)
    print(f"final passkey@{args.eval_length} {acc_final:.3f} wall {wall:.0f}s tokens {tokens_seen}", flush=True)
    meta = {
        "command": "benchmarks/train_eval_model.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "steps_done": step + 1,
        "tokens_seen": tokens_seen,
        "wall_seconds": round(wall, 1),
        "params": n_params,
        f"final_passkey@{args.eval_length}_teacher_forced": acc_final,
        "eval_history": history,
        "torch": torch.__version__,
    }
    save(model, tokenizer, args.out, meta)
    print(f"saved to {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
