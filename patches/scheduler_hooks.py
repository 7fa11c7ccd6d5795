"""Scheduler glue: demotion between steps, fp16-aware prefill limits, the tiered radix cache.

Hook points:

* ``sglang.srt.managers.scheduler.Scheduler.__init__`` (AFTER): attaches the fade
  state, clamps the prefill chunk to half the arena at full precision, starts stats.
* ``sglang.srt.managers.scheduler.Scheduler.ingest_requests`` (BEFORE): under TP, ticks the tree's step
  clock (every rank takes rank 0's reading: ``step_clock``) before SGLang matches and stamps new requests'
  prefixes, so every stamp of a step reads that step's time.
* ``sglang.srt.managers.scheduler.Scheduler.get_next_batch_to_run`` (AROUND):
  called once per event-loop iteration, before the next batch is formed (without the overlap
  schedule the previous batch's results are processed by then; with it, one batch later). Demotion
  here rewrites slots on the scheduler's stream; with overlap a forward may still be in flight, and
  SGLang's write-after-read barrier orders this work after it (fade's backends declare they read until
  the end of the forward: ``attention_backend.FadeAttnBackend.shared_read_ends``). Relieves memory pressure (below), runs
  ``demote_idle``, and tells the allocator how many requests are live (prefill
  admission waits for them rather than evict for fp16).

Memory pressure: the next step needs an fp16 slot per decoding request, the waiting
queue's head needs its next prefill chunk, and a chunked prefill its next chunk. Only
when the arena cannot give that much fp16 room does anything running get compressed,
in this order: idle radix branches (coldest first, warm -> cold before fp16 -> warm),
then the middle of running requests (sinks and recent windows stay fp16), and as a last
resort smaller recent windows. Eviction (SGLang's ``evict``) and retraction come after.
While everything fits at full precision nothing is compressed.
* ``sglang.srt.mem_cache.registry`` radix backend ``"fade"``, selected
  automatically under ``--kv-compression fade`` (the default tree in 0.5.23 is
  the Rust-core UnifiedRadixCache, which the tiered cache does not extend).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable

from fade_sglang.pool.layout import Tier

logger = logging.getLogger("fade_sglang")

RADIX_BACKEND_NAME = "fade"
_SCHEDULER = "sglang.srt.managers.scheduler.Scheduler"
# demote_idle looks only at nodes whose idle time came due (the radix cache's age index, not a tree
# walk); a few passes a second are plenty for second-scale idle thresholds.
_IDLE_DEMOTE_PERIOD_S = 0.25
# Fraction of the arena (at full precision) one prefill chunk may take.
_CHUNK_FP16_SHARE = 0.5
# Passes of pressure relief per step: each demotion can only fill the pages free at its start, and the
# fp16 rows it frees come back as whole pages for the next pass.
_RELIEF_PASSES = 16
# Pressure relief moves at least this many fp16 pages' worth of tokens per pass.
_RELIEF_PAGES = 4


class FadeSchedulerState:
    def __init__(self, cfg: Any, reporter: Any):
        self.cfg = cfg
        self.reporter = reporter
        self.last_idle_demote = 0.0
        self.demotion_passes = 0
        self.pressure_demotions = 0  # passes that shrank the recent window to keep decoding
        self.pressure_steps = 0  # steps that compressed something because fp16 room ran short
        self.clock_ticked = False  # this step's shared clock tick already happened (before ingest_requests)

    @property
    def retracted_requests(self) -> int:
        return _RETRACTED[0]


# Requests SGLang retracted (out of KV memory mid-decode) in this scheduler process.
_RETRACTED = [0]


def retract_decode_hook(result: Any, batch: Any, *args: Any, **kwargs: Any) -> Any:
    """AFTER ``ScheduleBatch.retract_decode``: count retractions for the stats (fade's last resort) and
    say what the arena held when it came to that."""
    _RETRACTED[0] += len(result[0])
    if result[0]:
        pool = batch.token_to_kv_pool_allocator.get_kvcache()
        table = pool.page_table
        logger.warning("[fade] retracted %d request(s): arena full (pages fp16/warm/cold/free %s/%d; tokens %s; "
                       "fp16 room %d)", len(result[0]), "/".join(str(n) for n in table.owned), table.free_pages(),
                       "/".join(str(pool.used(t)) for t in Tier), pool.available(Tier.FP16))
    return result


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
        logger.info("[fade] chunked prefill size %s -> %d (half of the arena at full precision)",
                    scheduler.chunked_prefill_size, limit)
        scheduler.chunked_prefill_size = limit
    scheduler.max_prefill_tokens = min(scheduler.max_prefill_tokens, limit)
    # SGLang bounds a request by max_total_num_tokens, which counts every tier's slot range (address space);
    # bound it by what one request can really hold compressed, so a longer prompt is refused up front.
    most = scheduler.token_to_kv_pool_allocator.get_kvcache().max_request_tokens()
    if most < scheduler.max_req_input_len:
        logger.info("[fade] longest request %d -> %d tokens (what the arena holds with its middle compressed)",
                    scheduler.max_req_input_len, most)
        scheduler.max_req_input_len = most
        scheduler.max_req_len = min(scheduler.max_req_len, most + 5)
    from sglang.srt.runtime_context import get_observability

    reporter = StatsReporter(cfg.stats_interval_seconds, bool(get_observability().enable_metrics))
    scheduler._fade_state = FadeSchedulerState(cfg, reporter)
    _start_step_clock(scheduler)
    return None


def _start_step_clock(scheduler: Any) -> None:
    """Under TP, radix access stamps and idle demotion read the tree's step clock, shared from rank 0. One
    rank keeps real time (the clock is never ticked): a stamp then is the moment of the access itself, not
    the start of its scheduler step."""
    from .step_clock import install, tp_share

    if getattr(scheduler, "tp_size", 1) > 1:
        clock = scheduler.tree_cache.clock
        clock.share = tp_share(scheduler.tp_cpu_group)
        install(clock)


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


def _waiting_need(scheduler: Any) -> int:
    """fp16 slots the next prefill wants: the chunked request's next chunk, else the waiting head's prompt
    (up to one chunk). Zero when the head could not fit even compressed (no point compressing for it)."""
    limit = scheduler.chunked_prefill_size or 1 << 30
    chunked = getattr(scheduler, "chunked_req", None)
    if chunked is not None:
        return min(limit, max(0, len(chunked.origin_input_ids) - chunked.kv.kv_committed_len))
    queue = getattr(scheduler, "waiting_queue", None)
    if not queue:
        return 0
    head = queue[0]
    pool = scheduler.token_to_kv_pool_allocator.get_kvcache()
    want = len(head.origin_input_ids) + (getattr(head.sampling_params, "max_new_tokens", 0) or 0)
    alloc = scheduler.token_to_kv_pool_allocator
    keep = alloc.fp16_kept_tokens(alloc.running_requests + 1)
    return min(limit, len(head.origin_input_ids)) if want <= pool.free_room_tokens(keep) else 0


def _relieve_pressure(scheduler: Any, tree: Any, reqs: list[Any], state: FadeSchedulerState) -> None:
    """Make the fp16 room the next step needs by compressing, cheapest first (see the module doc).

    Also keeps a spare free page beyond the packed tiers' reserve: demotion writes into pages, and the
    fp16 rows it frees only come back as pages once whole pages drain, so work starts before the last
    page is gone and moves a few pages' worth of tokens at a time (the oldest positions, which sit
    together on their pages), not the handful one step is short of."""
    pool = scheduler.token_to_kv_pool_allocator.get_kvcache()
    table = pool.page_table
    decode_need = 2 * len(reqs)  # this step's tokens plus headroom for the next
    need = decode_need + _waiting_need(scheduler)
    spare = table.reserve_pages + 1 if pool.fade_config.compresses else 0
    if pool.available(Tier.FP16) >= need and table.free_pages() >= spare:
        return
    state.pressure_steps += 1
    gain = pool.fp16_gain_per_demoted_token()  # fp16 room one fp16 -> warm demotion frees, net of its record
    batch = _RELIEF_PAGES * pool.geometry.rows_per_page[Tier.FP16]
    for _ in range(_RELIEF_PASSES):
        short = need - pool.available(Tier.FP16)
        if short <= 0 and table.free_pages() >= spare:
            break
        want = max(batch, math.ceil(max(short, 0) / max(gain, 1e-3)))
        if tree.demote_for_room(want):
            continue
        if not (state.cfg.demote_running and reqs and tree.demote_running(
                reqs, scheduler.req_to_token_pool, include_prompt=True, demote_chunk=1, limit=want)):
            break
    # Still short for decoding itself: trade the newest tokens' precision for progress. Without this,
    # requests whose sinks + windows fill the arena could never grow and SGLang would retract them forever.
    window = state.cfg.recent_window
    while pool.available(Tier.FP16) < decode_need and window > 0 and state.cfg.demote_running:
        window //= 2
        if tree.demote_running(reqs, scheduler.req_to_token_pool, recent_window=window, demote_chunk=1,
                               include_prompt=True):
            state.pressure_demotions += 1


def tick_before_ingest(scheduler: Any, *args: Any, **kwargs: Any) -> None:
    """BEFORE ``Scheduler.ingest_requests``, the first thing of every event-loop iteration: under TP, tick the
    shared step clock here, so the prefixes SGLang matches (and stamps) for new requests read this step's time,
    not the previous step's. One rank keeps real time and ticks nothing."""
    state: FadeSchedulerState | None = getattr(scheduler, "_fade_state", None)
    if state is not None and scheduler.tree_cache.clock.share is not None:
        scheduler.tree_cache.clock.tick()
        state.clock_ticked = True


def step_now(state: FadeSchedulerState, clock: Any) -> float:
    """The time this step's decisions read. Under TP the clock ticks once per step on every rank (a collective):
    before ``ingest_requests`` when that hook ran, else here (a loop that does not call it)."""
    if clock.share is not None and not state.clock_ticked:
        clock.tick()
    state.clock_ticked = False
    return clock.now()


def between_steps(scheduler: Any, running_batch: Any, last_batch: Any) -> None:
    state: FadeSchedulerState = scheduler._fade_state
    tree = scheduler.tree_cache
    now = step_now(state, tree.clock)
    reqs = _live_requests(running_batch, last_batch)
    chunked = getattr(scheduler, "chunked_req", None)
    running = len(reqs)  # reqs holds each request once
    if chunked is not None and any(r is chunked for r in reqs):
        running -= 1
    scheduler.token_to_kv_pool_allocator.running_requests = running
    # No catch-all: every demotion is all-or-nothing (TieredKVStore.demote frees what it allocated on
    # error, and rows / nodes are rewritten only after it returns), so a failure leaves slots and nodes
    # consistent, and it surfaces as the real error instead of a server that silently stops compressing.
    _relieve_pressure(scheduler, tree, reqs, state)
    state.demotion_passes += 1
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
                             around: Any, before: Any) -> None:
    register(f"{_SCHEDULER}.__init__", scheduler_init_hook, after)
    register(f"{_SCHEDULER}.ingest_requests", tick_before_ingest, before)
    register(f"{_SCHEDULER}.get_next_batch_to_run", next_batch_hook, around)
    register("sglang.srt.managers.schedule_batch.ScheduleBatch.retract_decode", retract_decode_hook, after)
