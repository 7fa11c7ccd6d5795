"""Tier statistics of the tiered KV cache: collection, periodic log, HTTP, Prometheus.

How the numbers travel: the pool and the radix tree live in the scheduler
process. The HTTP server (launcher process) already asks every scheduler for
its internal state (``GetInternalStateReq`` over ZMQ); an AFTER hook on
``sglang.srt.managers.scheduler_components.internal_state.SchedulerInternalStateController.get_internal_state``
adds a ``"fade_kv"`` entry, so it shows in ``GET /server_info`` (and the
deprecated ``/get_server_info``) under ``internal_states[i]["fade_kv"]``, and the
plugin's own ``GET /fade/stats`` route returns just those entries.

With ``--enable-metrics`` the scheduler also exports Prometheus gauges
(``fade_kv_*``) through SGLang's multiprocess registry.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

logger = logging.getLogger("fade_sglang")

STATS_KEY = "fade_kv"
STATS_ROUTE = "/fade/stats"
_METRICS_PERIOD_S = 1.0


def collect_stats(scheduler: Any) -> dict[str, Any]:
    """Plain-data snapshot (msgpack-able): pool tiers, radix tiers, demotions, evictions, ratio."""
    pool = scheduler.token_to_kv_pool_allocator.get_kvcache()
    stats = pool.tier_stats()
    k_bytes, v_bytes = pool.get_kv_size_bytes()
    stats["pool_bytes"] = int(k_bytes + v_bytes)  # the arena: all tiers, scales included
    stats["fp16_bytes_per_token"] = int(pool.tier_bytes[0])
    tree = scheduler.tree_cache
    stats["evictable_tokens"] = int(tree.evictable_size())
    stats["protected_tokens"] = int(tree.protected_size())
    radix = dict(tree.tier_stats())
    radix.pop("pool", None)  # same numbers as the top level
    stats["radix"] = radix
    state = getattr(scheduler, "_fade_state", None)
    if state is not None:
        stats["demotion_passes"] = state.demotion_passes
        stats["pressure_demotions"] = state.pressure_demotions
        stats["pressure_steps"] = state.pressure_steps
        stats["retracted_requests"] = state.retracted_requests
    stats["config"] = pool.fade_config.to_dict()
    return stats


def evicted_total(stats: dict[str, Any]) -> int | None:
    """Tokens evicted from the radix tree so far (all tiers), when the tree reports it."""
    evicted = stats.get("radix", {}).get("evicted_tokens")
    return sum(evicted.values()) if isinstance(evicted, dict) else evicted


def stats_line(stats: dict[str, Any]) -> str:
    tiers = " ".join(f"{name}={t['used']}tok/{t['pages']}pg" for name, t in stats["tiers"].items())
    pages = stats["pages"]
    by_cause = stats.get("radix", {}).get("demoted_tokens", {})
    demoted = " ".join(f"{cause}[{' '.join(f'{k}:{v}' for k, v in moves.items())}]" for cause, moves in by_cause.items())
    evicted = evicted_total(stats)
    return (f"[fade] tiers {tiers} free={pages['free']}/{pages['total']}pg | tokens={stats['tokens']} "
            f"stored={stats['stored_bytes'] / 2**20:.2f}MiB ratio={stats['compression_vs_16bit']:.2f}x vs 16-bit | "
            f"demoted {demoted or 'none'}" + (f" | evicted={evicted}" if evicted is not None else "")
            + f" | retracted={stats.get('retracted_requests', 0)}")


class TierMetrics:
    """Prometheus gauges fed from the scheduler process (multiprocess mode: most recent value wins)."""

    def __init__(self) -> None:
        from prometheus_client import Gauge

        self.used = Gauge("fade_kv_tier_tokens", "Tokens held in each KV tier.", ["tier"],
                          multiprocess_mode="mostrecent")
        self.pages = Gauge("fade_kv_tier_pages", "Arena pages each KV tier owns.", ["tier"],
                           multiprocess_mode="mostrecent")
        self.bytes = Gauge("fade_kv_tier_bytes", "Bytes of KV stored in each tier.", ["tier"],
                           multiprocess_mode="mostrecent")
        self.demoted = Gauge("fade_kv_demoted_tokens", "Tokens demoted so far, by path.", ["path"],
                             multiprocess_mode="mostrecent")
        self.ratio = Gauge("fade_kv_compression_ratio", "Full-precision bytes / stored bytes of the held tokens.",
                           multiprocess_mode="mostrecent")
        self.evicted = Gauge("fade_kv_evicted_tokens", "Tokens evicted from the radix cache so far.",
                             multiprocess_mode="mostrecent")
        self.last = 0.0

    def update(self, stats: dict[str, Any]) -> None:
        for name, t in stats["tiers"].items():
            self.used.labels(tier=name).set(t["used"])
            self.pages.labels(tier=name).set(t["pages"])
            self.bytes.labels(tier=name).set(t["used_bytes"])
        for path, n in stats["demoted_tokens"].items():
            self.demoted.labels(path=path).set(n)
        self.ratio.set(stats["compression_ratio"])
        evicted = evicted_total(stats)
        if evicted is not None:
            self.evicted.set(evicted)


class StatsReporter:
    """Called between scheduler steps; logs every ``stats_interval_seconds`` and refreshes gauges."""

    def __init__(self, interval_s: float, enable_metrics: bool):
        self.interval_s = interval_s
        self.last_log = time.monotonic()
        self.metrics = TierMetrics() if enable_metrics else None

    def tick(self, scheduler: Any, now: float) -> None:
        want_log = self.interval_s > 0 and now - self.last_log >= self.interval_s
        want_metrics = self.metrics is not None and now - self.metrics.last >= _METRICS_PERIOD_S
        if not (want_log or want_metrics):
            return
        stats = collect_stats(scheduler)
        if want_log:
            self.last_log = now
            logger.info(stats_line(stats))
        if want_metrics:
            self.metrics.last = now
            self.metrics.update(stats)


# ----------------------------------------------------------------------------- hooks


def internal_state_hook(result: Any, controller: Any, *args: Any, **kwargs: Any) -> Any:
    """AFTER ``SchedulerInternalStateController.get_internal_state``: attach the tier stats."""
    scheduler = controller.scheduler
    if getattr(scheduler, "_fade_state", None) is not None:
        result.internal_state[STATS_KEY] = collect_stats(scheduler)
    return result


def add_stats_route(app: Any) -> None:
    """``GET /fade/stats``: the ``fade_kv`` entry of every scheduler (one per DP rank)."""
    if any(getattr(r, "path", None) == STATS_ROUTE for r in app.routes):
        return

    async def fade_stats() -> dict[str, Any]:
        from sglang.srt.entrypoints import http_server

        states = await http_server._global_state.tokenizer_manager.get_internal_state()
        return {"enabled": True, "schedulers": [s.get(STATS_KEY) for s in states]}

    app.add_api_route(STATS_ROUTE, fade_stats, methods=["GET"])


def http_launch_hook(server_args: Any, *args: Any, **kwargs: Any) -> None:
    """BEFORE ``sglang.srt.entrypoints.http_server.launch_server``: mount the stats route under fade."""
    from .cli import fade_config_from_server_args

    if fade_config_from_server_args(server_args) is None:
        return None
    from sglang.srt.entrypoints.http_server import app

    add_stats_route(app)
    return None


def register_stats_hooks(register: Callable[[str, Callable[..., Any], Any], None], after: Any) -> None:
    register("sglang.srt.managers.scheduler_components.internal_state.SchedulerInternalStateController"
             ".get_internal_state", internal_state_hook, after)
