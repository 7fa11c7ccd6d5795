"""doc_qa's settings: names, the knobs ``--fade-set`` adds to every fade setting, and one-line errors."""

from __future__ import annotations

import pytest

from fade_sglang.eval import doc_qa


def test_fade_set_adds_knobs_to_fade_settings_and_renames_them() -> None:
    names = ["fp16", "control", "fade-balanced", "evict@fade-balanced"]
    fp16, control, fade, evict = doc_qa.with_knobs(doc_qa.settings_by_name(names),
                                                   ["protected_layers=18,23", "recent_window=64"])
    assert fade.name == "fade-balanced+protected_layers=18,23+recent_window=64"
    args = fade.server_args()
    assert args[-4:] == ["--fade-set", "protected_layers=18,23", "--fade-set", "recent_window=64"]
    assert "--fade-preset" in args and args[args.index("--fade-preset") + 1] == "balanced"
    # the baselines are untouched; eviction still matches the (renamed) fade setting's bytes
    assert fp16.server_args() == [] and "protected_layers=18,23" not in " ".join(control.server_args())
    assert evict.name == "evict@fade-balanced" and evict.evict_like == fade.name
    assert doc_qa.with_knobs(doc_qa.settings_by_name(names), []) == doc_qa.settings_by_name(names)


@pytest.mark.parametrize("knob,needle", [("bogus=1", "unknown knob 'bogus'"), ("protected_layers", "KEY=VALUE"),
                                         ("protected_key_bits=5", "protected_key_bits must be one of")])
def test_bad_knob_is_one_line_before_anything_runs(knob: str, needle: str, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        doc_qa.main(["--settings", "fp16,fade-safe", "--fade-set", knob, "--model-path", "/nonexistent"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert needle in err[-1] and "Traceback" not in "\n".join(err)
