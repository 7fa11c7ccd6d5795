"""Import-only stand-in for ``torchvision`` (CPU hosts only; see ``fade_sglang.cpu_shims``).

PyPI torchvision cannot load beside the CPU torch wheel (``torchvision::nms does
not exist``), yet ``sglang.srt.configs`` imports ``torchvision.transforms`` at
module level for vision models we never run. A meta-path finder serves every
``torchvision[.x.y]`` module: known submodule names resolve to (fake) submodules,
any other attribute to a placeholder that raises ``NotImplementedError`` when called.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from typing import Any, Sequence

_ROOT = "torchvision"
_FAKE_VERSION = "0.0.0+fade.fake"
# Attribute names that are submodules (so `from torchvision.transforms import functional` works);
# every other name (InterpolationMode, resize, Compose, ...) becomes a placeholder.
_SUBMODULES = frozenset({
    "transforms", "functional", "v2", "io", "ops", "models", "datasets", "utils", "tv_tensors",
    "detection", "segmentation", "video", "extension",
})


def _unavailable(what: str) -> NotImplementedError:
    return NotImplementedError(f"{what} is part of the import-only fake torchvision used by fade-sglang on CPU hosts")


class _PlaceholderMeta(type):
    # Class-level attribute access (e.g. InterpolationMode.BICUBIC) yields nested placeholders.
    def __getattr__(cls, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _placeholder(f"{cls.__qualname__}.{name}")

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        raise _unavailable(cls.__qualname__)


def _placeholder(qualname: str) -> type:
    return _PlaceholderMeta(qualname.rsplit(".", 1)[-1], (), {"__qualname__": qualname, "__module__": _ROOT})


class _FakeModule(types.ModuleType):
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        if name in _SUBMODULES:
            return importlib.import_module(f"{self.__name__}.{name}")
        value = _placeholder(f"{self.__name__}.{name}")
        setattr(self, name, value)
        return value


class _FakeLoader(importlib.abc.Loader):
    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = _FakeModule(spec.name)
        module.__version__ = _FAKE_VERSION
        module.__path__ = []  # every fake module is a package so any submodule imports
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        return None


class FakeTorchvisionFinder(importlib.abc.MetaPathFinder):
    """Serves ``torchvision`` and all of its submodules from nothing."""

    def find_spec(self, fullname: str, path: Sequence[str] | None = None, target: Any = None):
        if fullname != _ROOT and not fullname.startswith(_ROOT + "."):
            return None
        return importlib.machinery.ModuleSpec(fullname, _FakeLoader(), is_package=True)


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (idempotent), shadowing any real torchvision."""
    if any(isinstance(f, FakeTorchvisionFinder) for f in sys.meta_path):
        return
    for name in [m for m in sys.modules if m == _ROOT or m.startswith(_ROOT + ".")]:
        del sys.modules[name]  # a half-imported real torchvision must not linger
    sys.meta_path.insert(0, FakeTorchvisionFinder())


def install_if_unusable() -> None:
    """Install the fake only where the real torchvision is missing or fails to import (the PyPI wheel
    beside the CPU torch wheel: ``operator torchvision::nms does not exist``)."""
    if any(isinstance(f, FakeTorchvisionFinder) for f in sys.meta_path):
        return
    if importlib.util.find_spec(_ROOT) is not None:
        try:
            importlib.import_module(_ROOT)
            return
        except Exception:  # noqa: BLE001 - any failure means the real package is unusable here
            pass
    install()
