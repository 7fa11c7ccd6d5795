"""The command line every evaluation/test server starts from, the tools' one-line report of a server that does not
start, and an interrupt that does not wait for requests in flight (no server is started here)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from fade_sglang.eval.launcher import ServerStartupError, base_server_args, launch_command


def test_cpu_servers_sleep_when_idle() -> None:
    # An idle SGLang scheduler otherwise spins a core: on CI's 2 cores, a test module's idle fixtures
    # starved later servers' start-up past 300 s.
    assert "--sleep-on-idle" in base_server_args("cpu")
    assert "--sleep-on-idle" not in base_server_args("cuda")  # a GPU server starts from SGLang's defaults


def test_launch_command_keeps_an_explicit_attention_backend() -> None:
    cmd = launch_command("m", 1234, ["--attention-backend", "fade_torch"], attention_backend="torch_native")
    assert cmd.count("--attention-backend") == 1 and cmd[cmd.index("--attention-backend") + 1] == "fade_torch"
    assert cmd[cmd.index("--port") + 1] == "1234"


STARTUP_FAILURE = "sglang server not ready after 300s; log tail (/tmp/x.log):\nline 1\nline 2"


def _no_server(*args: Any, **kwargs: Any) -> None:
    raise ServerStartupError(STARTUP_FAILURE)


def test_quality_cli_reports_a_server_that_does_not_start_in_one_line(monkeypatch, capsys, tmp_path: Path) -> None:
    from fade_sglang.eval import quality

    monkeypatch.setattr(quality, "run_quality", _no_server)
    assert quality.main(["--settings", "fp16", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "[quality] FAILED: a server did not start: sglang server not ready after 300s; log tail (/tmp/x.log):"]


def test_serving_benchmark_reports_a_server_that_does_not_start_in_one_line(monkeypatch, capsys,
                                                                             tmp_path: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import serving

    monkeypatch.setattr(serving, "run_config", _no_server)
    monkeypatch.setattr(serving, "gsp_turns_for", lambda scale, model, say: scale)
    assert serving.main(["--scale", "smoke", "--configs", "fp16", "--out-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "serving.py: error: a server did not start: sglang server not ready after 300s; log tail (/tmp/x.log):")


def test_a_failed_parallel_call_does_not_wait_for_the_calls_in_flight() -> None:
    """quality._parallel: Ctrl-C (or an error) during a batch reaches the caller, who stops the server, instead of
    waiting minutes for the prefills still running."""
    import threading

    from fade_sglang.eval import quality

    started, release, finished = threading.Event(), threading.Event(), threading.Event()

    def call(item: int) -> int:
        if item == 0:
            started.wait(10)
            raise KeyboardInterrupt
        started.set()
        release.wait(10)  # a long request in flight
        finished.set()
        return item

    try:
        quality._parallel(call, [0, 1])  # type: ignore[arg-type]
    except KeyboardInterrupt:
        assert not finished.is_set()  # came back while the other call was still in flight
    else:
        raise AssertionError("the interrupt was lost")
    finally:
        release.set()
