"""``fade-sglang demo`` end to end (real servers, ``--quick``), its one-line errors, and Ctrl-C cleanup."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "fade_sglang.cli"]


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + args, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def test_missing_model_is_one_line_error(tmp_path: Path) -> None:
    res = _run(["demo", "--model-path", str(tmp_path / "nope")], timeout=60)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fade-sglang: error: model directory"), res.stderr
    assert "Traceback" not in res.stderr


def test_unknown_preset_is_one_line_error(tiny_model_dir: Path) -> None:
    res = _run(["demo", "--model-path", str(tiny_model_dir), "--preset", "extreme"], timeout=60)
    assert res.returncode == 2 and "unknown preset" in res.stderr and "Traceback" not in res.stderr


def test_server_that_does_not_start_is_one_line_error(monkeypatch, capsys) -> None:
    from fade_sglang.eval import demo
    from fade_sglang.eval.launcher import ServerStartupError

    def no_server(args):
        raise ServerStartupError("sglang server not ready after 300s; log tail (/tmp/x.log):\nline 1\nline 2")

    monkeypatch.setattr(demo, "run_demo", no_server)
    assert demo.main(["--quick"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["fade-sglang: error: a server did not start: sglang server not ready after 300s; log tail "
                   "(/tmp/x.log):"]


def test_cli_lists_subcommands() -> None:
    res = _run(["--help"], timeout=60)
    assert res.returncode == 0 and "demo" in res.stdout and "fidelity" in res.stdout


@pytest.mark.server
def test_demo_quick_json(tiny_model_dir: Path) -> None:
    t0 = time.monotonic()
    res = _run(["demo", "--model-path", str(tiny_model_dir), "--quick", "--json"], timeout=400)
    assert res.returncode == 0, res.stderr[-4000:]
    out = json.loads(res.stdout)
    print(f"\ndemo took {time.monotonic() - t0:.0f}s\n" + res.stderr[-3000:])
    base, fade = out["results"]["fp16"], out["results"]["fade"]
    for row in (base, fade):
        for key in ("max_tokens", "pool_bytes", "bytes_per_token", "tier_mix", "cache_hit_rate",
                    "output_tok_per_s", "requests_per_s", "ttft_ms_p50", "max_running_requests",
                    "preempted_requests"):
            assert key in row, key
        assert row["failed"] == 0
        assert row["requests"] == out["workload"]["sessions"] * out["workload"]["turns"]
        assert 0.0 < row["cache_hit_rate"] < 1.0  # shared system prompt + history come from the tree
        assert row["output_tok_per_s"] > 0
    # Same measured bytes: fade's arena is at most two pages larger (rounded up to whole pages, plus the
    # packed tiers' reserve page; pages of 39 fp16 rows with balanced's k8v4 + INT4 records here, about 10% of
    # the quick demo's 768-token pool), many more tokens.
    pages = 2 * fade["page_tokens"] / base["max_tokens"]
    assert 1.0 <= fade["pool_bytes"] / base["pool_bytes"] <= 1.0 + pages + 1e-3
    assert fade["max_tokens"] > 3 * base["max_tokens"]
    assert fade["bytes_per_token"] < base["bytes_per_token"] / 3
    mix = fade["tier_mix"]
    assert sum(t["tokens"] for t in mix.values()) == fade["held_tokens"] > 0
    assert sum(t["tokens"] for name, t in mix.items() if name != "fp16") > 0, "fade must have demoted tokens"
    assert sum(fade["demoted_tokens"].values()) > 0
    agree = out["greedy_agreement"]
    assert agree["requests_compared"] == base["requests"]
    assert 0.0 <= agree["token_match_rate"] <= 1.0


@pytest.mark.server
def test_demo_sigint_leaves_no_server(tiny_model_dir: Path) -> None:
    proc = subprocess.Popen(CLI + ["demo", "--model-path", str(tiny_model_dir), "--quick"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        seen = ""
        while time.monotonic() < deadline:  # wait until the first server serves: mid-run
            line = proc.stderr.readline()
            seen += line
            if "running" in line and "sessions" in line or proc.poll() is not None:
                break
        assert proc.poll() is None, seen
        launchers = _server_launchers(proc.pid)
        assert launchers, "the demo's server should be running"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=90)
        assert proc.returncode == 130, err
        assert "interrupted" in err and "Traceback" not in err
        time.sleep(1)
        assert not [p for p in launchers if _alive(p)], "a server survived the demo's Ctrl-C"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(")")[-1].split()[0] == "Z")


def _server_launchers(demo_pid: int) -> list[int]:
    """Server launchers started by the demo (children of its pid) and every process in their groups."""
    out = subprocess.run(["ps", "-eo", "pid=,ppid=,pgid="], capture_output=True, text=True).stdout
    rows = [tuple(int(x) for x in line.split()) for line in out.splitlines() if line.strip()]
    groups = {pid for pid, ppid, _ in rows if ppid == demo_pid}
    return [pid for pid, _, pgid in rows if pgid in groups]


def test_sigterm_unwinds_like_ctrl_c_once_and_handlers_come_back() -> None:
    """doc_qa and the demo run servers inside unwind_on_signals: a SIGTERM must reach their ``finally``."""
    from fade_sglang.eval.launcher import unwind_on_signals

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        with unwind_on_signals():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises before this ends
    assert signal.getsignal(signal.SIGTERM) is before
