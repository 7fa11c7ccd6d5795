"""Real CPU SGLang servers with ``--kv-compression fade``: capacity, greedy fidelity, multi-turn tiers, no leaks.

Three servers for the module (each ~20-100 s to start on a busy 2-core box):

* ``baseline``: stock SGLang (torch_native attention, fp16-style full-precision pool).
* ``fade_safe``: ``--fade-preset safe``; short sequences never leave the fp16 sink/recent windows.
* ``fade_small``: balanced tiers with tiny windows and second-scale idle thresholds, so tokens
  are demoted while requests run and while the tree idles.

The fade servers run SGLang's overlap schedule (demotion between overlapped steps), except ``fade_triton``
(the non-overlapped loop). The fade servers run with ``SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_BUSY=1``: SGLang asserts
``available + evictable + protected + uncached == max_total_num_tokens`` after every step,
which checks the tiered allocator's accounting continuously.
"""

from __future__ import annotations

import json
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import pytest

from fade_sglang.config import FadeConfig

from sglang_server import ServerProcess, corpus_ids as _ids

pytestmark = pytest.mark.server

BASE_TOKENS = 4096
FADE_TOKENS = BASE_TOKENS  # the same KV bytes as the baseline: fade's pool is sized like plain SGLang's
FADE_ARGS = ["--kv-compression", "fade", "--attention-backend", "fade_torch"]
SMALL_WINDOW_ARGS = FADE_ARGS + [
    "--fade-sink-tokens", "4", "--fade-recent-window", "16",
    # cold_idle well past warm_idle: tests that sleep past warm_idle expect INT4, even when a
    # loaded CI machine answers the next stats poll seconds late.
    "--fade-set", "warm_idle_seconds=2", "--fade-set", "cold_idle_seconds=8",
    "--fade-set", "stats_interval_seconds=2",
    # Small demotion chunks keep running requests' fp16 footprint near sinks + window;
    # a high hit threshold keeps only the system prompt (hit by every turn of every session) "hot".
    "--fade-set", "demote_chunk=16", "--fade-set", "shared_prefix_min_hits=6",
    "--enable-metrics",
]
STRICT_ENV = {"SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_BUSY": "1"}
LONG_NEW_TOKENS = 72
# Teacher-forced top-1 agreement through an INT4 prefix: HF simulation 0.50 on this model,
# broken reads <= 0.03 (see test_demoted_greedy_match_rate).
MIN_TEACHER_FORCED_AGREEMENT = 0.3


def _server(model: Path, args: list[str], tokens: int, env: dict[str, str] | None = None) -> Iterator[ServerProcess]:
    with ServerProcess(model, args, max_total_tokens=tokens, env=env, startup_timeout_s=300) as srv:
        yield srv
    print(f"\nserver log: {srv.log_path}")


@pytest.fixture(scope="module")
def baseline(tiny_model_dir: Path) -> Iterator[ServerProcess]:
    yield from _server(tiny_model_dir, [], BASE_TOKENS)


@pytest.fixture  # one test uses it: stopped right after, so it does not starve later servers' startup
def fade_safe(tiny_model_dir: Path) -> Iterator[ServerProcess]:
    yield from _server(tiny_model_dir, FADE_ARGS + ["--fade-preset", "safe"], FADE_TOKENS, STRICT_ENV)


@pytest.fixture(scope="module")
def fade_small(tiny_model_dir: Path) -> Iterator[ServerProcess]:
    yield from _server(tiny_model_dir, SMALL_WINDOW_ARGS, FADE_TOKENS, STRICT_ENV)


@pytest.fixture(scope="module")
def fade_triton(tiny_model_dir: Path) -> Iterator[ServerProcess]:
    """The same tiers read by the Triton kernels (TRITON_INTERPRET=1 on CPU, set by conftest), and the one fade
    server here without the overlap schedule (SGLang's default, which every other server keeps)."""
    args = [a if a != "fade_torch" else "fade_triton" for a in SMALL_WINDOW_ARGS] + ["--disable-overlap-schedule"]
    yield from _server(tiny_model_dir, args, FADE_TOKENS, STRICT_ENV)


@pytest.fixture  # one test uses it
def fade_protected(tiny_model_dir: Path) -> Iterator[ServerProcess]:
    """fade_small's tiers with layer 1 (of 2) protected: more bits in bigger pages."""
    yield from _server(tiny_model_dir, SMALL_WINDOW_ARGS + ["--fade-set", "protected_layers=1"], FADE_TOKENS,
                       STRICT_ENV)


@pytest.fixture  # one test uses it
def fade_aggressive(tiny_model_dir: Path) -> Iterator[ServerProcess]:
    """The aggressive preset (cold tier: 4-bit keys, 3-bit values) with fade_small's windows, aging in seconds."""
    args = SMALL_WINDOW_ARGS + ["--fade-preset", "aggressive", "--fade-set", "warm_idle_seconds=1",
                                "--fade-set", "cold_idle_seconds=2"]
    yield from _server(tiny_model_dir, args, FADE_TOKENS, STRICT_ENV)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))



def _wait_demoted_prefix(srv: ServerProcess, min_tokens: int, timeout_s: float = 10.0,
                         tier: str = "warm") -> dict[str, int]:
    """Idle demotion runs in the scheduler loop, which turns only when something arrives: poll
    (each stats request is one loop turn; its reply may predate that turn's demotion). Returns the
    tree's tokens per tier at the last poll."""
    deadline = time.monotonic() + timeout_s
    while True:
        tree = srv.fade_stats()["radix"]["tree_tokens"]
        if tree[tier] >= min_tokens or time.monotonic() > deadline:
            return tree
        time.sleep(0.2)


def _cache_and_age(srv: ServerProcess, ids: list[int], tier: str = "warm", attempts: int = 3) -> None:
    """Flush, cache ``ids`` (one generated token), idle 2.5 s (past fade_small's warm_idle_seconds, short of its
    cold_idle_seconds; past fade_aggressive's cold_idle_seconds) and wait until 30 tokens sit in ``tier``.

    A loaded machine can answer the polls after the next idle deadline too, when the prompt has already
    moved past ``tier``: then start over (a broken demotion never reaches ``tier`` and still fails)."""
    for _ in range(attempts):
        srv.flush_cache()
        srv.generate(input_ids=ids, max_new_tokens=1)
        time.sleep(2.5)
        tree = _wait_demoted_prefix(srv, 30, tier=tier)
        if tree[tier] >= 30:
            return
        if tier == "cold" or tree["cold"] < 30:
            break  # not overshot: demotion did not happen
    raise AssertionError(f"the prompt never sat in the {tier} tier: {tree}")


def _tier_names(stats: dict[str, Any]) -> tuple[str, str, str]:
    """The tiers' display names of the server's config (int4, k8v4, ...)."""
    return FadeConfig.from_dict(stats["config"]).tier_display_names()


def _server_info_capacity(srv: ServerProcess) -> int:
    (state,) = srv.request("/server_info")["internal_states"]
    return state["memory_usage"]["token_capacity"]


# ----------------------------------------------------------------------------- startup / capacity


def test_fade_server_holds_more_tokens_in_the_same_bytes(baseline: ServerProcess, fade_small: ServerProcess) -> None:
    stats = fade_small.fade_stats()
    assert set(stats["tiers"]) == set(_tier_names(stats))  # e.g. fp16 / k8v4 / int4 for balanced
    base_capacity = _server_info_capacity(baseline)
    assert base_capacity == BASE_TOKENS
    base_bytes = (base_capacity + 1) * stats["fp16_bytes_per_token"]  # the baseline pool (+ padding row), same dtype
    capacity = stats["capacity_tokens"]
    print(f"\nfade: up to {capacity} tokens ({stats['fp16_capacity_tokens']} at full precision) in "
          f"{stats['pool_bytes'] / 2**20:.2f} MiB; baseline: {base_capacity} tokens in {base_bytes / 2**20:.2f} MiB; "
          f"capacity_vs_fp16={stats['capacity_vs_fp16']:.2f}x")
    # The same --max-total-tokens, the same bytes: the arena rounds up to whole pages plus one reserve page.
    assert base_bytes <= stats["pool_bytes"] <= base_bytes + 2 * stats["pages"]["page_bytes"]
    assert stats["pool_bytes"] == stats["arena_bytes"] == stats["pages"]["total"] * stats["pages"]["page_bytes"]
    assert stats["fp16_capacity_tokens"] >= base_capacity  # nothing is split off at start-up
    assert capacity > 3 * base_capacity
    assert stats["capacity_vs_fp16"] > 3.0
    log = fade_small.log_text()
    assert "[fade] tiered KV arena:" in log and "Tree cache initialized: source=registered('fade')" in log


# ----------------------------------------------------------------------------- fidelity


def test_safe_preset_matches_uncompressed(baseline: ServerProcess, fade_safe: ServerProcess, tokenizer: Any) -> None:
    for seed in (1, 2):
        ids = _ids(tokenizer, 40, seed)  # 40 + 64 tokens stay inside sinks (16) + recent window (256)
        want = baseline.generate(input_ids=ids, max_new_tokens=64)["output_ids"]
        got = fade_safe.generate(input_ids=ids, max_new_tokens=64)["output_ids"]
        assert got == want


def _teacher_forced_top1(srv: ServerProcess, full: list[int], start: int) -> list[int]:
    """Top-1 prediction at every position >= start of ``full`` in one prefill (positions < start may be cached)."""
    out = srv.request("/generate", {"input_ids": full, "return_logprob": True, "logprob_start_len": start,
                                    "top_logprobs_num": 1,
                                    "sampling_params": {"max_new_tokens": 1, "temperature": 0}})
    tops = out["meta_info"]["input_top_logprobs"]
    return [entry[0][1] for entry in tops[1:]]  # entry i+1 predicts full[start + i + 1]


def test_demoted_greedy_match_rate(baseline: ServerProcess, fade_small: ServerProcess, tokenizer: Any) -> None:
    """Divergence once demotion happens, measured two ways on the seeded random tiny model.

    * free-running greedy over 72 tokens: the pool is far from full, so nothing of a running
      request is compressed (running demotion is memory-pressure relief only) and the output is
      the baseline's token for token. (Running demotion under pressure: tests/test_elastic_benchmark.py.)
    * teacher-forced top-1 agreement of 72 continuation positions attending over a cached
      prompt that idled into the packed tiers: asserted. HF simulation on this model:
      INT4 prefix 0.50, INT2 prefix 0.17, broken reads (noise / scrambled channels) <= 0.03.
    """
    def running_demotions() -> int:
        return sum(fade_small.fade_stats()["radix"]["demoted_tokens"].get("running", {}).values())

    rates, prefix, agreement, moved = [], [], [], 0
    for seed in (3, 4, 5):
        ids = _ids(tokenizer, 48, seed)
        want = baseline.generate(input_ids=ids, max_new_tokens=LONG_NEW_TOKENS)["output_ids"]
        before = running_demotions()  # counters restart at /flush_cache, so count per prompt
        got = fade_small.generate(input_ids=ids, max_new_tokens=LONG_NEW_TOKENS)["output_ids"]
        moved += running_demotions() - before
        assert len(got) == len(want) == LONG_NEW_TOKENS
        rates.append(sum(a == b for a, b in zip(got, want)) / LONG_NEW_TOKENS)
        prefix.append(next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), LONG_NEW_TOKENS))

        # Cache the prompt, let it idle into the packed tiers, then score the continuation through it.
        _cache_and_age(fade_small, ids)
        full = ids + want
        preds = _teacher_forced_top1(fade_small, full, len(ids) - 1)
        agreement.append(sum(p == t for p, t in zip(preds, full[len(ids):])) / len(want))
    print(f"\nfree-running greedy match per prompt {rates} (first divergence at {prefix}); "
          f"teacher-forced top-1 agreement through the demoted prefix {agreement}; running demotions {moved} tokens")
    assert moved == 0, "a running request was compressed although the pool had room at full precision"
    assert rates == [1.0, 1.0, 1.0], f"greedy outputs differ from the baseline without any running compression: {prefix}"
    assert sum(agreement) / len(agreement) >= MIN_TEACHER_FORCED_AGREEMENT


def test_triton_backend_serves_what_the_torch_reference_serves(fade_small: ServerProcess, fade_triton: ServerProcess,
                                                                 tokenizer: Any) -> None:
    """The fused mixed-tier kernels behind a real server give the torch reference's predictions; the torch
    server runs the overlap schedule (demotion between overlapped steps), the Triton one does not."""
    assert "attention backend fade_triton (Triton mixed-tier kernels)" in fade_triton.log_text()
    assert fade_small.request("/server_info")["disable_overlap_schedule"] is False
    assert fade_triton.request("/server_info")["disable_overlap_schedule"] is True
    ids = _ids(tokenizer, 48, 7)
    cont = fade_small.generate(input_ids=ids, max_new_tokens=24)["output_ids"]
    agreement = []
    for srv in (fade_small, fade_triton):
        _cache_and_age(srv, ids)
        # Both backends hand the pool their prefill queries: every layer's keys round for them.
        assert srv.fade_stats()["query_aware_key_layers"] == 2
        agreement.append(_teacher_forced_top1(srv, ids + cont, len(ids) - 1))
    same = sum(a == b for a, b in zip(*agreement)) / len(cont)
    print(f"\ntriton vs torch: teacher-forced top-1 agreement {same:.3f}")
    assert same >= 0.95


def test_aggressive_cold_tier_serves_3_bit_values(baseline: ServerProcess, fade_aggressive: ServerProcess,
                                                  tokenizer: Any) -> None:
    """A cached prompt idles into aggressive's cold tier (k4v3: the 3-bit values' two code planes) and the
    continuation is scored through it. Agreement bar as in test_demoted_greedy_match_rate: broken reads
    give <= 0.03 on this model, INT4 about 0.5, INT2 about 0.17."""
    stats = fade_aggressive.fade_stats()
    assert _tier_names(stats)[2] == "k4v3"
    agreement = []
    for seed in (3, 4):
        ids = _ids(tokenizer, 48, seed)
        want = baseline.generate(input_ids=ids, max_new_tokens=24)["output_ids"]
        _cache_and_age(fade_aggressive, ids, tier="cold")
        preds = _teacher_forced_top1(fade_aggressive, ids + want, len(ids) - 1)
        agreement.append(sum(p == t for p, t in zip(preds, want)) / len(want))
    print(f"\nteacher-forced top-1 agreement through a k4v3 prefix {agreement}")
    assert sum(agreement) / len(agreement) >= 0.2


def test_prometheus_gauges_follow_the_tiers(fade_small: ServerProcess, tokenizer: Any) -> None:
    fade_small.generate(input_ids=_ids(tokenizer, 48, 11), max_new_tokens=8)
    time.sleep(2.0)  # the gauges refresh about once a second from the scheduler loop
    fade_small.generate(input_ids=_ids(tokenizer, 8, 12), max_new_tokens=2)
    with urllib.request.urlopen(fade_small.base_url + "/metrics", timeout=30) as resp:
        text = resp.read().decode()
    gauges = {line.split(" ")[0]: float(line.split(" ")[-1]) for line in text.splitlines()
              if line.startswith("fade_kv_")}
    for tier in _tier_names(fade_small.fade_stats()):
        assert any(k.startswith("fade_kv_tier_tokens{") and f'tier="{tier}"' in k for k in gauges), sorted(gauges)
    used = sum(v for k, v in gauges.items() if k.startswith("fade_kv_tier_tokens{"))
    assert used > 0 and any(k.startswith("fade_kv_compression_ratio") for k in gauges)


def test_protected_layer_server_keeps_the_bytes_and_serves_demoted_history(
        fade_small: ServerProcess, fade_protected: ServerProcess, tokenizer: Any) -> None:
    """A protected layer's bigger pages come out of the same KV bytes (fewer fp16 tokens, not more memory),
    and the server serves, demotes and frees them under SGLang's strict per-step memory check."""
    small, prot = fade_small.fade_stats(), fade_protected.fade_stats()
    assert "[fade] protected layers 1: k8v4 -> k8v8, int4 -> k8v4" in fade_protected.log_text()
    assert abs(prot["pool_bytes"] - small["pool_bytes"]) <= 2 * prot["pages"]["page_bytes"]
    assert 0.6 * small["fp16_capacity_tokens"] < prot["fp16_capacity_tokens"] < small["fp16_capacity_tokens"]
    assert prot["capacity_tokens"] > 2.5 * prot["fp16_capacity_tokens"]
    initial = prot
    ids = _ids(tokenizer, 48, 21)
    _cache_and_age(fade_protected, ids)
    full = ids + fade_small.generate(input_ids=ids, max_new_tokens=24)["output_ids"]
    preds = _teacher_forced_top1(fade_protected, full, len(ids) - 1)
    assert len(preds) == 24
    with ThreadPoolExecutor(max_workers=4) as pool:  # running demotion (tiny windows) on several requests
        outs = list(pool.map(lambda s: fade_protected.generate(input_ids=_ids(tokenizer, 40, s), max_new_tokens=48),
                             range(30, 34)))
    assert all(len(o["output_ids"]) == 48 for o in outs)
    fade_protected.flush_cache()
    after = fade_protected.fade_stats()
    # every page back on the free list (page 0 keeps the padding); the first snapshot may still have held the
    # server's warm-up request in the tree
    assert after["pages"]["free"] == after["pages"]["total"] - 1 and after["tokens"] == 0
    assert after["pages"]["total"] == initial["pages"]["total"]
    log = fade_protected.log_text()
    assert "Traceback" not in log and "memory leak" not in log.lower()


# ----------------------------------------------------------------------------- multi-turn


def _session(srv: ServerProcess, tokenizer: Any, system: list[int], sid: int) -> list[dict[str, Any]]:
    history: list[int] = []
    metas = []
    for turn in range(4):
        history += _ids(tokenizer, 10, 100 + 10 * sid + turn)  # the user's turn
        out = srv.generate(input_ids=system + history, max_new_tokens=12)
        history += out["output_ids"]
        metas.append(out["meta_info"])
    return metas


def test_multi_turn_sessions_share_prefix_and_age(fade_small: ServerProcess, tokenizer: Any) -> None:
    fade_small.flush_cache()
    initial = fade_small.fade_stats()
    assert initial["tokens"] == 0
    system = _ids(tokenizer, 48, 99)
    # Cache the system prompt as a shared node first: two requests branching right after it
    # make it a prefix of two leaves, which the policy keeps fp16 from then on. (A single
    # warm-up request would leave an unshared leaf that idle demotion may take before the
    # sessions lock it, if the machine is slow enough to let warm_idle_seconds pass.)
    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(lambda tail: fade_small.generate(input_ids=system + [tail], max_new_tokens=1), (5, 6)))
    warm_tree = fade_small.fade_stats()["radix"]["tree_tokens"]
    assert warm_tree["fp16"] >= len(system), f"shared system prompt left fp16 before the sessions: {warm_tree}"
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda s: _session(fade_small, tokenizer, system, s), range(8)))
    for metas in results:
        assert len(metas) == 4
        for meta in metas:
            assert meta["finish_reason"]["type"] == "length"
            assert meta["cached_tokens"] >= len(system) - 1  # at least the system prompt came from the tree

    time.sleep(4)  # > warm_idle_seconds: idle branches age fp16 -> int4
    fade_small.generate(input_ids=[5, 6, 7], max_new_tokens=1)  # one more step so the scheduler runs demote_idle
    stats = fade_small.fade_stats()
    tree = stats["radix"]["tree_tokens"]
    print("\nafter 8x4 turns + idle:", json.dumps({"tree": tree, "demoted": stats["radix"]["demoted_tokens"],
                                                     "evicted": stats["radix"]["evicted_tokens"],
                                                     "ratio": stats["compression_ratio"]}))
    assert tree["warm"] + tree["cold"] > 0, "older turns must have been demoted"
    assert stats["radix"]["demoted_tokens"].get("idle"), "idle demotion must have run"
    # The shared system prompt is hot (hit by every session): it stays fp16; the rest aged out
    # (each unshared branch keeps at most its first sink tokens in fp16; the probe adds 3).
    assert len(system) <= tree["fp16"] <= len(system) + 4 * 10
    assert stats["compression_ratio"] > 1.5

    fade_small.flush_cache()
    after = fade_small.fade_stats()
    for name, tier in after["tiers"].items():  # every page back on the free list (page 0 keeps the padding)
        assert tier["used"] == 0 and tier["available"] == initial["tiers"][name]["available"], name
    assert after["pages"]["free"] == initial["pages"]["free"] == after["pages"]["total"] - 1
    log = fade_small.log_text()
    assert "Mem Leak" not in log and "memory leak" not in log
    assert "Traceback" not in log
