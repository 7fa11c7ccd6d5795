"""FadeConfig: every knob of the tiered KV cache, its presets, and validation.

Tiers: ``fp16`` (the model's KV dtype, full precision), ``warm`` (packed
``warm_bits``, INT4 by default) and ``cold`` (packed ``cold_bits``, INT2 by
default). All tiers share one byte arena handed out in pages (``fade_sglang.pool.pages``):
nothing is compressed while everything fits at full precision; ``tier_max_share`` only caps
how much of the arena a packed tier may own.

Load from a preset, from JSON (a string or a file path; an optional
``"preset"`` key names the base), and apply CLI-style ``key=value`` overrides.
Every error is a :class:`FadeConfigError` with a message naming the knob.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from .quant import QuantFormat
from .quant.formats import SUPPORTED_BITS

__all__ = ["FadeConfig", "FadeConfigError", "PRESETS", "TIER_NAMES"]

TIER_NAMES = ("fp16", "warm", "cold")
PACKED_TIER_NAMES = TIER_NAMES[1:]
# Knobs that no longer exist, with what replaced them (one clear line instead of "unknown knob").
_REMOVED_KNOBS = {"tier_budget": "tiers share one byte arena now; cap a packed tier with tier_max_share "
                                 "(e.g. {\"cold\": 0.0} turns INT2 off)"}


class FadeConfigError(ValueError):
    """A bad fade-sglang configuration (the message says which knob and why)."""


@dataclass(frozen=True)
class FadeConfig:
    preset: str = "balanced"
    # Full-precision regions.
    sink_tokens: int = 16  # first tokens of every sequence (attention sinks) stay fp16
    recent_window: int = 128  # each request's most recent tokens stay fp16
    shared_prefix_min_hits: int = 2  # radix nodes hit by this many requests stay fp16
    # Packed tiers.
    warm_bits: int = 4
    warm_group_size: int = 64
    cold_bits: int = 2
    cold_group_size: int = 32
    # Keys carry most of the quantization error on real models (benchmarks/RESULTS.md, sensitivity):
    # a tier may give them more bits than its values. 0 = the tier's bits.
    warm_key_bits: int = 0
    cold_key_bits: int = 0
    # Layers whose packed records get more bits (keys at least protected_key_bits, values at least
    # protected_value_bits) in bigger pages: on SmolLM2 two of 30 layers carry three quarters of the INT4
    # error (find them with ``python -m fade_sglang.eval.sensitivity --per-layer``). Model-specific, so no
    # preset sets it. Each costs a quarter-page step more bytes per page in that layer, fp16 pages included.
    protected_layers: tuple[int, ...] = ()
    protected_key_bits: int = 8
    protected_value_bits: int = 4
    rotation: bool = True  # fixed randomized Hadamard over head_dim (K, q, V; output un-rotated)
    rotation_seed: int = 0
    center_keys: bool = True  # subtract a per-(layer, head) key mean frozen at first demotion
    clip_search: bool = True  # values: per-group MSE-optimal range clipping at quantize time
    # Keys: the same search (off by default). Clipping trims a key's largest components, and those are the
    # ones the attention logits weight most: on SmolLM2, INT4 keys in groups of 64 lose 40% less NLL
    # unclipped, as little as group 32 (24 conversations; benchmarks/RESULTS.md, "Keys without the clip search").
    key_clip_search: bool = False
    # Keys rounded to minimize the attention-logit error under the queries the layer has seen (their second
    # moment, observed in prefill until the layer's first demotion): same grid and bytes. On SmolLM2 INT4 in
    # groups of 32 +0.018 -> +0.006 nats/token, INT3 +0.045 -> +0.029, INT4 group 64 and k4v3 unchanged
    # (24 answers; benchmarks/RESULTS.md, "Query-aware key rounding").
    query_aware_keys: bool = True
    # Most of the KV byte arena each packed tier may own (fraction of its pages); 0 disables the tier.
    # Not a partition: every tier draws pages from one arena as content ages and memory runs short.
    tier_max_share: dict[str, float] = field(default_factory=lambda: {"warm": 1.0, "cold": 1.0})
    # Policy.
    demote_running: bool = True  # demote a running request's tokens older than its recent window
    demote_chunk: int = 64  # demote running requests in chunks of this many tokens (amortizes launches)
    warm_idle_seconds: float = 5.0  # unlocked radix branches idle this long go fp16 -> warm
    cold_idle_seconds: float = 60.0  # ... and warm -> cold
    eviction: bool = True  # evict coldest lowest-tier leaves, only after demotion is exhausted
    idle_recent_tokens: int = 0  # idle demotion leaves the last N tokens of every branch in fp16
    # Evaluation baseline, not a compression mode: demoted tokens are dropped from attention
    # instead of read back, so with sinks + idle_recent_tokens it is StreamingLLM-style
    # eviction of idle branches; stats count only the fp16 tokens as stored.
    evict_instead_of_demote: bool = False
    stats_interval_seconds: float = 30.0  # period of the tier-stats log line (0 = off)

    def __post_init__(self) -> None:
        layers = self.protected_layers
        if isinstance(layers, (list, tuple)) and _all_ints(layers):  # JSON gives lists; keep one sorted tuple
            object.__setattr__(self, "protected_layers", tuple(sorted(set(layers))))
        self._validate()

    # ------------------------------------------------------------------ validation
    def _validate(self) -> None:
        def need(cond: bool, knob: str, msg: str) -> None:
            if not cond:
                raise FadeConfigError(f"fade config: {knob} {msg}")

        if self.preset not in PRESETS and self.preset != "custom":
            raise FadeConfigError(f"fade config: unknown preset {self.preset!r} (choose from {', '.join(PRESETS)})")
        for knob in ("sink_tokens", "recent_window", "shared_prefix_min_hits", "demote_chunk", "rotation_seed",
                     "idle_recent_tokens"):
            v = getattr(self, knob)
            need(isinstance(v, int) and not isinstance(v, bool), knob, f"must be an integer, got {v!r}")
            need(v >= 0, knob, f"must be >= 0, got {v}")
        need(self.demote_chunk >= 1, "demote_chunk", "must be >= 1")
        for knob in ("warm_bits", "cold_bits"):
            v = getattr(self, knob)
            need(v in SUPPORTED_BITS and not isinstance(v, bool), knob, f"must be one of {SUPPORTED_BITS}, got {v!r}")
        need(self.cold_bits <= self.warm_bits, "cold_bits", f"({self.cold_bits}) must not exceed warm_bits ({self.warm_bits})")
        for knob in ("warm_key_bits", "cold_key_bits"):
            v = getattr(self, knob)
            need((v == 0 or v in SUPPORTED_BITS) and not isinstance(v, bool), knob,
                 f"must be 0 (= the tier's bits) or one of {SUPPORTED_BITS}, got {v!r}")
        need(self.key_bits[1] <= self.key_bits[0], "cold_key_bits",
             f"(keys: {self.key_bits[1]}) must not exceed the warm tier's key bits ({self.key_bits[0]})")
        layers = self.protected_layers
        need(isinstance(layers, tuple) and _all_ints(layers) and all(l >= 0 for l in layers), "protected_layers",
             f"must be a list of layer indices >= 0, got {layers!r}")
        for knob in ("protected_key_bits", "protected_value_bits"):
            v = getattr(self, knob)
            need(v in SUPPORTED_BITS and not isinstance(v, bool), knob, f"must be one of {SUPPORTED_BITS}, got {v!r}")
        for knob in ("warm_group_size", "cold_group_size"):
            v = getattr(self, knob)
            need(isinstance(v, int) and not isinstance(v, bool) and v > 0, knob, f"must be a positive integer, got {v!r}")
            need(v & (v - 1) == 0, knob, f"must be a power of two, got {v}")
        for knob in ("rotation", "center_keys", "clip_search", "key_clip_search", "query_aware_keys", "demote_running",
                     "eviction", "evict_instead_of_demote"):
            need(isinstance(getattr(self, knob), bool), knob, f"must be true or false, got {getattr(self, knob)!r}")
        for knob in ("warm_idle_seconds", "cold_idle_seconds", "stats_interval_seconds"):
            v = getattr(self, knob)
            need(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0, knob, f"must be a number >= 0, got {v!r}")
        shares = self.tier_max_share
        need(isinstance(shares, dict), "tier_max_share", f"must be a mapping of {PACKED_TIER_NAMES} to fractions")
        unknown = set(shares) - set(PACKED_TIER_NAMES)
        need(not unknown, "tier_max_share", f"has unknown tiers {sorted(unknown)} (packed tiers: "
             f"{', '.join(PACKED_TIER_NAMES)}; fp16 may always use the whole arena)")
        for tier in PACKED_TIER_NAMES:
            v = shares.get(tier, 0.0)
            need(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1, "tier_max_share",
                 f"[{tier}] must be a number in [0, 1], got {v!r}")

    # ------------------------------------------------------------------ derived
    @property
    def max_shares(self) -> tuple[float, float, float]:
        """Most of the arena each tier (fp16, warm, cold) may own; fp16 may own all of it."""
        return (1.0, *(float(self.tier_max_share.get(t, 0.0)) for t in PACKED_TIER_NAMES))  # type: ignore[return-value]

    @property
    def warm_enabled(self) -> bool:
        return self.max_shares[1] > 0

    @property
    def cold_enabled(self) -> bool:
        return self.max_shares[2] > 0

    @property
    def compresses(self) -> bool:
        """Whether any packed tier is enabled (otherwise the pool is plain full-precision KV)."""
        return self.warm_enabled or self.cold_enabled

    @property
    def key_bits(self) -> tuple[int, int]:
        """Bits of the keys in the (warm, cold) tier."""
        return (self.warm_key_bits or self.warm_bits, self.cold_key_bits or self.cold_bits)

    @property
    def warm_format(self) -> QuantFormat:
        """The warm tier's value format (its keys: :attr:`warm_key_format`)."""
        return QuantFormat(self.warm_bits, self.warm_group_size, self.clip_search)

    @property
    def cold_format(self) -> QuantFormat:
        """The cold tier's value format (its keys: :attr:`cold_key_format`)."""
        return QuantFormat(self.cold_bits, self.cold_group_size, self.clip_search)

    @property
    def warm_key_format(self) -> QuantFormat:
        return QuantFormat(self.key_bits[0], self.warm_group_size, self.key_clip_search)

    @property
    def cold_key_format(self) -> QuantFormat:
        return QuantFormat(self.key_bits[1], self.cold_group_size, self.key_clip_search)

    def protected_out_of_range(self, layers: int) -> list[int]:
        """The protected layers a model with ``layers`` layers does not have."""
        return [l for l in self.protected_layers if l >= layers]

    def protected_formats(self, tier: int) -> tuple[QuantFormat, QuantFormat]:
        """(key, value) formats of packed ``tier`` (1 warm, 2 cold) in a protected layer: the tier's
        formats with at least ``protected_key_bits`` / ``protected_value_bits``."""
        key, value = ((self.warm_key_format, self.warm_format) if tier == 1 else (self.cold_key_format, self.cold_format))
        return (dataclasses.replace(key, bits=max(key.bits, self.protected_key_bits)),
                dataclasses.replace(value, bits=max(value.bits, self.protected_value_bits)))

    def tier_display_names(self) -> tuple[str, str, str]:
        def name(key: int, value: int) -> str:
            return f"int{value}" if key == value else f"k{key}v{value}"

        return ("fp16", name(self.key_bits[0], self.warm_bits), name(self.key_bits[1], self.cold_bits))

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_preset(cls, name: str) -> "FadeConfig":
        if name not in PRESETS:
            raise FadeConfigError(f"fade config: unknown preset {name!r} (choose from {', '.join(PRESETS)})")
        return cls(preset=name, **PRESETS[name])

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "FadeConfig":
        if not isinstance(data, Mapping):
            raise FadeConfigError(f"fade config: expected a JSON object, got {type(data).__name__}")
        data = dict(data)
        name = data.pop("preset", "balanced")
        # "custom" is what to_dict() writes for an overridden config: every knob is in the dict.
        base = cls(preset="custom") if name == "custom" else cls.from_preset(name)
        return base.with_overrides(data, preset_name=base.preset)

    @classmethod
    def from_json(cls, text_or_path: str) -> "FadeConfig":
        """Parse a JSON object given inline (``'{"sink_tokens": 8}'``) or as a path to a .json file."""
        text = text_or_path.strip()
        if not text.startswith("{"):
            if not os.path.isfile(text):
                raise FadeConfigError(f"fade config: {text_or_path!r} is neither inline JSON nor an existing file")
            with open(text, encoding="utf-8") as f:
                text = f.read()
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise FadeConfigError(f"fade config: invalid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
        return cls.from_dict(data)

    def with_overrides(self, overrides: Mapping[str, Any], preset_name: str | None = None) -> "FadeConfig":
        """Return a copy with knobs replaced; string values (from a CLI) are parsed to the knob's type."""
        known = {f.name: f for f in dataclasses.fields(self)}
        changes: dict[str, Any] = {}
        for raw_key, value in overrides.items():
            key = raw_key.replace("-", "_")
            if key in _REMOVED_KNOBS:
                raise FadeConfigError(f"fade config: {raw_key} was removed: {_REMOVED_KNOBS[key]}")
            if key not in known or key == "preset":
                raise FadeConfigError(f"fade config: unknown knob {raw_key!r} (knobs: {', '.join(k for k in known if k != 'preset')})")
            changes[key] = _coerce(key, value, getattr(self, key))
        if not changes:
            return self
        return dataclasses.replace(self, preset=preset_name or "custom", **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def summary(self) -> str:
        names = self.tier_display_names()
        caps = " ".join(f"{n}<={x:.0%}" for n, x in zip(names[1:], self.max_shares[1:]) if x > 0) or "none"
        protected = (f" protected_layers={','.join(map(str, self.protected_layers))}"
                     f"(k>={self.protected_key_bits},v>={self.protected_value_bits})" if self.protected_layers else "")
        return (f"preset={self.preset} sinks={self.sink_tokens} recent={self.recent_window} "
                f"packed[{caps}]{protected} rotation={'on' if self.rotation else 'off'} "
                f"eviction={'on' if self.eviction else 'off'}")


def _all_ints(values: Any) -> bool:
    return all(isinstance(v, int) and not isinstance(v, bool) for v in values)


def _coerce(key: str, value: Any, current: Any) -> Any:
    if isinstance(current, tuple) and isinstance(value, list):
        return tuple(value)
    if not isinstance(value, str):
        return value
    text = value.strip()
    try:
        if isinstance(current, tuple):  # "18,23", "[18, 23]" or "" (none)
            text = text.strip("[]() ")
            return tuple(int(x) for x in text.replace(",", " ").split())
        if isinstance(current, bool):
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if isinstance(current, int):
            return int(text)
        if isinstance(current, float):
            return float(text)
        if isinstance(current, dict):
            return json.loads(text)
    except (ValueError, json.JSONDecodeError):
        raise FadeConfigError(f"fade config: {key} cannot be {value!r} (expected {type(current).__name__})") from None
    return text


# Presets follow what the real model measured (benchmarks/RESULTS.md, SmolLM2 sensitivity, NLL of reference answers
# with the history in one format, nats/token, 24 conversations): k8v4 +0.003, INT4 +0.012 (group 64) / +0.014
# (group 32), k4v3 +0.022 (group 64), k4v2 +0.055 (group 32, the same bytes as k4v3), INT2 +0.6 (6 answers).
# Keys carry the error, so every preset spends its bits on keys first.
PRESETS: dict[str, dict[str, Any]] = {
    # fp16 sinks + recent window, 8-bit keys / 4-bit values for everything else (2.5x vs 16-bit KV); no cold tier.
    "safe": dict(sink_tokens=16, recent_window=256, warm_key_bits=8, tier_max_share={"warm": 1.0, "cold": 0.0},
                 warm_idle_seconds=10.0, cold_idle_seconds=3600.0),
    # k8v4 bulk; branches idle for a minute go to INT4 (group 32: 3.2x vs 16-bit KV).
    "balanced": dict(sink_tokens=16, recent_window=128, warm_key_bits=8, cold_bits=4, cold_key_bits=4,
                     tier_max_share={"warm": 1.0, "cold": 1.0}, warm_idle_seconds=5.0, cold_idle_seconds=60.0),
    # Short fp16 windows, INT4 bulk, fast aging to 4-bit keys / 3-bit values in groups of 64 (4x vs 16-bit KV).
    "aggressive": dict(sink_tokens=8, recent_window=64, cold_bits=3, cold_key_bits=4, cold_group_size=64,
                       tier_max_share={"warm": 1.0, "cold": 1.0}, warm_idle_seconds=1.0, cold_idle_seconds=10.0),
}
