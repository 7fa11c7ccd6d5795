"""The quality harness on real CPU servers with the shipped evaluation model (CI-sized).

Runs :func:`fade_sglang.eval.quality.run_quality` once on ``models/fade-tiny-llama`` (bfloat16
KV): 20 passkey prompts at 512 tokens (5 depths x 4), key-value recall NLL and short greedy
continuations, against fp16 KV, the safe and balanced presets and the StreamingLLM-style
eviction baseline at fade-balanced's measured bytes. Asserted: the model really retrieves
with fp16 KV (else nothing below means anything), compression keeps it within a stated
margin, eviction at the same measured bytes is really run there and loses the needle, and
every number came through the compressed cache with bytes measured from the pool.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fade_sglang.eval.quality import (DEFAULT_MODEL, QualityConfig, SettingResult, format_table, keep_recent_for,
                                 run_quality)

pytestmark = pytest.mark.server

# The eviction baseline's measured bytes must match fade's within this fraction.
BYTES_TOLERANCE = 0.05
FP16_MIN_PASSKEY = 0.9  # the model must solve the task uncompressed
SAFE_MARGIN = 0.1  # fade-safe (INT4) may lose at most 2 of the 20 prompts
BALANCED_MARGIN = 0.2  # fade-balanced (INT2 for aged contexts) at most 4 of 20
EVICT_GAP = 0.3  # eviction at fade-balanced's bytes must trail fade-balanced by at least this much


def test_shipped_model_is_small_and_reproducible() -> None:
    files = {f.name: f.stat().st_size for f in DEFAULT_MODEL.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "training.json", "README.md"} <= set(files)
    assert files["model.safetensors"] < 4 * 2**20
    meta = json.loads((DEFAULT_MODEL / "training.json").read_text())
    assert meta["command"].startswith("python benchmarks/train_eval_model.py") and "--seed" in meta["command"]
    assert min(meta["final_passkey_fp32"].values()) >= FP16_MIN_PASSKEY
    config = json.loads((DEFAULT_MODEL / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_key_value_heads"] < config["num_attention_heads"]


@pytest.fixture(scope="module")
def cfg() -> QualityConfig:
    return QualityConfig(model_path=DEFAULT_MODEL, lengths=(512,), depths=5, per_cell=4, greedy_prompts=2,
                         greedy_length=512, greedy_tokens=64, nll_prompts=2, nll_length=512)


@pytest.fixture(scope="module")
def results(cfg: QualityConfig) -> dict[str, SettingResult]:
    out = run_quality(cfg)
    print("\n" + format_table(out, cfg))
    return {r.name: r for r in out}


def test_every_setting_ran_every_task(results: dict[str, SettingResult]) -> None:
    assert list(results) == ["fp16", "fade-safe", "fade-balanced", "evict@fade-balanced"]
    for r in results.values():
        assert set(r.compression) == {"passkey@512", "greedy@512", "nll@512"}
        assert r.nll is not None and r.nll > 0 and 0.0 <= r.passkey["all"] <= 1.0
    for name in ("fade-safe", "fade-balanced", "evict@fade-balanced"):
        assert results[name].greedy_match is not None and 0.0 <= results[name].greedy_match <= 1.0


def test_model_retrieves_and_compression_keeps_it(results: dict[str, SettingResult]) -> None:
    fp16 = results["fp16"].passkey["all"]
    assert fp16 >= FP16_MIN_PASSKEY, "the evaluation model must solve passkey with fp16 KV"
    assert results["fade-safe"].passkey["all"] >= fp16 - SAFE_MARGIN
    assert results["fade-balanced"].passkey["all"] >= fp16 - BALANCED_MARGIN


def test_eviction_at_equal_bytes_loses_the_needle(results: dict[str, SettingResult]) -> None:
    balanced, evict = results["fade-balanced"], results["evict@fade-balanced"]
    assert evict.passkey["all"] <= balanced.passkey["all"] - EVICT_GAP
    # What eviction keeps (sinks + the recent window) still answers when the needle sits at the end.
    assert evict.passkey_by_depth["1.00"] >= FP16_MIN_PASSKEY


def test_compression_is_measured_from_the_pool(results: dict[str, SettingResult]) -> None:
    assert all(v == 1.0 for v in results["fp16"].compression.values())
    safe, balanced = results["fade-safe"], results["fade-balanced"]
    for task in safe.compression:
        # 512-token contexts keep a shared preamble, sinks and (safe) a recent window in fp16,
        # so under the 2.46x (k8v4) / 3.2x (INT4 group 32) of the formats themselves.
        assert 2.0 < safe.compression[task] < 256 / 104
        assert safe.compression[task] < balanced.compression[task] < 3.2
        for m in balanced.measured[task]:  # one entry per batch of cached contexts
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
    from fade_sglang.eval.quality import main

    for argv, msg in ((["--model-path", str(tmp_path)], "no config.json"),
                      (["--settings", "fp16,nope"], "unknown ['nope']"),
                      (["--settings", "evict@fade-balanced"], "needs fade-balanced earlier"),
                      (["--lengths", "5x"], "expected comma separated integers")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        assert msg in capsys.readouterr().err
