"""Seeded retrieval prompts: determinism, exact token lengths, answer placement."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest

from fade_sglang.eval import evaldata

MODEL_DIR = Path(__file__).resolve().parents[1] / "models" / "fade-tiny-llama"


@pytest.fixture(scope="module")
def tokenizer():
    transformers = pytest.importorskip("transformers")
    if not (MODEL_DIR / "tokenizer.json").exists():
        pytest.skip("shipped tokenizer missing")
    return transformers.AutoTokenizer.from_pretrained(str(MODEL_DIR))


def test_filler_is_deterministic_varied_and_digit_free() -> None:
    a = evaldata.filler_text(random.Random(7), 200)
    b = evaldata.filler_text(random.Random(7), 200)
    c = evaldata.filler_text(random.Random(8), 200)
    assert a == b and a != c
    sentences = re.split(r"(?<=[.?]) ", a)
    assert len(set(sentences)) > 0.9 * len(sentences)  # not one repeated sentence
    assert not re.search(r"\d", a)
    assert "pass key" not in a and "code of" not in a


@pytest.mark.parametrize("length", [128, 300, 1024])
@pytest.mark.parametrize("depth", [0.0, 0.37, 1.0])
def test_passkey_length_depth_and_answer(tokenizer, length: int, depth: float) -> None:
    s = evaldata.passkey_sample(random.Random(length * 10 + int(depth * 100)), length, depth, tokenizer)
    ids = evaldata.prompt_token_ids(tokenizer, s.prompt)
    assert len(ids) == s.num_tokens == length
    # HF call path (what transformers / SGLang use) sees the same tokens.
    assert tokenizer(s.prompt).input_ids == ids
    assert ids[0] == tokenizer.bos_token_id
    assert re.fullmatch(r"[1-9]\d{4}", s.answer)
    assert s.prompt.endswith(evaldata.PASSKEY_QUESTION)
    # the value is stated only in the needle (twice: "is N. ... N is the pass key")
    assert s.prompt.count(s.answer) == 2
    assert len(re.findall(r"\d", s.prompt)) == 10
    # needle lies at the requested depth of the filler region
    start = s.needle_token_starts[0]
    assert tokenizer.decode(ids[start : start + 4]).strip() == "The pass key is"
    prefix_len = len(evaldata.prompt_token_ids(tokenizer, evaldata.PASSKEY_PREAMBLE))
    tail_len = len(tokenizer(evaldata.PASSKEY_QUESTION, add_special_tokens=False).input_ids)
    needle_len = len(tokenizer(f" The pass key is {s.answer}. Remember it. {s.answer} is the pass key.",
                               add_special_tokens=False).input_ids)
    filler = length - prefix_len - tail_len - needle_len
    rel = (start - prefix_len) / filler
    assert abs(rel - depth) <= 16 / filler + 1e-9  # within one sentence


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_classic_passkey_is_the_needle_in_five_repeated_sentences(tokenizer, depth: float) -> None:
    s = evaldata.passkey_sample(random.Random(3), 1024, depth, tokenizer, filler="classic")
    ids = evaldata.prompt_token_ids(tokenizer, s.prompt)
    assert len(ids) == s.num_tokens == 1024
    assert s.prompt.count(s.answer) == 2 and len(re.findall(r"\d", s.prompt)) == 10
    filler = [t.strip() for t, role in s.segments if role == "filler"]
    whole = [t for t in filler if t in evaldata.CLASSIC_FILLER]
    assert len(whole) >= len(filler) - 1  # at most one truncated sentence closes the length
    assert whole[:5] == list(evaldata.CLASSIC_FILLER)  # in their cycle
    roles = [role for _, role in s.segments]
    needle_at = roles.index("needle")
    fillers_before = roles[:needle_at].count("filler")
    assert abs(fillers_before / roles.count("filler") - depth) < 0.02
    with pytest.raises(ValueError, match="filler 'lorem'"):
        evaldata.passkey_sample(random.Random(3), 1024, depth, tokenizer, filler="lorem")


def test_passkey_deterministic(tokenizer) -> None:
    a = evaldata.passkey_prompt(random.Random(3), 512, 0.5, tokenizer)
    b = evaldata.passkey_prompt(random.Random(3), 512, 0.5, tokenizer)
    c = evaldata.passkey_prompt(random.Random(4), 512, 0.5, tokenizer)
    assert a == b and a != c


def test_segments_tokenize_additively(tokenizer) -> None:
    # Training builds ids segment by segment; that must equal tokenizing the prompt.
    s = evaldata.kv_recall_sample(random.Random(5), 700, tokenizer, num_pairs=6, num_queries=3)
    pieces = [tokenizer.bos_token_id]
    for text, _ in s.segments:
        pieces.extend(tokenizer(text, add_special_tokens=False).input_ids)
    assert pieces == tokenizer(s.prompt).input_ids
    assert "".join(t for t, _ in s.segments) == s.prompt


def test_kv_recall(tokenizer) -> None:
    rng = random.Random(11)
    s = evaldata.kv_recall_sample(rng, 800, tokenizer, num_pairs=8, query_index=2)
    assert s.num_tokens == 800
    keys, values = s.extra["keys"], s.extra["values"]
    assert len(set(keys)) == 8 and s.answer == values[2]
    assert s.prompt.endswith(f"The code of the {keys[2]} is")
    for k, v in zip(keys, values):
        assert s.prompt.count(f"The code of the {k} is {v}.") == 1
    # needles appear in depth order
    assert s.needle_token_starts == sorted(s.needle_token_starts)
    assert evaldata.kv_recall_prompt(random.Random(1), 400, tokenizer) == evaldata.kv_recall_prompt(
        random.Random(1), 400, tokenizer
    )


def test_score_answer() -> None:
    assert evaldata.score_answer(" 71432.", "71432")
    assert evaldata.score_answer("71432 is the pass key", "71432")
    assert not evaldata.score_answer(" 714325.", "71432")
    assert not evaldata.score_answer(" 7143.", "71432")
    assert not evaldata.score_answer(" the key", "71432")


def test_too_short_context_raises(tokenizer) -> None:
    with pytest.raises(ValueError):
        evaldata.passkey_sample(random.Random(0), 20, 0.5, tokenizer)
