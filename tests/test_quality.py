"""The quality harness on real CPU servers (CI-sized): protocol, measured bytes, eviction baseline.

Runs :func:`fade_sglang.quality.run_quality` once on the seeded random tiny Llama (bfloat16
KV): 8 passkey prompts at 256 tokens, key-value recall NLL and short greedy continuations,
against fp16 KV, the safe and balanced presets and the StreamingLLM-style eviction baseline.
A random model cannot retrieve, so accuracy is not asserted here; what is asserted is that
every setting ran through the compressed cache and that the byte accounting is right.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fade_sglang.quality import QualityConfig, SettingResult, format_table, keep_recent_for, run_quality

pytestmark = pytest.mark.server

# The eviction baseline's measured bytes must match fade's within this fraction.
BYTES_TOLERANCE = 0.05


@pytest.fixture(scope="module")
def cfg(tiny_model_dir: Path) -> QualityConfig:
    return QualityConfig(model_path=tiny_model_dir, lengths=(256,), depths=2, per_cell=4, greedy_prompts=2,
                         greedy_length=256, greedy_tokens=24, nll_prompts=2, nll_length=256)


@pytest.fixture(scope="module")
def results(cfg: QualityConfig) -> dict[str, SettingResult]:
    out = run_quality(cfg)
    print("\n" + format_table(out, cfg))
    return {r.name: r for r in out}


def test_every_setting_ran_every_task(results: dict[str, SettingResult]) -> None:
    assert list(results) == ["fp16", "fade-safe", "fade-balanced", "evict@fade-balanced"]
    for r in results.values():
        assert set(r.compression) == {"passkey@256", "greedy@256", "nll@256"}
        assert r.nll is not None and r.nll > 0 and 0.0 <= r.passkey["all"] <= 1.0
    for name in ("fade-safe", "fade-balanced", "evict@fade-balanced"):
        assert results[name].greedy_match is not None and 0.0 <= results[name].greedy_match <= 1.0


def test_compression_is_measured_from_the_pool(results: dict[str, SettingResult]) -> None:
    assert all(v == 1.0 for v in results["fp16"].compression.values())
    safe, balanced = results["fade-safe"], results["fade-balanced"]
    for task in safe.compression:
        # 256-token contexts keep a shared preamble and sinks in fp16, so well under the 3.56x / 5.33x formats.
        assert 1.5 < safe.compression[task] < 3.56
        assert safe.compression[task] < balanced.compression[task] < 5.33
        (m,) = balanced.measured[task]
        assert m["stored_bytes"] > 0 and m["fp16_tokens"] > 0 and m["contexts"] >= 2


def test_eviction_baseline_runs_at_fades_measured_bytes(results: dict[str, SettingResult]) -> None:
    fade, evict = results["fade-balanced"], results["evict@fade-balanced"]
    for task, ratio in fade.compression.items():
        assert abs(evict.compression[task] - ratio) <= BYTES_TOLERANCE * ratio, (task, evict.compression, fade.compression)
        assert keep_recent_for(fade, task) > 0
    assert len(evict.server_args) == 3  # one server per task length/kind
    assert all("evict_instead_of_demote=true" in args for args in evict.server_args)


def test_compression_changes_what_the_model_computes(results: dict[str, SettingResult]) -> None:
    """Guards against a path that silently bypasses the packed tiers (identical NLL everywhere)."""
    base = results["fp16"].nll
    assert any(abs(results[n].nll - base) > 1e-4 for n in ("fade-safe", "fade-balanced", "evict@fade-balanced"))


def test_cli_rejects_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fade_sglang.quality import main

    for argv, msg in ((["--model-path", str(tmp_path)], "no config.json"),
                      (["--settings", "fp16,nope"], "unknown ['nope']"),
                      (["--settings", "evict@fade-balanced"], "needs fade-balanced earlier"),
                      (["--lengths", "5x"], "expected comma separated integers")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        assert msg in capsys.readouterr().err
