"""benchmarks/gpu_check.sh + gpu_check.py, the prepared GPU check, run here in its CPU smoke mode so it cannot rot.

The smoke run goes through the shell script exactly as the GPU machine does (``--smoke`` only switches to
TRITON_INTERPRET=1, tiny shapes, fp16 / fp32 and SDPA's math backend). SGLang's decode kernel comes from a
wheel-shaped zip of the installed SGLang's files (the same extraction + stub-package import path as the real
wheel, no network); ``--prepare`` (the real download) is checked separately and skipped when offline.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"

pytestmark = pytest.mark.triton


def _gpu_check_module():
    spec = importlib.util.spec_from_file_location("gpu_check_under_test", ROOT / "benchmarks" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # stdlib-only at import time
    return mod


GC = _gpu_check_module()


def _env(tmp_path: Path, whl_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OUT=str(tmp_path / "out"), PYTHON=sys.executable, FADE_WHL_DIR=str(whl_dir))
    return env


def _fake_wheel(whl_dir: Path) -> Path | None:
    """A zip named like SGLang's wheel holding the files gpu_check.py takes from it (from the installed SGLang)."""
    spec = importlib.util.find_spec("sglang")  # does not run sglang/__init__.py
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(list(spec.submodule_search_locations)[0]).parent
    whl_dir.mkdir(parents=True, exist_ok=True)
    path = whl_dir / f"sglang-{GC.SGLANG_VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for f in GC.SGLANG_FILES:
            z.write(root / f, f)
    return path


def _run(args: list[str], env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    out = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True, check=True).stdout
    assert "--prepare" in out and "$OUT" in out


def test_smoke_run_through_the_script(tmp_path):
    whl_dir = tmp_path / "whl"
    wheel = _fake_wheel(whl_dir)
    proc = _run(["--smoke"], _env(tmp_path, whl_dir))
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    out = tmp_path / "out"
    assert (out / "gpu_check.log").read_text().strip()
    data = json.loads((out / "gpu_check.json").read_text())
    meta, summary = data["meta"], data["summary"]
    assert meta["date"] and meta["torch"] and meta["triton"] and meta["device"] == "cpu"
    assert summary["complete"] and not summary["correctness_failed"] and not data["errors"] and not data["skipped"]

    corr = data["correctness"]
    assert {r["dtype"] for r in corr} == {"fp16", "fp32"}
    for dt in ("fp16", "fp32"):
        kinds = {r["kind"] for r in corr if r["dtype"] == dt}
        assert kinds == {"setup", "decode", "extend", "decode+extend", "quantize", "baselines"}
        decode = {r["case"] for r in corr if r["dtype"] == dt and r["kind"] == "decode"}
        assert {"fp16", "int4", "int2", "aged", "shuffled"} <= decode
        both = {r["case"] for r in corr if r["dtype"] == dt and r["kind"] == "decode+extend"}
        assert both == {"k8v4-k4v2-shuffled", "protected-layer-shuffled", "k4v3-g64-shuffled"}
    assert all(r["passed"] for r in corr)
    for r in corr:
        if r["kind"] in ("decode", "extend"):
            assert r["max_rel"] < r["tol"] == GC.ATTN_TOL[r["dtype"]]
    agree = [r for r in corr if r["kind"] == "baselines"]
    impls = {"fade-fp16", "sdpa-math-gqa", "sdpa-math-fold"} | ({"sglang-fp16"} if wheel else set())
    assert all(impls <= set(r["per_impl"]) for r in agree)

    rows = {r["impl"]: r for r in data["timing"]}
    for impl in ("fade-fp16", "fade-int4", "fade-int2", "fade-mix", "sdpa-math-gqa", "sdpa-math-fold"):
        assert rows[impl]["time_ms"] is not None and rows[impl]["bytes_read"] > 0, impl
        assert rows[impl]["speedup_vs_sdpa"] is not None, impl
    assert rows["fade-int2"]["bytes_read"] < rows["fade-int4"]["bytes_read"] < rows["fade-fp16"]["bytes_read"]
    if wheel is not None:
        assert meta["sglang"]["source"] == "wheel" and meta["sglang"]["wheel"] == wheel.name
        assert rows["sglang-fp16"]["time_ms"] is not None and rows["fade-int4"]["speedup_vs_sglang"] is not None
    else:  # no SGLang here: the rows say why
        assert "error" in meta["sglang"] and rows["sglang-fp16"]["time_ms"] is None
    assert "# decode timing" in proc.stdout and "# summary:" in proc.stdout


def test_time_budget_skips_cleanly(tmp_path):
    proc = _run(["--smoke", "--sglang", "none"], {**_env(tmp_path, tmp_path / "none"), "GPU_CHECK_BUDGET_S": "0"})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    data = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert data["summary"]["complete"] and not data["correctness"] and not data["timing"]
    sections = {s["section"] for s in data["skipped"]}
    assert sections == {"correctness", "timing"}
    assert all("time budget" in s["reason"] for s in data["skipped"])
    assert "SKIP (time budget)" in proc.stdout


def test_prepare_downloads_a_wheel_within_the_limit(tmp_path):
    whl_dir = tmp_path / "whl"
    proc = _run(["--prepare"], _env(tmp_path, whl_dir), timeout=300)
    if proc.returncode != 0 and "pip download of sglang" in proc.stderr:
        pytest.skip("no package index reachable: " + proc.stderr.strip().splitlines()[-1])
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    wheels = list(whl_dir.glob(f"sglang-{GC.SGLANG_VERSION}-*.whl"))
    assert len(wheels) == 1
    assert sum(p.stat().st_size for p in whl_dir.iterdir()) <= GC.WHEEL_LIMIT_BYTES
    with zipfile.ZipFile(wheels[0]) as z:
        assert set(GC.SGLANG_FILES) <= set(z.namelist())
    again = _run(["--prepare"], _env(tmp_path, whl_dir))  # idempotent, no second download
    assert again.returncode == 0 and "already in" in again.stdout
