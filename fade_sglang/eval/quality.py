"""Quality through the compressed cache, on the real serving path (``python -m fade_sglang.eval.quality``).

Every number comes from real ``sglang.launch_server`` processes. The protocol is the
multi-turn one fade-sglang is built for:

1. turn 1 sends each *context* (a document with a passkey, key-value pairs, or a story);
   SGLang caches it in the radix tree;
2. the contexts idle until the policy has demoted them to the setting's target tier
   (``int4`` / ``int2``), polled from ``GET /fade/stats``; the idle timers are shortened
   for the evaluation (``warm_idle_seconds`` / ``cold_idle_seconds``), the bits, groups,
   sinks and windows are the preset's;
3. turn 2 sends context + question: the context is served from the compressed cache
   (checked: ``meta_info.cached_tokens`` must cover it, else the run fails), the question
   and the answer run over it.

The effective compression ratio is measured from the pool stats after step 2 (fp16 bytes of
the held tokens / bytes they occupy), never computed from the config. The eviction baseline
(StreamingLLM-style: attention sinks + the most recent tokens of each cached context, the
rest dropped) runs the same protocol with ``evict_instead_of_demote``, its recent window
sized so that its measured bytes equal fade's measured bytes for the same contexts.

Metrics: passkey accuracy over a length x depth grid; greedy token match rate vs the fp16
server over ``--greedy-tokens`` generated tokens; teacher-forced NLL of key-value recall
questions+answers with compression applied to the context (delta vs fp16).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from . import evaldata
from .demo import DEFAULT_MODEL
from .launcher import DEVICE_DEFAULT, ServerProcess, ServerStartupError, unwind_on_signals

__all__ = ["Setting", "Item", "QualityConfig", "SettingResult", "default_settings", "passkey_items",
           "greedy_items", "nll_items", "run_setting", "run_quality", "main"]

FADE_BASE_ARGS = ("--kv-compression", "fade", "--attention-backend", "fade_torch")
# Evaluation timers: demote idle contexts within a second instead of the preset's seconds/minutes.
AGE_ARGS = {
    "int4": ("--fade-set", "warm_idle_seconds=0.3", "--fade-set", "cold_idle_seconds=100000"),
    "int2": ("--fade-set", "warm_idle_seconds=0.3", "--fade-set", "cold_idle_seconds=0.6"),
}


class QualityError(RuntimeError):
    """The evaluation could not measure what it claims (e.g. the context was not served from cache)."""


# ----------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Setting:
    """One server configuration. ``age_to`` None: plain SGLang, fp16 KV, nothing demoted."""

    name: str
    preset: str | None = None
    age_to: str | None = None
    extra: tuple[str, ...] = ()
    evict_like: str | None = None  # eviction baseline: match the measured bytes of this setting

    def server_args(self) -> list[str]:
        if self.preset is None:
            return list(self.extra)
        return [*FADE_BASE_ARGS, "--fade-preset", self.preset, *AGE_ARGS[self.age_to or "int4"], *self.extra]


def default_settings() -> list[Setting]:
    return [
        Setting("fp16"),
        Setting("fade-safe", "safe", "int4"),
        Setting("fade-balanced", "balanced", "int2"),
        Setting("evict@fade-balanced", "balanced", "int2", evict_like="fade-balanced"),
    ]


def eviction_setting(base: Setting, keep_recent: int) -> Setting:
    """``base`` turned into StreamingLLM-style eviction keeping sinks + ``keep_recent`` tokens."""
    return Setting(base.name, base.preset, base.age_to,
                   base.extra + ("--fade-set", "evict_instead_of_demote=true",
                                 "--fade-set", f"idle_recent_tokens={keep_recent}"), base.evict_like)


# ----------------------------------------------------------------------------- items


@dataclass
class Item:
    """One prompt: ``context`` ids are cached and aged first, then ``full`` = context + query runs."""

    task: str  # passkey | greedy | nll
    context: list[int]
    full: list[int]
    answer: str = ""
    length: int = 0
    depth: float = 0.0


def _split(tok: Any, context_text: str, full_text: str) -> tuple[list[int], list[int]]:
    full = evaldata.prompt_token_ids(tok, full_text)
    n = len(evaldata.prompt_token_ids(tok, context_text))
    return full[:n], full


def _fitting(make: Callable[[int], evaldata.EvalSample], length: int) -> evaldata.EvalSample:
    """The richest sample (most key-value pairs) whose fixed text fits in ``length`` tokens."""
    for pairs in (8, 4, 2, 1):
        try:
            return make(pairs)
        except ValueError:
            continue
    raise QualityError(f"{length} tokens cannot hold a task prompt with this tokenizer; use longer contexts")


def passkey_items(tok: Any, lengths: Sequence[int], depths: int, per_cell: int, seed: int = 0,
                  filler: str = "varied") -> list[Item]:
    """``per_cell`` passkey prompts per (length, depth); depths evenly spaced over [0, 1]; ``filler`` is one of
    :data:`evaldata.FILLERS`."""
    items = []
    for length in lengths:
        rng = random.Random(seed * 100_003 + length)  # per length: a one-length run gets the same prompts
        for d in range(depths):
            depth = d / max(1, depths - 1)
            for _ in range(per_cell):
                s = _fitting(lambda _: evaldata.passkey_sample(rng, length, depth, tok, filler=filler), length)
                context_text = s.prompt[: len(s.prompt) - len(evaldata.PASSKEY_QUESTION)]
                ctx, full = _split(tok, context_text, s.prompt)
                items.append(Item("passkey", ctx, full, s.answer, length, depth))
    return items


def greedy_items(tok: Any, length: int, count: int, seed: int = 1) -> list[Item]:
    """Stories of ``length`` tokens; the model continues them greedily."""
    rng = random.Random(seed)
    items = []
    for _ in range(count):
        # A long, natural-looking document (a passkey prompt; its question is just more text here).
        text = _fitting(lambda _: evaldata.passkey_sample(rng, length, rng.random(), tok), length).prompt
        ids = evaldata.prompt_token_ids(tok, text)
        items.append(Item("greedy", ids[:-1], ids, length=length))  # last token re-sent: the match is context-only
    return items


def nll_items(tok: Any, length: int, count: int, seed: int = 2) -> list[Item]:
    """Key-value recall documents: the context holds the pairs, the continuation asks and answers."""
    rng = random.Random(seed)
    items = []
    for _ in range(count):
        s = _fitting(lambda pairs: evaldata.kv_recall_sample(rng, length, tok, num_pairs=pairs,
                                                             num_queries=max(1, pairs // 2)), length)
        cut = next(i for i, (_, role) in enumerate(s.segments) if role == "query")
        context_text = "".join(t for t, _ in s.segments[:cut])
        ctx, full = _split(tok, context_text, s.prompt + f" {s.answer}.")
        items.append(Item("nll", ctx, full, s.answer, length))
    return items


# ----------------------------------------------------------------------------- protocol


@dataclass
class QualityConfig:
    model_path: Path = DEFAULT_MODEL
    dtype: str = "bfloat16"
    lengths: tuple[int, ...] = (256, 512, 1024)
    depths: int = 5
    per_cell: int = 4
    greedy_prompts: int = 4
    greedy_length: int = 512
    greedy_tokens: int = 256
    nll_prompts: int = 8
    nll_length: int = 512
    max_total_tokens: int = 131072  # KV of a tiny model: a few MB per 10K tokens
    batch_tokens: int = 12000  # context tokens cached at once (bounded by the packed tiers' room)
    age_timeout_s: float = 60.0
    seed: int = 0
    passkey_filler: str = "varied"  # evaldata.FILLERS: varied sentences, or the classic repeated five


@dataclass
class SettingResult:
    name: str
    server_args: list[str]
    passkey: dict[str, float] = field(default_factory=dict)  # "L" -> accuracy; "all"
    passkey_by_depth: dict[str, float] = field(default_factory=dict)
    # One record per passkey prompt: length, depth, the passkey and the server's answer (what a miss said).
    passkey_answers: list[dict[str, Any]] = field(default_factory=list)
    compression: dict[str, float] = field(default_factory=dict)  # task/length -> measured ratio
    greedy_match: float | None = None
    greedy_first_divergence: list[int] = field(default_factory=list)
    nll: float | None = None
    outputs: dict[str, list[Any]] = field(default_factory=dict)
    measured: dict[str, list[dict[str, float]]] = field(default_factory=dict)  # task -> per-batch pool stats
    seconds: float = 0.0

    def record(self, task: str, measured: dict[str, float]) -> None:
        batches = self.measured.setdefault(task, [])
        batches.append(measured)
        self.compression[task] = round(sum(m["ratio"] for m in batches) / len(batches), 3)


def _wait_aged(srv: ServerProcess, setting: Setting, timeout_s: float, settle_s: float = 1.0,
               stray_fraction: float = 0.02) -> dict[str, Any]:
    """Poll until the cached contexts sit in the target tier and nothing has moved for ``settle_s``
    (each poll is a scheduler-loop turn, which is when idle demotion runs).

    Up to ``stray_fraction`` of the tree may stay in a middle tier: a token demoted to warm
    before a later context split its node off as a shared prefix stays there (idle aging
    never moves shared nodes), which is the policy working, not a stalled demotion."""
    target = "warm" if setting.age_to == "int4" else "cold"  # radix stats name tiers by role
    deadline = time.monotonic() + timeout_s
    last, since = None, time.monotonic()
    while True:
        stats = srv.fade_stats()
        tree = stats["radix"]["tree_tokens"]
        now = time.monotonic()
        if tree != last:
            last, since = tree, now
        others = sum(v for k, v in tree.items() if k not in ("fp16", target))
        if tree[target] > 0 and others <= stray_fraction * sum(tree.values()) and now - since >= settle_s:
            return stats
        if now > deadline:
            raise QualityError(f"{setting.name}: contexts not demoted to {target} after {timeout_s:.0f}s "
                               f"(radix tiers {tree}); is the packed tier too small for --batch-tokens?")
        time.sleep(0.2)


def _measure(stats: dict[str, Any] | None, contexts: int) -> dict[str, float]:
    """Pool stats of the aged contexts: compression ratio (full-precision bytes of the held
    tokens / bytes they occupy, in the server's KV dtype) and what the bytes are made of."""
    if stats is None:
        return {"ratio": 1.0, "contexts": contexts}
    return {"ratio": float(stats["compression_ratio"]), "contexts": contexts,
            "stored_bytes": int(stats["stored_bytes"]), "fp16_tokens": int(stats["tiers"]["fp16"]["used"]),
            "fp16_bytes_per_token": int(stats["fp16_bytes_per_token"])}


def _batches(items: list[Item], batch_tokens: int) -> list[list[Item]]:
    out: list[list[Item]] = [[]]
    used = 0
    for it in items:
        if out[-1] and used + len(it.context) > batch_tokens:
            out.append([])
            used = 0
        out[-1].append(it)
        used += len(it.context)
    return [b for b in out if b]


def _parallel(fn: Callable[[Item], Any], items: list[Item]) -> list[Any]:
    pool = ThreadPoolExecutor(max_workers=min(16, max(1, len(items))))
    try:
        return list(pool.map(fn, items))
    finally:
        # On Ctrl-C or a failed call, do not wait for the requests still in flight (a 7K-token prefill on a CPU
        # takes minutes): the caller's ``with ServerProcess`` stops the server, which ends them.
        pool.shutdown(wait=False, cancel_futures=True)


def _check_cached(setting: Setting, item: Item, out: dict[str, Any]) -> None:
    cached = int(out["meta_info"].get("cached_tokens", 0))
    if cached < len(item.context) - 1:
        raise QualityError(f"{setting.name}: only {cached} of {len(item.context)} context tokens came from the "
                           "cache; the answer would not be computed over the compressed KV")


def run_batch(srv: ServerProcess, setting: Setting, items: list[Item], cfg: QualityConfig,
              query: Callable[[Item], dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Turn 1 (cache contexts), age them, turn 2 (``query``); returns outputs and the measured bytes."""
    srv.flush_cache()
    _parallel(lambda it: srv.generate(input_ids=it.context, max_new_tokens=1), items)
    stats = None
    if setting.preset is not None:
        stats = _wait_aged(srv, setting, cfg.age_timeout_s)
    outs = _parallel(query, items)
    for it, out in zip(items, outs):
        _check_cached(setting, it, out)
    return outs, _measure(stats, len(items))


def _fit_batches_to_fp16(srv: ServerProcess, cfg: QualityConfig) -> QualityConfig:
    """Cache at most half the fp16 room per batch: turn 1 must not run into fp16
    pressure, whose demotions (which ignore idle timers and windows) would age contexts
    differently from the idle policy being evaluated."""
    room = int(srv.fade_stats()["tiers"]["fp16"]["available"]) // 2
    return replace(cfg, batch_tokens=min(cfg.batch_tokens, room)) if room < cfg.batch_tokens else cfg


def _progress(name: str, task: str, done: int, total: int) -> None:
    width = 24
    filled = int(width * done / max(1, total))
    print(f"\r[quality] {name:<22} {task:<8} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}",
          end="" if done < total else "\n", file=sys.stderr, flush=True)


def enabled_tasks(cfg: QualityConfig) -> tuple[str, ...]:
    """Tasks with a non-zero prompt count."""
    counts = {"passkey": cfg.per_cell * cfg.depths * len(cfg.lengths), "greedy": cfg.greedy_prompts,
              "nll": cfg.nll_prompts}
    return tuple(t for t, n in counts.items() if n > 0)


def run_setting(setting: Setting, cfg: QualityConfig, tok: Any,
                tasks: Sequence[str] | None = None, reference: SettingResult | None = None) -> SettingResult:
    """Start one server, run the tasks, stop it."""
    tasks = enabled_tasks(cfg) if tasks is None else tasks
    t0 = time.monotonic()
    args = setting.server_args() + ["--dtype", cfg.dtype]
    res = SettingResult(setting.name, args)
    with ServerProcess(cfg.model_path, args, max_total_tokens=cfg.max_total_tokens, startup_timeout_s=300,
                       attention_backend=None if setting.preset else DEVICE_DEFAULT) as srv:
        if setting.preset is not None:
            cfg = _fit_batches_to_fp16(srv, cfg)
        if "passkey" in tasks:
            _run_passkey(srv, setting, cfg, tok, res)
        if "greedy" in tasks:
            _run_greedy(srv, setting, cfg, tok, res, reference)
        if "nll" in tasks:
            _run_nll(srv, setting, cfg, tok, res)
    res.seconds = round(time.monotonic() - t0, 1)
    return res


def _run_passkey(srv: ServerProcess, setting: Setting, cfg: QualityConfig, tok: Any,
                 res: SettingResult) -> None:
    items = passkey_items(tok, cfg.lengths, cfg.depths, cfg.per_cell, cfg.seed, cfg.passkey_filler)
    mine = len(res.passkey_answers)  # this call's records start here (doc_qa calls once per length)
    done = 0
    for length in cfg.lengths:
        group = [it for it in items if it.length == length]
        for batch in _batches(group, cfg.batch_tokens):
            outs, measured = run_batch(srv, setting, batch, cfg,
                                       lambda it: srv.generate(input_ids=it.full, max_new_tokens=8))
            res.record(f"passkey@{length}", measured)
            for it, out in zip(batch, outs):
                res.passkey_answers.append({"length": it.length, "depth": round(it.depth, 4), "passkey": it.answer,
                                            "answer": out["text"],
                                            "hit": evaldata.score_answer(out["text"], it.answer)})
            done += len(batch)
            _progress(setting.name, "passkey", done, len(items))
        res.passkey[str(length)] = _accuracy(a for a in res.passkey_answers[mine:] if a["length"] == length)
    answers = res.passkey_answers[mine:]
    res.passkey["all"] = _accuracy(answers)
    for depth in sorted({a["depth"] for a in answers}):
        res.passkey_by_depth[f"{depth:.2f}"] = _accuracy(a for a in answers if a["depth"] == depth)


def _accuracy(answers: Iterable[dict[str, Any]]) -> float:
    hits = [a["hit"] for a in answers]
    return sum(hits) / len(hits)


def _run_greedy(srv: ServerProcess, setting: Setting, cfg: QualityConfig, tok: Any,
                res: SettingResult, reference: SettingResult | None) -> None:
    items = greedy_items(tok, cfg.greedy_length, cfg.greedy_prompts, cfg.seed + 1)
    outs, measured = run_batch(srv, setting, items, cfg,
                               lambda it: srv.generate(input_ids=it.full, max_new_tokens=cfg.greedy_tokens))
    _progress(setting.name, "greedy", len(items), len(items))
    res.record(f"greedy@{cfg.greedy_length}", measured)
    res.outputs["greedy"] = [o["output_ids"] for o in outs]
    if reference is not None and reference.outputs.get("greedy"):
        match, first = [], []
        for got, want in zip(res.outputs["greedy"], reference.outputs["greedy"]):
            n = min(len(got), len(want))
            match.append(sum(a == b for a, b in zip(got, want)) / max(1, n))
            first.append(next((i for i in range(n) if got[i] != want[i]), n))
        res.greedy_match = sum(match) / len(match)
        res.greedy_first_divergence = first


def scoring_request(context: Sequence[int], continuation: Sequence[int], top_logprobs: int = 0) -> dict[str, Any]:
    """A ``/generate`` payload that teacher-forces ``continuation`` after ``context`` and returns its log-probabilities.

    SGLang reports no log-probability for the token at ``logprob_start_len`` (the logits that predict it are not
    computed), so the window starts one token early, at the context's last token, to cover the continuation's
    first."""
    payload: dict[str, Any] = {"input_ids": list(context) + list(continuation), "return_logprob": True,
                               "logprob_start_len": len(context) - 1,
                               "sampling_params": {"max_new_tokens": 1, "temperature": 0}}
    if top_logprobs:
        payload["top_logprobs_num"] = top_logprobs
    return payload


def scored_logprobs(out: dict[str, Any]) -> list[tuple[float, list[float]]]:
    """Per continuation token of a :func:`scoring_request` reply: its log-probability and the top ones (empty
    unless asked for); the window's leading entry, which has none, is dropped."""
    meta = out["meta_info"]
    tops = meta.get("input_top_logprobs") or [None] * len(meta["input_token_logprobs"])
    return [(float(entry[0]), [float(t[0]) for t in top or []])
            for entry, top in zip(meta["input_token_logprobs"], tops) if entry[0] is not None]


def _run_nll(srv: ServerProcess, setting: Setting, cfg: QualityConfig, tok: Any,
             res: SettingResult) -> None:
    items = nll_items(tok, cfg.nll_length, cfg.nll_prompts, cfg.seed + 2)

    def score(it: Item) -> dict[str, Any]:
        return srv.request("/generate", scoring_request(it.context, it.full[len(it.context):]))

    outs, measured = run_batch(srv, setting, items, cfg, score)
    _progress(setting.name, "nll", len(items), len(items))
    res.record(f"nll@{cfg.nll_length}", measured)
    logprobs = [lp for out in outs for lp, _ in scored_logprobs(out)]
    res.nll = -sum(logprobs) / max(1, len(logprobs))


# ----------------------------------------------------------------------------- driver


def keep_recent_for(fade: SettingResult, task: str) -> int:
    """Recent fp16 tokens per context that cost what fade's packed tokens cost for ``task``.

    Both settings keep the same fp16 tokens (sinks, shared prefixes); eviction spends the
    bytes fade puts into packed tokens on a recent window instead."""
    per_context = [(m["stored_bytes"] / m["fp16_bytes_per_token"] - m["fp16_tokens"]) / m["contexts"]
                   for m in fade.measured[task]]
    return max(0, round(sum(per_context) / len(per_context)))


def run_quality(cfg: QualityConfig, settings: Sequence[Setting] | None = None) -> list[SettingResult]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(cfg.model_path))
    settings = list(settings or default_settings())
    results: dict[str, SettingResult] = {}
    reference: SettingResult | None = None
    for setting in settings:
        if setting.evict_like is None:
            res = run_setting(setting, cfg, tok, reference=reference)
            reference = reference or (res if setting.preset is None else None)
        else:
            res = _run_eviction(setting, cfg, tok, results[setting.evict_like], reference)
        results[setting.name] = res
    return list(results.values())


def _run_eviction(setting: Setting, cfg: QualityConfig, tok: Any, fade: SettingResult,
                  reference: SettingResult | None) -> SettingResult:
    """One eviction server per context length (its window is a server knob), merged into one row."""
    merged = SettingResult(setting.name, [])
    runs: list[tuple[str, QualityConfig, tuple[str, ...]]] = []  # (task key, config, tasks)
    tasks = enabled_tasks(cfg)
    if "passkey" in tasks:
        for length in cfg.lengths:
            runs.append((f"passkey@{length}", replace(cfg, lengths=(length,)), ("passkey",)))
    if "greedy" in tasks:
        runs.append((f"greedy@{cfg.greedy_length}", cfg, ("greedy",)))
    if "nll" in tasks:
        runs.append((f"nll@{cfg.nll_length}", cfg, ("nll",)))
    passkey_cells: dict[str, float] = {}
    depth_hits: dict[str, list[float]] = {}
    for task, sub_cfg, run_tasks in runs:
        keep = keep_recent_for(fade, task)
        res = run_setting(eviction_setting(setting, keep), sub_cfg, tok, run_tasks, reference)
        merged.server_args.append(" ".join(res.server_args))
        merged.compression.update(res.compression)
        merged.measured.update(res.measured)
        merged.seconds += res.seconds
        if "passkey" in run_tasks:
            passkey_cells.update({k: v for k, v in res.passkey.items() if k != "all"})
            merged.passkey_answers.extend(res.passkey_answers)
            for d, acc in res.passkey_by_depth.items():
                depth_hits.setdefault(d, []).append(acc)
        if "greedy" in run_tasks:
            merged.greedy_match, merged.greedy_first_divergence = res.greedy_match, res.greedy_first_divergence
        if "nll" in run_tasks:
            merged.nll = res.nll
    if passkey_cells:
        merged.passkey = dict(passkey_cells, all=sum(passkey_cells.values()) / len(passkey_cells))
        merged.passkey_by_depth = {d: sum(v) / len(v) for d, v in depth_hits.items()}
    return merged


# ----------------------------------------------------------------------------- report


def format_table(results: Sequence[SettingResult], cfg: QualityConfig) -> str:
    base_nll = next((r.nll for r in results if r.name == "fp16"), None)
    head = (["setting", "compression"] + [f"passkey@{n}" for n in cfg.lengths]
            + ["passkey", "greedy match", "NLL", "dNLL"])
    rows = [head]
    for r in results:
        comp = [v for v in r.compression.values()]
        rows.append([
            r.name,
            f"{sum(comp) / len(comp):.2f}x" if comp else "1.00x",
            *[f"{r.passkey.get(str(n), float('nan')):.0%}" for n in cfg.lengths],
            f"{r.passkey.get('all', float('nan')):.0%}",
            "-" if r.greedy_match is None else f"{r.greedy_match:.3f}",
            "-" if r.nll is None else f"{r.nll:.3f}",
            "-" if r.nll is None or base_nll is None else f"{r.nll - base_nll:+.3f}",
        ])
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot(results: Sequence[SettingResult], cfg: QualityConfig, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for r in results:
        ys = [r.passkey.get(str(n), math.nan) for n in cfg.lengths]
        ax1.plot(cfg.lengths, ys, marker="o", label=r.name)
        comp = list(r.compression.values()) or [1.0]
        ax2.scatter([sum(comp) / len(comp)], [r.passkey.get("all", math.nan)], s=60, label=r.name)
    ax1.set(xlabel="context tokens", ylabel="passkey accuracy", title="Passkey accuracy", ylim=(-0.05, 1.05))
    ax2.set(xlabel="measured compression (x vs 16-bit KV)", ylabel="passkey accuracy",
            title="Accuracy vs memory", ylim=(-0.05, 1.05))
    ax1.legend(fontsize=8)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fade_sglang.eval.quality", description=__doc__.split("\n")[0])
    p.add_argument("--model-path", type=Path, default=DEFAULT_MODEL)
    p.add_argument("--dtype", default="bfloat16", help="server dtype (KV is stored in it; default bfloat16)")
    p.add_argument("--lengths", default="256,512,1024", help="passkey context lengths (comma separated)")
    p.add_argument("--depths", type=int, default=5, help="needle depths per length, evenly spaced in [0, 1]")
    p.add_argument("--per-cell", type=int, default=4, help="passkey prompts per (length, depth)")
    p.add_argument("--passkey-filler", choices=evaldata.FILLERS, default="varied",
                   help="passkey filler: varied sentences (default) or the classic five repeated")
    p.add_argument("--greedy-prompts", type=int, default=4)
    p.add_argument("--greedy-tokens", type=int, default=256)
    p.add_argument("--nll-prompts", type=int, default=8)
    p.add_argument("--settings", default="fp16,fade-safe,fade-balanced,evict@fade-balanced",
                   help="comma separated, from: " + ", ".join(s.name for s in default_settings()))
    p.add_argument("--out", type=Path, default=Path("out/quality"), help="directory for quality.json / quality.png")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    try:
        lengths = tuple(int(x) for x in a.lengths.split(",") if x)
    except ValueError:
        p.error(f"--lengths {a.lengths!r}: expected comma separated integers")
    known = {s.name: s for s in default_settings()}
    names = [n for n in a.settings.split(",") if n]
    unknown = [n for n in names if n not in known]
    if unknown:
        p.error(f"--settings: unknown {unknown} (choose from {', '.join(known)})")
    for n in names:
        like = known[n].evict_like
        if like and like not in names[: names.index(n)]:
            p.error(f"--settings: {n} needs {like} earlier in the list (it matches that setting's measured bytes)")
    if any(v < 0 for v in (a.depths, a.per_cell, a.greedy_prompts, a.greedy_tokens, a.nll_prompts)):
        p.error("counts must be >= 0")
    if not (a.model_path / "config.json").is_file():
        p.error(f"--model-path {a.model_path}: no config.json (an HF model directory is needed)")
    cfg = QualityConfig(model_path=a.model_path, dtype=a.dtype, lengths=lengths, depths=a.depths,
                        per_cell=a.per_cell, greedy_prompts=a.greedy_prompts, greedy_tokens=a.greedy_tokens,
                        nll_prompts=a.nll_prompts, seed=a.seed, passkey_filler=a.passkey_filler)
    try:
        with unwind_on_signals():
            results = run_quality(cfg, [known[n] for n in names])
    except ServerStartupError as e:
        print(f"[quality] FAILED: a server did not start: {e.headline}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("[quality] interrupted; servers stopped", file=sys.stderr)
        return 130
    table = format_table(results, cfg)
    print(table)
    a.out.mkdir(parents=True, exist_ok=True)
    payload = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
               "command": "python -m fade_sglang.eval.quality " + " ".join(argv if argv is not None else sys.argv[1:]),
               "results": [{k: v for k, v in asdict(r).items() if k != "outputs"} for r in results]}
    (a.out / "quality.json").write_text(json.dumps(payload, indent=2) + "\n")
    plot(results, cfg, a.out / "quality.png")
    print(f"wrote {a.out / 'quality.json'} and {a.out / 'quality.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
