"""The core store on its own (no SGLang): writes, demotion, all-or-nothing failure; the core imports no SGLang."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from fade_sglang.config import FadeConfig
from fade_sglang.eval.synthetic import synthetic_kv
from fade_sglang.pool import Tier
from fade_sglang.pool.tiered_store import TieredKVStore

LAYERS, HEADS, DIM = 2, 2, 64



def make_store(**kwargs) -> TieredKVStore:
    return TieredKVStore(3000, torch.float32, HEADS, DIM, LAYERS, "cpu", FadeConfig.from_preset("balanced"), **kwargs)


def filled(store: TieredKVStore, n: int) -> torch.Tensor:
    slots = store.alloc(n)
    for layer in range(LAYERS):
        k, v = synthetic_kv(n, HEADS, DIM, seed=layer)
        store.write_kv(layer, slots, k, v)
    return slots


def snapshot(store: TieredKVStore, slots: torch.Tensor) -> tuple:
    reads = [store.read_kv(layer, slots) for layer in range(LAYERS)]
    return [store.available(t) for t in Tier], dict(store.demoted_tokens), reads


def test_core_modules_import_without_sglang() -> None:
    code = ("import sys, fade_sglang.config, fade_sglang.quant, fade_sglang.pool.tiered_store, "
            "fade_sglang.radix.policy, fade_sglang.attention.reference; "
            "bad = sorted(m for m in sys.modules if m == 'sglang' or m.startswith('sglang.')); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_store_writes_demotes_and_reads_back() -> None:
    store = make_store()
    slots = filled(store, 64)
    exact = [store.read_kv(layer, slots) for layer in range(LAYERS)]
    new = store.demote(slots[16:48], Tier.WARM)
    assert (store.tier_of(new) == Tier.WARM).all()
    slots[16:48] = new
    for layer in range(LAYERS):
        k, v = store.read_kv(layer, slots)
        assert torch.equal(k[:16], exact[layer][0][:16])  # fp16 tier untouched
        err = (k[16:48] - exact[layer][0][16:48]).norm() / exact[layer][0][16:48].norm()
        assert 0 < err < 0.1  # quantized, within INT4 tolerance
    assert store.demoted_tokens[(Tier.FP16, Tier.WARM)] == 32


def test_failed_demotion_changes_nothing() -> None:
    """A quantize launch that fails mid-way (second chunk of a fp16 + warm batch) leaves slots,
    free lists, counters and values exactly as they were."""
    store = make_store()
    slots = filled(store, 64)
    slots[:16] = store.demote(slots[:16], Tier.WARM)  # first demotion freezes the key centers
    calls = []

    def failing_kernel(*args, **kwargs) -> None:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected launch failure")
        from fade_sglang.kernels import quantize_rows

        quantize_rows(*args, **kwargs)

    store.quantize_rows_fn = failing_kernel
    before = snapshot(store, slots)
    with pytest.raises(RuntimeError, match="injected"):
        store.demote(slots[:40], Tier.COLD)  # warm part and fp16 part: two launches
    after = snapshot(store, slots)
    assert before[0] == after[0] and before[1] == after[1]
    for (k0, v0), (k1, v1) in zip(before[2], after[2]):
        assert torch.equal(k0, k1) and torch.equal(v0, v1)
    assert len(calls) == 2
