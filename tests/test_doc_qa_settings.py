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


def test_a_divergence_is_a_tie_only_when_both_servers_were_within_an_eighth_of_a_nat() -> None:
    tie = {"reference_margin": 0.0625, "preference": 0.0}
    assert doc_qa.parted_at_tie(tie)
    assert not doc_qa.parted_at_tie(dict(tie, reference_margin=0.25))  # fp16 had a clear favourite
    assert not doc_qa.parted_at_tie(dict(tie, preference=0.5))  # the compressed server moved by half a nat
    assert not doc_qa.parted_at_tie(dict(tie, preference=None))  # it stopped early: no score there
    r = doc_qa.DocQAResult("fade-safe", answers=[[[1]]], nll=0.2, divergences=[tie, dict(tie, preference=1.0)])
    table = doc_qa.format_table([r], ()).splitlines()
    assert "at a tie" in table[0] and " 1/2 " in table[2]


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
    import json
    from dataclasses import replace
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
    with pytest.raises(doc_qa.QualityError, match="its passkey_filler differ"):
        doc_qa.load_reference(_reference_json(tmp_path, cfg, passkey_filler="classic"), cfg)
    # a JSON from before the filler was a knob ran the varied filler
    old_json = _reference_json(tmp_path, cfg)
    data = json.loads(old_json.read_text())
    del data["config"]["passkey_filler"]
    old_json.write_text(json.dumps(data))
    assert doc_qa.load_reference(old_json, cfg).name == "fp16"
    with pytest.raises(doc_qa.QualityError, match="its passkey_filler differ"):
        doc_qa.load_reference(old_json, replace(cfg, passkey_filler="classic"))
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


@pytest.mark.parametrize("extra,needle", [(["--reference", "x.json", "--settings", "fade-safe"], "no --reference"),
                                          (["--settings", "fp16,control"], "control"),
                                          (["--passkey-lengths", ""], "needs --passkey-lengths")])
def test_passkey_only_run_refuses_what_it_cannot_do_in_one_line(extra: list[str], needle: str, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        doc_qa.main(["--docs", "0", "--model-path", "/nonexistent", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and "--docs 0 runs passkey retrieval only" in err[-1] and needle in err[-1]


def _passkey_result(name: str, hits: list[bool], ratio: float | None = None) -> doc_qa.DocQAResult:
    answers = [{"length": 2048, "depth": i / max(1, len(hits) - 1), "passkey": "123", "answer": " 1.", "hit": h}
               for i, h in enumerate(hits)]
    return doc_qa.DocQAResult(name, max_total_tokens=24576, passkey={"2048": sum(hits) / len(hits)},
                              passkey_answers=answers,
                              passkey_compression_vs_16bit={"2048": ratio} if ratio else {})


def test_passkey_only_table_has_counts_and_no_qa_columns() -> None:
    results = [_passkey_result("fp16", [True, True, True, True]),
               _passkey_result("fade-aggressive", [True, False, True, True], ratio=3.94)]
    lines = doc_qa.format_table(results, (2048, 4096)).splitlines()
    assert "same t2-3" not in lines[0] and "NLL" not in lines[0] and "passkey@4096" in lines[0]
    assert "100% (4/4)" in lines[2] and "1.00x" in lines[2]
    assert "75% (3/4)" in lines[3] and "3.94x" in lines[3] and lines[3].split()[-2] == "-"  # 4096 not run
    assert doc_qa.summary_line(results[1], results[0]) == "passkey@2048=75% (3/4)"
    # a QA run keeps its columns; a result without per-prompt records shows the accuracy alone
    qa = doc_qa.DocQAResult("fade-safe", answers=[[[1]]], nll=0.2, passkey={"2048": 0.5})
    assert "same t2-3" in doc_qa.format_table([qa], (2048,)).splitlines()[0]
    assert doc_qa.passkey_cell(qa, 2048) == "50%"


class _PasskeyServer:
    """/generate for quality._run_passkey on an fp16 setting: the cached turn, then an answer per prompt."""

    def __init__(self, answers: dict[tuple[int, ...], str]) -> None:
        self.answers = answers  # prompt ids -> answer text

    def flush_cache(self) -> None:
        pass

    def generate(self, input_ids: list[int], max_new_tokens: int) -> dict:
        return {"text": self.answers.get(tuple(input_ids), " none."), "output_ids": [0],
                "meta_info": {"cached_tokens": len(input_ids) - 1}}


def test_passkey_run_records_every_prompt_and_what_a_miss_answered() -> None:
    from transformers import AutoTokenizer

    from fade_sglang.eval import quality

    tok_path = quality.DEFAULT_MODEL  # the tiny model in the repo: its tokenizer is enough here
    tok = AutoTokenizer.from_pretrained(str(tok_path))
    cfg = quality.QualityConfig(model_path=tok_path, lengths=(512,), depths=2, per_cell=2, greedy_prompts=0,
                                nll_prompts=0)
    items = quality.passkey_items(tok, cfg.lengths, cfg.depths, cfg.per_cell, cfg.seed)
    right = {tuple(it.full): f" {it.answer}." for it in items[:3]}  # the last prompt gets a wrong answer
    res = quality.SettingResult("fp16", [])
    quality._run_passkey(_PasskeyServer(right), quality.Setting("fp16"), cfg, tok, res)  # type: ignore[arg-type]
    assert [(a["depth"], a["hit"]) for a in res.passkey_answers] == [(0.0, True), (0.0, True), (1.0, True),
                                                                      (1.0, False)]
    assert res.passkey_answers[-1]["answer"] == " none." and res.passkey["512"] == 0.75


def test_a_server_that_does_not_start_is_one_line(tmp_path, monkeypatch, capsys) -> None:
    from fade_sglang.eval.launcher import ServerStartupError

    def no_server(*args, **kwargs):
        raise ServerStartupError("sglang server not ready after 600s; log tail (/tmp/x.log):\nline 1\nline 2")

    monkeypatch.setattr(doc_qa, "run_doc_qa", no_server)
    monkeypatch.setattr(doc_qa, "model_geometry", lambda *a: None)
    (tmp_path / "config.json").write_text("{}")
    code = doc_qa.main(["--docs", "0", "--passkey-lengths", "1024", "--settings", "fp16", "--model-path",
                        str(tmp_path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["[doc-qa] FAILED: sglang server not ready after 600s; log tail (/tmp/x.log):"]


def test_passkey_filler_reaches_the_prompts() -> None:
    from pathlib import Path

    from transformers import AutoTokenizer

    from fade_sglang.eval import quality

    cfg = doc_qa.DocQAConfig(model_path=Path("/m/SmolLM2-135M-Instruct"), docs=0, passkey_filler="classic")
    qcfg = doc_qa._passkey_cfg(cfg, (512,), 4096)
    tok = AutoTokenizer.from_pretrained(str(quality.DEFAULT_MODEL))
    items = quality.passkey_items(tok, qcfg.lengths, 2, 1, qcfg.seed, qcfg.passkey_filler)
    # five sentences repeated: a few dozen distinct tokens (the preamble's and the needle's included)
    assert len(items) == 2 and all(len(set(it.context)) < 50 for it in items)
    varied = quality.passkey_items(tok, qcfg.lengths, 2, 1, qcfg.seed)
    assert all(len(set(it.context)) > 100 for it in varied)
