"""The ``--kv-compression`` / ``--fade-*`` command-line surface of SGLang's launcher.

Two AROUND hooks (registered by :mod:`fade_sglang.patches.plugin`):

* ``ServerArgs.add_cli_args``: adds the flags to SGLang's parser.
* ``ServerArgs.from_cli_args``: turns them into a validated :class:`FadeConfig`
  and stores it on ``_fade_*`` attributes of the ServerArgs record.

Why underscore attributes: ``ServerArgs`` is a sealed msgspec Struct
(``dict=True``). Its ``__setattr__`` lets only non-field names starting with
``_`` through after resolution, and its ``__reduce__`` pickles exactly the
fields plus ``__dict__`` (the ``_``-prefixed bookkeeping) to the spawned
scheduler processes. Anything else we hung on it would be rejected or lost.

Errors (bad preset, JSON, knob value, conflicting SGLang flag) end the launcher
with ONE line on stderr and exit code 2, before any worker process exists.
Without ``--kv-compression fade`` nothing is stored and SGLang is untouched.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable, Iterable, NoReturn

from fade_sglang.config import PRESETS, FadeConfig, FadeConfigError

KV_COMPRESSION_CHOICES = ("none", "fade")
DEFAULT_PRESET = "balanced"

# ServerArgs bookkeeping attributes (must start with "_", see module docstring).
ATTR_MODE = "_fade_kv_compression"
ATTR_CONFIG = "_fade_config"  # FadeConfig.to_dict(): plain data, pickles anywhere
ATTR_FROM_CLI = "_fade_from_cli"  # a launcher may exit(2); a library caller gets an exception

# argparse dests of our flags; none of them is a ServerArgs field, so the
# original from_cli_args never sees them.
_FADE_DESTS = ("kv_compression", "fade_preset", "fade_config", "fade_sink_tokens", "fade_recent_window", "fade_set")

# KV dtypes whose full-precision tier fade can keep; everything else is another quantized format.
_COMPATIBLE_KV_DTYPES = ("auto", "bf16", "bfloat16", "float16", "fp16", "float32")


def add_fade_cli_args(parser: argparse.ArgumentParser) -> None:
    """Add the fade flags. All take strings and no ``choices``: validation happens in
    :func:`fade_config_from_namespace` so a mistake is one line, not argparse's usage wall."""
    group = parser.add_argument_group("fade-sglang (tiered-precision KV cache)")
    group.add_argument(
        "--kv-compression", type=str, default="none", metavar="{" + ",".join(KV_COMPRESSION_CHOICES) + "}",
        help="KV cache compression. 'fade' stores KV in fp16 / packed INT4 / packed INT2 tiers; "
             "'none' (default) leaves SGLang unchanged.")
    group.add_argument(
        "--fade-preset", type=str, default=None, metavar="{" + ",".join(PRESETS) + "}",
        help=f"Base preset of the fade config (default {DEFAULT_PRESET}).")
    group.add_argument(
        "--fade-config", type=str, default=None, metavar="JSON_OR_PATH",
        help='Fade config as inline JSON or a path to a .json file; an optional "preset" key names its base. '
             "Cannot be combined with --fade-preset.")
    group.add_argument(
        "--fade-sink-tokens", type=str, default=None, metavar="N",
        help="Override: first N tokens of every sequence stay fp16.")
    group.add_argument(
        "--fade-recent-window", type=str, default=None, metavar="N",
        help="Override: each request's N most recent tokens stay fp16.")
    group.add_argument(
        "--fade-set", type=str, action="append", default=None, metavar="KNOB=VALUE",
        help="Override any fade knob (repeatable), e.g. --fade-set warm_bits=4 --fade-set tier_max_share='{\"cold\": 0.5}'.")


def _parse_set_items(items: Iterable[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise FadeConfigError(f"fade config: --fade-set expects KNOB=VALUE, got {item!r}")
        out[key.strip()] = value
    return out


def fade_config_from_namespace(args: argparse.Namespace) -> FadeConfig | None:
    """Build the FadeConfig the fade flags ask for; ``None`` without ``--kv-compression fade``.

    Precedence: ``--fade-preset`` or ``--fade-config`` (the base), then
    ``--fade-sink-tokens`` / ``--fade-recent-window``, then ``--fade-set`` in order.
    Raises :class:`FadeConfigError`.
    """
    mode = (getattr(args, "kv_compression", None) or "none").strip().lower()
    if mode not in KV_COMPRESSION_CHOICES:
        raise FadeConfigError(
            f"--kv-compression: unknown value {args.kv_compression!r} (choose from {', '.join(KV_COMPRESSION_CHOICES)})")
    if mode == "none":
        return None
    preset = getattr(args, "fade_preset", None)
    config_text = getattr(args, "fade_config", None)
    if preset is not None and config_text is not None:
        raise FadeConfigError(
            'fade config: --fade-preset and --fade-config both given; put "preset" inside the JSON instead')
    cfg = FadeConfig.from_json(config_text) if config_text is not None else FadeConfig.from_preset(preset or DEFAULT_PRESET)
    overrides: dict[str, Any] = {}
    if getattr(args, "fade_sink_tokens", None) is not None:
        overrides["sink_tokens"] = args.fade_sink_tokens
    if getattr(args, "fade_recent_window", None) is not None:
        overrides["recent_window"] = args.fade_recent_window
    overrides.update(_parse_set_items(getattr(args, "fade_set", None) or ()))
    return cfg.with_overrides(overrides) if overrides else cfg


def given_fade_flags(args: argparse.Namespace) -> list[str]:
    """The ``--fade-*`` flags that were set (used to warn when they are ignored)."""
    return ["--" + d.replace("_", "-") for d in _FADE_DESTS[1:] if getattr(args, d, None) is not None]


def check_compatibility(get: Callable[[str], Any]) -> None:
    """Reject SGLang options fade cannot run with; ``get(name)`` reads a ServerArgs value.

    Called on the raw CLI values and again on the resolved ones (resolution may
    pick e.g. a page size for an attention backend). Raises FadeConfigError.
    """
    kv_dtype = get("kv_cache_dtype")
    if kv_dtype not in (None, *_COMPATIBLE_KV_DTYPES):
        raise FadeConfigError(
            f"--kv-compression fade cannot be combined with --kv-cache-dtype {kv_dtype} "
            f"(fade keeps its own packed tiers; use auto or bfloat16)")
    page_size = get("page_size")
    if page_size not in (None, 1):
        raise FadeConfigError(
            f"--kv-compression fade needs --page-size 1 (got {page_size}); tiers are assigned per token slot")
    conflicts = (
        ("enable_hierarchical_cache", "--enable-hierarchical-cache"),
        ("enable_unified_memory", "--enable-unified-memory"),
        ("enable_page_major_kv_layout", "--enable-page-major-kv-layout"),
    )
    for name, flag in conflicts:
        if get(name):
            raise FadeConfigError(f"--kv-compression fade cannot be combined with {flag}")
    if get("disable_radix_cache"):
        raise FadeConfigError(
            "--kv-compression fade cannot be combined with --disable-radix-cache: fade's tiers live in the radix "
            "cache (idle branches age there, and pressure demotes them before anything is evicted)")
    # Tensor parallelism is supported: every rank reads rank 0's step clock (patches/step_clock.py), so all
    # ranks take the same demotion decisions. Pipeline stages and DP attention would need their own sync.
    size = get("pp_size")
    if size not in (None, 1):
        raise FadeConfigError(f"--kv-compression fade does not support pipeline parallelism yet (--pp-size {size})")
    if get("enable_dp_attention") or (get("attn_dp_size") or 1) > 1:
        raise FadeConfigError("--kv-compression fade does not support DP attention yet (--attn-dp-size > 1)")
    spec = get("speculative_algorithm")
    if spec:
        raise FadeConfigError(
            f"--kv-compression fade does not support speculative decoding yet (--speculative-algorithm {spec})")
    disagg = get("disaggregation_mode")
    if disagg not in (None, "null"):
        raise FadeConfigError(
            f"--kv-compression fade does not support PD disaggregation yet (--disaggregation-mode {disagg})")


# HF config fields that mark an attention fade's MHA/GQA pool and backends cannot hold or compute.
_HYBRID_MARKERS = ("mamba", "linear_attention", "conv", "ssm")


def model_incompatibility(hf_config: Any) -> str | None:
    """Why fade cannot serve a model with this HF config (one phrase), or None.

    MLA keeps a latent KV (not per-head K/V), sliding-window / hybrid layers keep a second pool
    fade's tiers do not cover, an encoder-decoder model has cross-attention KV, and logit
    soft-capping is not implemented by the fade attention backends.
    """
    cfg = getattr(hf_config, "text_config", None) or hf_config
    get = lambda name: getattr(cfg, name, None)  # noqa: E731
    if get("kv_lora_rank") or get("q_lora_rank"):
        return "multi-head latent attention (MLA) keeps a latent KV cache, not per-head K/V"
    if get("is_encoder_decoder") or getattr(hf_config, "is_encoder_decoder", False):
        return "encoder-decoder models keep cross-attention KV"
    layer_types = [str(t).lower() for t in (get("layer_types") or get("layers_block_type") or ())]
    pattern = str(get("hybrid_override_pattern") or "")
    model_type = str(getattr(hf_config, "model_type", "") or "").lower()
    if any(m in t for t in layer_types for m in _HYBRID_MARKERS) or pattern or \
            any(m in model_type for m in ("mamba", "jamba", "nemotron_h", "falcon_h1", "qwen3_next")):
        return "hybrid attention / state-space layers keep a second cache"
    if any("sliding" in t for t in layer_types) or get("use_sliding_window") or \
            get("sliding_window_pattern") or get("interleaved_sliding_window"):
        return "sliding-window attention layers keep a windowed cache"
    if get("attn_logit_softcapping"):
        return "attention logit soft-capping is not implemented by the fade attention backends"
    return None


def _head_dim(hf_config: Any) -> int | None:
    cfg = getattr(hf_config, "text_config", None) or hf_config
    heads = getattr(cfg, "num_attention_heads", None)
    hidden = getattr(cfg, "hidden_size", None)
    return getattr(cfg, "head_dim", None) or (hidden // heads if hidden and heads else None)


def check_model(model_path: str, trust_remote_code: bool = False, device: str | None = "cpu",
                cfg: FadeConfig | None = None) -> None:
    """Reject a model fade cannot serve, at start-up (raises FadeConfigError). A config that does not
    load here is left to SGLang, which reports its own error. On CUDA (the Triton kernels' device) the
    head_dim must be one the kernels tile; ``cfg``'s protected layers must exist in the model."""
    try:
        from transformers import AutoConfig

        hf_config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    except Exception:  # noqa: BLE001 - not ours to diagnose: SGLang loads the model next and says why
        return
    why = model_incompatibility(hf_config)
    head_dim = _head_dim(hf_config)
    if why is None and head_dim and str(device or "").startswith("cuda"):
        from fade_sglang.kernels.decode import SUPPORTED_HEAD_DIMS, supported_head_dim

        if not supported_head_dim(head_dim):
            why = (f"head_dim {head_dim} is not one the fade Triton kernels tile ({SUPPORTED_HEAD_DIMS}); "
                   f"--attention-backend fade_torch serves it (slower)")
    if why is not None:
        raise FadeConfigError(f"--kv-compression fade cannot serve {model_path}: {why} "
                              f"(fade supports MHA/GQA decoder models with full attention)")
    layers = getattr(getattr(hf_config, "get_text_config", lambda: hf_config)(), "num_hidden_layers", None)
    bad = cfg.protected_out_of_range(layers) if cfg is not None and isinstance(layers, int) else []
    if bad:
        raise FadeConfigError(f"fade config: protected_layers {bad} out of range ({model_path} has {layers} layers)")


def resolved_device(device: str | None) -> str:
    """SGLang's ``--device`` as it will resolve: CUDA when unset on a host with a GPU, else CPU."""
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)


def _triton_device(server_args: Any) -> str | None:
    """The device when fade will read KV with its Triton kernels (CUDA and no explicit fade_torch), else None."""
    if getattr(server_args, "attention_backend", None) == "fade_torch":
        return None
    device = resolved_device(getattr(server_args, "device", None))
    return device if device.startswith("cuda") else None


def fail(message: str) -> NoReturn:
    """End the launcher with one readable line (no traceback) and argparse's exit code."""
    print(f"fade-sglang: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def store_on_server_args(server_args: Any, cfg: FadeConfig, *, from_cli: bool) -> None:
    server_args._fade_kv_compression = "fade"
    server_args._fade_config = cfg.to_dict()
    server_args._fade_from_cli = from_cli


def fade_config_from_server_args(server_args: Any) -> FadeConfig | None:
    """The FadeConfig carried by a ServerArgs record (launcher, scheduler, any process), or None.

    Rebuilt through the dataclass constructor, which re-validates it and keeps
    a ``"custom"`` preset name intact.
    """
    if getattr(server_args, ATTR_MODE, "none") != "fade":
        return None
    data = getattr(server_args, ATTR_CONFIG, None)
    if not isinstance(data, dict):
        raise FadeConfigError("fade config: ServerArgs says kv-compression=fade but carries no config")
    return FadeConfig(**data)


# ----------------------------------------------------------------------------- hooks


def add_cli_args_hook(original: Callable[..., Any], parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> Any:
    """AROUND ``ServerArgs.add_cli_args`` (a staticmethod: the parser comes first)."""
    result = original(parser, *args, **kwargs)
    if not any(a.dest == "kv_compression" for a in parser._actions):  # idempotent if called twice
        add_fade_cli_args(parser)
    return result


def from_cli_args_hook(original: Callable[..., Any], cls: type, args: argparse.Namespace, *rest: Any, **kwargs: Any) -> Any:
    """AROUND ``ServerArgs.from_cli_args`` (a classmethod: ``cls`` comes first)."""
    server_args = original(cls, args, *rest, **kwargs)
    try:
        cfg = fade_config_from_namespace(args)
        if cfg is not None:
            check_compatibility(lambda name: getattr(server_args, name, None))
    except FadeConfigError as e:
        fail(str(e))
    if cfg is None:
        ignored = given_fade_flags(args)
        if ignored:
            print(f"fade-sglang: warning: {' '.join(ignored)} ignored without --kv-compression fade",
                  file=sys.stderr, flush=True)
        return server_args
    try:
        check_model(server_args.model_path, bool(getattr(server_args, "trust_remote_code", False)),
                    _triton_device(server_args), cfg)
    except FadeConfigError as e:
        fail(str(e))
    store_on_server_args(server_args, cfg, from_cli=True)
    return server_args


def resolve_once_hook(original: Callable[..., Any], server_args: Any, *args: Any, **kwargs: Any) -> Any:
    """AROUND ``ServerArgs.resolve_once``: re-check the resolved values (e.g. a backend-picked page size)."""
    result = original(server_args, *args, **kwargs)
    if getattr(server_args, ATTR_MODE, "none") != "fade":
        return result
    from sglang.srt.arg_groups.overrides import resolution_result

    try:
        check_compatibility(lambda name: resolution_result(server_args, name))
    except FadeConfigError as e:
        if getattr(server_args, ATTR_FROM_CLI, False):
            fail(str(e))
        raise
    return result
