"""The --kv-compression / --fade-* flags: parsing, validation, transport to the scheduler.

In-process tests drive the hook functions directly (no global patching of
SGLang); server tests launch real ``sglang.launch_server`` processes where the
plugin is loaded through its entry point.
"""

from __future__ import annotations

import argparse
import json
import pickle
import re
import shutil
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from fade_sglang.config import FadeConfig, FadeConfigError
from fade_sglang.patches import cli
from sglang_server import ServerProcess, run_server_expect_failure

SERVER_ARGS_BASE = ["--model-path", "/nonexistent/tiny", "--device", "cpu"]


@pytest.fixture(scope="module")
def server_args_cls():
    from sglang.srt.server_args import ServerArgs

    return ServerArgs


@pytest.fixture(scope="module")
def parser(server_args_cls) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sglang serve")
    cli.add_cli_args_hook(server_args_cls.__dict__["add_cli_args"].__func__, p)
    return p


def parse(server_args_cls, parser: argparse.ArgumentParser, argv: list[str]):
    """What prepare_server_args does, with our AROUND hook around the original from_cli_args."""
    ns = parser.parse_args(SERVER_ARGS_BASE + argv)
    original = server_args_cls.__dict__["from_cli_args"].__func__
    return cli.from_cli_args_hook(original, server_args_cls, ns)


# ----------------------------------------------------------------------------- in-process


def test_entry_point_registered() -> None:
    eps = {ep.name: ep.value for ep in entry_points(group="sglang.srt.plugins")}
    assert eps.get("fade") == "fade_sglang.patches.plugin:register"


def test_without_flag_nothing_is_stored(server_args_cls, parser) -> None:
    sa = parse(server_args_cls, parser, [])
    assert not [k for k in vars(sa) if k.startswith("_fade")]
    assert cli.fade_config_from_server_args(sa) is None
    plain = server_args_cls.from_cli_args(argparse.Namespace(**{
        k: v for k, v in vars(parser.parse_args(SERVER_ARGS_BASE)).items() if not k.startswith(("fade", "kv_compression"))
    }))
    assert repr(sa) == repr(plain)  # every ServerArgs field identical to a plugin-free parse


def test_fade_flags_ignored_with_warning_when_off(server_args_cls, parser, capsys) -> None:
    sa = parse(server_args_cls, parser, ["--fade-preset", "nope"])  # not validated: compression is off
    assert cli.fade_config_from_server_args(sa) is None
    assert "--fade-preset ignored without --kv-compression fade" in capsys.readouterr().err


def test_default_preset_is_balanced(server_args_cls, parser) -> None:
    sa = parse(server_args_cls, parser, ["--kv-compression", "fade"])
    assert cli.fade_config_from_server_args(sa) == FadeConfig.from_preset("balanced")


def test_tensor_parallel_is_accepted(server_args_cls, parser) -> None:
    """Every TP rank reads rank 0's step clock, so --tp-size > 1 starts (tests/test_tp_clock.py)."""
    sa = parse(server_args_cls, parser, ["--kv-compression", "fade", "--tp-size", "2"])
    assert sa.tp_size == 2


def test_overrides_compose_in_order(server_args_cls, parser) -> None:
    sa = parse(server_args_cls, parser, [
        "--kv-compression", "fade", "--fade-preset", "aggressive",
        "--fade-sink-tokens", "4", "--fade-recent-window", "32",
        "--fade-set", "warm_idle_seconds=2.5", "--fade-set", "recent_window=48",
    ])
    cfg = cli.fade_config_from_server_args(sa)
    base = FadeConfig.from_preset("aggressive")
    assert (cfg.sink_tokens, cfg.recent_window, cfg.warm_idle_seconds) == (4, 48, 2.5)
    assert cfg.tier_max_share == base.tier_max_share and cfg.cold_idle_seconds == base.cold_idle_seconds


def test_fade_config_json_inline_and_file(server_args_cls, parser, tmp_path: Path) -> None:
    inline = parse(server_args_cls, parser, [
        "--kv-compression", "fade", "--fade-config", '{"preset": "safe", "sink_tokens": 8}'])
    assert cli.fade_config_from_server_args(inline) == FadeConfig.from_preset("safe").with_overrides(
        {"sink_tokens": 8}, preset_name="safe")
    path = tmp_path / "fade.json"
    path.write_text(json.dumps({"recent_window": 64}))
    from_file = parse(server_args_cls, parser, ["--kv-compression", "fade", "--fade-config", str(path)])
    assert cli.fade_config_from_server_args(from_file).recent_window == 64


def test_config_survives_pickling_and_sealing(server_args_cls, parser) -> None:
    """The scheduler gets ServerArgs by pickle (mp spawn); only `_`-attributes ride along and stay writable."""
    sa = parse(server_args_cls, parser, ["--kv-compression", "fade", "--fade-set", "warm_bits=4", "--fade-sink-tokens", "3"])
    expected = cli.fade_config_from_server_args(sa)
    assert expected.preset == "custom"
    sa._resolution_finished = True  # what resolve_once() leaves behind: the record is sealed
    copy = pickle.loads(pickle.dumps(sa))
    assert cli.fade_config_from_server_args(copy) == expected
    assert copy._fade_from_cli is True
    with pytest.raises(AttributeError, match="after resolution"):
        copy.page_size = 4  # fields are sealed...
    with pytest.raises(AttributeError, match="after resolution"):
        copy.fade_mode = "x"  # ...and so is any non-underscore attribute
    copy._fade_scratch = 1  # underscore bookkeeping is the only door


BAD_ARGS = [
    (["--kv-compression", "zstd"], "unknown value 'zstd'"),
    (["--kv-compression", "fade", "--fade-preset", "nope"], "unknown preset 'nope'"),
    (["--kv-compression", "fade", "--fade-config", "{bad json"], "invalid JSON"),
    (["--kv-compression", "fade", "--fade-config", "/no/such/fade.json"], "neither inline JSON nor an existing file"),
    (["--kv-compression", "fade", "--fade-preset", "safe", "--fade-config", "{}"], "both given"),
    (["--kv-compression", "fade", "--fade-sink-tokens", "many"], "sink_tokens"),
    (["--kv-compression", "fade", "--fade-set", "no_such_knob=1"], "unknown knob 'no_such_knob'"),
    (["--kv-compression", "fade", "--fade-set", "warm_bits"], "KNOB=VALUE"),
    (["--kv-compression", "fade", "--fade-set", "warm_bits=5"], "warm_bits must be one of"),
    (["--kv-compression", "fade", "--kv-cache-dtype", "fp8_e4m3"], "--kv-cache-dtype fp8_e4m3"),
    (["--kv-compression", "fade", "--page-size", "16"], "--page-size 1"),
    (["--kv-compression", "fade", "--enable-hierarchical-cache"], "--enable-hierarchical-cache"),
    (["--kv-compression", "fade", "--speculative-algorithm", "EAGLE"], "speculative decoding"),
    (["--kv-compression", "fade", "--disable-radix-cache"], "--disable-radix-cache"),
    (["--kv-compression", "fade", "--tp-size", "2", "--attn-dp-size", "2"], "DP attention yet"),
    (["--kv-compression", "fade", "--pp-size", "2"], "pipeline parallelism yet (--pp-size 2)"),
]


@pytest.mark.parametrize("argv,needle", BAD_ARGS, ids=[" ".join(a[2:] if len(a) > 2 else a) for a, _ in BAD_ARGS])
def test_bad_config_exits_with_one_line(server_args_cls, parser, capsys, argv, needle) -> None:
    with pytest.raises(SystemExit) as exc:
        parse(server_args_cls, parser, argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("fade-sglang: error: "), err
    assert needle in lines[0]


def test_resolved_values_are_checked_too(server_args_cls, parser) -> None:
    # A page size chosen by resolution (not by the user) must be caught after resolve_once().
    sa = parse(server_args_cls, parser, ["--kv-compression", "fade"])
    sa._resolved_overrides = [("some_backend_rule", {"page_size": 64})]  # how resolution declares decisions
    sa._fade_from_cli = False  # library caller: an exception, not an exit
    with pytest.raises(FadeConfigError, match="--page-size 1"):
        cli.resolve_once_hook(lambda self: None, sa)
    sa._fade_from_cli = True
    with pytest.raises(SystemExit):
        cli.resolve_once_hook(lambda self: None, sa)


UNSERVABLE_MODELS = [
    ("deepseek_v3", {"kv_lora_rank": 512, "q_lora_rank": 1536}, "multi-head latent attention"),
    ("gemma2", {}, "sliding-window"),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 4096}, "sliding-window"),
    ("t5", {}, "encoder-decoder"),
    ("mamba", {}, "hybrid attention / state-space"),
    ("llama", {"attn_logit_softcapping": 50.0}, "soft-capping"),
]


@pytest.mark.parametrize("model_type,fields,needle", UNSERVABLE_MODELS, ids=[m[0] + str(len(m[1])) for m in UNSERVABLE_MODELS])
def test_models_fade_cannot_serve_are_named(tmp_path: Path, model_type: str, fields: dict, needle: str) -> None:
    from transformers import AutoConfig

    AutoConfig.for_model(model_type, **fields).save_pretrained(tmp_path)
    with pytest.raises(FadeConfigError, match=needle) as exc:
        cli.check_model(str(tmp_path))
    assert "\n" not in str(exc.value) and str(tmp_path) in str(exc.value)


def test_head_dims_the_triton_kernels_cannot_tile_are_rejected_on_cuda_only(tmp_path: Path) -> None:
    from transformers import AutoConfig

    AutoConfig.for_model("llama", hidden_size=288, num_attention_heads=4, head_dim=72).save_pretrained(tmp_path)
    with pytest.raises(FadeConfigError, match="head_dim 72"):
        cli.check_model(str(tmp_path), device="cuda")
    cli.check_model(str(tmp_path), device="cpu")  # the torch reference serves any head_dim
    AutoConfig.for_model("llama", hidden_size=320, num_attention_heads=4, head_dim=80).save_pretrained(tmp_path)
    cli.check_model(str(tmp_path), device="cuda")


def test_protected_layers_beyond_the_model_are_one_line(tmp_path: Path) -> None:
    from transformers import AutoConfig

    AutoConfig.for_model("llama", num_hidden_layers=4).save_pretrained(tmp_path)
    cli.check_model(str(tmp_path), cfg=FadeConfig(protected_layers=(0, 3)))
    with pytest.raises(FadeConfigError, match=r"protected_layers \[4, 9\] out of range .* has 4 layers") as exc:
        cli.check_model(str(tmp_path), cfg=FadeConfig(protected_layers=(1, 4, 9)))
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("model_type,fields", [("llama", {}), ("qwen2", {"use_sliding_window": False}),
                                               ("mistral", {"sliding_window": None})])
def test_plain_mha_gqa_models_pass_the_model_check(tmp_path: Path, model_type: str, fields: dict) -> None:
    from transformers import AutoConfig

    AutoConfig.for_model(model_type, **fields).save_pretrained(tmp_path)
    cli.check_model(str(tmp_path))
    cli.check_model(str(tmp_path / "missing"))  # a config that does not load is SGLang's to report


def test_fade_config_from_server_args_rejects_missing_payload() -> None:
    class Record:
        _fade_kv_compression = "fade"

    with pytest.raises(FadeConfigError):
        cli.fade_config_from_server_args(Record())


# ----------------------------------------------------------------------------- real servers


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "fade-sglang: error:" in line]


LAUNCH_FAILURES = [
    (["--kv-compression", "fade", "--disable-radix-cache"], "--disable-radix-cache"),
    (["--kv-compression", "fade", "--fade-preset", "nope"], "unknown preset 'nope'"),
    (["--kv-compression", "fade", "--fade-config", '{"sink_tokens": 4,'], "invalid JSON"),
    (["--kv-compression", "fade", "--kv-cache-dtype", "fp8_e4m3"], "--kv-cache-dtype fp8_e4m3"),
]


@pytest.mark.server
@pytest.mark.parametrize("argv,needle", LAUNCH_FAILURES, ids=["no-radix-cache", "bad-preset", "bad-json", "fp8-conflict"])
def test_launch_fails_fast_with_clear_message(tiny_model_dir: Path, argv: list[str], needle: str) -> None:
    rc, stderr, stdout = run_server_expect_failure(tiny_model_dir, argv, attention_backend=None)
    assert rc == 2, stderr[-3000:]
    errors = _error_lines(stderr)
    assert len(errors) == 1 and needle in errors[0], stderr[-3000:]
    assert "Traceback" not in stderr + stdout
    # Failed while parsing arguments: no scheduler was ever started.
    assert "Init parallel" not in stderr + stdout and "Load weight" not in stderr + stdout


@pytest.mark.server
def test_unservable_model_fails_at_launch_not_at_the_first_request(tiny_model_dir: Path, tmp_path: Path) -> None:
    model = tmp_path / "softcapped"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "attn_logit_softcapping": 30.0}))
    rc, stderr, stdout = run_server_expect_failure(model, ["--kv-compression", "fade"], attention_backend=None)
    assert rc == 2, stderr[-3000:]
    errors = _error_lines(stderr)
    assert len(errors) == 1 and "soft-capping" in errors[0], stderr[-3000:]
    assert "Traceback" not in stderr + stdout and "Load weight" not in stderr + stdout


@pytest.mark.server
def test_config_reaches_scheduler_process(tiny_model_dir: Path) -> None:
    args = ["--kv-compression", "fade", "--fade-preset", "aggressive", "--fade-sink-tokens", "4",
            "--fade-set", "recent_window=32"]
    with ServerProcess(tiny_model_dir, args, attention_backend=None) as srv:  # fade picks its backend
        out = srv.generate(input_ids=[5, 6, 7, 8], max_new_tokens=4)
        assert len(out["output_ids"]) == 4
        log = srv.log_text()
        launcher_pid = srv.proc.pid
    lines = [line for line in log.splitlines() if "[fade] kv-compression=fade" in line]
    assert len(lines) == 1, log[-3000:]
    match = re.search(r"preset=(\S+) sinks=(\d+) recent=(\d+) .*\(scheduler pid=(\d+)\)", lines[0])
    assert match, lines[0]
    assert match.group(1, 2, 3) == ("custom", "4", "32")
    assert int(match.group(4)) != launcher_pid  # logged by the spawned scheduler, not the launcher
    assert "fade-sglang:" not in log


def _fade_record(device: str, **fields) -> "SimpleNamespace":
    from types import SimpleNamespace

    defaults = dict(attention_backend=None, prefill_attention_backend=None, decode_attention_backend=None,
                    radix_cache_backend=None, disable_overlap_schedule=False, disable_cuda_graph=False,
                    disable_prefill_cuda_graph=False)
    record = SimpleNamespace(device=device, **{**defaults, **fields})
    cli.store_on_server_args(record, FadeConfig.from_preset("balanced"), from_cli=False)
    return record


def test_serving_defaults_capture_decode_graphs_only_with_the_triton_backend_on_cuda() -> None:
    from fade_sglang.patches.serving import apply_serving_defaults

    gpu = _fade_record("cuda")
    apply_serving_defaults(gpu)
    assert gpu.attention_backend == "fade_triton" and gpu.radix_cache_backend == "fade"
    assert not gpu.disable_cuda_graph and gpu.disable_prefill_cuda_graph
    for record in (_fade_record("cpu"), _fade_record("cuda", attention_backend="fade_torch")):
        apply_serving_defaults(record)
        assert record.disable_cuda_graph
    # The overlap schedule is the user's choice: fade leaves it as set (its backends declare a whole-forward
    # read fence instead, see test_backend_fences_the_whole_forward_for_overlapped_demotion).
    for overlap_off in (False, True):
        record = _fade_record("cuda", disable_overlap_schedule=overlap_off)
        apply_serving_defaults(record)
        assert record.disable_overlap_schedule is overlap_off
