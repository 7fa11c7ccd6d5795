"""Workload drivers shared by the demo, the serving benchmark and the load test.

* :class:`AgentTraceSpec` / :func:`build_agent_trace`: a multi-turn agent trace.
  Every session starts from the same system prompt; each turn appends a user
  message or a long tool-output-like block to the session's history, then the
  model's answer. Text comes from :mod:`fade_sglang.eval.evaldata`'s filler grammar
  (the distribution the shipped tiny model was trained on).
* :func:`run_agent_trace`: drives a trace against a server over SGLang's native
  streaming ``/generate`` (sessions run concurrently, turns of one session in
  order) and records per-request TTFT, latency, cached tokens and outputs.
  ``replay`` feeds another run's exact prompts, so two servers see identical
  inputs and their greedy outputs can be compared token by token.
* :func:`stream_generate`: one streaming request that can also be abandoned
  after a few chunks (a client disconnect, for the load test).
* :func:`scheduler_log_summary`: queueing / preemption counters from a server log.
"""

from __future__ import annotations

import http.client
import json
import random
import re
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from .evaldata import FillerGenerator

__all__ = ["AgentTrace", "AgentTraceSpec", "StreamResult", "TraceRun", "TurnRecord", "build_agent_trace",
           "load_tokenizer", "percentile", "run_agent_trace", "scheduler_log_summary", "stream_generate",
           "text_token_ids", "token_agreement"]


# ----------------------------------------------------------------------------- trace


@dataclass(frozen=True)
class AgentTraceSpec:
    sessions: int = 8
    turns: int = 4
    system_tokens: int = 192  # shared by every session
    user_tokens: int = 32  # a user message
    tool_tokens: int = 160  # a tool-output-like block (every ``tool_every``-th turn)
    tool_every: int = 2
    output_tokens: int = 24  # max_new_tokens of every request (ignore_eos: exactly this many)
    seed: int = 0

    def turn_tokens(self, turn: int) -> int:
        is_tool = self.tool_every > 0 and turn % self.tool_every == self.tool_every - 1
        return self.tool_tokens if is_tool else self.user_tokens

    def final_context_tokens(self) -> int:
        """Prompt + output tokens of a session's last turn (must fit the model's context)."""
        return self.system_tokens + sum(self.turn_tokens(t) + self.output_tokens for t in range(self.turns))

    def unique_tokens(self) -> int:
        """KV tokens the whole trace produces if nothing is shared but the system prompt."""
        return self.system_tokens + self.sessions * (self.final_context_tokens() - self.system_tokens)


@dataclass
class AgentTrace:
    spec: AgentTraceSpec
    system_ids: list[int]
    turns: list[list[list[int]]]  # [session][turn] -> ids appended before the model answers


def load_tokenizer(model_path: str | Path) -> Any:
    """The model's fast tokenizer; the bare ``tokenizers`` file when present (imports in ~0.1 s)."""
    path = Path(model_path) / "tokenizer.json"
    if path.is_file():
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(path))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_path))


def _encode(tokenizer: Any, text: str, special: bool) -> list[int]:
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    return list(backend.encode(text, add_special_tokens=special).ids)


def text_token_ids(tokenizer: Any, rng: random.Random, n: int, *, bos: bool = False) -> list[int]:
    """Exactly ``n`` token ids of filler text (optionally starting with the tokenizer's specials)."""
    gen = FillerGenerator(rng)
    ids = _encode(tokenizer, "", True) if bos else []
    while len(ids) < n:
        ids += _encode(tokenizer, " " + " ".join(gen.sentences(4)), False)
    return ids[:n]


def build_agent_trace(spec: AgentTraceSpec, tokenizer: Any) -> AgentTrace:
    rng = random.Random(spec.seed)
    system = text_token_ids(tokenizer, rng, spec.system_tokens, bos=True)
    turns = [[text_token_ids(tokenizer, rng, spec.turn_tokens(t)) for t in range(spec.turns)]
             for _ in range(spec.sessions)]
    return AgentTrace(spec, system, turns)


# ----------------------------------------------------------------------------- one request


@dataclass
class StreamResult:
    output_ids: list[int] = field(default_factory=list)
    meta_info: dict[str, Any] = field(default_factory=dict)
    ttft_s: float | None = None
    latency_s: float = 0.0
    chunks: int = 0
    aborted: bool = False  # the client closed the connection on purpose
    error: str | None = None


def stream_generate(base_url: str, input_ids: Sequence[int], max_new_tokens: int, *,
                    abort_after_chunks: int | None = None, timeout_s: float = 300.0,
                    extra: dict[str, Any] | None = None) -> StreamResult:
    """POST ``/generate`` with ``stream: true`` (greedy, ignore_eos) and read its SSE chunks.

    With ``abort_after_chunks`` the connection is closed after that many chunks:
    SGLang sees a client disconnect and aborts the request server-side.
    """
    host, _, port = base_url.removeprefix("http://").partition(":")
    payload = {"input_ids": list(input_ids), "stream": True,
               "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0.0, "ignore_eos": True},
               **(extra or {})}
    res = StreamResult()
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout_s)
    try:
        conn.request("POST", "/generate", json.dumps(payload), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            res.error = f"HTTP {resp.status}: {resp.read()[:300]!r}"
            return res
        done = False
        for raw in resp:  # SSE: "data: {...}\n\n" ... "data: [DONE]"
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            body = line[5:].strip()
            if body == b"[DONE]":
                done = True
                break
            chunk = json.loads(body)
            if "error" in chunk:
                res.error = str(chunk["error"])[:300]
                break
            res.chunks += 1
            if res.ttft_s is None:
                res.ttft_s = time.perf_counter() - t0
            res.output_ids = chunk.get("output_ids", res.output_ids)  # cumulative in the native API
            res.meta_info = chunk.get("meta_info", res.meta_info)
            if abort_after_chunks is not None and res.chunks >= abort_after_chunks:
                res.aborted = True
                break
        if not (done or res.aborted or res.error):
            res.error = "stream ended without [DONE] (server gone?)"
    except (OSError, http.client.HTTPException, json.JSONDecodeError) as e:
        res.error = f"{type(e).__name__}: {e}"
    finally:
        conn.close()  # for an abandoned stream this is the disconnect
        res.latency_s = time.perf_counter() - t0
    return res


# ----------------------------------------------------------------------------- trace runs


@dataclass
class TurnRecord:
    session: int
    turn: int
    prompt_ids: list[int]
    output_ids: list[int]
    cached_tokens: int
    ttft_s: float | None
    latency_s: float
    error: str | None = None

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first (None for one-token answers)."""
        if self.ttft_s is None or len(self.output_ids) < 2:
            return None
        return (self.latency_s - self.ttft_s) / (len(self.output_ids) - 1)


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank-with-interpolation percentile (``q`` in 0..100); None when empty."""
    vals = sorted(values)
    if not vals:
        return None
    if len(vals) == 1:
        return vals[0]
    return statistics.quantiles(vals, n=100, method="inclusive")[min(98, max(0, int(q) - 1))] if q < 100 else vals[-1]


@dataclass
class TraceRun:
    records: list[TurnRecord]
    wall_s: float

    @property
    def ok(self) -> list[TurnRecord]:
        return [r for r in self.records if r.error is None]

    def summary(self) -> dict[str, Any]:
        ok = self.ok
        prompt = sum(len(r.prompt_ids) for r in ok)
        cached = sum(r.cached_tokens for r in ok)
        out = sum(len(r.output_ids) for r in ok)
        ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
        tpot = [t for t in (r.tpot_s for r in ok) if t is not None]
        ms = lambda v: None if v is None else round(1000 * v, 2)  # noqa: E731
        return {
            "requests": len(self.records),
            "failed": len(self.records) - len(ok),
            "prompt_tokens": prompt,
            "cached_tokens": cached,
            "cache_hit_rate": cached / prompt if prompt else 0.0,
            "output_tokens": out,
            "wall_s": round(self.wall_s, 3),
            "output_tok_per_s": out / self.wall_s if self.wall_s else 0.0,
            "requests_per_s": len(ok) / self.wall_s if self.wall_s else 0.0,
            "ttft_ms_p50": ms(percentile(ttft, 50)), "ttft_ms_p99": ms(percentile(ttft, 99)),
            "tpot_ms_p50": ms(percentile(tpot, 50)), "tpot_ms_p99": ms(percentile(tpot, 99)),
        }

    def by_key(self) -> dict[tuple[int, int], TurnRecord]:
        return {(r.session, r.turn): r for r in self.records}

    def to_json(self) -> list[dict[str, Any]]:
        return [asdict(r) for r in self.records]


def run_agent_trace(
    base_url: str,
    trace: AgentTrace,
    *,
    concurrency: int | None = None,
    replay: TraceRun | None = None,
    on_turn: Callable[[TurnRecord], None] | None = None,
    on_wave: Callable[[int, float], None] | None = None,
    timeout_s: float = 300.0,
) -> TraceRun:
    """Run ``trace`` turn by turn: turn t of every session (``concurrency`` requests in flight,
    default all sessions), then turn t + 1. Many interleaved sessions is what makes a server
    keep every session's history cached between its turns.

    Closed loop: turn t's prompt is the system prompt + all previous turns and
    answers. ``on_turn`` sees every request, ``on_wave(t, elapsed_s)`` every finished turn. With ``replay``, prompts are taken verbatim from that run instead,
    so both servers get identical inputs (the answers of the replaying server
    are recorded but not fed back). A session whose turn fails runs no later turns.
    """
    spec = trace.spec
    ref = replay.by_key() if replay is not None else None
    records: list[TurnRecord] = []
    lock = threading.Lock()
    history = [list(trace.system_ids) for _ in range(spec.sessions)]
    alive = [True] * spec.sessions

    def one_turn(s: int, t: int) -> None:
        history[s] += trace.turns[s][t]
        prompt = list(ref[(s, t)].prompt_ids) if ref is not None else list(history[s])
        try:
            res = stream_generate(base_url, prompt, spec.output_tokens, timeout_s=timeout_s)
        except Exception as e:  # a driver bug must not hang the run: record it as a failed turn
            res = StreamResult(error=f"driver error: {e!r}")
        error = res.error
        if error is None and len(res.output_ids) != spec.output_tokens:
            reason = res.meta_info.get("finish_reason")
            error = f"expected {spec.output_tokens} output tokens, got {len(res.output_ids)} (finish {reason})"
        rec = TurnRecord(s, t, prompt, res.output_ids, int(res.meta_info.get("cached_tokens", 0)),
                         res.ttft_s, res.latency_s, error)
        with lock:
            records.append(rec)
            alive[s] = error is None
            history[s] += res.output_ids
        if on_turn is not None:
            on_turn(rec)

    t0 = time.perf_counter()
    for t in range(spec.turns):
        _run_bounded([(s, t) for s in range(spec.sessions) if alive[s]], one_turn, concurrency or spec.sessions)
        if on_wave is not None:
            on_wave(t, time.perf_counter() - t0)
    records.sort(key=lambda r: (r.session, r.turn))
    return TraceRun(records, time.perf_counter() - t0)


def _run_bounded(jobs: list[tuple[int, int]], fn: Callable[[int, int], None], concurrency: int) -> None:
    """Run ``fn(*job)`` for every job, ``concurrency`` at a time, on daemon threads.

    Daemon threads and short joins: on Ctrl-C the main thread gets the interrupt at once and
    the caller stops the server without waiting for in-flight requests (which then fail).
    """
    pending = list(reversed(jobs))
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                if not pending:
                    return
                job = pending.pop()
            fn(*job)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(min(concurrency, len(jobs)))]
    try:
        for th in threads:
            th.start()
        for th in threads:
            while th.is_alive():
                th.join(timeout=0.2)
    except BaseException:
        with lock:
            pending.clear()  # interrupted: workers take no further job
        raise


def token_agreement(reference: TraceRun, other: TraceRun) -> dict[str, Any]:
    """Position-wise greedy token match rate of ``other`` against ``reference`` on the same prompts."""
    ref = reference.by_key()
    match = total = exact = compared = 0
    for rec in other.ok:
        want = ref.get((rec.session, rec.turn))
        if want is None or want.error is not None or want.prompt_ids != rec.prompt_ids:
            continue
        compared += 1
        n = len(want.output_ids)
        match += sum(a == b for a, b in zip(rec.output_ids, want.output_ids))
        total += n
        exact += rec.output_ids == want.output_ids
    return {"token_match_rate": match / total if total else None, "requests_compared": compared,
            "requests_identical": exact}


# ----------------------------------------------------------------------------- server logs

_RUNNING = re.compile(r"#running-req: (\d+)")
_QUEUE = re.compile(r"#queue-req: (\d+)")
_RETRACT = re.compile(r"KV cache pool is full\. Retract requests\. #retracted_reqs: (\d+)")


def scheduler_log_summary(log_text: str) -> dict[str, int]:
    """Max running / queued requests seen in batch log lines, and requests retracted (preempted)
    because the KV pool was full. Prefill lines always log; decode lines every
    ``--decode-log-interval`` steps (the drivers pass 1)."""
    running = [int(m) for m in _RUNNING.findall(log_text)]
    queued = [int(m) for m in _QUEUE.findall(log_text)]
    retracted = [int(m) for m in _RETRACT.findall(log_text)]
    return {"max_running_requests": max(running, default=0), "max_queued_requests": max(queued, default=0),
            "preempted_requests": sum(retracted), "preemption_events": len(retracted)}
