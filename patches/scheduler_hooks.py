"""Scheduler glue: demotion between steps, fp16-aware prefill limits, the tiered radix cache.

Hook points:

* ``sglang.srt.managers.scheduler.Scheduler.__init__`` (AFTER): attaches the fade
  state, clamps the prefill chunk to what the fp16 tier can hold, starts stats.
* ``sglang.srt.managers.scheduler.Scheduler.get_next_batch_to_run`` (AROUND):
  called once per event-loop iteration, after the previous batch's results were
  processed and before the next batch is formed. Fade forces
  ``--disable-overlap-schedule``, so no forward is reading the KV here and
  rewriting slots (demotion) is safe. Runs ``demote_running`` over the requests
  that will keep decoding, then ``demote_idle``, and tells the allocator how many
  requests are live (prefill admission waits for them rather than evict for fp16).
* ``sglang.srt.mem_cache.registry`` radix backend ``"fade"``, selected
  automatically under ``--kv-compression fade`` (the default tree in 0.5.23 is
  the Rust-core UnifiedRadixCache, which the tiered cache does not extend).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

from fade_sglang.pool.layout import Tier

logger = logging.getLogger("fade_sglang")

RADIX_BACKEND_NAME = "fade"
_SCHEDULER = "sglang.srt.managers.scheduler.Scheduler"
# demote_idle looks only at nodes whose idle time came due (the radix cache's age index, not a tree
# walk); a few passes a second are plenty for second-scale idle thresholds.
_IDLE_DEMOTE_PERIOD_S = 0.25
# Fraction of the fp16 tier one prefill chunk may take (the rest holds decode windows).
_CHUNK_FP16_SHARE = 0.5


class FadeSchedulerState:
    def __init__(self, cfg: Any, reporter: Any):
        self.cfg = cfg
        self.reporter = reporter
        self.last_idle_demote = 0.0
        self.demotion_passes = 0
        self.pressure_demotions = 0  # passes that shrank the recent window to keep decoding


# ----------------------------------------------------------------------------- radix cache


def fade_radix_factory(ctx: Any) -> Any:
    if ctx.is_hybrid_swa or ctx.is_hybrid_ssm or ctx.enable_hierarchical_cache:
        raise ValueError("--kv-compression fade: the tiered radix cache supports plain MHA/GQA models only")
    from .radix_cache import TieredRadixCache

    return TieredRadixCache(ctx.params)


def register_radix_backend() -> None:
    from sglang.srt.mem_cache.registry import get_radix_cache_factory, register_radix_cache_backend

    if get_radix_cache_factory(RADIX_BACKEND_NAME) is None:
        register_radix_cache_backend(RADIX_BACKEND_NAME, fade_radix_factory)


# ----------------------------------------------------------------------------- scheduler


def _fp16_chunk_limit(scheduler: Any) -> int:
    pool = scheduler.token_to_kv_pool_allocator.get_kvcache()
    return max(1, int(pool.layout.fp16_slots * _CHUNK_FP16_SHARE))


def scheduler_init_hook(result: Any, scheduler: Any, server_args: Any, *args: Any, **kwargs: Any) -> None:
    from .cli import fade_config_from_server_args
    from .stats import StatsReporter

    cfg = fade_config_from_server_args(server_args)
    if cfg is None:
        return None
    limit = _fp16_chunk_limit(scheduler)
    # A prefill chunk must land in fp16 at once; bigger chunks would fail allocation.
    if scheduler.chunked_prefill_size is None or scheduler.chunked_prefill_size > limit:
        logger.info("[fade] chunked prefill size %s -> %d (half of the fp16 tier)", scheduler.chunked_prefill_size,
                    limit)
        scheduler.chunked_prefill_size = limit
    scheduler.max_prefill_tokens = min(scheduler.max_prefill_tokens, limit)
    from sglang.srt.runtime_context import get_observability

    reporter = StatsReporter(cfg.stats_interval_seconds, bool(get_observability().enable_metrics))
    scheduler._fade_state = FadeSchedulerState(cfg, reporter)
    return None


def _live_requests(running_batch: Any, last_batch: Any) -> list[Any]:
    """Requests whose KV rows stay live into the next step (decoding now, or just prefilled); 0.5.23 keeps
    the req_to_token row on ``req.kv``."""
    batches = [b.reqs for b in (running_batch, last_batch) if b is not None]
    if len(batches) == 2 and last_batch is running_batch:
        batches.pop()
    live = [req for reqs in batches for req in reqs
            if (kv := getattr(req, "kv", None)) is not None and kv.req_pool_idx is not None and not req.finished()]
    if len(batches) > 1:  # a request in both batches counts once, where it first appears
        live = list({id(req): req for req in live}.values())
    return live


def _relieve_fp16_pressure(scheduler: Any, tree: Any, reqs: list[Any], state: FadeSchedulerState) -> None:
    """Shrink the recent windows when the next decode step would not find an fp16 slot per request.

    Without this, requests whose prompts + windows fill the fp16 tier can never grow (nothing
    they hold may be demoted) and SGLang retracts them forever. Prompt tokens become eligible
    and the window halves down to 0: precision of the newest tokens traded for progress.
    """
    pool = scheduler.token_to_kv_pool_allocator.get_kvcache()
    need = 2 * len(reqs)  # this step's tokens plus headroom for the next
    window = state.cfg.recent_window
    while pool.available(Tier.FP16) < need and window > 0:
        window //= 2
        if tree.demote_running(reqs, scheduler.req_to_token_pool, recent_window=window, demote_chunk=1,
                               include_prompt=True):
            state.pressure_demotions += 1


def between_steps(scheduler: Any, running_batch: Any, last_batch: Any) -> None:
    state: FadeSchedulerState = scheduler._fade_state
    tree = scheduler.tree_cache
    now = time.monotonic()
    reqs = _live_requests(running_batch, last_batch)
    chunked = getattr(scheduler, "chunked_req", None)
    running = len(reqs)  # reqs holds each request once
    if chunked is not None and any(r is chunked for r in reqs):
        running -= 1
    scheduler.token_to_kv_pool_allocator.running_requests = running
    # No catch-all: every demotion is all-or-nothing (TieredKVStore.demote frees what it allocated on
    # error, and rows / nodes are rewritten only after it returns), so a failure leaves slots and nodes
    # consistent, and it surfaces as the real error instead of a server that silently stops compressing.
    if state.cfg.demote_running and reqs:
        tree.demote_running(reqs, scheduler.req_to_token_pool)
        state.demotion_passes += 1
        _relieve_fp16_pressure(scheduler, tree, reqs, state)
    if now - state.last_idle_demote >= _IDLE_DEMOTE_PERIOD_S:
        state.last_idle_demote = now
        tree.demote_idle(now)
    state.reporter.tick(scheduler, now)


def next_batch_hook(original: Callable[..., Any], scheduler: Any, *args: Any, **kwargs: Any) -> Any:
    if getattr(scheduler, "_fade_state", None) is not None:
        running = kwargs.get("running_batch", args[0] if args else None)
        last = kwargs.get("last_batch", args[1] if len(args) > 1 else None)
        between_steps(scheduler, running, last)
    return original(scheduler, *args, **kwargs)


def register_scheduler_hooks(register: Callable[[str, Callable[..., Any], Any], None], after: Any,
                             around: Any) -> None:
    register(f"{_SCHEDULER}.__init__", scheduler_init_hook, after)
    register(f"{_SCHEDULER}.get_next_batch_to_run", next_batch_hook, around)
