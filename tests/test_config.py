"""FadeConfig presets, validation messages, JSON and CLI-style loading."""

from __future__ import annotations

import json

import pytest

from fade_sglang.config import PRESETS, FadeConfig, FadeConfigError


def test_presets_are_valid_and_ordered_by_aggressiveness() -> None:
    safe, balanced, aggressive = (FadeConfig.from_preset(p) for p in ("safe", "balanced", "aggressive"))
    assert not safe.cold_enabled and balanced.cold_enabled and aggressive.cold_enabled
    assert safe.recent_window >= balanced.recent_window >= aggressive.recent_window
    assert safe.warm_enabled and safe.compresses
    assert safe.max_shares[2] <= balanced.max_shares[2] <= aggressive.max_shares[2]
    assert all(c.max_shares[0] == 1.0 for c in (safe, balanced, aggressive))  # fp16 may always use the whole arena
    assert set(PRESETS) == {"safe", "balanced", "aggressive"}


@pytest.mark.parametrize("overrides,message", [
    ({"recent_window": -1}, "recent_window must be >= 0"),
    ({"warm_bits": 6}, "warm_bits must be one of"),
    ({"cold_bits": 8}, "must not exceed warm_bits"),
    ({"warm_group_size": 48}, "power of two"),
    ({"tier_max_share": {"warm": 1.5}}, r"tier_max_share \[warm\] must be a number in \[0, 1\]"),
    ({"tier_max_share": {"cold": -0.1}}, r"tier_max_share \[cold\] must be a number in \[0, 1\]"),
    ({"tier_max_share": {"warm": True}}, r"\[warm\] must be a number"),
    ({"tier_max_share": {"fp16": 0.5}}, "unknown tiers"),  # fp16 is never capped
    ({"tier_max_share": {"warm": 0.5, "hot": 0.5}}, "unknown tiers"),
    ({"tier_max_share": [0.5, 0.5]}, "tier_max_share must be a mapping"),
    ({"tier_budget": {"fp16": 0.5, "warm": 0.5}}, "tier_budget was removed: .*tier_max_share"),
    ({"rotation": "maybe"}, "rotation cannot be 'maybe'"),
    ({"sink_tokens": "x"}, "sink_tokens cannot be 'x'"),
    ({"no_such_knob": 1}, "unknown knob 'no_such_knob'"),
])
def test_bad_knobs_raise_clear_messages(overrides: dict, message: str) -> None:
    with pytest.raises(FadeConfigError, match=message):
        FadeConfig.from_preset("balanced").with_overrides(overrides)


def test_unknown_preset() -> None:
    with pytest.raises(FadeConfigError, match="unknown preset 'nope'"):
        FadeConfig.from_preset("nope")


def test_json_inline_file_and_errors(tmp_path) -> None:
    cfg = FadeConfig.from_json('{"preset": "safe", "sink_tokens": 4}')
    assert cfg.sink_tokens == 4 and cfg.recent_window == PRESETS["safe"]["recent_window"]
    path = tmp_path / "fade.json"
    path.write_text(json.dumps({"preset": "aggressive", "recent_window": 32}))
    assert FadeConfig.from_json(str(path)).recent_window == 32
    with pytest.raises(FadeConfigError, match="invalid JSON"):
        FadeConfig.from_json("{bad")
    with pytest.raises(FadeConfigError, match="neither inline JSON nor an existing file"):
        FadeConfig.from_json(str(tmp_path / "missing.json"))
    with pytest.raises(FadeConfigError, match="expected a JSON object"):
        FadeConfig.from_dict([1, 2])  # type: ignore[arg-type]


def test_cli_strings_are_parsed_and_roundtrip() -> None:
    cfg = FadeConfig.from_preset("balanced").with_overrides(
        {"recent-window": "64", "rotation": "off", "tier_max_share": '{"warm": 0.5, "cold": 0}'})
    assert cfg.recent_window == 64 and cfg.rotation is False and not cfg.cold_enabled
    assert cfg.max_shares == (1.0, 0.5, 0.0) and cfg.warm_enabled and cfg.compresses
    assert cfg.preset == "custom"
    assert FadeConfig.from_dict(cfg.to_dict()) == cfg


def test_zero_shares_turn_compression_off() -> None:
    off = FadeConfig.from_preset("balanced").with_overrides({"tier_max_share": {"warm": 0.0, "cold": 0.0}})
    assert not off.compresses and not off.warm_enabled and not off.cold_enabled
    only_cold = FadeConfig.from_preset("balanced").with_overrides({"tier_max_share": {"warm": 0, "cold": 0.25}})
    assert only_cold.compresses and not only_cold.warm_enabled and only_cold.max_shares == (1.0, 0.0, 0.25)
