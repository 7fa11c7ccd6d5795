"""Demotion under SGLang's overlap schedule: fade's backends make the scheduler fence the whole in-flight forward.

With overlap on, SGLang 0.5.23 launches step N's forward on ``forward_stream`` and then runs the bookkeeping of
the next step on ``schedule_stream`` (``Scheduler.event_loop_overlap``); ``Scheduler._apply_war_barrier``, called
right after the launch, makes ``schedule_stream`` wait only for the point where the backend declares its reads
of scheduler-written data over (``AttentionBackend.shared_read_ends``): for decode, by default, the in-graph
metadata prep. Fade's demotion is scheduler-side work that rewrites what every layer of the forward reads (fp16
slots, packed rows, ``req_to_token``), so the backends declare UNKNOWN, which SGLang turns into a wait for the
whole forward. These tests drive SGLang's own resolution and barrier code with fade's backend. The end-to-end
check is the server suite, which runs with the overlap schedule on (tests/test_server_fade.py asserts it).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from fade_sglang.config import FadeConfig
from fade_sglang.patches.attention_backend import FadeAttnBackend
from fade_sglang.patches.pool import TieredKVPool


def _backend(use_triton: bool) -> FadeAttnBackend:
    from sglang.srt.mem_cache.memory_pool import ReqToTokenPool

    pool = TieredKVPool(512, 1, torch.float32, 2, 64, 2, "cpu", False, fade_config=FadeConfig(), strict=False)
    runner = SimpleNamespace(device="cpu", req_to_token_pool=ReqToTokenPool(4, 64, "cpu", False),
                             token_to_kv_pool=pool, use_mla_backend=False)
    return FadeAttnBackend(runner, use_triton=use_triton)


@pytest.mark.parametrize("use_triton", [False, True], ids=["fade_torch", "fade_triton"])
def test_backend_reads_until_the_end_of_the_forward_in_every_mode(use_triton: bool, monkeypatch) -> None:
    from sglang.srt.layers.attention.base_attn_backend import AttentionBackend, SharedReadEnds
    from sglang.srt.model_executor.forward_batch_info import ForwardMode
    from sglang.srt.model_executor.runner.decode_cuda_graph_runner import DecodeCudaGraphRunner

    backend = _backend(use_triton)
    # SGLang's default ends decode reads at the in-graph metadata prep: too early for fade (the test can fail).
    assert AttentionBackend.shared_read_ends(backend, ForwardMode.DECODE) is SharedReadEnds.IN_REPLAY
    for mode in ForwardMode:
        assert backend.shared_read_ends(mode) is SharedReadEnds.UNKNOWN, mode
    # The decode graph runner publishes an in-graph read-done event only for IN_REPLAY / PRE / POST_REPLAY.
    graph_runner = SimpleNamespace(in_graph_metadata_prep_done=object())
    assert (DecodeCudaGraphRunner._resolve_shared_read_ends(graph_runner, backend, ForwardMode.DECODE)
            is SharedReadEnds.UNKNOWN)
    # The prefill fast path (an early read-done event after a metadata snapshot) stays off too.
    monkeypatch.setenv("SGLANG_ENABLE_PREFILL_WAR_READ_DONE", "1")
    batch = SimpleNamespace(forward_mode=ForwardMode.EXTEND)
    assert backend.resolve_prefill_shared_read_ends(batch, num_qo_tokens=8) is SharedReadEnds.UNKNOWN


class _Stream:
    def __init__(self, name: str, calls: list[tuple[str, str]]):
        self.name, self.calls = name, calls

    def wait_stream(self, other: "_Stream") -> None:
        self.calls.append((f"{self.name}.wait_stream", other.name))

    def wait_event(self, event: object) -> None:
        self.calls.append((f"{self.name}.wait_event", "read-done event"))


def _barrier_calls(read_done_event: object | None) -> list[tuple[str, str]]:
    """What SGLang's barrier does after a forward launch, given the event the runner published (if any)."""
    from sglang.srt.managers.scheduler import Scheduler

    calls: list[tuple[str, str]] = []
    runner = SimpleNamespace(shared_read_done_event=read_done_event)
    scheduler = SimpleNamespace(_war_barrier_enabled=True, model_worker=SimpleNamespace(last_shared_read_runner=runner),
                                schedule_stream=_Stream("schedule", calls), forward_stream=_Stream("forward", calls))
    Scheduler._apply_war_barrier(scheduler)
    assert runner.shared_read_done_event is None  # consumed: the next forward publishes its own (or none)
    return calls


def test_without_a_read_done_event_the_scheduler_waits_for_the_whole_forward() -> None:
    # UNKNOWN publishes no event: the schedule stream, where demotion runs, waits for the forward stream.
    assert _barrier_calls(None) == [("schedule.wait_stream", "forward")]
    # What an early (IN_REPLAY) event would give instead: a wait for the metadata prep only.
    assert _barrier_calls(object()) == [("schedule.wait_event", "read-done event")]
