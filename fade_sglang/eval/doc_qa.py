"""Multi-turn document QA on a real pretrained model through the compressed cache
(``python -m fade_sglang.eval.doc_qa``).

Model: SmolLM2-135M-Instruct (:mod:`fade_sglang.eval.real_model`), served by real
``sglang.launch_server`` processes on CPU (bfloat16 weights and KV). Protocol, per setting:

1. turn 1 sends, per document (seeded, procedurally written reports of ~1400 tokens with
   names, numbers and dates), the chat prompt "report + question 1"; the answer is 40 greedy
   tokens at most (stops at the end-of-turn token). SGLang caches prompt and answer.
2. The server idles until fade's policy has demoted the cached conversations (``GET /fade/stats``
   polled; idle timers shortened with ``--fade-set warm_idle_seconds/cold_idle_seconds``, everything
   else is the preset's).
3. Turns 2 and 3 ask the next questions with the history teacher-forced: every server gets exactly
   the same prompt tokens (the fp16 server's answers are the history for all). Each turn-2/3 request
   must take its history from the cache (``meta_info.cached_tokens``), else the run fails, so no
   number bypasses the compressed KV. After each turn the server idles again.

Per setting: answers identical to the fp16 server's (turns 2-3; turn 1 runs on uncompressed KV and
is a sanity check), the first diverging token of those that differ, the NLL of the fp16 answers
(teacher forced, nats/token, ``return_logprob`` from the answer's first token, history from the
cache), fact recall (the fp16 answer's fact string appears in the answer), the measured compression
of the held conversations (``tokens x 16-bit bytes/token / stored bytes``, from ``/fade/stats``), and
passkey retrieval (:func:`fade_sglang.eval.quality._run_passkey`: cache the context, age it, ask; every
prompt's answer is kept). ``--docs 0`` runs passkey retrieval alone, e.g. with ``--passkey-per-cell`` for
enough prompts to tell 67% from 95%; ``--passkey-filler classic`` hides the needle in the standard test's five
repeated sentences instead of varied ones (SmolLM2-135M reads the varied filler only up to about 2K tokens).

Settings, all at the KV bytes of the fp16 server's ``--max-total-tokens`` (every server gets the same
``--max-total-tokens``: fade's pool is sized like plain SGLang's): ``fp16`` (plain SGLang),
``control`` (fade's pool, allocator and attention backend with both packed tiers off,
``tier_max_share`` 0, and idle timers that never fire; must reproduce fp16 token for token, and is
checked to have demoted nothing),
``fade-safe|balanced|aggressive`` (presets; safe ages to INT4, the others to INT2) and
``evict@fade-X`` (StreamingLLM-style eviction: sinks + a recent window per idle branch, the rest
dropped from attention, the window sized so that its stored bytes match fade-X's measured bytes).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Sequence

from ..config import FadeConfig
from . import evaldata, quality
from .demo import model_geometry
from .launcher import DEVICE_DEFAULT, ServerProcess, ServerStartupError, unwind_on_signals
from .real_model import ensure_smollm2

__all__ = ["Doc", "DocQAConfig", "make_docs", "settings_by_name", "run_doc_qa", "format_table", "main"]

QualityError = quality.QualityError
Setting = quality.Setting
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO_ROOT / ".cache" / "doc_qa"
DEFAULT_SETTINGS = "fp16,control,fade-safe,fade-balanced,fade-aggressive,evict@fade-balanced"
PRESET_AGE = {"safe": "int4", "balanced": "int2", "aggressive": "int2"}
NEVER = "1000000000"  # idle seconds: never
CONTROL_EXTRA = ("--fade-set", f"warm_idle_seconds={NEVER}", "--fade-set", f"cold_idle_seconds={NEVER}",
                 "--fade-set", 'tier_max_share={"warm": 0.0, "cold": 0.0}')
REQUEST_TIMEOUT_S = 600.0
INSTRUCTION = "Read the following report carefully and answer my questions about it in one sentence."


def _say(msg: str) -> None:
    print(f"[doc-qa {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- documents

_FIRST = ("Amelia Hart", "Jonas Berg", "Priya Nair", "Tomas Novak", "Grace Okafor", "Lucas Moreau", "Hannah Weiss",
          "Mateo Ruiz", "Ingrid Larsen", "Samuel Osei", "Clara Jensen", "Daniel Kim", "Elena Petrova", "Omar Haddad",
          "Sofia Rossi", "Victor Lindqvist", "Nadia Karim", "Felix Wagner", "Maya Fischer", "Arjun Mehta",
          "Lena Vogel", "Rafael Costa", "Yuki Tanaka", "Oliver Grant")
_TOWNS = ("Millbrook", "Eastwater", "Harrowgate", "Linden Falls", "Stonebridge", "Kestrel Bay", "Ashford",
          "Northwick", "Pine Hollow", "Redcliff", "Saltmarsh", "Westerly")
_ORGS = ("Water Authority", "Public Library Trust", "Harbour Commission", "Regional Rail Office",
         "Community Hospital", "Forestry Service", "School District", "Energy Cooperative")
_SITES = ("north reservoir", "old pumping station", "river crossing", "east depot", "main archive",
          "hill observatory", "harbour wall", "central warehouse", "west clinic", "seed bank", "ferry terminal",
          "signal tower", "orchard field", "quarry road", "market hall", "tunnel entrance")
_PROJECTS = ("bridge repair", "roof replacement", "flood barrier", "solar array", "reading program",
             "track renewal", "vaccination drive", "tree planting", "pipe upgrade", "archive digitization",
             "bus shelter program", "dock extension")
_ROLES = ("chief engineer", "head librarian", "safety officer", "finance director", "site manager",
          "training coordinator", "operations lead", "community liaison")
_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December")
_UNITS = ("visitors", "inspections", "repairs", "deliveries", "volunteers", "complaints")
_FILLER = (
    "Staff noted that the weather during the season made routine work around the {site} slower than planned.",
    "The committee thanked the volunteers from {town} for their patience and for the many hours they gave.",
    "Several residents wrote letters asking for clearer signs near the {site}, and the office promised to review them.",
    "A short training session on safe lifting was held for new staff, and most of them found it useful.",
    "The office also replaced a number of old computers, which had become slow and unreliable over the years.",
    "Work near the {site} was paused for a few days while crews waited for materials to arrive.",
    "Members of the public were invited to an open evening, where the plans for next year were explained.",
    "The team agreed that communication between departments had improved, although some delays remained.",
    "A local newspaper published a friendly article about the work of the {org} in {town}.",
    "During the autumn, heavy rain flooded a service road, and the crews cleared it within a week.",
    "The annual audit found the accounts in good order and made only minor recommendations.",
    "Several long-serving employees retired this year, and a small farewell dinner was held in their honour.",
    "Plans for a new visitor centre were discussed but postponed until funding becomes clearer.",
    "The board asked for a simpler monthly summary so that residents can follow the progress more easily.",
    "A new set of safety rules was introduced after a near miss involving a delivery truck at the {site}.",
    "The cleaning contract was renewed with the same company, which had delivered reliable service.",
)

_OPENERS = ("", "", "", "In {month}, ", "According to {person}, ", "As in previous years, ", "Meanwhile, ",
            "Later in the year, ", "In a note to the board, {person} explained that ", "By the end of {month}, ")


@dataclass
class Doc:
    title: str
    text: str
    questions: list[str]
    facts: list[str]  # the string each question's answer should contain
    num_tokens: int = 0


def _date(rng: random.Random) -> str:
    return f"{rng.choice(_MONTHS)} {rng.randint(2, 27)}, {rng.randint(2015, 2023)}"


def _fact_pool(rng: random.Random, town: str, org: str) -> list[tuple[str, str, str]]:
    """(sentence, question, fact) triples, each about a distinct site/project/role/person."""
    people = rng.sample(_FIRST, 12)
    sites = rng.sample(_SITES, 6)
    projects = rng.sample(_PROJECTS, 4)
    roles = rng.sample(_ROLES, 3)
    out = []
    for i, site in enumerate(sites[:3]):
        p, d = people[i], _date(rng)
        out.append((f"The inspection of the {site} was led by {p}, who arrived there on {d}.",
                    f"Who led the inspection of the {site}?", p))
    for site in sites[3:]:
        n, unit, month = rng.randint(120, 9800), rng.choice(_UNITS), rng.choice(_MONTHS)
        out.append((f"In {month}, the team recorded {n} {unit} at the {site}, more than in any other month.",
                    f"How many {unit} did the team record at the {site} in {month}?", str(n)))
    for project in projects[:2]:
        amount = rng.randint(15, 950) * 1000
        out.append((f"The budget for the {project} was set at {amount:,} dollars after a long discussion.",
                    f"What was the budget for the {project}?", f"{amount:,}"))
    for project in projects[2:]:
        p, year = people[3 + len(out) % 6], rng.randint(2016, 2024)
        out.append((f"The {project} was completed in {year} under the supervision of {p}.",
                    f"In which year was the {project} completed?", str(year)))
    for i, role in enumerate(roles):
        p, d = people[9 + i], _date(rng)
        out.append((f"{p} was appointed {role} of the {org} on {d}.", f"Who was appointed {role} of the {org}?", p))
    rng.shuffle(out)
    return out


def make_doc(tok: Any, rng: random.Random, target_tokens: int = 1400) -> Doc:
    """One report of about ``target_tokens`` tokens; the three asked facts sit in its first, middle and
    last third."""
    town, org = rng.choice(_TOWNS), rng.choice(_ORGS)
    title = f"Annual report of the {town} {org}"
    facts = _fact_pool(rng, town, org)
    asked = facts[:3]
    others = facts[3:]
    sentences: list[str] = []
    def fill() -> str:
        s = rng.choice(_FILLER).format(site=rng.choice(_SITES), town=town, org=org)
        opener = rng.choice(_OPENERS).format(month=rng.choice(_MONTHS), person=rng.choice(_FIRST))
        return opener + (s[0].lower() + s[1:] if opener else s)
    # Body: all facts spread among filler until the target length; measured with the real tokenizer.
    body = [s for s, _, _ in others]
    while True:
        sentences = list(body)
        text = " ".join(sentences)
        if len(tok.encode(f"{title}\n\n{text}", add_special_tokens=False)) >= target_tokens - 60:
            break
        body.insert(rng.randrange(len(body) + 1), fill())
    n = len(sentences)
    for k, (s, _, _) in enumerate(asked):  # first, middle, last third
        lo, hi = k * n // 3, max(k * n // 3 + 1, (k + 1) * n // 3)
        sentences.insert(rng.randint(lo, hi) + k, s)
    paras = [" ".join(sentences[i:i + 6]) for i in range(0, len(sentences), 6)]
    text = f"{title}\n\n" + "\n\n".join(paras)
    return Doc(title, text, [q for _, q, _ in asked], [f for _, _, f in asked],
               len(tok.encode(text, add_special_tokens=False)))


def make_docs(tok: Any, n: int, target_tokens: int = 1400, seed: int = 0) -> list[Doc]:
    rng = random.Random(seed)
    return [make_doc(tok, rng, target_tokens) for _ in range(n)]


# ----------------------------------------------------------------------------- conversations


def _ids(x: Any) -> list[int]:
    if hasattr(x, "keys"):
        x = x["input_ids"]
    return [int(t) for t in x]


def turn1_ids(tok: Any, doc: Doc) -> list[int]:
    msg = f"{INSTRUCTION}\n\n{doc.text}\n\nQuestion: {doc.questions[0]}"
    return _ids(tok.apply_chat_template([{"role": "user", "content": msg}], add_generation_prompt=True,
                                        tokenize=True))


def _turn_suffix(tok: Any, question: str) -> list[int]:
    """Tokens between an assistant answer's text and the next answer: end of turn, the user's next
    question, the generation prompt (taken from the chat template, so any template works)."""
    mark = "\u2063ANSWER\u2063"
    text = tok.apply_chat_template([{"role": "user", "content": "x"}, {"role": "assistant", "content": mark},
                                    {"role": "user", "content": f"Question: {question}"}],
                                   add_generation_prompt=True, tokenize=False)
    return tok.encode(text.split(mark, 1)[1], add_special_tokens=False)


def _stop_ids(tok: Any, model_path: Path) -> set[int]:
    ids = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    gen = model_path / "generation_config.json"
    if gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return ids


def next_turn_ids(tok: Any, prompt: list[int], answer: list[int], question: str, stop: set[int]) -> list[int]:
    body = list(answer)
    while body and body[-1] in stop:
        body.pop()
    return prompt + body + _turn_suffix(tok, question)


# ----------------------------------------------------------------------------- settings


def settings_by_name(names: Sequence[str], reference_given: bool = False) -> list[Setting]:
    """Settings in run order; the first must be fp16 (every server's history) unless ``--reference`` gives it."""
    out = []
    for name in names:
        if name == "fp16":
            out.append(Setting("fp16"))
        elif name == "control":
            out.append(Setting("control", "balanced", "int4", CONTROL_EXTRA))
        elif name.startswith("fade-") and name[5:] in PRESET_AGE:
            out.append(Setting(name, name[5:], PRESET_AGE[name[5:]]))
        elif name.startswith("evict@fade-") and name[11:] in PRESET_AGE:
            p = name[11:]
            if f"fade-{p}" not in names[: list(names).index(name)]:
                raise ValueError(f"{name} needs fade-{p} earlier in --settings (it matches its measured bytes)")
            out.append(Setting(name, p, PRESET_AGE[p], evict_like=f"fade-{p}"))
        else:
            raise ValueError(f"unknown setting {name!r} (fp16, control, fade-<preset>, evict@fade-<preset>; "
                             f"presets: {', '.join(PRESET_AGE)})")
    if out and out[0].name != "fp16" and not reference_given:
        raise ValueError("--settings must start with fp16 (its answers are every server's history)")
    return out


def with_knobs(settings: list[Setting], knobs: Sequence[str]) -> list[Setting]:
    """``knobs`` (``key=value``, checked against FadeConfig) added to every fade-<preset> setting, whose name
    then says so (``fade-balanced+protected_layers=18,23``)."""
    if not knobs:
        return settings
    pairs = []
    for knob in knobs:
        key, sep, value = knob.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--fade-set {knob!r}: expected KEY=VALUE")
        pairs.append((key.strip(), value.strip()))
    FadeConfig().with_overrides(dict(pairs))  # FadeConfigError (a ValueError) names a bad knob
    extra = tuple(a for k, v in pairs for a in ("--fade-set", f"{k}={v}"))
    suffix = "+" + "+".join(f"{k}={v}" for k, v in pairs)
    out = []
    for s in settings:
        if s.name.startswith("fade-"):
            s = dataclasses.replace(s, name=s.name + suffix, extra=s.extra + extra)
        elif s.evict_like:  # eviction matches the bytes of the (renamed) fade setting
            s = dataclasses.replace(s, evict_like=s.evict_like + suffix)
        out.append(s)
    return out


# ----------------------------------------------------------------------------- protocol


@dataclass
class DocQAConfig:
    model_path: Path
    docs: int = 6
    doc_tokens: int = 1400
    turns: int = 3
    answer_tokens: int = 40
    passkey_lengths: tuple[int, ...] = (2048, 4096, 7168)
    passkey_depths: int = 3
    passkey_per_cell: int = 1
    passkey_filler: str = "varied"  # evaldata.FILLERS
    base_tokens: int = 24576  # --max-total-tokens of every server (the same KV bytes for all)
    dtype: str = "bfloat16"
    age_timeout_s: float = 120.0
    seed: int = 0


@dataclass
class DocQAResult:
    name: str
    server_args: list[str] = field(default_factory=list)
    max_total_tokens: int = 0
    answers: list[list[list[int]]] = field(default_factory=list)  # doc -> turn -> output ids
    answer_texts: list[list[str]] = field(default_factory=list)
    identical: dict[str, list[int]] = field(default_factory=dict)  # "turn1"/"turn2+" -> [same, total]
    first_divergence: list[int] = field(default_factory=list)  # answers that differ (turns 2+)
    # Per answer token (turns 2+; turn 1 is not scored): the server's own top-1 minus top-2 log-probability
    # with the reference answer teacher-forced, doc -> turn -> token. Small margins are near-ties that any
    # perturbation of the KV (or of the numerics) can flip.
    margins: list[list[list[float]]] = field(default_factory=list)
    # Where an answer parts from the reference: doc, turn, token, the reference's own margin there and how far
    # this server preferred its token over the reference's (nats).
    divergences: list[dict[str, Any]] = field(default_factory=list)
    nll: float | None = None  # nats/token of the fp16 answers, turns 2+
    fact_recall: list[int] = field(default_factory=lambda: [0, 0])
    cached_min_fraction: float = 1.0  # smallest cached_tokens / history tokens of a turn 2+ request
    compression_vs_16bit: float | None = None  # held conversations after the last turn
    stored_bytes: int | None = None
    held_tokens: int | None = None
    demoted_tokens: int | None = None
    snapshots: list[dict[str, Any]] = field(default_factory=list)
    passkey: dict[str, float] = field(default_factory=dict)
    passkey_compression_vs_16bit: dict[str, float] = field(default_factory=dict)
    passkey_answers: list[dict[str, Any]] = field(default_factory=list)  # per prompt: length, depth, answer, hit
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _bytes16(geom: Any) -> int:
    return 2 * geom.layers * geom.kv_heads * geom.head_dim * 2  # K and V, every layer, 16-bit


def _snapshot(stats: dict[str, Any], bytes16: int) -> dict[str, Any]:
    return {"tokens": int(stats["tokens"]), "stored_bytes": int(stats["stored_bytes"]),
            "compression_vs_16bit": round(int(stats["tokens"]) * bytes16 / max(1, int(stats["stored_bytes"])), 4),
            "server_ratio": float(stats["compression_ratio"]), "tree_tokens": stats["radix"]["tree_tokens"],
            "demoted_tokens": stats["demoted_tokens"]}


def _cached(out: dict[str, Any]) -> int:
    return int(out["meta_info"].get("cached_tokens", 0))


def _check_history_cached(setting: Setting, what: str, out: dict[str, Any], history: int) -> float:
    cached = _cached(out)
    if cached < history - 1:
        raise QualityError(f"{setting.name}: {what}: only {cached} of {history} history tokens came from the "
                           "cache; the answer would not be computed over the cached (compressed) KV")
    return cached / max(1, history)


@dataclass
class Scored:
    """A teacher-forced pass over ``answer`` after ``prompt``."""
    nll_sum: float
    count: int
    margins: list[float]  # per answer token: top-1 minus top-2 log-probability
    preference: list[float]  # per answer token: top-1 log-probability minus the answer token's
    out: dict[str, Any]


def _score(srv: ServerProcess, prompt: list[int], answer: list[int]) -> Scored:
    """Teacher-forced NLL of ``answer`` after ``prompt``, with the top-2 log-probabilities at every answer token."""
    out = srv.request("/generate", quality.scoring_request(prompt, answer, top_logprobs=2))
    scored = quality.scored_logprobs(out)
    if len(scored) != len(answer):
        raise QualityError(f"scoring returned {len(scored)} log-probabilities for a {len(answer)}-token answer")
    margins = [top[0] - top[1] if len(top) >= 2 else float("nan") for _, top in scored]
    preference = [top[0] - lp if top else float("nan") for lp, top in scored]
    return Scored(-sum(lp for lp, _ in scored), len(scored), margins, preference, out)


def _first_divergence(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


# The servers compute bfloat16 logits, rounded in steps of 1/8 nat between 16 and 32 (1/16 between 8 and 16...):
# two tokens whose log-probabilities differ by 1/8 nat or less may be ordered by that rounding, not by the model.
TIE_NATS = 0.125


def parted_at_tie(divergence: dict[str, Any]) -> bool:
    """Whether an answer parted where both servers were all but indifferent: the reference's own top-1/top-2 margin
    there and this server's preference for its token both at most :data:`TIE_NATS`."""
    ref, pref = divergence.get("reference_margin"), divergence.get("preference")
    return ref is not None and pref is not None and ref <= TIE_NATS and pref <= TIE_NATS


def _divergence(reference: DocQAResult | None, doc: int, turn: int, at: int, scored: Scored) -> dict[str, Any]:
    """Where an answer parts from the reference (``at`` may be the answer's end: one stopped earlier)."""
    ref_margins = reference.margins[doc][turn] if reference is not None and reference.margins else []
    return {"doc": doc, "turn": turn + 1, "token": at,
            "reference_margin": ref_margins[at] if at < len(ref_margins) else None,
            "preference": round(scored.preference[at], 4) if at < len(scored.preference) else None}


def run_doc_qa_on(srv: ServerProcess, setting: Setting, cfg: DocQAConfig, tok: Any, docs: list[Doc],
                  res: DocQAResult, qres: quality.SettingResult, reference: DocQAResult | None,
                  bytes16: int) -> None:
    """The multi-turn protocol on a running server (docs one at a time, turn by turn)."""
    stop = _stop_ids(tok, cfg.model_path)
    compressed = setting.preset is not None and setting.name != "control"
    ref = reference.answers if reference is not None else None
    prompts = [turn1_ids(tok, d) for d in docs]
    res.answers = [[] for _ in docs]
    res.answer_texts = [[] for _ in docs]
    res.margins = [[[]] for _ in docs]  # turn 1 is not scored
    nll_sum, nll_count = 0.0, 0
    same = {"turn1": [0, 0], "turn2+": [0, 0]}
    srv.flush_cache()
    for t in range(cfg.turns):
        for i, doc in enumerate(docs):
            if t > 0:
                history = len(prompts[i])
                prev_ref = ref[i][t - 1] if ref is not None else res.answers[i][t - 1]
                prompts[i] = next_turn_ids(tok, prompts[i], prev_ref, doc.questions[t], stop)
            out = srv.generate(input_ids=prompts[i], max_new_tokens=cfg.answer_tokens, ignore_eos=False)
            ids = [int(x) for x in out["output_ids"]]
            res.answers[i].append(ids)
            res.answer_texts[i].append(out["text"])
            want = ref[i][t] if ref is not None else ids
            key = "turn1" if t == 0 else "turn2+"
            same[key][1] += 1
            same[key][0] += int(ids == want)
            if t > 0:
                frac = _check_history_cached(setting, f"doc {i} turn {t + 1}", out, history)
                res.cached_min_fraction = min(res.cached_min_fraction, frac)
                res.fact_recall[1] += 1
                res.fact_recall[0] += int(doc.facts[t].lower() in out["text"].lower())
                scored = _score(srv, prompts[i], want)
                _check_history_cached(setting, f"doc {i} turn {t + 1} (NLL)", scored.out, history)
                nll_sum += scored.nll_sum
                nll_count += scored.count
                res.margins[i].append([round(m, 4) for m in scored.margins])
                if ids != want:
                    at = _first_divergence(ids, want)
                    res.first_divergence.append(at)
                    res.divergences.append(_divergence(reference, i, t, at, scored))
        if compressed:
            stats = quality._wait_aged(srv, setting, cfg.age_timeout_s)
            res.snapshots.append({"after_turn": t + 1, **_snapshot(stats, bytes16)})
            qres.record("docqa", quality._measure(stats, len(docs)))
        elif setting.preset is not None:  # control: a snapshot, nothing may have moved
            res.snapshots.append({"after_turn": t + 1, **_snapshot(srv.fade_stats(), bytes16)})
        _say(f"{setting.name}: turn {t + 1}/{cfg.turns} done for {len(docs)} docs")
    res.identical = same
    res.nll = nll_sum / max(1, nll_count)
    if setting.preset is not None:
        stats = srv.fade_stats()
        res.demoted_tokens = int(sum(stats["demoted_tokens"].values()))
        last = res.snapshots[-1]
        res.compression_vs_16bit = last["compression_vs_16bit"]
        res.stored_bytes, res.held_tokens = last["stored_bytes"], last["tokens"]
        if setting.name == "control":
            tree = stats["radix"]["tree_tokens"]
            if res.demoted_tokens != 0 or any(v for k, v in tree.items() if k != "fp16"):
                raise QualityError(f"control: {res.demoted_tokens} tokens were demoted (tree {tree}); the control "
                                   "must keep everything in fp16")
        elif res.demoted_tokens == 0 and "evict" not in setting.name:
            raise QualityError(f"{setting.name}: nothing was demoted; the run did not exercise the compressed KV")


def _passkey_cfg(cfg: DocQAConfig, lengths: Sequence[int], tokens: int) -> quality.QualityConfig:
    return quality.QualityConfig(model_path=cfg.model_path, dtype=cfg.dtype, lengths=tuple(lengths),
                                 depths=cfg.passkey_depths, per_cell=cfg.passkey_per_cell, greedy_prompts=0,
                                 nll_prompts=0, max_total_tokens=tokens, age_timeout_s=cfg.age_timeout_s,
                                 seed=cfg.seed, passkey_filler=cfg.passkey_filler)


def _run_passkey_on(srv: ServerProcess, setting: Setting, cfg: DocQAConfig, lengths: Sequence[int], tokens: int,
                    tok: Any, res: DocQAResult, qres: quality.SettingResult, bytes16: int) -> None:
    """Passkey per length (shortest first); a length that fails (e.g. a prompt the server cannot
    prefill) is recorded in ``res.errors`` and ends this server's passkey run."""
    for n in sorted(lengths):
        qcfg = _passkey_cfg(cfg, (n,), tokens)
        try:
            if setting.preset is not None:
                srv.flush_cache()
                qcfg = quality._fit_batches_to_fp16(srv, qcfg)
            quality._run_passkey(srv, setting, qcfg, tok, qres)
        except Exception as e:  # noqa: BLE001 - reported per length, the other settings still run
            res.errors.append(f"passkey@{n}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            _say(f"{setting.name}: passkey@{n} FAILED: {res.errors[-1]}")
            return
        res.passkey.update({k: v for k, v in qres.passkey.items() if k != "all"})
        res.passkey_answers = list(qres.passkey_answers)
    for n in lengths:
        ms = qres.measured.get(f"passkey@{n}")
        if ms and setting.preset is not None:  # the server's ratio: KV dtype bytes (16-bit here) / stored
            res.passkey_compression_vs_16bit[str(n)] = round(sum(m["ratio"] for m in ms) / len(ms), 4)


def _server(model: Path, args: list[str], tokens: int, fade: bool) -> ServerProcess:
    # 10 minutes: on a loaded 2-core CPU the real model's server has been seen to need just over 5.
    return ServerProcess(model, args, max_total_tokens=tokens, startup_timeout_s=600,
                         attention_backend=None if fade else DEVICE_DEFAULT)


REFERENCE_KEYS = ("docs", "doc_tokens", "turns", "answer_tokens", "dtype", "seed", "passkey_filler")
# What a JSON written before a key existed ran with.
_REFERENCE_DEFAULTS = {f.name: f.default for f in fields(DocQAConfig) if f.name in REFERENCE_KEYS}


def load_reference(path: Path, cfg: DocQAConfig) -> DocQAResult:
    """The fp16 result of an earlier run over the same documents, questions and answer length, so that a run of
    fade settings alone compares with it (the fp16 server takes a third of a run's time on a CPU)."""
    try:
        data = json.loads(path.read_text())
        first = data["results"][0]
        old = data["config"]
    except (OSError, ValueError, KeyError, IndexError) as e:
        raise QualityError(f"--reference {path}: not a doc_qa.json ({e})") from None
    differ = [k for k in REFERENCE_KEYS if old.get(k, _REFERENCE_DEFAULTS[k]) != getattr(cfg, k)]
    if Path(old.get("model_path", "")).name != cfg.model_path.name:
        differ.append("model")
    if differ:
        raise QualityError(f"--reference {path}: its {', '.join(differ)} differ from this run's")
    if first.get("name") != "fp16" or not first.get("margins"):
        raise QualityError(f"--reference {path}: its first result is not an fp16 run with answer margins "
                           "(runs before 2026-12-07 evening have none)")
    try:
        return DocQAResult(**first)
    except TypeError as e:
        raise QualityError(f"--reference {path}: written by another doc_qa version ({e})") from None


def run_doc_qa(cfg: DocQAConfig, settings: Sequence[Setting],
               on_result: Callable[[list[DocQAResult], dict[str, Any]], None] | None = None,
               reference: DocQAResult | None = None) -> tuple[list[DocQAResult], dict[str, Any]]:
    """Run every setting (one server each; eviction: one per task) in order; ``on_result`` sees the
    results so far after each setting (for partial reports). Without a ``reference`` the first setting's
    answers are the reference."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(cfg.model_path))
    geom = model_geometry(cfg.model_path, cfg.dtype)
    bytes16 = _bytes16(geom)
    if geom.dtype_bytes != 2:
        _say(f"note: KV dtype {cfg.dtype} is not 16-bit; ratios are still stated against 16-bit KV")
    budget = geom.baseline_pool_bytes(cfg.base_tokens)
    docs = make_docs(tok, cfg.docs, cfg.doc_tokens, cfg.seed)
    meta = {"kv_dtype": cfg.dtype, "bytes_per_token_16bit": bytes16, "kv_budget_bytes": budget,
            "doc_tokens": [d.num_tokens for d in docs], "questions": [d.questions for d in docs],
            "facts": [d.facts for d in docs]}
    what = (f"{len(docs)} documents of {min(meta['doc_tokens'])}-{max(meta['doc_tokens'])} tokens" if docs
            else "passkey only")
    _say(f"{what}; passkey filler {cfg.passkey_filler}; KV budget {budget / 2**20:.1f} MiB "
         f"({cfg.base_tokens} tokens at {bytes16} B/token)")
    results: dict[str, DocQAResult] = {} if reference is None else {reference.name: reference}
    qresults: dict[str, quality.SettingResult] = {}
    for setting in settings:
        t0 = time.monotonic()
        fade = setting.preset is not None
        tokens = cfg.base_tokens  # the same KV bytes for every server: fade's pool is sized like plain SGLang's
        res = DocQAResult(setting.name, max_total_tokens=tokens)
        qres = quality.SettingResult(setting.name, [])
        runs: list[tuple[Setting, bool, tuple[int, ...]]] = []  # (server setting, doc qa?, passkey lengths)
        if setting.evict_like is None:
            lengths = () if setting.name == "control" else tuple(cfg.passkey_lengths)
            runs.append((setting, bool(docs), lengths))
        else:  # eviction: its window is a server knob, sized per task from the matched setting's bytes
            like = qresults[setting.evict_like]
            if docs:
                runs.append((quality.eviction_setting(setting, quality.keep_recent_for(like, "docqa")), True, ()))
            for n in cfg.passkey_lengths:
                keep = quality.keep_recent_for(like, f"passkey@{n}")
                runs.append((quality.eviction_setting(setting, keep), False, (n,)))
        for run_setting, docqa, lengths in runs:
            args = run_setting.server_args() + ["--dtype", cfg.dtype]
            res.server_args.append(" ".join(args))
            _say(f"{setting.name}: starting server (--max-total-tokens {tokens}) {' '.join(args)}")
            with _server(cfg.model_path, args, tokens, fade) as srv:
                request = srv.request  # long prompts through the CPU reference path: allow 10 minutes
                srv.request = lambda route, payload=None, timeout_s=REQUEST_TIMEOUT_S: request(  # type: ignore
                    route, payload, timeout_s)
                if docqa:
                    run_doc_qa_on(srv, run_setting, cfg, tok, docs, res, qres, reference, bytes16)
                if lengths:
                    _run_passkey_on(srv, run_setting, cfg, lengths, tokens, tok, res, qres, bytes16)
        res.seconds = round(time.monotonic() - t0, 1)
        results[setting.name], qresults[setting.name] = res, qres
        reference = reference or res
        _say(f"{setting.name}: done in {res.seconds:.0f}s; " + summary_line(res, reference))
        if on_result is not None:
            on_result(list(results.values()), meta)
    return list(results.values()), meta


# ----------------------------------------------------------------------------- report


def summary_line(r: DocQAResult, ref: DocQAResult | None) -> str:
    same = r.identical.get("turn2+", [0, 0])
    d = "" if ref is None or r.nll is None or ref.nll is None else f" (dNLL {r.nll - ref.nll:+.4f})"
    pk = " ".join(f"passkey@{k}={passkey_cell(r, int(k))}" for k in r.passkey)
    if r.nll is None:  # a passkey-only run
        return pk or "no results"
    return (f"identical turn 2-3 answers {same[0]}/{same[1]}, NLL {r.nll:.4f}{d}, "
            f"compression {r.compression_vs_16bit or 1.0:.2f}x {pk}")


def passkey_cell(r: DocQAResult, length: int) -> str:
    """Accuracy at one length, with the prompt counts when they were recorded ("67% (2/3)")."""
    if str(length) not in r.passkey:
        return "-"
    hits = [a["hit"] for a in r.passkey_answers if a["length"] == length]
    counts = f" ({sum(hits)}/{len(hits)})" if hits else ""
    return f"{r.passkey[str(length)]:.0%}{counts}"


def _ties(r: DocQAResult) -> str:
    """Divergences at a tie (:func:`parted_at_tie`) of all divergences, e.g. "3/4"."""
    if not r.divergences:
        return "-"
    return f"{sum(parted_at_tie(d) for d in r.divergences)}/{len(r.divergences)}"


def _margins_at_divergence(r: DocQAResult) -> str:
    """The reference's own top-1 minus top-2 log-probability where each answer parted, smallest first."""
    known = sorted(d["reference_margin"] for d in r.divergences if d.get("reference_margin") is not None)
    return " ".join(f"{m:.2f}" for m in known) or "-"


def format_table(results: Sequence[DocQAResult], lengths: Sequence[int]) -> str:
    """One row per setting; a passkey-only run (no answers anywhere) leaves out the QA columns."""
    base = next((r for r in results if r.name == "fp16"), None)
    qa = any(r.answers for r in results)
    qa_head = ["same t1", "same t2-3", "1st div", "fp16 margin there", "at a tie", "NLL", "dNLL", "recall"] if qa else []
    head = ["setting", "KV tokens", "compression", *qa_head, *[f"passkey@{n}" for n in lengths], "s"]
    rows = [head]
    for r in results:
        s1, s2 = r.identical.get("turn1", [0, 0]), r.identical.get("turn2+", [0, 0])
        div = f"{sum(r.first_divergence) / len(r.first_divergence):.1f}" if r.first_divergence else "-"
        dnll = "-" if base is None or r.nll is None or base.nll is None else f"{r.nll - base.nll:+.4f}"
        qa_cells = [f"{s1[0]}/{s1[1]}", f"{s2[0]}/{s2[1]}", div, _margins_at_divergence(r), _ties(r),
                    "-" if r.nll is None else f"{r.nll:.4f}", dnll,
                    f"{r.fact_recall[0]}/{r.fact_recall[1]}"] if qa else []
        passkey_ratios = list(r.passkey_compression_vs_16bit.values())
        if qa:  # the held conversations' ratio
            ratio = r.compression_vs_16bit or 1.0
        else:  # passkey only: the aged passkey prompts' ratio, mean over lengths
            ratio = statistics.fmean(passkey_ratios) if passkey_ratios else 1.0
        rows.append([r.name, str(r.max_total_tokens), f"{ratio:.2f}x", *qa_cells,
                     *[passkey_cell(r, n) for n in lengths], f"{r.seconds:.0f}"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fade_sglang.eval.doc_qa", description=__doc__.split("\n")[0])
    p.add_argument("--model-path", type=Path, default=None,
                   help="HF model directory (default: SmolLM2-135M-Instruct via fade_sglang.eval.real_model)")
    p.add_argument("--settings", default=DEFAULT_SETTINGS, help=f"comma separated (default {DEFAULT_SETTINGS})")
    p.add_argument("--docs", type=int, default=None,
                   help="documents (default 6; --quick 2; 0 = passkey retrieval only)")
    p.add_argument("--passkey-lengths", default=None, help="comma separated (default 2048,4096,7168; --quick 2048)")
    p.add_argument("--passkey-depths", type=int, default=3, help="needle depths per length, evenly in [0, 1]")
    p.add_argument("--passkey-per-cell", type=int, default=1, help="passkey prompts per (length, depth)")
    p.add_argument("--passkey-filler", choices=evaldata.FILLERS, default="varied",
                   help="passkey filler: varied sentences (default; SmolLM2-135M reads it up to ~2K tokens) or the "
                        "classic five sentences repeated (Mohtashami & Jaggi 2023; it reaches 4K-7K)")
    p.add_argument("--base-tokens", type=int, default=24576,
                   help="fp16 server's --max-total-tokens; every other server gets the same KV bytes")
    p.add_argument("--dtype", default="bfloat16", help="server dtype; KV is stored in it (default bfloat16)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="directory for doc_qa.json")
    p.add_argument("--quick", action="store_true", help="CI size: 2 documents, passkey at 2048 only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reference", type=Path, default=None, metavar="DOC_QA_JSON",
                   help="reuse the fp16 result of an earlier doc_qa.json with the same documents (skips the fp16 "
                        "server; --settings must then leave fp16 out)")
    p.add_argument("--fade-set", action="append", default=[], metavar="KEY=VALUE",
                   help="a fade knob for every fade-<preset> setting (repeatable), e.g. protected_layers=18,23")
    a = p.parse_args(argv)
    docs = a.docs if a.docs is not None else (2 if a.quick else 6)
    lengths_text = a.passkey_lengths or ("2048" if a.quick else "2048,4096,7168")
    try:
        lengths = tuple(int(x) for x in lengths_text.split(",") if x.strip())
    except ValueError:
        p.error(f"--passkey-lengths {lengths_text!r}: expected comma separated integers")
    names = [n.strip() for n in a.settings.split(",") if n.strip()]
    if a.reference is not None and "fp16" in names:
        p.error("--reference gives the fp16 result: leave fp16 out of --settings")
    try:
        settings = with_knobs(settings_by_name(names, reference_given=a.reference is not None), a.fade_set)
    except ValueError as e:
        p.error(str(e))
    if docs < 0 or a.passkey_depths < 1 or a.passkey_per_cell < 1:
        p.error("--docs must be >= 0, --passkey-depths and --passkey-per-cell >= 1")
    if docs == 0 and (a.reference is not None or "control" in names or not lengths):
        p.error("--docs 0 runs passkey retrieval only: it needs --passkey-lengths, runs fp16 itself (no --reference) "
                "and has no answers for control to match")
    try:
        model = a.model_path or ensure_smollm2()
    except RuntimeError as e:
        print(f"[doc-qa] error: {e}", file=sys.stderr)
        return 1
    if not (model / "config.json").is_file():
        p.error(f"--model-path {model}: no config.json (an HF model directory is needed)")
    if max(lengths, default=0) + 64 > a.base_tokens:
        p.error(f"--base-tokens {a.base_tokens} cannot hold a {max(lengths)}-token passkey prompt")
    cfg = DocQAConfig(model_path=model, docs=docs, passkey_lengths=lengths, passkey_depths=a.passkey_depths,
                      passkey_per_cell=a.passkey_per_cell, passkey_filler=a.passkey_filler,
                      base_tokens=a.base_tokens, dtype=a.dtype, seed=a.seed)
    reference = None
    if a.reference is not None:
        try:
            reference = load_reference(a.reference, cfg)
        except QualityError as e:
            p.error(str(e))
    t0 = time.monotonic()
    a.out.mkdir(parents=True, exist_ok=True)
    command = "python -m fade_sglang.eval.doc_qa " + " ".join(argv if argv is not None else sys.argv[1:])

    def write(results: list[DocQAResult], meta: dict[str, Any], complete: bool) -> str:
        table = format_table(results, lengths)
        payload = {"command": command, "complete": complete,
                   "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
                   "meta": meta, "wall_seconds": round(time.monotonic() - t0, 1), "table": table,
                   "results": [asdict(r) for r in results]}
        (a.out / "doc_qa.json").write_text(json.dumps(payload, indent=1) + "\n")
        return table

    try:
        with unwind_on_signals():
            results, meta = run_doc_qa(cfg, settings, on_result=lambda r, m: write(r, m, False), reference=reference)
    except QualityError as e:
        print(f"[doc-qa] FAILED: {e}", file=sys.stderr)
        return 2
    except ServerStartupError as e:
        print(f"[doc-qa] FAILED: {e.headline}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        done = a.out / "doc_qa.json"
        print("[doc-qa] interrupted; servers stopped" + (f"; settings finished so far: {done}" if done.is_file() else ""),
              file=sys.stderr)
        return 130
    wall = time.monotonic() - t0
    print(write(results, meta, True))
    when = "after the last turn" if docs else "with the aged passkey prompts held (mean over lengths)"
    print(f"KV in {meta['kv_dtype']}: compression = held tokens x {meta['bytes_per_token_16bit']} B (16-bit) / "
          f"stored bytes, from /fade/stats {when}; wall {wall:.0f}s")
    print(f"wrote {a.out / 'doc_qa.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
