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


class _FakeServer:
    """Answers /generate like SGLang with return_logprob and top_logprobs_num=2 (no text)."""

    def __init__(self, token_logprobs: list[float], tops: list[tuple[float, float]], answer: list[int]) -> None:
        # the token at logprob_start_len (here the prompt's last one) has no log-probability
        self.meta = {"input_token_logprobs": [(None, 3, None)] + [(lp, t, None) for lp, t in zip(token_logprobs, answer)],
                     "input_top_logprobs": [None] + [[(a, 7, None), (b, 8, None)] for a, b in tops]}

    def request(self, route: str, payload: dict) -> dict:
        assert route == "/generate" and payload["top_logprobs_num"] == 2
        self.payload = payload
        return {"meta_info": self.meta, "output_ids": [0]}


def test_score_reports_nll_margins_and_where_the_server_preferred_another_token() -> None:
    answer = [11, 12, 13]
    # token 0 is the server's own top-1; at token 1 it preferred another token by 0.3 nats (a near-tie)
    srv = _FakeServer([-0.1, -0.9, -0.05], [(-0.1, -2.5), (-0.6, -0.9), (-0.05, -4.0)], answer)
    scored = doc_qa._score(srv, [1, 2, 3], answer)  # type: ignore[arg-type]
    assert srv.payload["logprob_start_len"] == 2  # the prompt's last token: the answer's first gets a log-probability
    assert scored.count == 3 and scored.nll_sum == pytest.approx(1.05)
    assert scored.margins == pytest.approx([2.4, 0.3, 3.95])
    assert scored.preference == pytest.approx([0.0, 0.3, 0.0])

    reference = doc_qa.DocQAResult("fp16", margins=[[[], [2.0, 0.02, 1.0]]])
    div = doc_qa._divergence(reference, doc=0, turn=1, at=1, scored=scored)
    assert div == {"doc": 0, "turn": 2, "token": 1, "reference_margin": 0.02, "preference": 0.3}
    # an answer that stopped earlier parts at its end: no margin there
    assert doc_qa._divergence(reference, 0, 1, 3, scored)["reference_margin"] is None
    assert doc_qa._margins_at_divergence(doc_qa.DocQAResult("x", divergences=[div, {**div, "reference_margin": 0.01}])
                                         ) == "0.01 0.02"


def test_score_refuses_a_short_logprob_list() -> None:
    srv = _FakeServer([-0.1, -0.2], [(-0.1, -2.0), (-0.2, -1.0)], [11, 12])
    with pytest.raises(doc_qa.QualityError, match="2 log-probabilities for a 3-token answer"):
        doc_qa._score(srv, [1], [11, 12, 13])  # type: ignore[arg-type]


def _reference_json(tmp_path, cfg: "doc_qa.DocQAConfig", margins: bool = True, **config_changes) -> "Path":
    import json
    from dataclasses import asdict, replace

    fp16 = doc_qa.DocQAResult("fp16", answers=[[[1, 2], [3]]], nll=0.2,
                              margins=[[[], [0.5]]] if margins else [])
    old = replace(cfg, **config_changes)
    path = tmp_path / "doc_qa.json"
    path.write_text(json.dumps({"config": {k: str(v) if k == "model_path" else v for k, v in asdict(old).items()},
                                "results": [asdict(fp16)]}))
    return path


def test_reference_reuses_an_earlier_fp16_run_only_over_the_same_documents(tmp_path) -> None:
    from pathlib import Path

    cfg = doc_qa.DocQAConfig(model_path=Path("/m/SmolLM2-135M-Instruct"), docs=2)
    ref = doc_qa.load_reference(_reference_json(tmp_path, cfg), cfg)
    assert ref.name == "fp16" and ref.answers == [[[1, 2], [3]]] and ref.margins == [[[], [0.5]]]
    with pytest.raises(doc_qa.QualityError, match="its docs, seed differ"):
        doc_qa.load_reference(_reference_json(tmp_path, cfg, docs=6, seed=1), cfg)
    with pytest.raises(doc_qa.QualityError, match="its model differ"):
        doc_qa.load_reference(_reference_json(tmp_path, cfg, model_path=Path("/m/other")), cfg)
    with pytest.raises(doc_qa.QualityError, match="no margins|with answer margins"):
        doc_qa.load_reference(_reference_json(tmp_path, cfg, margins=False), cfg)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(doc_qa.QualityError, match="not a doc_qa.json"):
        doc_qa.load_reference(tmp_path / "bad.json", cfg)


def test_reference_with_fp16_in_settings_is_one_line(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        doc_qa.main(["--settings", "fp16,fade-safe", "--reference", str(tmp_path / "x.json"),
                     "--model-path", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and "leave fp16 out" in err[-1]


def test_settings_start_with_fp16_unless_a_reference_gives_it() -> None:
    with pytest.raises(ValueError, match="must start with fp16"):
        doc_qa.settings_by_name(["fade-safe"])
    assert [s.name for s in doc_qa.settings_by_name(["fade-safe"], reference_given=True)] == ["fade-safe"]
