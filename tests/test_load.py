"""Bounded load test of one fade server (127.0.0.1): 64 concurrent multi-turn sessions plus aborted requests.

Checks: no crash, no failed request except the aborted ones, tier counts consistent
while busy (tier used counts sum to ``tokens``, the tiers' arena pages plus the free ones
are all pages, each tier's tokens fit its pages), and no slot leak (after ``/flush_cache``
every tier's available count and the free pages are back to their initial values). The
server runs with ``SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_BUSY=1``, so SGLang
also checks its token accounting after every scheduler step.

Small windows and sub-second idle thresholds make demotion run during the load.
Tokens are kept small: the whole test takes ~2-3 minutes on 2 CPU cores.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest

from fade_sglang.eval.workloads import (AgentTraceSpec, build_agent_trace, load_tokenizer, run_agent_trace,
                                   stream_generate)
from sglang_server import ServerProcess

pytestmark = pytest.mark.server

SESSIONS = 64
SPEC = AgentTraceSpec(sessions=SESSIONS, turns=3, system_tokens=32, user_tokens=8, tool_tokens=24,
                      output_tokens=8, seed=7)
FADE_ARGS = [
    "--kv-compression", "fade", "--attention-backend", "fade_torch",
    "--fade-sink-tokens", "4", "--fade-recent-window", "16", "--fade-set", "demote_chunk=16",
    "--fade-set", "warm_idle_seconds=0.5", "--fade-set", "cold_idle_seconds=2",
]
# ~37 MiB of KV (full-precision tokens of the same bytes), as when this test ran on a fixed tier split;
# fp16 may use all of it, so it holds every in-flight window.
MAX_TOTAL_TOKENS = 18944
# Long enough that the abort (sent after 1 s) lands first (the tiny model decodes ~500 tokens/s), within
# its 2048-token context.
API_ABORT_TOKENS = 1900
STRICT_ENV = {"SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_BUSY": "1"}
STREAM_ABORTS = 16  # streaming requests closed by the client after a few chunks
API_ABORTS = 8  # requests cancelled with POST /abort_request


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path) -> Iterator[ServerProcess]:
    with ServerProcess(tiny_model_dir, FADE_ARGS, max_total_tokens=MAX_TOTAL_TOKENS, env=STRICT_ENV,
                       startup_timeout_s=300) as srv:
        yield srv
    print(f"\nserver log: {srv.log_path}")


def _check_consistent(stats: dict[str, Any]) -> None:
    tiers, pages = stats["tiers"], stats["pages"]
    assert sum(t["used"] for t in tiers.values()) == stats["tokens"]
    assert sum(t["pages"] for t in tiers.values()) + pages["free"] == pages["total"]
    for name, t in tiers.items():
        assert t["used"] <= t["pages"] * pages["rows_per_page"][name], name  # live rows fit the tier's pages
        assert t["page_bytes"] == t["pages"] * pages["page_bytes"], name


def _api_abort(srv: ServerProcess, ids: list[int], results: list[dict[str, Any]]) -> None:
    """A long request with a known rid, cancelled through SGLang's /abort_request while it runs."""
    rid = uuid.uuid4().hex
    out: dict[str, Any] = {}

    def run() -> None:
        out.update(stream_generate(srv.base_url, ids, API_ABORT_TOKENS, extra={"rid": rid}).__dict__)

    th = threading.Thread(target=run, daemon=True)
    th.start()
    time.sleep(1.0)
    req = urllib.request.Request(srv.base_url + "/abort_request", data=json.dumps({"rid": rid}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:  # an empty 200 body: not srv.request()
        assert resp.status == 200
    th.join(timeout=120)
    assert not th.is_alive(), "an aborted request never returned"
    results.append(out)


def test_many_sessions_with_aborts_no_leak(server: ServerProcess, tiny_model_dir: Path) -> None:
    server.flush_cache()
    initial = server.fade_stats()
    _check_consistent(initial)
    assert initial["tokens"] == 0
    trace = build_agent_trace(SPEC, load_tokenizer(tiny_model_dir))
    long_prompt = trace.system_ids + trace.turns[0][0]

    busy_stats: list[dict[str, Any]] = []
    stream_aborts: list[Any] = []
    api_aborts: list[dict[str, Any]] = []
    done = threading.Event()

    def sample() -> None:  # stats while the server is busy
        while not done.wait(1.0):
            busy_stats.append(server.fade_stats())

    def stream_aborter() -> None:  # client disconnects mid-generation
        for i in range(STREAM_ABORTS):
            stream_aborts.append(stream_generate(server.base_url, long_prompt + [5 + i], 256,
                                                 abort_after_chunks=2 + i % 3))

    def api_aborter() -> None:
        for i in range(API_ABORTS):
            _api_abort(server, long_prompt + [50 + i], api_aborts)

    helpers = [threading.Thread(target=f, daemon=True) for f in (sample, stream_aborter, api_aborter)]
    t0 = time.monotonic()
    for th in helpers:
        th.start()
    run = run_agent_trace(server.base_url, trace, concurrency=SESSIONS, timeout_s=240)
    for th in helpers[1:]:
        th.join(timeout=300)
    done.set()
    helpers[0].join(timeout=30)
    print(f"\nload: {len(run.records)} requests in {time.monotonic() - t0:.1f}s; {run.summary()}")

    failures = [(r.session, r.turn, r.error) for r in run.records if r.error]
    assert not failures, failures[:5]
    assert len(run.records) == SESSIONS * SPEC.turns
    assert all(r.cached_tokens >= SPEC.system_tokens - 1 for r in run.records if r.turn > 0)
    assert len(stream_aborts) == STREAM_ABORTS and all(r.aborted and r.error is None for r in stream_aborts)
    assert len(api_aborts) == API_ABORTS
    for res in api_aborts:  # ended by the abort: fewer tokens than asked, an "abort" finish reason
        assert res["error"] is None, res["error"]
        assert len(res["output_ids"]) < API_ABORT_TOKENS and res["meta_info"]["finish_reason"]["type"] == "abort"

    assert busy_stats, "no stats sampled while busy"
    for stats in busy_stats:
        _check_consistent(stats)
    assert any(s["tokens"] > 0 for s in busy_stats)

    time.sleep(3)  # > cold_idle_seconds: idle demotion runs on the finished tree
    server.generate(input_ids=[5, 6, 7], max_new_tokens=1)  # one more scheduler step
    after_load = server.fade_stats()
    _check_consistent(after_load)
    assert sum(after_load["demoted_tokens"].values()) > 0

    server.flush_cache()
    final = server.fade_stats()
    _check_consistent(final)
    for name, tier in final["tiers"].items():
        assert tier["used"] == 0 and tier["available"] == initial["tiers"][name]["available"], (name, tier)
    assert final["pages"]["free"] == initial["pages"]["free"]
    log = server.log_text()
    for bad in ("Traceback", "Mem Leak", "memory leak", "token_to_kv_pool_allocator memory leak"):
        assert bad not in log, bad
    # The server still serves after the load.
    assert len(server.generate(input_ids=long_prompt, max_new_tokens=4)["output_ids"]) == 4
