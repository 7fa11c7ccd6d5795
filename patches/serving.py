"""Everything that makes ``--kv-compression fade`` *serve*: one entry point for plugin.register().

Per process:

* every process: the ``fade_torch`` / ``fade_triton`` attention-backend CLI choices (the launcher
  builds its parser after plugins load) and a BEFORE hook on
  ``sglang.srt.server_args.ServerArgs.resolve_once`` that fills fade's defaults
  (attention backend ``fade_triton`` on CUDA / ``fade_torch`` on CPU, radix backend ``fade``;
  the overlap schedule stays as the user set it; decode CUDA graphs with ``fade_triton`` on CUDA, no prefill CUDA graphs,
  none at all otherwise)
  and rejects an attention backend that cannot read packed tiers;
* the launcher (main process, no scheduler): the ``GET /fade/stats`` route,
  mounted by a BEFORE hook on ``sglang.srt.entrypoints.http_server.launch_server``;
* runtime processes (scheduler / Engine): pool, allocator, backend, radix, scheduler
  and stats hooks (see the modules named below).
"""

from __future__ import annotations

import multiprocessing
from typing import Any

from .cli import ATTR_FROM_CLI, fade_config_from_server_args, fail

FADE_ATTENTION_BACKENDS = ("fade_torch", "fade_triton")
_BACKEND_FIELDS = ("attention_backend", "prefill_attention_backend", "decode_attention_backend")


def _add_backend_choice() -> None:
    from sglang.srt.arg_groups.choices import ATTENTION_BACKEND_CHOICES, add_attention_backend_choices

    missing = [b for b in FADE_ATTENTION_BACKENDS if b not in ATTENTION_BACKEND_CHOICES]
    if missing:
        add_attention_backend_choices(missing)


def apply_serving_defaults(server_args: Any) -> None:
    """Fill fade's defaults on the raw record and reject what the tiered pool cannot serve.

    Runs before resolution (the only time non-underscore fields may be set).
    """
    if getattr(server_args, "_resolution_finished", False) or fade_config_from_server_args(server_args) is None:
        return
    for field in _BACKEND_FIELDS:
        value = getattr(server_args, field, None)
        if value is not None and value not in FADE_ATTENTION_BACKENDS:
            message = (f"--kv-compression fade needs an attention backend that reads packed KV tiers "
                       f"({', '.join(FADE_ATTENTION_BACKENDS)}); got --{field.replace('_', '-')} {value}. "
                       f"Drop the flag to get fade's default for the device.")
            if getattr(server_args, ATTR_FROM_CLI, False):
                fail(message)
            raise ValueError(message)
    if server_args.attention_backend is None:
        from .attention_backend import default_backend

        server_args.attention_backend = default_backend(server_args.device)
    if server_args.radix_cache_backend is None:
        from .scheduler_hooks import RADIX_BACKEND_NAME

        server_args.radix_cache_backend = RADIX_BACKEND_NAME
    # The overlap schedule stays on: demotion runs on the scheduler's stream between steps, and fade's
    # backends declare their reads unaudited (``FadeAttnBackend.shared_read_ends``), so SGLang fences that
    # stream behind the whole in-flight forward before anything rewrites a slot it reads.
    # fade_triton captures decode CUDA graphs (attention_backend.py); no fade backend has a prefill
    # (breakable / full) graph path, which SGLang turns on by default on CUDA; fade_torch has none.
    from .attention_backend import TRITON_BACKEND, default_backend

    decode_backend = getattr(server_args, "decode_attention_backend", None) or server_args.attention_backend
    if decode_backend == TRITON_BACKEND and default_backend(server_args.device) == TRITON_BACKEND:
        server_args.disable_prefill_cuda_graph = True
    else:
        server_args.disable_cuda_graph = True


def _resolve_once_before(server_args: Any, *args: Any, **kwargs: Any) -> None:
    apply_serving_defaults(server_args)
    return None


def install_serving_hooks(in_runtime_process: bool) -> None:
    """Register the serving hooks for this process (called once from plugin.register())."""
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    def register(target: str, hook: Any, kind: HookType) -> None:
        HookRegistry.register(target, hook, kind)

    _add_backend_choice()
    register("sglang.srt.server_args.ServerArgs.resolve_once", _resolve_once_before, HookType.BEFORE)

    if in_runtime_process:
        from .allocator import register_allocator_hooks
        from .attention_backend import register_attention_backend
        from .pool_hooks import register_pool_hooks
        from .scheduler_hooks import register_radix_backend, register_scheduler_hooks
        from .stats import register_stats_hooks

        register_attention_backend()
        register_radix_backend()
        register_pool_hooks(register, HookType.AROUND)
        register_allocator_hooks(register, HookType.AROUND)
        register_scheduler_hooks(register, HookType.AFTER, HookType.AROUND, HookType.BEFORE)
        register_stats_hooks(register, HookType.AFTER)
    elif multiprocessing.parent_process() is None:
        from .stats import http_launch_hook

        register("sglang.srt.entrypoints.http_server.launch_server", http_launch_hook, HookType.BEFORE)
