"""Measure the evaluation model's retrieval accuracy with HF transformers (full-precision KV).

Passkey over a context-length x needle-depth grid, plus single-query key-value recall,
greedy decoding, scored with ``evaldata.score_answer`` (exact match of the digits)::

    .venv/bin/python benchmarks/check_eval_model.py --model models/fade-tiny-llama

Prompts of one grid cell have identical token counts (evaldata hits lengths exactly), so
they are batched without padding.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from fade_sglang.eval import evaldata  # noqa: E402


def load(model_dir: str):  # -> (model, tokenizer)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    return model, tok


@torch.no_grad()
def greedy_answers(model, tokenizer, prompts: list[str], max_new_tokens: int = 8, batch: int = 8) -> list[str]:
    """Greedy continuations (decoded text) for prompts; equal-length prompts share a batch."""
    encoded = [evaldata.prompt_token_ids(tokenizer, p) for p in prompts]
    out: list[str] = [""] * len(prompts)
    by_len: dict[int, list[int]] = {}
    for i, ids in enumerate(encoded):
        by_len.setdefault(len(ids), []).append(i)
    for idx in by_len.values():
        for k in range(0, len(idx), batch):
            chunk = idx[k : k + batch]
            x = torch.tensor([encoded[i] for i in chunk], dtype=torch.long)
            gen = model.generate(
                input_ids=x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
            for j, i in enumerate(chunk):
                out[i] = tokenizer.decode(gen[j, x.shape[1] :], skip_special_tokens=True)
    return out


def passkey_grid(
    model, tokenizer, lengths: list[int], depths: list[float], per_cell: int, seed: int
) -> dict[tuple[int, float], float]:
    acc: dict[tuple[int, float], float] = {}
    for L in lengths:
        for d in depths:
            # One seed per cell so cells are independent of the grid's shape.
            rng = random.Random(f"passkey-{seed}-{L}-{d}")
            samples = [evaldata.passkey_sample(rng, L, d, tokenizer) for _ in range(per_cell)]
            gens = greedy_answers(model, tokenizer, [s.prompt for s in samples])
            acc[(L, d)] = sum(evaldata.score_answer(g, s.answer) for g, s in zip(gens, samples)) / per_cell
    return acc


def kv_accuracy(model, tokenizer, lengths: list[int], num_pairs: int, n: int, seed: int) -> dict[int, float]:
    acc: dict[int, float] = {}
    for L in lengths:
        rng = random.Random(f"kv-{seed}-{L}-{num_pairs}")
        samples = [evaldata.kv_recall_sample(rng, L, tokenizer, num_pairs=num_pairs) for _ in range(n)]
        gens = greedy_answers(model, tokenizer, [s.prompt for s in samples])
        acc[L] = sum(evaldata.score_answer(g, s.answer) for g, s in zip(gens, samples)) / n
    return acc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/fade-tiny-llama")
    ap.add_argument("--lengths", default="256,512,768,1024")
    ap.add_argument("--depths", default="0,0.25,0.5,0.75,1")
    ap.add_argument("--per-cell", type=int, default=10)
    ap.add_argument("--kv-pairs", type=int, default=8)
    ap.add_argument("--kv-n", type=int, default=20)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="also write results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    lengths = [int(x) for x in args.lengths.split(",")]
    depths = [float(x) for x in args.depths.split(",")]
    model, tok = load(args.model)
    t0 = time.time()
    grid = passkey_grid(model, tok, lengths, depths, args.per_cell, args.seed)
    kv = kv_accuracy(model, tok, lengths, args.kv_pairs, args.kv_n, args.seed) if args.kv_n else {}

    print(f"passkey accuracy (greedy, exact digits; {args.per_cell} prompts per cell)")
    print("| length \\ depth | " + " | ".join(f"{d:g}" for d in depths) + " | mean |")
    print("|---" * (len(depths) + 2) + "|")
    for L in lengths:
        row = [grid[(L, d)] for d in depths]
        print(f"| {L} | " + " | ".join(f"{a:.2f}" for a in row) + f" | {sum(row) / len(row):.3f} |")
    overall = sum(grid.values()) / len(grid)
    print(f"overall passkey accuracy {overall:.3f}")
    if kv:
        print(f"\nkey-value recall ({args.kv_pairs} pairs, {args.kv_n} prompts per length)")
        print("| length | " + " | ".join(str(L) for L in lengths) + " |")
        print("|---" * (len(lengths) + 1) + "|")
        print("| accuracy | " + " | ".join(f"{kv[L]:.2f}" for L in lengths) + " |")
    print(f"\n({time.time() - t0:.0f}s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "passkey": {f"{L}@{d:g}": a for (L, d), a in grid.items()},
                    "passkey_overall": overall,
                    "kv_recall": {str(L): a for L, a in kv.items()},
                    "args": vars(args),
                },
                f,
                indent=2,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
