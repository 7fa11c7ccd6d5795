"""benchmarks/scheduler_overhead.py at its ``--quick`` (CI) size: the report it writes, and that the radix
cache's incremental bookkeeping equalled a full recount after every simulated scheduler step.

No timing assertions: the per-step targets are read off the benchmark's own report.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import scheduler_overhead  # noqa: E402

DIST = {"median", "p99", "mean", "max", "n"}
PARTS = ("total", "bookkeeping", "hooks", "admission", "demote", "evict", "stats", "churn")


def test_quick_run_reports_every_part_and_agrees_with_a_recount(tmp_path: Path) -> None:
    assert scheduler_overhead.main(["--quick", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "scheduler_overhead.json").read_text())
    assert data["benchmark"] == "scheduler_overhead" and data["schema_version"] == 1 and data["quick"] is True
    assert data["bookkeeping"] == "incremental"
    assert data["assumed_step_ms"] == 30.0 and "assumed" in data["step_assumption"]
    assert data["running"] == 16 and data["admission_candidates"] == 4
    assert "--quick" in data["command"]
    results = data["results"]
    assert [r["nodes_target"] for r in results] == list(scheduler_overhead.QUICK_NODES)
    for r in results:
        assert r["nodes"] >= r["nodes_target"] and r["steps"] == 10 and r["running"] == 16
        for part in PARTS:
            for clock in ("wall", "cpu"):
                d = r["ms"][part][clock]
                assert set(d) == DIST and 0 <= d["median"] <= d["p99"] <= d["max"], (part, clock, d)
        assert r["ms"]["total"]["cpu"]["n"] == 10 and r["ms"]["stats"]["cpu"]["n"] == 1
        assert set(r["share_of_step"]) == {f"{p}_{c}" for p in ("total", "bookkeeping") for c in ("wall", "cpu")}
        # The incremental counters, idle index and fp16 totals matched a full walk at every step.
        assert r["bookkeeping_check"] == {"checked": True, "ok": True, "mismatches": []}
        assert r["idle_passes"] >= 1
        tiers = r["tree_tokens_end"]
        assert tiers["fp16"] > 0 and tiers["warm"] + tiers["cold"] > 0  # a mixed-tier tree, as in serving
        assert any(k.startswith("idle:") for k in r["demoted_tokens"])
        assert len(r["fingerprint"]) == 16


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(SystemExit):
        scheduler_overhead.parse_args(["--steps", "0"])
    with pytest.raises(SystemExit):
        scheduler_overhead.parse_args(["--nodes", "100,-1"])
