"""Shared pytest setup: offline hub, the torchvision fake in-process, test groups, and the tiny model.

Groups (markers): ``server`` starts real SGLang processes, ``gpu`` needs CUDA (skipped without it);
everything else is the quick unit group: ``pytest -m "not server and not gpu"``.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent

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


from fade_sglang.cpu_shims import install_torchvision_fake  # noqa: E402

# sglang.srt.configs imports torchvision.transforms; PyPI torchvision cannot load beside CPU torch.
install_torchvision_fake()


def pytest_configure(config: pytest.Config) -> None:
    # Also declared in pyproject.toml; repeated so the markers exist under any rootdir/ini.
    config.addinivalue_line("markers", "server: starts real SGLang server processes (slow)")
    config.addinivalue_line("markers", "triton: runs Triton kernels (under TRITON_INTERPRET=1 on CPU)")
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seeded tiny random Llama (4 q heads / 2 kv heads, head_dim 64, 2 layers) + local BPE tokenizer."""
    from sglang_server import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))
