"""Per-step cost of fade's scheduler-side bookkeeping over a large radix tree (CPU, no server, no model).

What a scheduler step pays fade, besides the forward itself, timed on the real classes
(``TieredKVPool`` + ``TieredRadixCache`` + ``FadeTokenAllocator`` + SGLang's ``ReqToTokenPool``, driven by
the ``Sim`` harness of ``tests/test_radix_property.py`` with a tiny KV geometry so memory stays small):

* ``hooks``: ``patches/scheduler_hooks.between_steps`` as the scheduler calls it before forming a batch:
  ``demote_running`` over every running request, and ``demote_idle`` whenever its period (0.25 s of
  simulated time) is due;
* ``admission``: ``FadePrefillBudget.fp16_room()`` for a few prefill candidates (what every
  admission check of a waiting request costs);
* ``stats``: one ``collect_stats`` (the periodic log / Prometheus / ``/fade/stats`` snapshot), timed on its
  own: it runs every few seconds, not every step.

Also reported, for context: ``demote`` (the part of ``hooks`` spent inside ``pool.demote``, i.e. the
quantize-and-copy work itself, which scales with the tokens moved, not with the tree) and ``churn``
(SGLang's own tree work for finishing and starting requests: match, insert, lock, plus the harness's KV
writes; fade's overrides of those run there).

The workload (seeded): shared system prompts with many conversations below them, multi-turn chains
(each turn re-hits its history), branches cut at earlier turns, built on a simulated clock spanning at
least 4 minutes (longer for big trees: ~40 nodes/s, the timed loop's own churn rate) so older branches
idle into INT4 / INT2; then ``--running`` requests (default 256) hold locked
paths and ``req_to_token`` rows with 0..640 generated tokens. Each timed step: the hooks, admission,
then every running request decodes one token and those that reach their length finish (checkpointed into
the tree) and are replaced by new turns. The clock advances by ``--step-ms`` per step.

Share of a step uses an *assumed* decode step time, ``--step-ms`` (default 30 ms: an 8B Llama-class
model at batch 256 with ~2K-token contexts on one H100 reads ~16 GB of weights plus ~64 GB of fp16 KV per
step at ~3.3 TB/s; an estimate, not a measurement).

    python benchmarks/scheduler_overhead.py                  # N = 1K, 5K, 20K nodes
    python benchmarks/scheduler_overhead.py --quick          # CI size (small trees, few steps)
    python benchmarks/scheduler_overhead.py --nodes 1000,20000 --steps 300 --out /tmp/res --tag after

Writes ``<out>/scheduler_overhead[-<tag>].json`` (default out: ``benchmarks/results/``) and prints a table.
The JSON also records, per tree size, whether the cache's incremental bookkeeping agreed with a full
recount (when the cache has one) and a fingerprint of the final state (demoted / evicted token counts
and tree tiers): two builds that make the same decisions print the same fingerprint.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterator

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results"
DEFAULT_NODES = (1000, 5000, 20000)
QUICK_NODES = (200, 800)
STEP_ASSUMPTION = ("assumed decode step: an 8B Llama-class model, batch 256, ~2K-token contexts, one H100 "
                   "(~16 GB weights + ~64 GB fp16 KV read per step at ~3.3 TB/s); an estimate, not measured")
SCHEMA_VERSION = 1

# Workload shape (tokens).
SYS_LEN = (200, 800)  # system prompts
USER_LEN = (8, 40)  # a user turn
ANSWER_LEN = (16, 80)  # an assistant turn in the cached history
OUTPUT_LEN = (64, 640)  # total generated tokens of a running request
MAX_CONV = 3000  # conversations longer than this start over (row context is 4096)
CTX = 4096
# Simulated time the tree build spans, so old branches idle into INT4 / INT2: at least 4 minutes, and
# never faster than the timed loop's own churn (~0.6 requests finish per 30 ms step, ~2 nodes each:
# ~40 new nodes/s), so idle passes see the steady-state rate of nodes crossing the idle thresholds.
BUILD_SPAN_S = 240.0
BUILD_NODES_PER_S = 40.0
IDLE_PASSES_IN_BUILD = 10
VOCAB = (1000, 60000)


def _bootstrap() -> None:
    """sglang.srt imports torchvision, which a CPU-only host lacks: install fade's stand-in first (as conftest)."""
    for p in (REPO, REPO / "tests"):
        if str(p) not in sys.path:
            sys.path.insert(0, str(p))
    from fade_sglang.cpu_shims import install_torchvision_fake

    install_torchvision_fake()


# --------------------------------------------------------------------------- simulated clock


class SimClock:
    """Stands in for ``time`` in the modules that stamp / compare node ages, so ages are deterministic."""

    def __init__(self, start: float = 10_000.0):
        self.now = start

    def monotonic(self) -> float:
        return self.now

    def __getattr__(self, name: str) -> Any:  # perf_counter, time, ... stay real
        return getattr(time, name)


@contextmanager
def simulated_time(clock: SimClock) -> Iterator[None]:
    import sglang.srt.mem_cache.radix_cache as sgl_radix

    from fade_sglang.patches import radix_cache

    mods = (sgl_radix, radix_cache)
    saved = [m.time for m in mods]
    for m in mods:
        m.time = clock
    try:
        yield
    finally:
        for m, t in zip(mods, saved):
            m.time = t


# --------------------------------------------------------------------------- workload


@dataclass
class Scale:
    nodes: int
    running: int
    steps: int
    max_seconds: float
    candidates: int
    stats_every: int
    check_every: int  # 0: check the bookkeeping at the end only


class Workload:
    """Builds the tree, keeps the running set going, and hands out new turns (seeded)."""

    def __init__(self, sim: Any, clock: SimClock, seed: int, n_sys: int):
        self.sim, self.clock = sim, clock
        self.rng = random.Random(seed)
        self.sys_prompts = [self.tokens(self.rng.randint(*SYS_LEN)) for _ in range(n_sys)]
        self.convs: list[tuple[list[int], list[int]]] = []  # (tokens, turn boundaries)
        self.targets: dict[int, tuple[int, int]] = {}  # id(req) -> (output target, conversation index)

    def tokens(self, n: int) -> list[int]:
        return [self.rng.randrange(*VOCAB) for _ in range(n)]

    def next_prompt(self) -> tuple[list[int], int]:
        """A new turn: continue a conversation (60%), branch off an earlier turn (15%), or a new one."""
        r = self.rng.random()
        user = self.tokens(self.rng.randint(*USER_LEN))
        if self.convs and r < 0.75:
            ci = self.rng.randrange(len(self.convs))
            toks, cuts = self.convs[ci]
            if r >= 0.60 and len(cuts) > 1:
                cut = self.rng.choice(cuts[:-1])
                self.convs.append((toks[:cut], [c for c in cuts if c <= cut]))
                ci = len(self.convs) - 1
                toks = toks[:cut]
            if len(toks) < MAX_CONV:
                return toks + user, ci
        sys_prompt = self.rng.choice(self.sys_prompts)
        self.convs.append((list(sys_prompt), [len(sys_prompt)]))
        return sys_prompt + user, len(self.convs) - 1

    def finish_turn(self, ci: int, tokens: list[int]) -> None:
        _, cuts = self.convs[ci]
        self.convs[ci] = (list(tokens), cuts + [len(tokens)])

    def build(self, target_nodes: int) -> int:
        """Cache finished turns until the tree holds ``target_nodes`` nodes; returns the node count."""
        turns = max(1, target_nodes // 2)  # a turn adds ~2 nodes (prompt / output split at checkpoint)
        dt = max(BUILD_SPAN_S, target_nodes / BUILD_NODES_PER_S) / turns
        idle_every = max(1, turns // IDLE_PASSES_IN_BUILD)
        done = nodes = 0
        while nodes < target_nodes:
            prompt, ci = self.next_prompt()
            answer = self.tokens(self.rng.randint(*ANSWER_LEN))
            req = self.sim.start(prompt + answer)
            if req is not None:
                req.origin_len = len(prompt)
                self.sim.release(req, cache_it=True)
                self.finish_turn(ci, prompt + answer)
            done += 1
            self.clock.now += dt
            if done % idle_every == 0:
                self.sim.cache.demote_idle(self.clock.now)
            if done % 200 == 0 or done >= turns:
                nodes = count_nodes(self.sim.cache)
        self.sim.cache.demote_idle(self.clock.now)
        return count_nodes(self.sim.cache)

    def start_running(self, generated: int | None = None) -> Any | None:
        """A running request: a new turn's prompt plus ``generated`` tokens already decoded."""
        prompt, ci = self.next_prompt()
        target = self.rng.randint(*OUTPUT_LEN)
        gen = self.rng.randrange(target) if generated is None else generated
        req = self.sim.start(prompt + self.tokens(gen + 1))  # +1: the token the last decode step produced
        if req is None:
            return None
        req.origin_len = len(prompt)
        self.targets[id(req)] = (target, ci)
        return req

    def decode_step(self) -> int:
        """Every running request decodes one token (one fp16 allocation for the batch); returns finished."""
        import torch

        sim = self.sim
        reqs = [r for r in sim.running if r.kv.kv_committed_len + 1 < CTX]
        slots = sim.alloc_fp16(len(reqs)) if reqs else None
        if slots is not None:
            rows = torch.tensor([r.kv.req_pool_idx for r in reqs])
            pos = torch.tensor([r.kv.kv_committed_len for r in reqs])
            sim.rtp.req_to_token[rows, pos] = slots.to(sim.rtp.req_to_token.dtype)
            for r in reqs:
                r.tokens.append(self.rng.randrange(*VOCAB))
                r.kv.kv_committed_len += 1
                r.kv.kv_allocated_len += 1
        finished = 0
        for r in list(sim.running):
            target, ci = self.targets[id(r)]
            if len(r.tokens) - r.origin_len >= target or r.kv.kv_committed_len + 1 >= CTX:
                sim.release(r, cache_it=True)
                del self.targets[id(r)]
                self.finish_turn(ci, r.tokens)
                finished += 1
        return finished

    def refill(self, running: int) -> None:
        while len(self.sim.running) < running:
            if self.start_running(generated=0) is None:
                break


def count_nodes(cache: Any) -> int:
    n, stack = 0, list(cache.root_node.children.values())
    while stack:
        node = stack.pop()
        n += 1
        stack.extend(node.children.values())
    return n


# --------------------------------------------------------------------------- measurement


def build_sim(scale: Scale, seed: int, clock: SimClock) -> tuple[Any, Workload, int]:
    import torch

    from fade_sglang.config import FadeConfig
    from fade_sglang.pool.tiered_store import tier_bytes_per_token
    from fade_sglang.radix.clock import StepClock
    from test_radix_property import Sim

    geometry = (1, 32, 1)  # heads, head_dim, layers: tiny KV, the bookkeeping does not depend on it
    tokens = int(scale.nodes * 40 + scale.running * 700 + 20_000)  # generous estimate of held tokens
    # The arena's bytes: what 0.45 / 0.6 / 0.6 x those tokens took as fp16 / INT4 / INT2 when the tiers
    # were a fixed split (earlier runs of this benchmark), now one arena the tiers share (default caps).
    cfg = FadeConfig()
    bpt = tier_bytes_per_token(cfg, geometry[2], geometry[0], geometry[1], torch.float32)
    total_bytes = sum(int(tokens * share) * b for share, b in zip((0.45, 0.6, 0.6), bpt))
    size = -(-total_bytes // bpt[0])  # fp16 tokens of the same bytes: the pool's size
    sim = Sim(cfg, size=size, rows=scale.running + 16, ctx=CTX, geometry=geometry, verify=False)
    sim.cache.clock = StepClock(lambda: clock.now)  # the scheduler hook ticks it: simulated time too
    work = Workload(sim, clock, seed, n_sys=max(4, scale.nodes // 400))
    nodes = work.build(scale.nodes)
    for _ in range(scale.running):
        work.start_running()
    return sim, work, nodes


def _dist(samples: list[float]) -> dict[str, float]:
    if not samples:
        return {"median": 0.0, "p99": 0.0, "mean": 0.0, "max": 0.0, "n": 0}
    s = sorted(samples)
    p99 = s[min(len(s) - 1, max(0, int(round(0.99 * (len(s) - 1)))))]
    return {"median": statistics.median(s), "p99": p99, "mean": statistics.fmean(s), "max": s[-1], "n": len(s)}


class Meter:
    """Wall and process-CPU milliseconds of the calls it wraps, since the last :meth:`take`. CPU time is what
    the host spends (torch runs single-threaded here); wall also counts other load on a shared machine."""

    def __init__(self) -> None:
        self.wall = self.cpu = 0.0

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            c0, t0 = time.process_time(), time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.wall += (time.perf_counter() - t0) * 1e3
                self.cpu += (time.process_time() - c0) * 1e3
        return timed

    def take(self) -> tuple[float, float]:
        out = (self.wall, self.cpu)
        self.wall = self.cpu = 0.0
        return out


class Samples:
    """Per-step (wall, cpu) samples by name."""

    def __init__(self) -> None:
        self.data: dict[str, list[tuple[float, float]]] = {}

    def add(self, name: str, sample: tuple[float, float]) -> None:
        self.data.setdefault(name, []).append(sample)

    def dists(self) -> dict[str, dict[str, dict[str, float]]]:
        return {name: {"wall": _dist([w for w, _ in xs]), "cpu": _dist([c for _, c in xs])}
                for name, xs in self.data.items()}


def fingerprint(sim: Any) -> str:
    """Digest of the final state: demoted / evicted counts, tree tiers, and every slot of the tree (in
    walk order) and of the running rows. Equal digests: the same decisions, down to slot numbers."""
    cache = sim.cache
    digest = hashlib.sha256()
    state = {"demoted": sorted((f"{r}:{m}", n) for (r, m), n in cache.demoted.items()),
             "evicted": sorted(cache.evicted.items()), "tree": cache.tier_token_counts(),
             "pool": [sim.pool.available(t) for t in range(3)], "nodes": count_nodes(cache)}
    digest.update(json.dumps(state, sort_keys=True).encode())
    stack = list(cache.root_node.children.values())
    while stack:
        node = stack.pop()
        digest.update(node.value.numpy().tobytes())
        stack.extend(node.children.values())
    for req in sim.running:
        digest.update(sim.rtp.req_to_token[req.kv.req_pool_idx, :req.kv.kv_committed_len].numpy().tobytes())
    return digest.hexdigest()[:16]


def check_bookkeeping(cache: Any) -> list[str] | None:
    """Incremental counters vs a full recount (None: this cache keeps no incremental counters)."""
    check = getattr(cache, "check_bookkeeping", None)
    return None if check is None else list(check())


def run_scale(scale: Scale, seed: int, step_ms: float) -> dict[str, Any]:
    from fade_sglang.patches.scheduler_hooks import FadeSchedulerState, between_steps
    from fade_sglang.patches.stats import StatsReporter, collect_stats

    clock = SimClock()
    with simulated_time(clock):
        t0 = time.perf_counter()
        sim, work, nodes = build_sim(scale, seed, clock)
        build_s = time.perf_counter() - t0
        cache = sim.cache
        scheduler = SimpleNamespace(
            _fade_state=FadeSchedulerState(sim.cfg, StatsReporter(0, False)), tree_cache=cache,
            token_to_kv_pool_allocator=sim.alloc, req_to_token_pool=sim.rtp, chunked_req=None,
            chunked_prefill_size=None, waiting_queue=[])  # admission is timed below, not through the queue
        # Settle: the first pass demotes the backlog of the freshly started rows (not a steady-state step).
        between_steps(scheduler, SimpleNamespace(reqs=list(sim.running)), None)
        before_tree = dict(cache.tier_token_counts())
        meters = {name: Meter() for name in ("hooks", "admission", "demote", "evict", "stats", "churn")}
        sim.pool.demote = meters["demote"].wrap(sim.pool.demote)  # the quantize-and-copy work itself
        cache.evict = meters["evict"].wrap(cache.evict)  # fade's demote-before-evict, called by allocation
        hooks = meters["hooks"].wrap(between_steps)
        stats = meters["stats"].wrap(collect_stats)
        churn = meters["churn"].wrap(lambda: (work.decode_step(), work.refill(scale.running)))
        samples = Samples()
        mismatches: list[str] = []
        checked = False
        idle_passes = 0
        t_start = time.perf_counter()
        steps = 0
        while steps < scale.steps and (steps < 20 or time.perf_counter() - t_start < scale.max_seconds):
            meters["demote"].take()
            last_idle = scheduler._fade_state.last_idle_demote
            hooks(scheduler, SimpleNamespace(reqs=list(sim.running)), None)
            idle_passes += scheduler._fade_state.last_idle_demote != last_idle
            budget = sim.alloc.create_prefill_budget(cache)
            meters["admission"].wrap(lambda: [budget.fp16_room() for _ in range(scale.candidates)])()
            h, a, d = meters["hooks"].take(), meters["admission"].take(), meters["demote"].take()
            total = (h[0] + a[0], h[1] + a[1])
            for name, sample in (("hooks", h), ("admission", a), ("demote", d), ("total", total),
                                 ("bookkeeping", (total[0] - d[0], total[1] - d[1]))):
                samples.add(name, sample)
            if steps % scale.stats_every == 0:
                stats(scheduler)
                samples.add("stats", meters["stats"].take())
            if scale.check_every and steps % scale.check_every == 0:
                got = check_bookkeeping(cache)
                if got is not None:
                    checked = True
                    mismatches += [f"step {steps}: {m}" for m in got]
            meters["evict"].take()
            churn()
            samples.add("churn", meters["churn"].take())
            samples.add("evict", meters["evict"].take())
            clock.now += step_ms / 1e3
            steps += 1
        got = check_bookkeeping(cache)
        if got is not None:
            checked = True
            mismatches += [f"end: {m}" for m in got]
        ms = samples.dists()
        result = {
            "nodes_target": scale.nodes,
            "nodes": nodes,
            "nodes_end": count_nodes(cache),
            "running": len(sim.running),
            "steps": steps,
            "build_s": round(build_s, 2),
            "tree_tokens_start": before_tree,
            "tree_tokens_end": cache.tier_token_counts(),
            "idle_passes": idle_passes,
            "admission_candidates": scale.candidates,
            "ms": ms,
            "share_of_step": {f"{name}_{clock_}": {q: ms[name][clock_][q] / step_ms for q in ("median", "p99")}
                              for name in ("total", "bookkeeping") for clock_ in ("wall", "cpu")},
            "bookkeeping_check": {"checked": checked, "ok": not mismatches, "mismatches": mismatches[:20]},
            "demoted_tokens": {f"{r}:{m}": n for (r, m), n in sorted(cache.demoted.items())},
            "evicted_tokens": dict(cache.evicted),
            "fingerprint": fingerprint(sim),
        }
    return result


# --------------------------------------------------------------------------- report


def table(results: list[dict[str, Any]], step_ms: float) -> str:
    """Per-step totals (hooks + admission) and bookkeeping (the same without ``pool.demote``), then a breakdown."""
    def f(r: dict[str, Any], name: str, clock_: str, q: str) -> float:
        return r["ms"][name][clock_][q]

    head = (f"{'nodes':>6} {'steps':>5} | {'total wall':>10} {'p99':>7} | {'total cpu':>9} {'p99':>7} "
            f"{'share':>6} {'p99':>6} | {'bookkeep cpu':>12} {'p99':>7} {'share':>6} {'p99':>6} | check")
    lines = [f"fade per-step work (hooks + {results[0]['admission_candidates'] if results else 0} admission checks), "
             f"ms median / p99; share of an assumed {step_ms:g} ms step; bookkeeping = total - pool.demote", head,
             "-" * len(head)]
    for r in results:
        chk = ("ok" if r["bookkeeping_check"]["ok"] else "MISMATCH") if r["bookkeeping_check"]["checked"] else "n/a"
        lines.append(
            f"{r['nodes']:>6} {r['steps']:>5} | {f(r, 'total', 'wall', 'median'):>10.3f} {f(r, 'total', 'wall', 'p99'):>7.2f}"
            f" | {f(r, 'total', 'cpu', 'median'):>9.3f} {f(r, 'total', 'cpu', 'p99'):>7.2f} "
            f"{100 * f(r, 'total', 'cpu', 'median') / step_ms:>5.1f}% {100 * f(r, 'total', 'cpu', 'p99') / step_ms:>5.0f}%"
            f" | {f(r, 'bookkeeping', 'cpu', 'median'):>12.3f} {f(r, 'bookkeeping', 'cpu', 'p99'):>7.2f} "
            f"{100 * f(r, 'bookkeeping', 'cpu', 'median') / step_ms:>5.2f}% "
            f"{100 * f(r, 'bookkeeping', 'cpu', 'p99') / step_ms:>5.1f}% | {chk}")
    names = ("hooks", "admission", "demote", "evict", "stats", "churn")
    lines += ["", "breakdown, cpu ms median / p99 (demote: inside hooks; evict: fade's demote-before-evict run by "
              "allocation during churn; stats: one collect_stats; churn: decode + finish/start, context only)",
              f"{'nodes':>6} | " + " | ".join(f"{n:>15}" for n in names)]
    for r in results:
        lines.append(f"{r['nodes']:>6} | " + " | ".join(
            f"{f(r, n, 'cpu', 'median'):>7.3f} {f(r, n, 'cpu', 'p99'):>7.2f}" for n in names))
    if len(results) > 1:
        base = max(f(results[0], "bookkeeping", "cpu", "median"), 1e-9)
        growth = ", ".join(f"{r['nodes']}: x{f(r, 'bookkeeping', 'cpu', 'median') / base:.2f}" for r in results[1:])
        lines.append(f"bookkeeping cpu median vs {results[0]['nodes']} nodes: {growth}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", default=None, help="comma-separated tree sizes (default 1000,5000,20000)")
    ap.add_argument("--running", type=int, default=None, help="running requests (default 256; --quick 32)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per size (default 200; --quick 12)")
    ap.add_argument("--max-seconds", type=float, default=120.0,
                    help="stop a size's timed loop after this long (at least 20 steps run)")
    ap.add_argument("--candidates", type=int, default=4, help="prefill candidates per step (fp16_room calls)")
    ap.add_argument("--stats-every", type=int, default=10, help="time collect_stats every N steps")
    ap.add_argument("--check-every", type=int, default=None,
                    help="compare incremental bookkeeping with a full recount every N steps (0: at the end only; "
                         "default 50, --quick 1)")
    ap.add_argument("--step-ms", type=float, default=30.0, help="assumed decode step time for the share column")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="CI size: small trees, 16 running requests, 10 steps")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder for the JSON")
    ap.add_argument("--tag", default="", help="suffix of the JSON file name (e.g. before / after)")
    args = ap.parse_args(argv)
    args.nodes = [int(x) for x in args.nodes.split(",")] if args.nodes else list(QUICK_NODES if args.quick
                                                                                 else DEFAULT_NODES)
    args.running = args.running if args.running is not None else (16 if args.quick else 256)
    args.steps = args.steps if args.steps is not None else (10 if args.quick else 200)
    args.check_every = args.check_every if args.check_every is not None else (1 if args.quick else 50)
    if any(n < 1 for n in args.nodes) or args.running < 1 or args.steps < 1 or args.step_ms <= 0:
        ap.error("--nodes, --running, --steps and --step-ms must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _bootstrap()
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the scheduler's bookkeeping is single-threaded; CPU time then equals its cost
    results = []
    try:
        for n in args.nodes:
            scale = Scale(n, args.running, args.steps, args.max_seconds, args.candidates, args.stats_every,
                          args.check_every)
            results.append(run_scale(scale, args.seed, args.step_ms))
            r = results[-1]
            print(f"[{n} nodes] built {r['nodes']} nodes in {r['build_s']}s, {r['steps']} steps, per-step cpu "
                  f"median {r['ms']['total']['cpu']['median']:.3f} ms", file=sys.stderr, flush=True)
    finally:
        torch.set_num_threads(threads)
    from fade_sglang.patches.radix_cache import TieredRadixCache

    report = {
        "benchmark": "scheduler_overhead",
        "schema_version": SCHEMA_VERSION,
        "quick": args.quick,
        "bookkeeping": "incremental" if hasattr(TieredRadixCache, "check_bookkeeping") else "tree-walk",
        "host": {"platform": platform.platform(), "cpus": os.cpu_count(), "loadavg_end": list(os.getloadavg()),
                 "torch_threads": 1},
        "command": " ".join(["python", "benchmarks/scheduler_overhead.py", *(argv if argv is not None else sys.argv[1:])]),
        "assumed_step_ms": args.step_ms,
        "step_assumption": STEP_ASSUMPTION,
        "running": args.running,
        "admission_candidates": args.candidates,
        "seed": args.seed,
        "results": results,
    }
    print(table(results, args.step_ms))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / (f"scheduler_overhead-{args.tag}.json" if args.tag else "scheduler_overhead.json")
    path.write_text(json.dumps(report, indent=1))
    print(f"wrote {path}")
    return 0 if all(r["bookkeeping_check"]["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
