"""Seeded long-context retrieval prompts (passkey, key-value recall) and filler text.

Shared by ``benchmarks/train_eval_model.py`` (training mixture) and the quality
harness, so that the evaluation prompts are exactly the distribution the tiny
evaluation model was trained on.

Design notes
------------
* Every prompt is assembled from *segments* ``(text, role)``; each segment's text
  carries its own leading space, and the prompt is their concatenation.  With the
  word-level pre-tokenizer of ``models/fade-tiny-llama`` (whitespace, one token per digit)
  token counts are additive over segments, which is how a target token length is
  hit exactly without re-tokenizing the whole prompt for every sentence.
* Filler comes from a small generative grammar over word lists (no digits, never
  the phrases used by needles or queries), so the only digits in a prompt are the
  values to retrieve.
* Scoring: greedy-decode a few tokens after the prompt and compare the first run of
  digits with ``answer`` (:func:`score_answer`).  The prompt ends with ``... is``;
  the model answers `` 71432.``.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

__all__ = [
    "FillerGenerator",
    "ClassicFiller",
    "CLASSIC_FILLER",
    "FILLERS",
    "EvalSample",
    "PASSKEY_PREAMBLE",
    "PASSKEY_QUESTION",
    "passkey_sample",
    "passkey_prompt",
    "kv_recall_sample",
    "kv_recall_prompt",
    "filler_text",
    "score_answer",
    "tokenizer_corpus",
]

# ---------------------------------------------------------------------------------------
# Word lists.  Kept disjoint from the key vocabulary below so filler never mentions a key.
# ---------------------------------------------------------------------------------------
_NAMES = (
    "Anna Ben Clara David Elena Frank Grace Henry Iris Jack Karen Leo Maria Nora Oscar "
    "Paula Quinn Rosa Sam Tina Victor Wendy Adam Beth Carl Diana Emil Fiona Hugo Lucy"
).split()
_NOUNS = (
    "farmer teacher sailor baker doctor child dog cat horse bird tree river mountain house "
    "garden window door letter book lamp table chair bridge road boat train wagon market "
    "village city castle tower forest field lake stone flower apple bread basket coat hat "
    "song story dream storm cloud wind candle mirror clock key ladder bell rope map painting "
    "kettle blanket fence well shadow king queen soldier merchant"
).split()
_ADJS = (
    "old young quiet loud small large bright dark warm cold green blue yellow red white "
    "heavy light gentle strange famous hidden broken tall narrow wide busy empty ancient "
    "little happy tired careful sleepy golden wooden silent distant humble clever brave"
).split()
# Transitive verbs as (past, base) pairs; the base form feeds the question template.
_VERBS_T = tuple(
    tuple(p.split("/"))
    for p in (
        "found/find carried/carry painted/paint watched/watch opened/open closed/close "
        "followed/follow visited/visit cleaned/clean repaired/repair built/build "
        "noticed/notice admired/admire sold/sell bought/buy borrowed/borrow dropped/drop "
        "lifted/lift pushed/push pulled/pull washed/wash described/describe "
        "remembered/remember forgot/forget hid/hide shared/share moved/move packed/pack"
    ).split()
)
_VERBS_I = (
    "walked waited laughed slept rested wandered listened smiled worked danced sang "
    "travelled stayed returned paused whispered shouted hurried"
).split()
_ADVS = (
    "slowly quickly quietly happily carefully early late often rarely suddenly calmly "
    "gladly softly patiently briefly"
).split()
_PREPS = "across near behind beside inside under over past through around toward".split()
_PLACES = (
    "valley harbor meadow hill square station library kitchen orchard cellar attic bakery "
    "chapel barn courtyard riverbank workshop garden market hallway"
).split()
_TIMES = (
    "morning evening night afternoon winter summer spring autumn week holiday festival "
    "harvest"
).split()

# Key vocabulary for key-value recall (two-word keys: "<color> <animal>").
_KEY_COLORS = (
    "crimson amber azure violet scarlet ivory olive teal indigo coral silver copper jade "
    "maroon cobalt purple orange pink"
).split()
_KEY_ANIMALS = (
    "otter falcon badger heron lynx walrus gecko bison ferret jackal koala lemur marten "
    "puffin raven tapir vulture weasel zebra panda moose beaver camel donkey"
).split()

_TEMPLATES = (
    "The {adj} {noun} {vt} the {adj2} {noun2}.",
    "{name} {vi} {adv} {prep} the {place}.",
    "In the {place}, {name} {vt} {a_adj} {noun}.",
    "{name} said that the {noun} was {adj}.",
    "It was {a_adj} {time} in the {place}.",
    "The {noun} {prep} the {place} {vi} {adv}.",
    "{name} and {name2} {vt} the {adj} {noun} {prep} the {place}.",
    "Nobody knew why the {noun} was so {adj}.",
    "After the {time}, {name} {vi} {adv}.",
    "Every {time} the {adj} {noun} {vi} {prep} the {place}.",
    "{name} {vt} the {noun}, and the {noun2} {vi} {adv}.",
    "There was {a_adj} {noun} {prep} the {place}.",
    "Later that {time}, the {noun} seemed {adj} and {adj2}.",
    "{name} {vi} {prep} the {adj} {place} and {vi2} {adv}.",
    "Why did {name} {vt_base} the {noun}?",
    "The {place} was {adj}, but the {noun} was {adj2}.",
)

PASSKEY_PREAMBLE = (
    "There is an important info hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about the important information there."
)
PASSKEY_QUESTION = "\nWhat is the pass key? The pass key is"
_KV_PREAMBLE = (
    "Below is a story with some secret codes hidden in it. "
    "Remember every code; you will be asked about one of them."
)


class FillerGenerator:
    """Natural-looking, digit-free sentences from a small grammar, driven by ``rng``.

    ``repeat_prob`` > 0 makes a sentence, with that probability, a verbatim repeat of an
    earlier one (training data only: it gives dense long-range copy signal, which is what
    makes induction/retrieval heads form quickly)."""

    def __init__(self, rng: random.Random, repeat_prob: float = 0.0) -> None:
        self.rng = rng
        self.repeat_prob = repeat_prob
        self._history: list[str] = []

    def sentence(self) -> str:
        if self.repeat_prob > 0.0 and self._history and self.rng.random() < self.repeat_prob:
            return self.rng.choice(self._history)
        s = self._fresh()
        if self.repeat_prob > 0.0:
            self._history.append(s)
        return s

    def _fresh(self) -> str:
        r = self.rng
        vt, vt_base = r.choice(_VERBS_T)
        adj = r.choice(_ADJS)
        fields = {
            "name": r.choice(_NAMES), "name2": r.choice(_NAMES),
            "noun": r.choice(_NOUNS), "noun2": r.choice(_NOUNS),
            "adj": adj, "adj2": r.choice(_ADJS),
            "a_adj": ("an " if adj[0] in "aeiou" else "a ") + adj,
            "vt": vt, "vt_base": vt_base,
            "vi": r.choice(_VERBS_I), "vi2": r.choice(_VERBS_I),
            "adv": r.choice(_ADVS), "prep": r.choice(_PREPS),
            "place": r.choice(_PLACES), "time": r.choice(_TIMES),
        }
        return r.choice(_TEMPLATES).format(**fields)

    def sentences(self, n: int) -> list[str]:
        return [self.sentence() for _ in range(n)]


# The passkey filler of Mohtashami & Jaggi (2023, "Landmark Attention"), which most passkey evaluations use: five
# sentences over and over, so the needle is the only new text in the prompt. It tests whether the model can still
# reach the needle through the cache; the varied filler also tests reading, which small models lose past ~2K tokens.
CLASSIC_FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
                  "There and back again.")
FILLERS = ("varied", "classic")


class ClassicFiller:
    """:data:`CLASSIC_FILLER` in a cycle; the same interface as :class:`FillerGenerator`."""

    def __init__(self) -> None:
        self._next = 0

    def sentence(self) -> str:
        s = CLASSIC_FILLER[self._next % len(CLASSIC_FILLER)]
        self._next += 1
        return s

    _fresh = sentence  # the gap closer truncates a fresh sentence

    def sentences(self, n: int) -> list[str]:
        return [self.sentence() for _ in range(n)]


def filler_text(rng: random.Random, num_sentences: int) -> str:
    """Plain filler paragraph (for tokenizer training, language-modelling data, demos)."""
    return " ".join(FillerGenerator(rng).sentences(num_sentences))


# ---------------------------------------------------------------------------------------
# Tokenizer helpers.  Accept an HF fast tokenizer or a raw ``tokenizers.Tokenizer``.
# ---------------------------------------------------------------------------------------
def _backend(tokenizer: Any) -> Any:
    return getattr(tokenizer, "backend_tokenizer", tokenizer)


def _piece_lengths(tokenizer: Any, texts: Sequence[str]) -> list[int]:
    encs = _backend(tokenizer).encode_batch(list(texts), add_special_tokens=False)
    return [len(e.ids) for e in encs]


def _special_overhead(tokenizer: Any) -> int:
    # Tokens the post-processor adds around a prompt (BOS for the shipped tokenizer).
    return len(_backend(tokenizer).encode("", add_special_tokens=True).ids)


def prompt_token_ids(tokenizer: Any, text: str) -> list[int]:
    """Token ids the model sees for ``text`` (special tokens included, as SGLang/HF add them)."""
    return list(_backend(tokenizer).encode(text, add_special_tokens=True).ids)


# ---------------------------------------------------------------------------------------
# Samples
# ---------------------------------------------------------------------------------------
@dataclass
class EvalSample:
    """One retrieval prompt.  ``prompt`` == ``"".join(text for text, _ in segments)``."""

    prompt: str
    answer: str
    segments: list[tuple[str, str]]  # (text, role); roles: prefix filler needle query answer
    num_tokens: int  # prompt tokens incl. special tokens
    needle_token_starts: list[int] = field(default_factory=list)  # incl. BOS offset
    depth_fractions: list[float] = field(default_factory=list)  # requested depth of each needle
    extra: dict[str, Any] = field(default_factory=dict)


def _random_number(rng: random.Random, digits: int) -> str:
    # First digit non-zero so the value reads as a number; rest uniform.
    return str(rng.randint(1, 9)) + "".join(str(rng.randint(0, 9)) for _ in range(digits - 1))


def _fill_to_budget(
    rng: random.Random, tokenizer: Any, budget: int, batch: int = 32, repeat_prob: float = 0.0,
    filler: str = "varied",
) -> tuple[list[str], list[int]]:
    """Sentences (each with a leading space) whose token counts sum to exactly ``budget``
    (or as close as the word granularity allows, never above); ``filler`` is one of :data:`FILLERS`."""
    if filler not in FILLERS:
        raise ValueError(f"filler {filler!r}: expected one of {', '.join(FILLERS)}")
    gen = ClassicFiller() if filler == "classic" else FillerGenerator(rng, repeat_prob)
    out: list[str] = []
    lens: list[int] = []
    total = 0
    skips = 0
    # Whole sentences while they fit; skip one that would leave a 1-token gap (the
    # shortest truncated sentence, "Word.", is 2 tokens).  Stop after a run of misfits:
    # the remainder is then shorter than most sentences and is closed below.
    while skips < 8:
        cand = [" " + s for s in gen.sentences(batch)]
        for s, n in zip(cand, _piece_lengths(tokenizer, cand)):
            left = budget - total - n
            if left < 0 or left == 1:
                skips += 1
                if skips >= 8:
                    break
                continue
            skips = 0
            out.append(s)
            lens.append(n)
            total += n
            if left == 0:
                return out, lens
    remaining = budget - total
    if remaining <= 0:
        return out, lens
    # Close the gap with a truncated sentence; try a few so the count is exact.
    best: tuple[str, int] | None = None
    for _ in range(24):
        words = gen._fresh().rstrip(".?").split(" ")
        prefixes = [" " + " ".join(words[:k]) + "." for k in range(1, len(words) + 1)]
        for p, n in zip(prefixes, _piece_lengths(tokenizer, prefixes)):
            if n <= remaining and (best is None or n > best[1]):
                best = (p, n)
        if best is not None and best[1] == remaining:
            break
    if best is not None:
        out.append(best[0])
        lens.append(best[1])
    return out, lens


def _place_needles(
    sentences: list[str],
    lens: list[int],
    needles: list[tuple[str, str]],
    needle_lens: list[int],
    depths: list[float],
) -> tuple[list[tuple[str, str]], list[int]]:
    """Interleave needle segments into filler at the sentence boundaries nearest each depth.

    Returns the segments and, per needle (input order), its token offset from the start
    of the filler region."""
    cum = [0]
    for n in lens:
        cum.append(cum[-1] + n)
    by_boundary: dict[int, list[int]] = {}
    for i, d in enumerate(depths):
        # boundary b = "before sentence b"
        b = min(range(len(cum)), key=lambda j: abs(cum[j] - d * cum[-1]))
        by_boundary.setdefault(b, []).append(i)
    segs: list[tuple[str, str]] = []
    offsets = [0] * len(needles)
    pos = 0
    for b in range(len(sentences) + 1):
        for i in by_boundary.get(b, []):
            offsets[i] = pos
            segs.append(needles[i])
            pos += needle_lens[i]
        if b < len(sentences):
            segs.append((sentences[b], "filler"))
            pos += lens[b]
    return segs, offsets


def _assemble(
    rng: random.Random,
    tokenizer: Any,
    context_tokens: int,
    head: list[tuple[str, str]],
    needles: list[tuple[str, str]],
    depths: list[float],
    tail: list[tuple[str, str]],
    filler_repeat: float = 0.0,
    filler: str = "varied",
) -> tuple[list[tuple[str, str]], int, list[int]]:
    fixed = head + needles + tail
    fixed_len = sum(_piece_lengths(tokenizer, [t for t, _ in fixed])) + _special_overhead(tokenizer)
    budget = context_tokens - fixed_len
    if budget < 0:
        raise ValueError(f"context_tokens={context_tokens} is shorter than the fixed text ({fixed_len})")
    sentences, lens = _fill_to_budget(rng, tokenizer, budget, repeat_prob=filler_repeat, filler=filler)
    needle_lens = _piece_lengths(tokenizer, [t for t, _ in needles])
    body, offsets = _place_needles(sentences, lens, needles, needle_lens, depths)
    segs = head + body + tail
    start = _special_overhead(tokenizer) + sum(_piece_lengths(tokenizer, [t for t, _ in head]))
    return segs, start, [start + o for o in offsets]


def passkey_sample(
    rng: random.Random,
    context_tokens: int,
    depth_fraction: float,
    tokenizer: Any,
    digits: int = 5,
    filler_repeat: float = 0.0,
    filler: str = "varied",
) -> EvalSample:
    """Passkey retrieval prompt of exactly ``context_tokens`` tokens (BOS included) when
    the filler granularity allows (always within a couple of tokens, never above).

    ``depth_fraction`` places the needle at that fraction of the filler (0 = right after
    the preamble, 1 = right before the question). ``filler``: ``varied`` (sentences from the grammar) or
    ``classic`` (:data:`CLASSIC_FILLER` repeated)."""
    if not 0.0 <= depth_fraction <= 1.0:
        raise ValueError("depth_fraction must be in [0, 1]")
    key = _random_number(rng, digits)
    needle = (f" The pass key is {key}. Remember it. {key} is the pass key.", "needle")
    segs, _, starts = _assemble(
        rng, tokenizer, context_tokens,
        head=[(PASSKEY_PREAMBLE, "prefix")],
        needles=[needle],
        depths=[depth_fraction],
        tail=[(PASSKEY_QUESTION, "query")],
        filler_repeat=filler_repeat,
        filler=filler,
    )
    prompt = "".join(t for t, _ in segs)
    return EvalSample(
        prompt=prompt,
        answer=key,
        segments=segs,
        num_tokens=len(prompt_token_ids(tokenizer, prompt)),
        needle_token_starts=starts,
        depth_fractions=[depth_fraction],
    )


def passkey_prompt(
    rng: random.Random, context_tokens: int, depth_fraction: float, tokenizer: Any, digits: int = 5
) -> tuple[str, str]:
    """``(prompt_text, answer_text)`` for passkey retrieval; see :func:`passkey_sample`."""
    s = passkey_sample(rng, context_tokens, depth_fraction, tokenizer, digits)
    return s.prompt, s.answer


def _kv_keys(rng: random.Random, n: int) -> list[str]:
    pool = [f"{c} {a}" for c in _KEY_COLORS for a in _KEY_ANIMALS]
    return rng.sample(pool, n)


def kv_recall_sample(
    rng: random.Random,
    context_tokens: int,
    tokenizer: Any,
    num_pairs: int = 8,
    query_index: int | None = None,
    depths: Sequence[float] | None = None,
    digits: int = 5,
    num_queries: int = 1,
    filler_repeat: float = 0.0,
) -> EvalSample:
    """Associative recall: ``num_pairs`` sentences ``The code of the <key> is <value>.``
    scattered in filler, then ``num_queries`` questions.  Keys are two words (color +
    animal) and share words across pairs, so the model must match the whole key.

    With ``num_queries == 1`` the prompt ends with ``... The code of the <key> is`` and
    ``answer`` is that key's value (``query_index`` picks the pair; default random).
    With more queries (training documents) every query but the last is answered inline
    (role ``answer``); ``answer``/``extra['query_index']`` describe the last one."""
    if depths is None:
        depths = sorted(rng.random() for _ in range(num_pairs))
    if len(depths) != num_pairs:
        raise ValueError("need one depth per pair")
    keys = _kv_keys(rng, num_pairs)
    values = [_random_number(rng, digits) for _ in range(num_pairs)]
    needles = [(f" The code of the {k} is {v}.", "needle") for k, v in zip(keys, values)]
    if num_queries == 1:
        order = [rng.randrange(num_pairs) if query_index is None else query_index]
    else:
        order = rng.sample(range(num_pairs), min(num_queries, num_pairs))
    tail: list[tuple[str, str]] = []
    for j, qi in enumerate(order):
        lead = "\n" if j == 0 else " "
        tail.append((f"{lead}What is the code of the {keys[qi]}? The code of the {keys[qi]} is", "query"))
        if j < len(order) - 1:
            tail.append((f" {values[qi]}.", "answer"))
    segs, _, starts = _assemble(
        rng, tokenizer, context_tokens,
        head=[(_KV_PREAMBLE, "prefix")],
        needles=needles,
        depths=list(depths),
        tail=tail,
        filler_repeat=filler_repeat,
    )
    prompt = "".join(t for t, _ in segs)
    return EvalSample(
        prompt=prompt,
        answer=values[order[-1]],
        segments=segs,
        num_tokens=len(prompt_token_ids(tokenizer, prompt)),
        needle_token_starts=starts,
        depth_fractions=list(depths),
        extra={"keys": keys, "values": values, "query_index": order[-1], "query_order": order},
    )


def kv_recall_prompt(
    rng: random.Random, context_tokens: int, tokenizer: Any, num_pairs: int = 8
) -> tuple[str, str]:
    """``(prompt_text, answer_text)`` for single-query key-value recall."""
    s = kv_recall_sample(rng, context_tokens, tokenizer, num_pairs=num_pairs)
    return s.prompt, s.answer


_DIGITS_RE = re.compile(r"\d+")


def score_answer(generated: str, answer: str) -> bool:
    """Exact match of the first run of digits in the model's continuation."""
    # Word-level tokenizers decode digits space-separated ("7 1 4 3 2 ."): join them first.
    m = _DIGITS_RE.search(re.sub(r"(?<=\d)\s+(?=\d)", "", generated))
    return m is not None and m.group(0) == answer


def tokenizer_corpus(rng: random.Random, num_sentences: int = 20000) -> list[str]:
    """Text lines covering filler, needles, queries and numbers, for training the BPE.

    Fixed phrases (preambles, key words) are repeated enough that BPE gives them whole
    tokens instead of spelling them out letter by letter."""
    gen = FillerGenerator(rng)
    lines = [" ".join(gen.sentences(8)) for _ in range(num_sentences // 8)]
    keys = [f"{c} {a}" for c in _KEY_COLORS for a in _KEY_ANIMALS]
    for _ in range(num_sentences // 4):
        k, v = rng.choice(keys), _random_number(rng, 5)
        lines.append(f"The code of the {k} is {v}. What is the code of the {k}? The code of the {k} is {v}.")
        lines.append(f"The pass key is {v}. Remember it. {v} is the pass key.{PASSKEY_QUESTION} {v}.")
    lines.extend([PASSKEY_PREAMBLE, _KV_PREAMBLE] * (num_sentences // 10))
    return lines
