"""Shared pytest setup: offline hub, the torchvision fake in-process, and the tiny model."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
FAKES_SITE_DIR = TESTS_DIR / "fakes" / "site"

# Triton binds tl.* when triton is first imported (sglang imports it), so the interpreter
# switch must be set before anything else on a machine without a GPU. Server children
# inherit it, which lets --attention-backend fade_triton run on CPU too.
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# tests/ holds helper modules (sglang_server) imported by test files.
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))


def _load_fake_torchvision() -> None:
    """Install the torchvision fake by file path: fakes/site stays off sys.path in-process, so
    the sgl_kernel stand-in there cannot fool feature probes (`import sgl_kernel`) in tests."""
    name = "fade_fake_torchvision"
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, FAKES_SITE_DIR / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    module.install()


# sglang.srt.configs imports torchvision.transforms; PyPI torchvision cannot load beside CPU torch.
_load_fake_torchvision()


def pytest_configure(config: pytest.Config) -> None:
    # Also declared in pyproject.toml; repeated so the markers exist under any rootdir/ini.
    config.addinivalue_line("markers", "server: starts real SGLang server processes (slow)")
    config.addinivalue_line("markers", "triton: runs Triton kernels (under TRITON_INTERPRET=1 on CPU)")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seeded tiny random Llama (4 q heads / 2 kv heads, head_dim 64, 2 layers) + local BPE tokenizer."""
    from sglang_server import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))
