"""benchmarks/train_eval_model.py: its documents and a few-step run that writes an SGLang-loadable model."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import train_eval_model as T  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    return T.build_tokenizer(0)


def test_tokenizer_is_word_level_with_single_digits(tok) -> None:
    ids = tok("The pass key is 71432.")["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert tok.convert_ids_to_tokens(ids[1:]) == ["The", "pass", "key", "is", "7", "1", "4", "3", "2", "."]
    assert tok.unk_token_id not in ids


def test_chat_template_joins_message_texts_and_ships_with_the_model(tok) -> None:
    from transformers import AutoTokenizer

    chat = [{"role": "user", "content": "What is the pass key?"}, {"role": "assistant", "content": "7"}]
    text = tok.apply_chat_template(chat, tokenize=False)
    assert text == "What is the pass key? . 7 . "
    assert tok.unk_token_id not in tok(text)["input_ids"]
    shipped = AutoTokenizer.from_pretrained(str(Path(__file__).resolve().parents[1] / "models" / "fade-tiny-llama"))
    assert shipped.chat_template == T.CHAT_TEMPLATE  # the script and the shipped files agree


def test_documents_have_exact_length_and_weighted_answers(tok) -> None:
    rng = random.Random(0)
    for length in (128, 512):
        for _ in range(20):
            ids, weights = T.training_document(rng, tok, length, answer_weight=8.0)
            assert len(ids) == len(weights) == length and ids[0] == tok.bos_token_id
    # Retrieval documents end in a weighted answer; copy documents repeat their period.
    ids, weights = T.training_document(random.Random(1), tok, 256, 8.0, copy_fraction=0.0)
    assert 8.0 in weights
    ids, _ = T.copy_document(random.Random(2), tok, 256)
    period = next(p for p in range(8, 49) if ids[1:1 + p] == ids[1 + p:1 + 2 * p])
    assert ids[1:] == (ids[1:1 + period] * 300)[:255]


def test_short_run_writes_a_loadable_llama(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "m"
    assert T.main(["--out", str(out), "--steps", "3", "--copy-steps", "1", "--tokens-per-step", "256", "--eval-every", "0",
                   "--hidden", "64", "--heads", "2", "--kv-heads", "1", "--layers", "1", "--threads", "1",
                   "--final-eval-prompts", "1"]) == 0
    meta = json.loads((out / "training.json").read_text())
    assert "--steps 3" in meta["command"] and set(meta["final_passkey_fp32"]) == {"256", "512", "1024"}
    assert "train_eval_model.py" in (out / "README.md").read_text()
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert model.config.model_type == "llama" and model.config.num_key_value_heads == 1
    assert model.dtype == torch.bfloat16
    assert AutoTokenizer.from_pretrained(str(out)).decode([4]) != ""


def test_training_data_is_the_same_in_every_process() -> None:
    """The shipped model is reproducible only if a fresh process draws the same documents
    (the tokenizer's vocab dict comes back in a different order in every process)."""
    import subprocess

    code = ("import hashlib, random, sys; sys.path.insert(0, 'benchmarks'); import train_eval_model as T; "
            "tok = T.build_tokenizer(0); x, w = T.batch(random.Random(0), tok, 8, 256, 8.0, copy_fraction=0.5); "
            "print(hashlib.sha256(x.numpy().tobytes() + w.numpy().tobytes()).hexdigest())")
    repo = Path(__file__).resolve().parents[1]
    digests = {subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True,
                              check=True).stdout.strip() for _ in range(2)}
    assert len(digests) == 1, digests
