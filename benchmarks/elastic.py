"""Elastic tiers: plain SGLang vs ``--kv-compression fade`` at the SAME ``--max-total-tokens N``.

A fade server started with ``--max-total-tokens N`` has the KV bytes of plain SGLang with
``--max-total-tokens N``: at full precision it holds N tokens like plain, and as memory runs
short it compresses (idle radix branches, then the middles of running requests; sinks and
recent windows stay fp16), then evicts; retraction is the last resort. Acceptance scenarios,
each run against both servers in one run:

* ``long``: K unique long prompts sent at once (more KV than N holds at full precision).
  Reported per server: most requests running at once, retracted requests, wall time, outputs
  identical to plain, and fade's pressure steps and demotions by cause. Acceptance: fade's
  most-running >= plain's, fade retracts nothing while its pool can hold all the prompts
  compressed, every request completes. Where fade is slower than 1.1x plain, a breakdown of where
  the time goes, as far as it can be seen from outside (client timings, the server's batch log
  lines, fade's stats).
* ``short``: short requests that fit at full precision and never age: outputs must be identical
  token for token, fade's capacity >= plain's N, wall time ratio fade / plain (target <= 1.1;
  each side runs ``repeats`` times, interleaved, the cache flushed before each, the minimum kept).
* ``long_prompt``: one prompt of ~2.5x N tokens: plain at N must refuse it, fade at N must serve
  it; fade's output is compared with plain SGLang given a pool big enough to hold it (a third
  server with ``--max-total-tokens`` ~3.5 N).
* ``agent``: the demo's multi-turn agent trace (``fade_sglang.eval.demo.FULL_SPEC``, its
  concurrency) on the same two servers (same N, so same KV bytes): capacity, cache-hit rate,
  greedy agreement. Not in the default list; the demo's recorded bar (6.96x tokens, 77.6 % hit for
  ``balanced`` on CPU) was measured by ``fade-sglang demo`` at a 6144-token budget.

One plain and one fade server serve every scenario (the radix cache flushed in between); the big
plain server starts only for ``long_prompt``, after the other two stopped. When the long prompt does
not fit the model's context length, every server gets ``--context-length`` raised just enough (with
``SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN=1``; positions past the model's trained length are
computed by plain RoPE) so that plain's refusal is about the KV pool, not the context.

    .venv/bin/python benchmarks/elastic.py --scale tiny                  # CPU, tiny model, a few minutes
    .venv/bin/python benchmarks/elastic.py --scale real                  # SmolLM2-135M-Instruct
    .venv/bin/python benchmarks/elastic.py --scenarios long,short --out /tmp/elastic.json
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shlex
import statistics
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from fade_sglang.eval.launcher import ServerProcess, ServerStartupError, server_device  # noqa: E402
from fade_sglang.eval.workloads import (percentile, scheduler_log_summary, stream_generate,  # noqa: E402
                                        text_token_ids)


SCENARIOS = ("long", "short", "long_prompt", "agent")
DEFAULT_SCENARIOS = ("long", "short", "long_prompt")
# Every decode step logs #running-req. Two servers stay up at once (plain and fade): an idle SGLang scheduler
# busy-polls a core unless --sleep-on-idle, which on a 2-core CPU would slow the busy one several-fold.
LOG_ARGS = ("--decode-log-interval", "1", "--sleep-on-idle")
SLOWER_THAN = 1.1  # fade / plain wall-time ratio above which a scenario prints a breakdown (the target)
# Identical output is the goal (printed as a target). Asserted: the first token equal and at least half of the
# tokens equal position by position. Broken reads of the compressed prefix change the first argmax and agree on
# ~0% of tokens; a greedy near-tie flipped by INT4 noise in ~70% of the context changes one token and may shift
# the rest, which this bound tolerates.
LONG_PROMPT_MIN_MATCH = 0.5
REQUEST_TIMEOUT_S = 900.0


@dataclass(frozen=True)
class Scale:
    max_total_tokens: int  # N: --max-total-tokens of the plain and the fade server
    long_requests: int = 8
    long_prompt_tokens: int = 600  # each of the `long` scenario's prompts
    long_new_tokens: int = 48
    short_requests: int = 16
    short_prompt_tokens: int = 100
    short_new_tokens: int = 32
    short_concurrency: int = 8
    short_repeats: int = 2
    long_prompt_ratio: float = 2.5  # the `long_prompt` scenario's prompt: this many times N
    long_prompt_new_tokens: int = 16
    big_ratio: float = 3.5  # --max-total-tokens of the reference server: this many times N
    default_model: str = "models/fade-tiny-llama"


SCALES = {
    # CPU, the shipped tiny model (2 layers, 1 KV head): 8 x 608 tokens need 2.4x the pool at full precision;
    # fade's fp16 windows for 8 requests (8 x 144) plus the k8v4 middles (balanced) fit in it.
    "tiny": Scale(max_total_tokens=2048, long_prompt_tokens=560),
    "real": Scale(max_total_tokens=4096, long_prompt_tokens=1200, long_prompt_new_tokens=32,
                  default_model=".cache/models/SmolLM2-135M-Instruct"),
}


class ElasticError(RuntimeError):
    """A problem the user can fix (printed as one line, exit code 2)."""


def _say_default(msg: str) -> None:
    print(f"[elastic {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- servers


def fade_server_args(preset: str) -> tuple[str, ...]:
    """``--kv-compression fade`` with the torch reference backend on CPU; on GPU fade picks its own backend."""
    backend = ("--attention-backend", "fade_torch") if server_device() == "cpu" else ()
    return ("--kv-compression", "fade", *backend, "--fade-preset", preset)


def model_context_length(model: Path) -> int:
    cfg = json.loads((model / "config.json").read_text())
    return int(cfg.get("max_position_embeddings") or cfg.get("max_sequence_length") or 2048)


def context_args(model: Path, scale: Scale,
                 scenarios: Sequence[str]) -> tuple[tuple[str, ...], dict[str, str], str | None]:
    """Server args / env that let the long prompt past the model's context length (or nothing), and a note."""
    if "long_prompt" not in scenarios:
        return (), {}, None
    need = long_prompt_tokens(scale) + scale.long_prompt_new_tokens + 64
    ctx = model_context_length(model)
    if need <= ctx:
        return (), {}, None
    new = -(-need // 256) * 256
    note = (f"long prompt of {long_prompt_tokens(scale)} tokens exceeds the model's context length ({ctx}): every "
            f"server runs --context-length {new} (SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN=1)")
    return ("--context-length", str(new)), {"SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN": "1"}, note


@dataclass
class Servers:
    """The plain and the fade server at the same N (both running), and how to start the big reference."""
    plain: ServerProcess
    fade: ServerProcess
    model: Path
    scale: Scale
    preset: str
    extra_args: tuple[str, ...] = ()
    env: dict[str, str] | None = None

    def plain_capacity(self) -> int:
        return int(_server_state(self.plain)["memory_usage"]["token_capacity"])

    def start_big(self, tokens: int) -> ServerProcess:
        return ServerProcess(self.model, [*self.extra_args, *LOG_ARGS], max_total_tokens=tokens, env=self.env,
                             startup_timeout_s=600).start()


def start_servers(model: Path, scale: Scale, preset: str, scenarios: Sequence[str],
                  say: Callable[[str], None] = _say_default) -> Servers:
    """Start the plain and the fade server (one after the other) at the scale's N."""
    extra, env, note = context_args(model, scale, scenarios)
    if note:
        say(note)
    n = scale.max_total_tokens
    t0 = time.perf_counter()
    say(f"plain: starting server (--max-total-tokens {n})")
    plain = ServerProcess(model, [*extra, *LOG_ARGS], max_total_tokens=n, env=env or None,
                          startup_timeout_s=600).start()
    say(f"plain: ready in {time.perf_counter() - t0:.0f}s (log {plain.log_path})")
    try:
        t0 = time.perf_counter()
        say(f"fade: starting server (--max-total-tokens {n}, --fade-preset {preset})")
        fade = ServerProcess(model, [*extra, *fade_server_args(preset), *LOG_ARGS], max_total_tokens=n,
                             env=env or None, startup_timeout_s=600).start()
    except BaseException:
        plain.stop()
        raise
    say(f"fade: ready in {time.perf_counter() - t0:.0f}s (log {fade.log_path})")
    return Servers(plain, fade, model, scale, preset, extra, env or None)


def _server_state(srv: ServerProcess) -> dict[str, Any]:
    (state,) = srv.request("/server_info")["internal_states"]
    return state


# ----------------------------------------------------------------------------- measuring helpers


def _tokenizer(model: Path) -> Any:
    from fade_sglang.eval.workloads import load_tokenizer

    return load_tokenizer(model)


def unique_prompts(tokenizer: Any, count: int, tokens: int, seed: int) -> list[list[int]]:
    """``count`` prompts of exactly ``tokens`` filler tokens, each from its own seed (no shared prefix)."""
    return [text_token_ids(tokenizer, random.Random(seed * 100_003 + i), tokens) for i in range(count)]


class LogWindow:
    """The part of a server log written since :meth:`mark`."""

    def __init__(self, srv: ServerProcess) -> None:
        self.srv = srv
        self.offset = len(srv.log_text())

    def text(self) -> str:
        return self.srv.log_text()[self.offset:]


_BATCH_LINE = re.compile(r"(Prefill|Decode) batch[,.]\s*(.*)")
_FIELD = {
    "new": re.compile(r"#new-token: (\d+)"),
    "cached": re.compile(r"#cached-token: (\d+)"),
    "running": re.compile(r"#running-req: (\d+)"),
    "in_tp": re.compile(r"input throughput \(token/s\): ([0-9.]+)"),
    "gen_tp": re.compile(r"gen throughput \(token/s\): ([0-9.]+)"),
}


def log_phases(text: str) -> dict[str, Any]:
    """Prefill / decode batch counts from the scheduler's batch log lines, and decode step times.

    A decode line (``--decode-log-interval 1``) reports ``gen throughput`` = tokens generated since the
    previous decode line / the time since it; when the previous batch line is a decode line too, that
    time is one decode step, ``#running-req / gen throughput``. Prefill lines report
    ``input throughput`` over the time since the previous prefill line, which spans decode steps in
    between, so no prefill time is derived from them (TTFT from the client covers queueing + prefill).
    """
    prefill_batches = prefill_tokens = cached_tokens = decode_steps = 0
    batch_sizes: list[int] = []
    step_s: list[float] = []
    prev = None
    for line in text.splitlines():
        m = _BATCH_LINE.search(line)
        if not m:
            continue
        kind, rest = m.groups()
        get = lambda k: (lambda x: x.group(1) if x else None)(_FIELD[k].search(rest))  # noqa: E731
        if kind == "Prefill":
            prefill_batches += 1
            prefill_tokens += int(get("new") or 0)
            cached_tokens += int(get("cached") or 0)
        else:
            decode_steps += 1
            running = int(get("running") or 0)
            batch_sizes.append(running)
            tp = float(get("gen_tp") or 0.0)
            if prev == "Decode" and tp > 0 and running > 0:
                step_s.append(running / tp)
        prev = kind
    return {
        "prefill_batches": prefill_batches, "prefill_tokens": prefill_tokens, "prefill_cached_tokens": cached_tokens,
        "decode_steps": decode_steps,
        "decode_batch_mean": round(statistics.fmean(batch_sizes), 2) if batch_sizes else None,
        "decode_step_ms_p50": round(1000 * statistics.median(step_s), 2) if step_s else None,
        "decode_step_ms_mean": round(1000 * statistics.fmean(step_s), 2) if step_s else None,
        "decode_steps_timed": len(step_s),
        "decode_time_timed_s": round(sum(step_s), 3),
    }


def _delta(after: Any, before: Any) -> Any:
    """``after - before`` for numbers, recursively for dicts (fade's counters are cumulative)."""
    if isinstance(after, dict):
        b = before if isinstance(before, dict) else {}
        out = {k: _delta(v, b.get(k)) for k, v in after.items()}
        return {k: v for k, v in out.items() if v not in (0, {}, None)}
    if isinstance(after, (int, float)) and not isinstance(after, bool):
        return after - (before if isinstance(before, (int, float)) else 0)
    return after


def fade_counters(stats: dict[str, Any]) -> dict[str, Any]:
    radix = stats.get("radix", {})
    return {
        "pressure_steps": stats.get("pressure_steps", 0),
        "pressure_demotions": stats.get("pressure_demotions", 0),
        "retracted_requests": stats.get("retracted_requests", 0),
        "demoted_by_cause": radix.get("demoted_tokens", {}),
        "evicted_tokens": radix.get("evicted_tokens", {}),
        "demoted_tokens": stats.get("demoted_tokens", {}),
    }


def fade_snapshot(stats: dict[str, Any]) -> dict[str, Any]:
    """The tier occupancy at one moment (not cumulative)."""
    return {"tiers": {n: {"tokens": t["used"], "pages": t["pages"]} for n, t in stats["tiers"].items()},
            "tokens": stats["tokens"], "pages": stats["pages"],
            "compression_vs_16bit": round(stats["compression_vs_16bit"], 3)}


def _ms(v: float | None) -> float | None:
    return None if v is None else round(1000 * v, 1)


def run_concurrent(base_url: str, prompts: Sequence[Sequence[int]], new_tokens: int, concurrency: int,
                   timeout_s: float = REQUEST_TIMEOUT_S) -> tuple[list[Any], float]:
    """Stream every prompt (greedy, ignore_eos), ``concurrency`` at a time; results in prompt order, wall s."""
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        results = list(pool.map(lambda p: stream_generate(base_url, p, new_tokens, timeout_s=timeout_s), prompts))
    return results, time.perf_counter() - t0


def request_summary(results: Sequence[Any], new_tokens: int) -> dict[str, Any]:
    ok = [r for r in results if r.error is None and len(r.output_ids) == new_tokens]
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    decode = [r.latency_s - r.ttft_s for r in ok if r.ttft_s is not None]
    tpot = [(r.latency_s - r.ttft_s) / (len(r.output_ids) - 1) for r in ok if r.ttft_s is not None
            and len(r.output_ids) > 1]
    return {
        "requests": len(results), "completed": len(ok),
        "errors": [r.error or f"{len(r.output_ids)} of {new_tokens} tokens" for r in results if r not in ok][:5],
        "latency_s_p50": round(percentile([r.latency_s for r in ok], 50) or 0, 3),
        "latency_s_max": round(max((r.latency_s for r in ok), default=0), 3),
        "ttft_ms_p50": _ms(percentile(ttft, 50)), "ttft_ms_max": _ms(max(ttft, default=None)),
        "decode_s_p50": round(percentile(decode, 50) or 0, 3),
        "tpot_ms_p50": _ms(percentile(tpot, 50)),
    }


def identical_count(ref: Sequence[Any], other: Sequence[Any]) -> int:
    return sum(1 for a, b in zip(ref, other) if a.error is None and b.error is None and a.output_ids == b.output_ids)


def first_divergence(a: Sequence[int], b: Sequence[int]) -> int | None:
    """Index of the first differing token (the shorter length if one is a prefix of the other); None if equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


# ----------------------------------------------------------------------------- scenarios


def pool_holds_compressed(stats: dict[str, Any], requests: int, tokens_each: int) -> dict[str, Any]:
    """Whether the fade arena can hold ``requests`` sequences of ``tokens_each`` with sinks + recent window
    in fp16 and the rest in the warm tier (what running demotion writes), leaving a tenth for partly filled pages."""
    cfg = stats.get("config", {})
    keep = min(tokens_each, int(cfg.get("sink_tokens", 16)) + int(cfg.get("recent_window", 128)))
    tiers = list(stats["tiers"].values())
    fp16_b, warm_b = tiers[0]["bytes_per_token"], tiers[1]["bytes_per_token"]
    need = requests * (keep * fp16_b + (tokens_each - keep) * warm_b)
    arena = stats.get("arena_bytes") or stats["pool_bytes"]
    return {"need_bytes": int(need), "arena_bytes": int(arena), "fits": need <= 0.9 * arena}


def run_long(servers: Servers, tokenizer: Any, say: Callable[[str], None] = _say_default) -> dict[str, Any]:
    sc = servers.scale
    prompts = unique_prompts(tokenizer, sc.long_requests, sc.long_prompt_tokens, seed=1)
    out: dict[str, Any] = {"workload": {"requests": sc.long_requests, "prompt_tokens": sc.long_prompt_tokens,
                                        "new_tokens": sc.long_new_tokens, "sent": "all at once",
                                        "kv_tokens_total": sc.long_requests * (sc.long_prompt_tokens
                                                                               + sc.long_new_tokens),
                                        "max_total_tokens": sc.max_total_tokens}}
    runs = {}
    for name in ("plain", "fade"):
        srv = getattr(servers, name)
        srv.flush_cache()
        before = srv.fade_stats() if name == "fade" else None
        log = LogWindow(srv)
        say(f"long: {name}: {sc.long_requests} x {sc.long_prompt_tokens}-token prompts at once, "
            f"{sc.long_new_tokens} new tokens each")
        results, wall = run_concurrent(srv.base_url, prompts, sc.long_new_tokens, len(prompts))
        text = log.text()
        row = {"wall_s": round(wall, 3), **request_summary(results, sc.long_new_tokens),
               **scheduler_log_summary(text), "phases": log_phases(text)}
        if name == "fade":
            after = srv.fade_stats()
            row["fade"] = _delta(fade_counters(after), fade_counters(before))
            row["fade"]["pressure_steps"] = row["fade"].get("pressure_steps", 0)
            row["fade"]["retracted_requests"] = row["fade"].get("retracted_requests", 0)
            row["fade"]["after"] = fade_snapshot(after)
            row["fade"]["holds_all_compressed"] = pool_holds_compressed(
                after, sc.long_requests, sc.long_prompt_tokens + sc.long_new_tokens)
        runs[name] = (results, row)
        say(f"long: {name}: {row['completed']}/{row['requests']} done in {wall:.1f}s, most running "
            f"{row['max_running_requests']}, retracted {row['preempted_requests']}")
    out["plain"], out["fade"] = runs["plain"][1], runs["fade"][1]
    out["fade"]["identical_to_plain"] = identical_count(runs["plain"][0], runs["fade"][0])
    out["fade"]["first_divergences"] = [first_divergence(a.output_ids, b.output_ids)
                                        for a, b in zip(runs["plain"][0], runs["fade"][0])]
    out["output_ids"] = {name: [r.output_ids for r in runs[name][0]] for name in ("plain", "fade")}
    out["wall_ratio_fade_over_plain"] = round(out["fade"]["wall_s"] / out["plain"]["wall_s"], 3)
    if out["wall_ratio_fade_over_plain"] > SLOWER_THAN:
        out["slowdown_breakdown"] = slowdown_breakdown(out)
    return out


def slowdown_breakdown(res: dict[str, Any], which: str = "") -> list[str]:
    """Where the time goes, from what is measured outside the server (no estimates beyond the log's own timer)."""
    p, f = res["plain"], res["fade"]
    lines = [f"fade took {res['wall_ratio_fade_over_plain']:.2f}x plain's wall time ({f['wall_s']:.2f}s vs "
             f"{p['wall_s']:.2f}s{', ' + which if which else ''}); where it goes:"]

    def both(label: str, a: Any, b: Any) -> None:
        lines.append(f"  {label:<44} plain {a!s:>10}   fade {b!s:>10}")

    both("most requests running at once", p["max_running_requests"], f["max_running_requests"])
    both("TTFT p50 / max ms (queue + prefill, client)", f"{p['ttft_ms_p50']}/{p['ttft_ms_max']}",
         f"{f['ttft_ms_p50']}/{f['ttft_ms_max']}")
    both("decode time per request p50 s (client)", p["decode_s_p50"], f["decode_s_p50"])
    both("time per output token p50 ms (client)", p["tpot_ms_p50"], f["tpot_ms_p50"])
    pp, fp = p["phases"], f["phases"]
    both("prefill batches (log)", pp["prefill_batches"], fp["prefill_batches"])
    both("prefill tokens (log)", pp["prefill_tokens"], fp["prefill_tokens"])
    both("decode steps (log)", pp["decode_steps"], fp["decode_steps"])
    both("mean decode batch (log)", pp["decode_batch_mean"], fp["decode_batch_mean"])
    both("decode step ms p50 (log, timed steps)", pp["decode_step_ms_p50"], fp["decode_step_ms_p50"])
    both("sum of timed decode steps s (log)",
         f"{pp['decode_time_timed_s']} ({pp['decode_steps_timed']})",
         f"{fp['decode_time_timed_s']} ({fp['decode_steps_timed']})")
    fd = f.get("fade", {})
    lines.append(f"  fade pressure steps {fd.get('pressure_steps', 0)} "
                 f"(window shrinks {fd.get('pressure_demotions', 0)}), "
                 f"demoted by cause {json.dumps(fd.get('demoted_by_cause', {}))}")
    lines.append("  (a timed decode step is the gap between two consecutive decode log lines: forward, SGLang's "
                 "scheduling and, on fade, the pressure-relief / demotion pass before the step; how that splits "
                 "between demotion and compressed-attention reads is not visible from outside the server)")
    return lines


def run_short(servers: Servers, tokenizer: Any, say: Callable[[str], None] = _say_default) -> dict[str, Any]:
    sc = servers.scale
    prompts = unique_prompts(tokenizer, sc.short_requests, sc.short_prompt_tokens, seed=2)
    walls: dict[str, list[float]] = {"plain": [], "fade": []}
    results: dict[str, list[Any]] = {}
    fastest: dict[str, dict[str, Any]] = {}  # request summary + log of each side's fastest run
    identical_all_reps = True
    before = servers.fade.fade_stats()
    for rep in range(sc.short_repeats):
        for name in ("plain", "fade"):  # interleaved: drift on a shared machine hits both sides alike
            srv = getattr(servers, name)
            srv.flush_cache()
            log = LogWindow(srv)
            res, wall = run_concurrent(srv.base_url, prompts, sc.short_new_tokens, sc.short_concurrency)
            walls[name].append(round(wall, 3))
            if name in results and [r.output_ids for r in res] != [r.output_ids for r in results[name]]:
                identical_all_reps = False  # greedy must repeat itself
            results.setdefault(name, res)
            if name not in fastest or wall < fastest[name]["wall_s"]:
                text = log.text()
                fastest[name] = {"wall_s": round(wall, 3), **request_summary(res, sc.short_new_tokens),
                                 **scheduler_log_summary(text), "phases": log_phases(text)}
            say(f"short: {name} run {rep + 1}/{sc.short_repeats}: {wall:.2f}s")
    after = servers.fade.fade_stats()
    plain_cap = servers.plain_capacity()
    p, f = results["plain"], results["fade"]
    div = [first_divergence(a.output_ids, b.output_ids) for a, b in zip(p, f)]
    out = {
        "workload": {"requests": sc.short_requests, "prompt_tokens": sc.short_prompt_tokens,
                     "new_tokens": sc.short_new_tokens, "concurrency": sc.short_concurrency,
                     "repeats": sc.short_repeats},
        "plain": {"wall_s_runs": walls["plain"], **fastest["plain"], "capacity_tokens": plain_cap},
        "fade": {"wall_s_runs": walls["fade"], **fastest["fade"],
                 "capacity_tokens": after["capacity_tokens"], "fp16_capacity_tokens": after["fp16_capacity_tokens"],
                 "fade": _delta(fade_counters(after), fade_counters(before))},
        "identical": identical_count(p, f),
        "first_divergences": [d for d in div if d is not None],
        "repeatable": identical_all_reps,
    }
    out["wall_ratio_fade_over_plain"] = round(out["fade"]["wall_s"] / out["plain"]["wall_s"], 3)
    out["capacity_ratio_fade_over_plain"] = round(out["fade"]["capacity_tokens"] / plain_cap, 3)
    if out["wall_ratio_fade_over_plain"] > SLOWER_THAN:
        out["slowdown_breakdown"] = slowdown_breakdown(out, "fastest runs")
    return out


def long_prompt_tokens(scale: Scale) -> int:
    return int(round(scale.long_prompt_ratio * scale.max_total_tokens))


def post_generate(srv: ServerProcess, input_ids: Sequence[int], new_tokens: int,
                  timeout_s: float = REQUEST_TIMEOUT_S) -> dict[str, Any]:
    """Non-streaming POST /generate; what happened: HTTP status, output ids, error text, wall time."""
    payload = {"input_ids": list(input_ids),
               "sampling_params": {"max_new_tokens": new_tokens, "temperature": 0.0, "ignore_eos": True}}
    req = urllib.request.Request(srv.base_url + "/generate", data=json.dumps(payload).encode(),
                                 headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    res: dict[str, Any] = {"http_status": None, "output_ids": None, "error": None, "finish_reason": None}
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            res["http_status"] = resp.status
            body = json.loads(resp.read().decode())
        meta = body.get("meta_info", {}) if isinstance(body, dict) else {}
        res["finish_reason"] = meta.get("finish_reason")
        res["output_ids"] = body.get("output_ids") if isinstance(body, dict) else None
        fr = res["finish_reason"] or {}
        if isinstance(fr, dict) and fr.get("type") == "abort":
            res["error"] = str(fr.get("message"))[:400]
        elif isinstance(body, dict) and "error" in body:
            res["error"] = str(body["error"])[:400]
    except urllib.error.HTTPError as e:
        res["http_status"] = e.code
        res["error"] = e.read().decode(errors="replace")[:400]
    except (OSError, ValueError) as e:
        res["error"] = f"{type(e).__name__}: {e}"[:400]
    res["wall_s"] = round(time.perf_counter() - t0, 3)
    res["served"] = res["error"] is None and res["output_ids"] is not None and len(res["output_ids"]) == new_tokens
    return res


def run_long_prompt_at_n(servers: Servers, tokenizer: Any, say: Callable[[str], None] = _say_default) -> dict[str, Any]:
    """The long prompt against plain and fade at N (the reference run is :func:`run_long_prompt_reference`)."""
    sc = servers.scale
    n_tokens = long_prompt_tokens(sc)
    prompt = unique_prompts(tokenizer, 1, n_tokens, seed=3)[0]
    out: dict[str, Any] = {"workload": {"prompt_tokens": n_tokens, "ratio_to_n": sc.long_prompt_ratio,
                                        "new_tokens": sc.long_prompt_new_tokens,
                                        "max_total_tokens": sc.max_total_tokens}, "prompt": prompt}
    for name in ("plain", "fade"):
        srv = getattr(servers, name)
        srv.flush_cache()
        before = srv.fade_stats() if name == "fade" else None
        say(f"long_prompt: {name} at N={sc.max_total_tokens}: one {n_tokens}-token prompt")
        res = post_generate(srv, prompt, sc.long_prompt_new_tokens)
        if name == "fade":
            after = srv.fade_stats()
            res["fade"] = _delta(fade_counters(after), fade_counters(before))
            res["fade"]["after"] = fade_snapshot(after)
        out[name] = res
        say(f"long_prompt: {name}: " + (f"served in {res['wall_s']:.1f}s" if res["served"] else
                                         f"refused (HTTP {res['http_status']}): {(res['error'] or '')[:160]}"))
    return out


def run_long_prompt_reference(res: dict[str, Any], servers: Servers,
                              say: Callable[[str], None] = _say_default) -> dict[str, Any]:
    """Plain SGLang with a pool that holds the long prompt: the reference fade's output is compared with."""
    sc = servers.scale
    big = int(round(sc.big_ratio * sc.max_total_tokens))
    t0 = time.perf_counter()
    say(f"long_prompt: plain-big: starting server (--max-total-tokens {big})")
    srv = servers.start_big(big)
    try:
        say(f"long_prompt: plain-big: ready in {time.perf_counter() - t0:.0f}s (log {srv.log_path})")
        ref = post_generate(srv, res["prompt"], sc.long_prompt_new_tokens)
    finally:
        srv.stop()
    ref["max_total_tokens"] = big
    ref["log_path"] = str(srv.log_path)
    res["plain_big"] = ref
    fade_ids, ref_ids = res["fade"].get("output_ids"), ref.get("output_ids")
    if res["fade"]["served"] and ref["served"]:
        d = first_divergence(ref_ids, fade_ids)
        res["fade_vs_plain_big"] = {"identical": d is None, "first_divergence": d,
                                    "matching_prefix_tokens": len(ref_ids) if d is None else d,
                                    "token_match_rate": sum(a == b for a, b in zip(ref_ids, fade_ids)) / len(ref_ids)}
    else:
        res["fade_vs_plain_big"] = None
    say(f"long_prompt: plain-big: " + (f"served in {ref['wall_s']:.1f}s; fade vs plain-big: "
                                       f"{res['fade_vs_plain_big']}" if ref["served"] else f"FAILED: {ref['error']}"))
    return res


def run_agent(servers: Servers, tokenizer: Any, say: Callable[[str], None] = _say_default) -> dict[str, Any]:
    """The demo's agent trace (its full spec and concurrency) on the same plain / fade servers at N."""
    from fade_sglang.eval.demo import CONCURRENCY, FULL_SPEC
    from fade_sglang.eval.workloads import build_agent_trace, run_agent_trace, token_agreement

    trace = build_agent_trace(FULL_SPEC, tokenizer)
    out: dict[str, Any] = {"workload": {**asdict(FULL_SPEC), "concurrency": CONCURRENCY,
                                        "unique_kv_tokens": FULL_SPEC.unique_tokens()}}
    runs = {}
    for name in ("plain", "fade"):
        srv = getattr(servers, name)
        srv.flush_cache()
        log = LogWindow(srv)
        say(f"agent: {name}: {FULL_SPEC.sessions} sessions x {FULL_SPEC.turns} turns, concurrency {CONCURRENCY}")
        run = run_agent_trace(srv.base_url, trace, concurrency=CONCURRENCY, replay=runs.get("plain"),
                              timeout_s=REQUEST_TIMEOUT_S)
        runs[name] = run
        row = {**run.summary(), **scheduler_log_summary(log.text())}
        if name == "fade":
            stats = srv.fade_stats()
            row["capacity_tokens"] = stats["capacity_tokens"]
            row["fade"] = fade_snapshot(stats)
        else:
            row["capacity_tokens"] = servers.plain_capacity()
        out[name] = row
        say(f"agent: {name}: hit {row['cache_hit_rate']:.1%}, {row['failed']} failed, {row['wall_s']}s")
    out["capacity_gain"] = round(out["fade"]["capacity_tokens"] / out["plain"]["capacity_tokens"], 3)
    out["greedy_agreement"] = token_agreement(runs["plain"], runs["fade"])
    out["demo_bar"] = {"capacity_gain": 6.96, "fade_cache_hit_rate": 0.776,
                       "note": "fade-sglang demo, balanced, CPU, 6144-token budget (not the N used here)"}
    return out


# ----------------------------------------------------------------------------- acceptance + report


def acceptance(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The acceptance properties of each scenario that ran: name, ok, the numbers behind it."""
    checks: list[dict[str, Any]] = []

    def check(name: str, ok: bool, detail: str, kind: str = "acceptance") -> None:
        """``kind`` "acceptance" fails the run; "target" (timing on a noisy CPU, the identical-output goal) is shown."""
        checks.append({"check": name, "ok": bool(ok), "detail": detail, "kind": kind})

    if "long" in results:
        r = results["long"]
        p, f = r["plain"], r["fade"]
        check("long: fade most-running >= plain", f["max_running_requests"] >= p["max_running_requests"],
              f"fade {f['max_running_requests']} vs plain {p['max_running_requests']}")
        fits = f["fade"]["holds_all_compressed"]["fits"]
        retracted = max(f["preempted_requests"], f["fade"]["retracted_requests"])
        check("long: fade retracts nothing (pool holds all prompts compressed)" if fits else
              "long: fade retractions (pool cannot hold all prompts compressed: not required to be 0)",
              retracted == 0 or not fits, f"log {f['preempted_requests']}, stats {f['fade']['retracted_requests']}")
        check("long: every request completes", p["completed"] == p["requests"] and f["completed"] == f["requests"],
              f"plain {p['completed']}/{p['requests']}, fade {f['completed']}/{f['requests']}")
        check("long: outputs identical to plain", f["identical_to_plain"] == f["requests"],
              f"{f['identical_to_plain']}/{f['requests']}; first divergence per request {f['first_divergences']}",
              "target")
        check(f"long: wall fade / plain <= {SLOWER_THAN}", r["wall_ratio_fade_over_plain"] <= SLOWER_THAN,
              f"{r['wall_ratio_fade_over_plain']:.2f}x", "target")
    if "short" in results:
        r = results["short"]
        check("short: outputs identical", r["identical"] == r["workload"]["requests"],
              f"{r['identical']}/{r['workload']['requests']}")
        check("short: fade capacity >= plain's N", r["fade"]["capacity_tokens"] >= r["plain"]["capacity_tokens"],
              f"fade {r['fade']['capacity_tokens']} (fp16 {r['fade']['fp16_capacity_tokens']}) vs plain "
              f"{r['plain']['capacity_tokens']}")
        check(f"short: wall fade / plain <= {SLOWER_THAN}", r["wall_ratio_fade_over_plain"] <= SLOWER_THAN,
              f"{r['wall_ratio_fade_over_plain']:.2f}x (min of {r['workload']['repeats']} runs each)", "target")
    if "long_prompt" in results:
        r = results["long_prompt"]
        check("long_prompt: plain at N refuses", not r["plain"]["served"],
              f"HTTP {r['plain']['http_status']}: {(r['plain']['error'] or 'served')[:120]}")
        check("long_prompt: fade at N serves", r["fade"]["served"],
              f"HTTP {r['fade']['http_status']}" + (f": {r['fade']['error'][:120]}" if r["fade"]["error"] else ""))
        cmp = r.get("fade_vs_plain_big")
        if cmp is not None:
            check(f"long_prompt: fade's first token == plain-big's and >= {LONG_PROMPT_MIN_MATCH:.0%} of tokens agree",
                  cmp["matching_prefix_tokens"] >= 1 and cmp["token_match_rate"] >= LONG_PROMPT_MIN_MATCH,
                  f"matching prefix {cmp['matching_prefix_tokens']} tokens, token match {cmp['token_match_rate']:.1%}")
            check("long_prompt: fade output identical to plain-big", cmp["identical"],
                  f"first divergence {cmp['first_divergence']}, token match {cmp['token_match_rate']:.1%}", "target")
        else:
            check("long_prompt: fade output compared with plain-big", False, "plain-big or fade did not serve it")
    if "agent" in results:
        r = results["agent"]
        check("agent: every request served", r["plain"]["failed"] == 0 and r["fade"]["failed"] == 0,
              f"plain {r['plain']['failed']} failed, fade {r['fade']['failed']} failed")
    return checks


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(c) for c in header]] + [["-" if v is None else str(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _demoted(fd: dict[str, Any]) -> str:
    causes = fd.get("demoted_by_cause") or {}
    return " ".join(f"{c}[{' '.join(f'{k}:{v}' for k, v in m.items())}]" for c, m in causes.items()) or "none"


def format_report(result: dict[str, Any]) -> str:
    res = result["scenarios"]
    out: list[str] = []
    n = result["max_total_tokens"]
    if "long" in res:
        r = res["long"]
        w = r["workload"]
        out.append(f"== long: {w['requests']} x {w['prompt_tokens']}-token prompts at once, {w['new_tokens']} new "
                   f"tokens, --max-total-tokens {n} ({w['kv_tokens_total']} KV tokens needed)")
        rows = []
        for name in ("plain", "fade"):
            x = r[name]
            fd = x.get("fade", {})
            rows.append((name, x["max_running_requests"],
                         f"{x['preempted_requests']}" + (f" / {fd.get('retracted_requests', 0)}" if fd else ""),
                         f"{x['completed']}/{x['requests']}", f"{x['wall_s']:.2f}",
                         x.get("identical_to_plain", "(ref)"), x["ttft_ms_p50"], x["phases"]["decode_step_ms_p50"],
                         fd.get("pressure_steps", "-") if fd else "-", _demoted(fd) if fd else "-"))
        out.append(_table(("server", "most running", "retracted (log / stats)", "done", "wall s", "identical",
                           "TTFT p50 ms", "decode step ms p50 (log)", "pressure steps", "demoted tokens by cause"), rows))
        out.append(f"wall fade / plain: {r['wall_ratio_fade_over_plain']:.2f}x; fade pool holds all prompts compressed: "
                   f"{r['fade']['fade']['holds_all_compressed']['fits']}; fade's first divergence from plain per "
                   f"request: {r['fade']['first_divergences']}")
        if "slowdown_breakdown" in r:
            out.extend(r["slowdown_breakdown"])
    if "short" in res:
        r = res["short"]
        w = r["workload"]
        out.append(f"\n== short: {w['requests']} x {w['prompt_tokens']}-token prompts, {w['new_tokens']} new tokens, "
                   f"concurrency {w['concurrency']}, min of {w['repeats']} runs each")
        rows = [("plain", r["plain"]["capacity_tokens"], "-", ", ".join(map(str, r["plain"]["wall_s_runs"])),
                 f"{r['plain']['wall_s']:.2f}", "(ref)"),
                ("fade", r["fade"]["capacity_tokens"], r["fade"]["fp16_capacity_tokens"],
                 ", ".join(map(str, r["fade"]["wall_s_runs"])), f"{r['fade']['wall_s']:.2f}",
                 f"{r['identical']}/{w['requests']}")]
        out.append(_table(("server", "capacity tokens", "fp16 capacity", "wall s runs", "wall s (min)",
                           "identical"), rows))
        out.append(f"wall fade / plain: {r['wall_ratio_fade_over_plain']:.2f}x (target <= {SLOWER_THAN}); capacity "
                   f"fade / plain: {r['capacity_ratio_fade_over_plain']:.2f}x; demoted during the runs: "
                   f"{_demoted(r['fade']['fade'])}")
        if "slowdown_breakdown" in r:
            out.extend(r["slowdown_breakdown"])
    if "long_prompt" in res:
        r = res["long_prompt"]
        w = r["workload"]
        out.append(f"\n== long_prompt: one {w['prompt_tokens']}-token prompt ({w['ratio_to_n']}x N={n}), "
                   f"{w['new_tokens']} new tokens")
        rows = []
        for name in ("plain", "fade", "plain_big"):
            x = r.get(name)
            if x is None:
                continue
            tokens = x.get("max_total_tokens", n)
            what = "served" if x["served"] else f"refused: {(x['error'] or '')[:90]}"
            rows.append((name, tokens, x["http_status"], what, f"{x['wall_s']:.2f}" if x["served"] else "-"))
        out.append(_table(("server", "max total tokens", "HTTP", "result", "wall s"), rows))
        cmp = r.get("fade_vs_plain_big")
        if cmp is not None:
            same = "identical" if cmp["identical"] else f"first divergence at token {cmp['first_divergence']}"
            out.append(f"fade vs plain-big: {same}"
                       f" ({cmp['token_match_rate']:.0%} of tokens match position-wise); fade pressure steps "
                       f"{r['fade']['fade'].get('pressure_steps', 0)}, demoted {_demoted(r['fade']['fade'])}")
    if "agent" in res:
        r = res["agent"]
        out.append(f"\n== agent: demo trace {r['workload']['sessions']} sessions x {r['workload']['turns']} turns "
                   f"(concurrency {r['workload']['concurrency']}), --max-total-tokens {n}")
        rows = [(name, r[name]["capacity_tokens"], f"{r[name]['cache_hit_rate']:.1%}", r[name]["failed"],
                 r[name]["max_running_requests"], r[name]["preempted_requests"], f"{r[name]['wall_s']:.1f}")
                for name in ("plain", "fade")]
        out.append(_table(("server", "capacity tokens", "cache hit", "failed", "most running", "retracted", "wall s"),
                          rows))
        agree = r["greedy_agreement"]
        rate = agree["token_match_rate"]
        out.append(f"capacity gain {r['capacity_gain']:.2f}x (demo bar 6.96x at a 6144-token budget); fade hit "
                   f"{r['fade']['cache_hit_rate']:.1%} (demo bar 77.6%); greedy match "
                   + ("-" if rate is None else f"{rate:.1%} ({agree['requests_identical']}/{agree['requests_compared']})"))
    if result.get("notes"):
        out.append("\nnotes: " + "; ".join(result["notes"]))
    out.append("\nacceptance:")
    for c in result["acceptance"]:
        mark = "ok" if c["ok"] else ("FAIL" if c["kind"] == "acceptance" else "miss")
        out.append(f"  [{mark}] {c['check']}{' (target)' if c['kind'] == 'target' else ''}: {c['detail']}")
    logs = result.get("server_logs", {})
    if logs:
        out.append("server logs: " + ", ".join(f"{k} {v}" for k, v in logs.items()))
    return "\n".join(out)


# ----------------------------------------------------------------------------- entry


def resolve_model(arg: str | None, scale: Scale) -> Path:
    path = Path(arg).expanduser() if arg else REPO / scale.default_model
    if not (path / "config.json").is_file():
        hint = "" if arg else " (pass --model-path)"
        raise ElasticError(f"model directory {path} not found or has no config.json{hint}")
    return path.resolve()


def run(model: Path, scale: Scale, preset: str, scenarios: Sequence[str],
        say: Callable[[str], None] = _say_default) -> dict[str, Any]:
    tokenizer = _tokenizer(model)
    results: dict[str, Any] = {}
    notes: list[str] = []
    extra, _, note = context_args(model, scale, scenarios)
    if note:
        notes.append(note)
    servers = start_servers(model, scale, preset, scenarios, say)
    logs = {"plain": str(servers.plain.log_path), "fade": str(servers.fade.log_path)}
    try:
        fns = {"long": run_long, "short": run_short, "long_prompt": run_long_prompt_at_n, "agent": run_agent}
        for name in SCENARIOS:
            if name in scenarios:
                say(f"scenario {name}")
                t0 = time.perf_counter()
                results[name] = fns[name](servers, tokenizer, say)
                say(f"scenario {name} done in {time.perf_counter() - t0:.0f}s")
    finally:
        servers.plain.stop()
        servers.fade.stop()
    if "long_prompt" in results:
        run_long_prompt_reference(results["long_prompt"], servers, say)
        logs["plain_big"] = results["long_prompt"]["plain_big"]["log_path"]
    return {"scenarios": results, "notes": notes, "server_logs": logs}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", choices=sorted(SCALES), default="tiny",
                   help="tiny: models/fade-tiny-llama, N=2048; real: SmolLM2-135M-Instruct, N=4096")
    p.add_argument("--model-path", default=None, help="model dir (default: the scale's)")
    p.add_argument("--scenarios", default=",".join(DEFAULT_SCENARIOS),
                   help=f"comma list of {', '.join(SCENARIOS)} (default: %(default)s)")
    p.add_argument("--preset", default="balanced", help="fade preset (default %(default)s)")
    p.add_argument("--max-total-tokens", type=int, default=None, help="N (default: the scale's)")
    p.add_argument("--long-prompt-ratio", type=float, default=None,
                   help="long_prompt's prompt as a multiple of N (default: the scale's, 2.5)")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON path (default benchmarks/results/elastic-<device>-<scale>.json)")
    args = p.parse_args(argv)

    def fail(msg: str) -> int:
        print(f"elastic.py: error: {msg}", file=sys.stderr)
        return 2

    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = sorted(set(scenarios) - set(SCENARIOS))
    if unknown or not scenarios:
        return fail(f"unknown scenarios {unknown} (choose from {', '.join(SCENARIOS)})")
    from fade_sglang.config import PRESETS

    if args.preset not in PRESETS:
        return fail(f"unknown preset {args.preset!r} (choose from {', '.join(PRESETS)})")
    scale = SCALES[args.scale]
    if args.max_total_tokens is not None:
        if args.max_total_tokens < 64:
            return fail(f"--max-total-tokens must be >= 64 (got {args.max_total_tokens})")
        from dataclasses import replace

        scale = replace(scale, max_total_tokens=args.max_total_tokens)
    if args.long_prompt_ratio is not None:
        if not 1.0 < args.long_prompt_ratio <= scale.big_ratio:
            return fail(f"--long-prompt-ratio must be in (1, {scale.big_ratio}] (got {args.long_prompt_ratio})")
        from dataclasses import replace

        scale = replace(scale, long_prompt_ratio=args.long_prompt_ratio)
    try:
        model = resolve_model(args.model_path, scale)
    except ElasticError as e:
        return fail(str(e))
    device = server_device()
    out = args.out or REPO / "benchmarks" / "results" / f"elastic-{device}-{args.scale}.json"
    command = " ".join(shlex.quote(a) for a in ["python", "benchmarks/elastic.py", *argv])
    _say_default(f"model {model}, N={scale.max_total_tokens}, preset {args.preset}, scenarios {','.join(scenarios)}")
    t0 = time.perf_counter()
    try:
        body = run(model, scale, args.preset, scenarios)
    except KeyboardInterrupt:
        print("elastic.py: interrupted; servers stopped", file=sys.stderr)
        return 130
    except ServerStartupError as e:
        return fail(f"a server did not start: {e.headline} (see the log named above)")
    result = {"command": command, "scale": args.scale, "scale_config": asdict(scale), "model": str(model),
              "device": device, "preset": args.preset, "max_total_tokens": scale.max_total_tokens,
              "wall_s": round(time.perf_counter() - t0, 1), **body}
    if "long_prompt" in result["scenarios"]:
        result["scenarios"]["long_prompt"].pop("prompt", None)  # token ids: regenerated from the seed
    result["acceptance"] = acceptance(result["scenarios"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(format_report(result))
    print(f"\nwrote {out} (reproduce: {command}); total {result['wall_s']}s")
    failed = [c for c in result["acceptance"] if not c["ok"] and c["kind"] == "acceptance"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
