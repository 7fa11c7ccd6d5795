"""The shipped evaluation model really retrieves: passkey with full-precision KV (HF, CPU)."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from fade_sglang import evaldata

os.environ.setdefault("HF_HUB_OFFLINE", "1")
MODEL_DIR = Path(__file__).resolve().parents[1] / "models" / "fade-tiny-llama"


@pytest.fixture(scope="module")
def model_and_tokenizer():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    if not (MODEL_DIR / "model.safetensors").exists():
        pytest.skip("shipped model missing")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    tok = transformers.AutoTokenizer.from_pretrained(str(MODEL_DIR))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(MODEL_DIR), dtype=torch.float32)
    model.eval()
    return model, tok


def test_checkpoint_is_small_and_llama() -> None:
    if not (MODEL_DIR / "model.safetensors").exists():
        pytest.skip("shipped model missing")
    cfg = json.loads((MODEL_DIR / "config.json").read_text())
    assert cfg["model_type"] == "llama"
    assert cfg["num_key_value_heads"] < cfg["num_attention_heads"]  # GQA
    assert cfg["max_position_embeddings"] >= 2048
    assert (MODEL_DIR / "model.safetensors").stat().st_size < 16 * 2**20


def test_passkey_accuracy_full_precision(model_and_tokenizer) -> None:
    import torch

    model, tok = model_and_tokenizer
    rng = random.Random(2024)
    samples = [
        evaldata.passkey_sample(rng, length, depth, tok)
        for length in (256, 512, 768, 1024)
        for depth in (0.0, 0.25, 0.5, 0.75, 1.0)
    ]
    hits = 0
    with torch.no_grad():
        for length in sorted({s.num_tokens for s in samples}):
            group = [s for s in samples if s.num_tokens == length]  # equal lengths: no padding
            x = torch.tensor([evaldata.prompt_token_ids(tok, s.prompt) for s in group])
            out = model.generate(
                input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=8, do_sample=False,
                pad_token_id=tok.pad_token_id,
            )
            for row, s in zip(out, group):
                hits += evaldata.score_answer(tok.decode(row[x.shape[1]:], skip_special_tokens=True), s.answer)
    acc = hits / len(samples)
    assert acc >= 0.9, f"passkey accuracy {acc:.2f} < 0.90"
