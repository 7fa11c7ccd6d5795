"""Import stand-ins that let SGLang 0.5.23 serve on a CPU-only host (see notes on the CPU install).

``site/`` holds an import-only ``torchvision`` fake (PyPI torchvision cannot load beside the CPU torch
wheel, yet ``sglang.srt.configs`` imports it) and a pure-torch ``sgl_kernel`` with the one op the CPU
engine calls. They are used only where they are needed: a host without the real ``sgl_kernel`` (every
GPU install has it, so a GPU host never sees them) gets ``site/`` on a server child's PYTHONPATH, and
its ``sitecustomize`` installs the torchvision fake only when the real torchvision does not import.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

__all__ = ["SITE_DIR", "install_torchvision_fake", "shims_needed", "shim_pythonpath"]

SITE_DIR = Path(__file__).resolve().parent / "site"
_FAKE_TORCHVISION = "fade_fake_torchvision"


def shims_needed() -> bool:
    """True on a host without the real ``sgl_kernel`` package (a CPU-only install)."""
    return importlib.util.find_spec("sgl_kernel") is None


def shim_pythonpath() -> list[str]:
    """PYTHONPATH entries for a CPU SGLang child: ``site/`` where the real packages are missing, else none."""
    return [str(SITE_DIR)] if shims_needed() else []


def _load_fake_module() -> ModuleType:
    """The torchvision fake, loaded by file path so that ``site/`` (and its ``sgl_kernel`` stand-in) stays
    off ``sys.path`` in-process, where it could fool feature probes such as ``import sgl_kernel``."""
    module = sys.modules.get(_FAKE_TORCHVISION)
    if module is None:
        spec = importlib.util.spec_from_file_location(_FAKE_TORCHVISION, SITE_DIR / f"{_FAKE_TORCHVISION}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[_FAKE_TORCHVISION] = module
        spec.loader.exec_module(module)
    return module


def install_torchvision_fake() -> None:
    """In this process: serve ``torchvision`` from the fake where the real one is missing or broken."""
    _load_fake_module().install_if_unusable()
