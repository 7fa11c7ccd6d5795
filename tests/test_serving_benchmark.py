"""benchmarks/serving.py end to end at the CI-sized ``smoke`` scale.

SGLang's own ``bench_serving`` (generated-shared-prefix, multi-turn over the chat API) and the
multi-turn agent trace run against an fp16 server and a fade-balanced server holding the same
KV bytes (the same ``--max-total-tokens``), on the shipped model. Asserted: equal measured pool bytes (fade's arena
rounds up to whole pages plus a reserve page), the capacity gain, every request served, fade's
tier stats and Prometheus gauges in the report, JSON and plot written.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import serving  # noqa: E402

pytestmark = pytest.mark.server


def test_smoke_scale_fp16_vs_fade_at_equal_bytes(tmp_path: Path) -> None:
    assert serving.main(["--scale", "smoke", "--configs", "fp16,fade-balanced", "--out-dir", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "serving.json").read_text())
    rows = {r["config"]: r for r in data["results"]}
    fp16, fade = rows["fp16"], rows["fade-balanced"]
    assert fade["max_total_tokens"] == fp16["max_total_tokens"]  # the same N: fade's pool is sized like plain KV
    # the same bytes, up to the arena's rounding to whole pages plus its reserve page
    assert fp16["pool_bytes"] <= fade["pool_bytes"] <= fp16["pool_bytes"] + 2 * fade["page_bytes"]
    assert fade["fp16_capacity_tokens"] >= fp16["capacity_tokens"]  # nothing split off: all of it holds fp16
    assert fade["capacity_tokens"] > 3 * fp16["capacity_tokens"]  # float32 KV on CPU: ~6x for balanced (INT4 group 32 aged tier)
    scale = serving.SCALES["smoke"]
    assert data["scale_config"]["gsp"]["num-turns"] == scale.gsp["num-turns"] > 1  # the shipped model chats
    expected = {"gsp": scale.gsp["num-groups"] * scale.gsp["prompts-per-group"] * scale.gsp["num-turns"],
                "agent": scale.agent.sessions * scale.agent.turns}
    for row in (fp16, fade):
        for wl, n in expected.items():
            res = row[wl]
            assert "error" not in res, res.get("error")
            assert res["requests"] == n and res.get("failed", 0) == 0 and res["output_tok_per_s"] > 0
    for wl in expected:
        stats = fade[wl]["fade"]
        assert stats["compression_ratio"] >= 1.0
        assert any(k.startswith("fade_kv_") for k in stats["prometheus"])
    assert fade["agent"]["fade"]["compression_ratio"] > 1.0  # the trace's older turns were demoted
    assert (tmp_path / "serving.png").stat().st_size > 0


def test_bad_arguments_are_clear_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert serving.main(["--configs", "fp16,fp4"]) == 2
    assert "unknown configs ['fp4']" in capsys.readouterr().err
    assert serving.main(["--gsp-turns", "0"]) == 2
    assert "--gsp-turns must be >= 1" in capsys.readouterr().err


def test_multi_turn_gsp_falls_back_to_one_turn_without_a_chat_template(tmp_path: Path) -> None:
    said: list[str] = []
    scale = serving.SCALES["smoke"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>"}))
    one = serving.gsp_turns_for(scale, tmp_path, said.append)
    assert one.gsp["num-turns"] == 1 and one.gsp["num-groups"] == scale.gsp["num-groups"]
    assert "no chat template" in said[0]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    assert serving.gsp_turns_for(scale, tmp_path, said.append) is scale and len(said) == 1
