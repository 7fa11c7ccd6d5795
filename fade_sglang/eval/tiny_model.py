"""A seeded tiny random Llama (GQA) with a locally trained BPE tokenizer: no hub, loads in HF and SGLang.

Used by the demo when no trained model is shipped, and by the tests. Random
weights: good for checking that serving through the compressed cache computes
the right thing and for capacity / throughput, not as a quality benchmark.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

__all__ = ["build_tiny_llama", "build_tokenizer", "english_like_corpus"]

_SUBJECTS = ["the cat", "a dog", "my friend", "the old man", "a small bird", "the teacher", "our team", "the river"]
_VERBS = ["sees", "likes", "finds", "carries", "watches", "follows", "builds", "paints", "answers", "remembers"]
_OBJECTS = ["a red ball", "the green house", "some fresh bread", "the long road", "a quiet song", "the blue sky",
            "an open door", "the last train", "a warm coat", "the big city"]
_TAILS = ["today", "every morning", "in the garden", "after dinner", "near the sea", "with great care",
          "before the rain", "at night", "without a word", "for a while"]


def english_like_corpus(num_sentences: int = 2000, seed: int = 0) -> list[str]:
    """Deterministic sentences from a tiny grammar; enough to train a small BPE."""
    rng = random.Random(seed)
    lines = []
    for _ in range(num_sentences):
        s = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}"
        if rng.random() < 0.7:
            s += f" {rng.choice(_TAILS)}"
        if rng.random() < 0.3:
            s += f", and {rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}"
        lines.append(s[0].upper() + s[1:] + rng.choice([".", ".", "!", "?"]))
    return lines


# Local models were never trained on chat turns; the template exists so OpenAI chat clients (SGLang's
# multi-turn bench_serving) can drive them: every message's text, each closed by a full stop.
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }} . {% endfor %}"


def build_tokenizer(path: str | os.PathLike, vocab_size: int = 512, seed: int = 0) -> Any:
    """Train a byte-level BPE locally and save it as a PreTrainedTokenizerFast (no hub access)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 0..3: Llama's bos=1, eos=2 convention
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(english_like_corpus(seed=seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        model_max_length=2048,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(path))
    return fast


def build_tiny_llama(
    path: str | os.PathLike,
    *,
    vocab_size: int = 512,
    hidden_size: int = 256,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    num_hidden_layers: int = 2,
    intermediate_size: int = 512,
    max_position_embeddings: int = 2048,
    initializer_range: float = 0.2,
    seed: int = 0,
) -> Path:
    """Write a seeded random LlamaForCausalLM (head_dim = hidden/heads) and its tokenizer to ``path``.

    A large ``initializer_range`` keeps logits peaked so greedy decoding is not
    decided by float rounding differences between HF and SGLang kernels.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(out, vocab_size=vocab_size, seed=seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        head_dim=hidden_size // num_attention_heads,
        max_position_embeddings=max_position_embeddings,
        initializer_range=initializer_range,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    model.save_pretrained(str(out), safe_serialization=True)
    return out
