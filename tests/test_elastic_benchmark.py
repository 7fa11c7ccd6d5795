"""benchmarks/elastic.py's acceptance scenarios on the tiny model: plain SGLang vs fade at the same N.

One plain and one fade server (``--max-total-tokens 2048``, the ``tiny`` scale) serve the ``long``,
``short`` and ``long_prompt`` scenarios, called as functions (no subprocess); the long prompt's
reference server (plain, 3.5 N) starts after the two are stopped. Asserted, the properties that are
robust on CPU:

* long: fade's most-running >= plain's, fade retracts nothing (the pool holds all prompts with their
  middles compressed), every request completes on both servers;
* short: every output identical token for token, fade's capacity >= plain's N;
* long_prompt: plain at N refuses the 2.5 N prompt, fade at N serves it, and fade's output equals the
  big plain server's in its first token and in at least ``LONG_PROMPT_MIN_MATCH`` of its tokens.

Wall-time ratios are printed, not asserted (CPU timing on a shared 2-core machine is noisy).
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import elastic  # noqa: E402

pytestmark = pytest.mark.server

# The tiny scale with one timed repetition of `short` (the ratio is not asserted here).
SCALE = replace(elastic.SCALES["tiny"], short_repeats=1)
# Identical output is the goal; the asserted bound (why: see elastic.LONG_PROMPT_MIN_MATCH).
LONG_PROMPT_MIN_MATCH = elastic.LONG_PROMPT_MIN_MATCH


def _say(msg: str) -> None:
    print(f"[elastic-test] {msg}", flush=True)


@pytest.fixture(scope="module")
def model() -> Path:
    return elastic.resolve_model(None, SCALE)


@pytest.fixture(scope="module")
def tokenizer(model: Path) -> Any:
    return elastic._tokenizer(model)


@pytest.fixture(scope="module")
def servers(model: Path) -> Iterator[elastic.Servers]:
    srv = elastic.start_servers(model, SCALE, "balanced", ("long", "short", "long_prompt"), _say)
    try:
        yield srv
    finally:
        srv.plain.stop()
        srv.fade.stop()


def _show(name: str, res: dict[str, Any]) -> None:
    body = {k: v for k, v in res.items() if k not in ("prompt", "output_ids")}
    print(f"\n{name}: {json.dumps(body, indent=1, default=str)[:6000]}")


def test_long_prompts_fade_runs_at_least_as_many_without_retracting(servers: elastic.Servers, tokenizer: Any) -> None:
    res = elastic.run_long(servers, tokenizer, _say)
    _show("long", res)
    print(elastic.format_report({"scenarios": {"long": res}, "max_total_tokens": SCALE.max_total_tokens,
                                 "acceptance": elastic.acceptance({"long": res})}))
    plain, fade = res["plain"], res["fade"]
    n = SCALE.long_requests
    assert plain["completed"] == n and fade["completed"] == n, (plain["errors"], fade["errors"])
    assert fade["max_running_requests"] >= plain["max_running_requests"]
    fits = fade["fade"]["holds_all_compressed"]
    assert fits["fits"], f"the scale no longer exercises 'holds all prompts compressed': {fits}"
    assert fade["preempted_requests"] == 0 and fade["fade"]["retracted_requests"] == 0, (
        f"fade retracted (log {fade['preempted_requests']}, stats {fade['fade']['retracted_requests']}) although "
        f"its pool holds all prompts compressed ({fits}); log {servers.fade.log_path}")


def test_short_requests_are_identical_and_fade_holds_at_least_n(servers: elastic.Servers, tokenizer: Any) -> None:
    res = elastic.run_short(servers, tokenizer, _say)
    _show("short", res)
    print(f"short: wall fade / plain {res['wall_ratio_fade_over_plain']:.2f}x (not asserted; target <= 1.1)")
    n = SCALE.short_requests
    assert res["plain"]["completed"] == n and res["fade"]["completed"] == n
    assert res["identical"] == n, f"first divergences {res['first_divergences']}"
    assert res["plain"]["capacity_tokens"] == SCALE.max_total_tokens
    assert res["fade"]["capacity_tokens"] >= res["plain"]["capacity_tokens"]
    assert res["fade"]["fp16_capacity_tokens"] >= res["plain"]["capacity_tokens"]


def test_long_prompt_plain_refuses_fade_serves_like_a_big_pool(servers: elastic.Servers, tokenizer: Any) -> None:
    res = elastic.run_long_prompt_at_n(servers, tokenizer, _say)
    servers.plain.stop()  # the last scenario on them: the reference server runs alone
    servers.fade.stop()
    elastic.run_long_prompt_reference(res, servers, _say)
    _show("long_prompt", res)
    assert res["workload"]["prompt_tokens"] > 2 * SCALE.max_total_tokens
    plain, fade, big = res["plain"], res["fade"], res["plain_big"]
    print(f"long_prompt: fade {fade['wall_s']}s, plain-big {big['wall_s']}s; plain at N: HTTP {plain['http_status']}"
          f" {plain['error']}")
    assert not plain["served"] and plain["error"], plain
    assert fade["served"], fade
    assert big["served"], big
    cmp = res["fade_vs_plain_big"]
    print(f"long_prompt: fade vs plain-big: {cmp}\n  plain-big {big['output_ids']}\n  fade      {fade['output_ids']}")
    assert cmp["matching_prefix_tokens"] >= 1 and cmp["token_match_rate"] >= LONG_PROMPT_MIN_MATCH, (
        f"fade's output diverges from plain-big's at token {cmp['first_divergence']}: fade {fade['output_ids']} vs "
        f"plain-big {big['output_ids']}; fade log {servers.fade.log_path}")


def test_bad_arguments_are_one_line_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert elastic.main(["--model-path", "/nonexistent/model"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("elastic.py: error: model directory /nonexistent/model not found") and "\n" not in err
    assert elastic.main(["--scenarios", "long,bogus"]) == 2
    assert "unknown scenarios ['bogus']" in capsys.readouterr().err
    assert elastic.main(["--preset", "nope"]) == 2
    assert "unknown preset 'nope'" in capsys.readouterr().err
