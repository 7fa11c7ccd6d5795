"""Run real ``sglang.launch_server`` processes and talk to them (used by the demo, benchmarks and tests).

:class:`ServerProcess` launches a server in its own process group, waits until
it serves, and always stops the whole group (also on errors and Ctrl-C).
On a CPU-only machine SGLang needs two import stand-ins (a torchvision import
fake and a pure-torch ``sgl_kernel`` op); they live in :mod:`fade_sglang.cpu_shims`
and go first on the child's PYTHONPATH only on a host without the real ``sgl_kernel``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator, Sequence

from ..cpu_shims import shim_pythonpath

__all__ = ["CPU_SERVER_ARGS", "DEVICE_DEFAULT", "ServerProcess", "ServerStartupError", "base_server_args",
           "default_attention_backend", "free_port", "launch_command", "run_server_expect_failure",
           "server_device", "server_env", "tail"]


# The CPU baseline every CPU server starts from (see notes/sglang-0.5.23.md). A GPU server starts from
# SGLang's own defaults (model dtype, CUDA graphs, its default attention backend), so a GPU comparison
# of plain SGLang against fade is against what a user would run.
CPU_SERVER_ARGS: tuple[str, ...] = (
    "--device", "cpu",
    "--dtype", "float32",
    "--disable-cuda-graph",
    # SGLang's scheduler otherwise busy-polls a core while idle: on a 2-core box, each idle server alive
    # (a test module's fixtures, an A/B pair) then slows every other server's start-up and steps several-fold.
    # It wakes at once when a request arrives and turns its loop at least once a second, so fade's idle
    # demotion still runs.
    "--sleep-on-idle",
)
# ``attention_backend`` value meaning "the device's default": torch_native on CPU, SGLang's choice on GPU.
# None passes no flag (--kv-compression fade then picks its own backend for the device).
DEVICE_DEFAULT = "device-default"
DEFAULT_MAX_TOTAL_TOKENS = 4096


@functools.cache
def server_device() -> str:
    """``cuda`` where a GPU is visible, else ``cpu``; ``FADE_SERVER_DEVICE`` overrides."""
    forced = os.environ.get("FADE_SERVER_DEVICE")
    if forced:
        return forced
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def base_server_args(device: str | None = None) -> tuple[str, ...]:
    return CPU_SERVER_ARGS if (device or server_device()) == "cpu" else ()


def default_attention_backend(device: str | None = None) -> str | None:
    return "torch_native" if (device or server_device()) == "cpu" else None



def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for an SGLang child: offline hub; on CPU the CPU engine and, where needed, the CPU shims
    first on PYTHONPATH."""
    env = dict(os.environ)
    if server_device() == "cpu":
        env["SGLANG_USE_CPU_ENGINE"] = "1"
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PYTHONUNBUFFERED="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "2"),
    )
    shims = shim_pythonpath()
    paths = shims + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    if extra:
        env.update(extra)
    return env


def launch_command(model_path: str | os.PathLike, port: int, extra_args: Sequence[str] = (),
                   max_total_tokens: int = DEFAULT_MAX_TOTAL_TOKENS,
                   attention_backend: str | None = DEVICE_DEFAULT) -> list[str]:
    if attention_backend == DEVICE_DEFAULT:
        attention_backend = default_attention_backend()
    explicit = any(a == "--attention-backend" or a.startswith("--attention-backend=") for a in extra_args)
    backend = ["--attention-backend", attention_backend] if attention_backend and not explicit else []
    return [
        sys.executable, "-m", "sglang.launch_server",
        "--model-path", str(model_path),
        *base_server_args(),
        *backend,
        "--max-total-tokens", str(max_total_tokens),
        "--host", "127.0.0.1",
        "--port", str(port),
        *extra_args,
    ]


def _kill_group(proc: subprocess.Popen, grace_s: float = 15.0) -> None:
    """Stop a launcher started with ``start_new_session=True`` and every process in its group.

    SIGTERM goes to the launcher only: it shuts its scheduler/detokenizer down in
    order (signalling them directly makes the launcher treat it as a crash and
    sleep before diagnostics). Whatever is left after ``grace_s`` gets SIGKILL.
    """
    pgid = proc.pid  # a new session's leader: its pid is the process group id
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
        except ProcessLookupError:
            pass
    try:
        os.killpg(pgid, signal.SIGKILL)  # stragglers (spawned children share the group)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def tail(path: str | os.PathLike, lines: int = 60) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return "<no log>"
    return "\n".join(text.splitlines()[-lines:])


_PORT_RETRIES = 2


def _lost_port_race(log_path: Path) -> bool:
    text = tail(log_path, 200).lower()
    return "address already in use" in text or "error while attempting to bind" in text


class ServerStartupError(RuntimeError):
    """The message's first line says what failed and names the server log; the lines after it are the log's tail."""

    @property
    def headline(self) -> str:
        return str(self).splitlines()[0]


def _interrupt_once(signum: int, frame: Any) -> None:
    """SIGINT / SIGTERM: unwind like Ctrl-C; further signals are ignored so a second Ctrl-C cannot cut the
    servers' cleanup short."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    raise KeyboardInterrupt


@contextlib.contextmanager
def unwind_on_signals() -> Iterator[None]:
    """Inside: SIGINT and SIGTERM raise KeyboardInterrupt (once), so every ``with ServerProcess`` stops its
    process group. A plain SIGTERM would end the Python process without cleanup and leave servers running."""
    previous = {sig: signal.signal(sig, _interrupt_once) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class ServerProcess:
    """A real ``sglang.launch_server`` child on CPU; use as a context manager.

    >>> with ServerProcess(model_dir, ["--kv-compression", "fade"]) as srv:
    ...     srv.generate(input_ids=[1, 2, 3], max_new_tokens=8)["output_ids"]
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        extra_args: Sequence[str] = (),
        *,
        max_total_tokens: int = DEFAULT_MAX_TOTAL_TOKENS,
        attention_backend: str | None = DEVICE_DEFAULT,
        startup_timeout_s: float = 240.0,
        log_path: str | os.PathLike | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.model_path = str(model_path)
        self.extra_args = list(extra_args)
        self.max_total_tokens = max_total_tokens
        self.attention_backend = attention_backend
        self.startup_timeout_s = startup_timeout_s
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        if log_path is None:  # kept after the run for post-mortems
            log_dir = Path(os.environ.get("FADE_TEST_LOG_DIR", Path(tempfile.gettempdir()) / "fade-sglang-logs"))
            log_dir.mkdir(parents=True, exist_ok=True)
            fd, log_path = tempfile.mkstemp(prefix="sglang-server-", suffix=".log", dir=log_dir)
            os.close(fd)
        self.log_path = Path(log_path)
        self.extra_env = env
        self.proc: subprocess.Popen | None = None

    # -- lifecycle
    def start(self) -> "ServerProcess":
        # free_port() cannot reserve the port: another process may take it before the
        # server binds. Such a start is retried on a fresh port; other failures are not.
        retries = _PORT_RETRIES
        while True:
            self._spawn()
            try:
                self._wait_ready()
                return self
            except ServerStartupError:
                self.stop()
                if retries == 0 or not _lost_port_race(self.log_path):
                    raise
                retries -= 1
                self.port = free_port()
                self.base_url = f"http://127.0.0.1:{self.port}"
            except BaseException:
                self.stop()
                raise

    def _spawn(self) -> None:
        cmd = launch_command(self.model_path, self.port, self.extra_args, self.max_total_tokens,
                             self.attention_backend)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=server_env(self.extra_env), start_new_session=True,  # own group: killpg reaches every child
            )

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            assert self.proc is not None
            rc = self.proc.poll()
            if rc is not None:
                raise ServerStartupError(
                    f"sglang server exited with code {rc} during startup; log tail ({self.log_path}):\n"
                    + tail(self.log_path))
            try:
                with urllib.request.urlopen(self.base_url + "/health_generate", timeout=10) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.5)
        raise ServerStartupError(
            f"sglang server not ready after {self.startup_timeout_s:.0f}s; log tail ({self.log_path}):\n"
            + tail(self.log_path))

    def stop(self) -> None:
        if self.proc is not None:
            _kill_group(self.proc)

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- API
    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def request(self, route: str, payload: dict[str, Any] | None = None, timeout_s: float = 120.0) -> Any:
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(self.base_url + route, data=data,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return json.loads(resp.read().decode())

    def fade_stats(self) -> dict[str, Any]:
        """GET /fade/stats of a fade server: the tier stats of its one scheduler."""
        body = self.request("/fade/stats")
        if not body.get("enabled"):
            raise RuntimeError(f"{self.base_url}: fade is not enabled on this server (no --kv-compression fade)")
        (stats,) = body["schedulers"]
        return stats

    def flush_cache(self, busy_timeout_s: float = 30.0) -> None:
        """POST /flush_cache (empties the radix cache).

        SGLang answers 400 while requests are still running, which includes a request whose
        HTTP reply has arrived but which the scheduler has not retired yet: retry until idle."""
        deadline = time.monotonic() + busy_timeout_s
        while True:
            req = urllib.request.Request(self.base_url + "/flush_cache", data=b"", method="POST")
            try:
                with urllib.request.urlopen(req, timeout=60):
                    return
            except urllib.error.HTTPError as e:
                if e.code != 400 or time.monotonic() > deadline:
                    raise
            time.sleep(0.2)

    def generate(
        self,
        text: str | None = None,
        *,
        input_ids: Sequence[int] | None = None,
        max_new_tokens: int = 16,
        temperature: float = 0.0,
        ignore_eos: bool = True,
        **sampling: Any,
    ) -> dict[str, Any]:
        """POST /generate (native API); returns ``{"text", "output_ids", "meta_info"}``."""
        if (text is None) == (input_ids is None):
            raise ValueError("pass exactly one of text / input_ids")
        payload: dict[str, Any] = {
            "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": temperature,
                                "ignore_eos": ignore_eos, **sampling},
        }
        if text is not None:
            payload["text"] = text
        else:
            payload["input_ids"] = list(input_ids)  # type: ignore[arg-type]
        return self.request("/generate", payload)


def run_server_expect_failure(
    model_path: str | os.PathLike,
    extra_args: Sequence[str] = (),
    *,
    timeout_s: float = 180.0,
    max_total_tokens: int = DEFAULT_MAX_TOTAL_TOKENS,
    attention_backend: str | None = DEVICE_DEFAULT,
) -> tuple[int, str, str]:
    """Launch a server that must fail at startup; return ``(exit_code, stderr, stdout)``.

    Raises AssertionError if the server is still running after ``timeout_s``
    (it is killed first, process group included).
    """
    cmd = launch_command(model_path, free_port(), extra_args, max_total_tokens, attention_backend)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            env=server_env(), start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        out, err = proc.communicate()
        raise AssertionError(
            f"server did not fail within {timeout_s:.0f}s; stderr tail:\n" + err.decode(errors="replace")[-4000:])
    finally:
        _kill_group(proc)  # also reaps children a crashed launcher may have left behind
    return proc.returncode, err.decode(errors="replace"), out.decode(errors="replace")
