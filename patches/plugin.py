"""SGLang plugin entry point (group ``sglang.srt.plugins``).

SGLang calls :func:`register` from ``load_plugins()`` in every process it
starts: the launcher (before parsing arguments), the scheduler(s), the
detokenizer, a DP controller, and an in-process ``Engine``. Hooks registered
here are applied right after by ``HookRegistry.apply_hooks()``.

Everything stays inert unless ``--kv-compression fade`` was given: the CLI
hooks only add flags, and runtime hooks check :func:`fade_config_from_server_args`
before doing anything.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Callable

from fade_sglang.config import FadeConfig

from .cli import fade_config_from_server_args

__all__ = ["register", "fade_config_from_server_args", "current_fade_config", "in_runtime_process"]

logger = logging.getLogger("fade_sglang")

_SERVER_ARGS = "sglang.srt.server_args.ServerArgs"
_SCHEDULER_MODULE = "sglang.srt.managers.scheduler"


def in_runtime_process() -> bool:
    """True where the scheduler lives (a scheduler process, a DP controller, an in-process Engine).

    ``load_plugins()`` runs there after ``sglang.srt.managers.scheduler`` is
    imported. In the launcher (before argument parsing) and the detokenizer it
    is not, and registering runtime hooks there would only import the
    scheduler stack for nothing. Pool / radix / backend hooks belong behind this.
    """
    return _SCHEDULER_MODULE in sys.modules


def current_fade_config() -> FadeConfig | None:
    """The FadeConfig of this process's published ServerArgs (scheduler side), or None."""
    from sglang.srt.runtime_context import get_server_args

    try:
        server_args = get_server_args()
    except Exception:  # nothing published yet
        return None
    return fade_config_from_server_args(server_args) if server_args is not None else None


def _scheduler_init_hook(original: Callable[..., Any], scheduler: Any, server_args: Any, *args: Any, **kwargs: Any) -> Any:
    """AROUND ``Scheduler.__init__``: announce the config this scheduler process received."""
    cfg = fade_config_from_server_args(server_args)
    if cfg is not None:
        logger.info("[fade] kv-compression=fade %s (scheduler pid=%d)", cfg.summary(), os.getpid())
    return original(scheduler, server_args, *args, **kwargs)


def register() -> None:
    """Register fade-sglang's hooks with SGLang's HookRegistry (idempotent per process)."""
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    from . import cli

    global _registered
    if _registered:
        return
    _registered = True

    HookRegistry.register(f"{_SERVER_ARGS}.add_cli_args", cli.add_cli_args_hook, HookType.AROUND)
    HookRegistry.register(f"{_SERVER_ARGS}.from_cli_args", cli.from_cli_args_hook, HookType.AROUND)
    HookRegistry.register(f"{_SERVER_ARGS}.resolve_once", cli.resolve_once_hook, HookType.AROUND)

    if in_runtime_process():
        HookRegistry.register(f"{_SCHEDULER_MODULE}.Scheduler.__init__", _scheduler_init_hook, HookType.AROUND)

    from .serving import install_serving_hooks  # pool / allocator / backend / radix / scheduler / stats
    install_serving_hooks(in_runtime_process())


_registered = False
