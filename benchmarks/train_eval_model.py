"""Train the tiny Llama used by the quality evaluation (``models/fade-tiny-llama``).

A small Llama (RoPE, GQA) is trained from scratch on CPU on a seeded mixture from
:mod:`fade_sglang.eval.evaldata`: passkey documents (a 5-digit key hidden in filler), associative
key-value recall documents (several queries per document), and plain filler text for
language modelling.  The retrieval tasks only work if the model attends back over the
whole context, so compressing its KV cache can measurably hurt (or not hurt) accuracy.

Recipe (what makes retrieval form in minutes on 2 CPU cores):

* a word-level tokenizer (one token per word, one per digit): short sequences, small vocab;
* phase 1 (``--copy-steps``): only 64-token documents of random tokens repeated verbatim.
  Retrieval is copying from far back, which needs an induction circuit (a previous-token
  head feeding a content-matching head); on pure copy data it forms in about 150 steps,
  while inside the mixed data it stayed on a loss plateau for thousands of steps;
* phase 2: the retrieval mixture, answer tokens weighted ``--answer-weight`` times (the
  answers are a handful of tokens in a 1K-token document), with a length curriculum
  from 128 to 1024 tokens at a constant token budget per step; no weight decay.

Usage::

    .venv/bin/python benchmarks/train_eval_model.py --out models/fade-tiny-llama --seed 0

Deterministic for a given ``--seed`` and thread count.  Prints progress (loss, passkey
accuracy on held-out prompts) while it runs and writes the model, tokenizer,
``training.json`` and a README to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from fade_sglang.eval import evaldata  # noqa: E402
from fade_sglang.eval.tiny_model import CHAT_TEMPLATE  # noqa: E402

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]  # Llama convention: bos=1, eos=2
COPY_FRACTION = 0.3  # share of copy documents (random tokens repeated verbatim) in phase 2
COPY_LENGTH = 64  # phase-1 document length
CURRICULUM = (128, 256, 512, 1024)  # phase-2 document lengths, unlocked one after another


def build_tokenizer(seed: int):  # -> PreTrainedTokenizerFast
    """Word-level tokenizer over the evaldata vocabulary: words and punctuation are single
    tokens, digits are split one per token, ``<s>`` is prepended to every prompt."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)]
    )
    trainer = trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS, show_progress=False)
    corpus = evaldata.tokenizer_corpus(random.Random(seed))
    corpus.append(" ".join(str(d) for d in range(10)))
    tok.train_from_iterator(corpus, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        model_max_length=4096,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


# ---------------------------------------------------------------------------------------
# Training documents: token ids plus a per-token loss weight (answers weigh more).
# ---------------------------------------------------------------------------------------
def _encode_segments(tok, segments: list[tuple[str, str]], answer_weight: float) -> tuple[list[int], list[float]]:
    ids = [tok.bos_token_id]
    weights = [1.0]
    encs = tok.backend_tokenizer.encode_batch([t for t, _ in segments], add_special_tokens=False)
    for (_, role), enc in zip(segments, encs):
        ids.extend(enc.ids)
        weights.extend([answer_weight if role == "answer" else 1.0] * len(enc.ids))
    return ids, weights


def copy_document(rng: random.Random, tok, length: int, periods: tuple[int, int] = (8, 24)) -> tuple[list[int], list[float]]:
    """Random tokens repeated verbatim: after the first period every token is predictable
    only by looking back (induction), the circuit retrieval is built from, with no
    competing grammar to learn."""
    words = sorted(i for t, i in tok.get_vocab().items() if t not in SPECIAL_TOKENS)  # vocab dict order varies per process
    period = [rng.choice(words) for _ in range(rng.randint(*periods))]
    ids = [tok.bos_token_id] + (period * (length // len(period) + 1))[: length - 1]
    return ids, [1.0] * length


def training_document(rng: random.Random, tok, length: int, answer_weight: float,
                      copy_fraction: float = COPY_FRACTION) -> tuple[list[int], list[float]]:
    """One document of about ``length`` tokens (padded/cut to exactly ``length``)."""
    kind = rng.random()
    if kind < copy_fraction:
        return copy_document(rng, tok, length)
    kind = rng.random()
    if kind < 0.5:
        s = evaldata.passkey_sample(rng, length - 8, rng.random(), tok)
        segments = s.segments + [(f" {s.answer}.", "answer")]
    elif kind < 0.85:
        pairs = rng.randint(2, max(2, min(8, length // 64)))
        s = evaldata.kv_recall_sample(
            rng, length - 12, tok, num_pairs=pairs, num_queries=rng.randint(1, pairs)
        )
        segments = s.segments + [(f" {s.answer}.", "answer")]
    else:
        segments = [(" " + evaldata.filler_text(rng, length // 8), "filler")]
    ids, weights = _encode_segments(tok, segments, answer_weight)
    return _fit(ids, weights, length, tok)


def _fit(ids: list[int], weights: list[float], length: int, tok) -> tuple[list[int], list[float]]:
    if len(ids) >= length:
        return ids[:length], weights[:length]
    pad = length - len(ids)
    return ids + [tok.pad_token_id] * pad, weights + [0.0] * pad


def batch(rng: random.Random, tok, size: int, length: int, answer_weight: float,
          copy_fraction: float = COPY_FRACTION) -> tuple[torch.Tensor, torch.Tensor]:
    docs = [training_document(rng, tok, length, answer_weight, copy_fraction) for _ in range(size)]
    return torch.tensor([d[0] for d in docs]), torch.tensor([d[1] for d in docs])


# ---------------------------------------------------------------------------------------
# Model, schedule, evaluation
# ---------------------------------------------------------------------------------------
def build_model(tok, args: argparse.Namespace):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 2,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads,
        max_position_embeddings=4096,
        rope_theta=10000.0,
        initializer_range=0.02,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def length_for_step(progress: float, rng: random.Random) -> int:
    """Phase-2 curriculum: short documents first (retrieval is found among few distractors);
    each longer length joins the draw as ``progress`` (0..1) grows, all of them by 0.77."""
    unlocked = min(len(CURRICULUM), 1 + int(progress * len(CURRICULUM) * 1.3))
    return rng.choice(CURRICULUM[:unlocked])


def lr_at(step: int, warmup: int, peak: float, progress: float) -> float:
    """Linear warmup, then cosine from ``peak`` to ``peak / 10`` over phase 2 (``progress`` 0..1)."""
    return peak * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def passkey_accuracy(model, tok, lengths: tuple[int, ...], per_length: int, seed: int = 1234) -> dict[int, float]:
    """Greedy passkey accuracy with full-precision KV (HF), per context length."""
    model.eval()
    rng = random.Random(seed)
    out = {}
    for length in lengths:
        samples = [evaldata.passkey_sample(rng, length, (i + 0.5) / per_length, tok) for i in range(per_length)]
        by_len: dict[int, list] = {}
        for s in samples:
            by_len.setdefault(s.num_tokens, []).append(s)
        hits = 0
        for group in by_len.values():
            x = torch.tensor([evaldata.prompt_token_ids(tok, s.prompt) for s in group])
            gen = model.generate(
                input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=7, do_sample=False,
                pad_token_id=tok.pad_token_id,
            )
            for row, s in zip(gen, group):
                hits += evaldata.score_answer(tok.decode(row[x.shape[1]:], skip_special_tokens=True), s.answer)
        out[length] = hits / len(samples)
    model.train()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=2400, help="total optimizer steps (both phases)")
    p.add_argument("--copy-steps", type=int, default=300, help="phase-1 steps on pure copy documents")
    p.add_argument("--tokens-per-step", type=int, default=4096)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--answer-weight", type=float, default=8.0)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--kv-heads", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--final-eval-prompts", type=int, default=16, help="passkey prompts per length at the end")
    args = p.parse_args(argv)
    if not 0 <= args.copy_steps < args.steps:
        p.error("--copy-steps must be in [0, --steps)")

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = random.Random(args.seed)
    tok = build_tokenizer(args.seed)
    model = build_model(tok, args).float().train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[train] vocab {len(tok)}  params {n_params / 1e6:.2f}M  steps {args.steps} "
          f"({args.copy_steps} copy-only)", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    t0 = time.time()
    history = []
    ema = None
    for step in range(args.steps):
        progress = max(0, step - args.copy_steps) / (args.steps - args.copy_steps)
        if step < args.copy_steps:
            length = COPY_LENGTH
            x, w = batch(rng, tok, args.tokens_per_step // length, length, args.answer_weight, copy_fraction=1.0)
        else:
            length = length_for_step(progress, rng)
            x, w = batch(rng, tok, max(1, args.tokens_per_step // length), length, args.answer_weight)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.warmup, args.lr, progress)
        logits = model(input_ids=x).logits[:, :-1].float()
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="none")
        tw = w[:, 1:].reshape(-1)
        loss = (nll * tw).sum() / tw.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if (step + 1) % 20 == 0:
            print(f"[train] step {step + 1}/{args.steps}  len {length}  loss {ema:.3f}  "
                  f"{time.time() - t0:.0f}s", flush=True)
        if args.eval_every and (step + 1) % args.eval_every == 0 and step >= args.copy_steps:
            acc = passkey_accuracy(model, tok, (256, 1024), 8)
            history.append({"step": step + 1, "loss": round(ema, 4), "passkey": acc})
            print(f"[eval] step {step + 1}  passkey {acc}", flush=True)

    final = passkey_accuracy(model, tok, (256, 512, 1024), args.final_eval_prompts, seed=99)
    print(f"[done] {time.time() - t0:.0f}s  passkey (fp32 HF) {final}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(str(args.out), safe_serialization=True)
    tok.save_pretrained(str(args.out))
    meta = {
        "command": "python benchmarks/train_eval_model.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "torch": torch.__version__,
        "train_seconds": round(time.time() - t0, 1),
        "final_passkey_fp32": final,
        "history": history,
    }
    (args.out / "training.json").write_text(json.dumps(meta, indent=2) + "\n")
    (args.out / "README.md").write_text(model_card(meta, n_params))
    return 0


def model_card(meta: dict, n_params: int) -> str:
    a = meta["args"]
    acc = ", ".join(f"{k} tokens {v:.0%}" for k, v in meta["final_passkey_fp32"].items())
    return f"""# fade-tiny-llama: the evaluation model of fade-sglang

A {n_params / 1e6:.2f}M-parameter Llama (RoPE, GQA {a['heads']}:{a['kv_heads']}, {a['layers']} layers,
hidden {a['hidden']}, head_dim {a['hidden'] // a['heads']}, word-level tokenizer) trained from scratch on CPU
by `benchmarks/train_eval_model.py` on a seeded synthetic mixture (`fade_sglang/evaldata.py`):
passkey retrieval in filler text, associative key-value recall, repeated random token
sequences (copying) and filler text for language modelling. It exists so that quality
numbers measure long-range retrieval through the compressed KV cache; it is not a
general language model.

Reproduce (deterministic for the seed and thread count, {meta['train_seconds']:.0f} s here):

    .venv/bin/{meta['command']}

Passkey accuracy after training (HF, fp32, full-precision KV, {a['final_eval_prompts']} prompts per length): {acc}.
Weights are stored in bfloat16 (`model.safetensors`); `training.json` has the loss and
accuracy history. `chat_template.jinja` joins chat messages' texts (the model never saw chat
turns; the template lets OpenAI chat clients such as SGLang's multi-turn `bench_serving` drive it).
"""


if __name__ == "__main__":
    raise SystemExit(main())
