"""The shared byte arena in pages (:mod:`fade_sglang.pool.pages`) and the tiers living in it.

* ``choose_page_geometry``: pages tile fp16 rows and packed records exactly, with little padding.
* ``PageTable`` on its own: claim / release, the packed-only reserve, per-tier caps.
* A seeded random model check of :class:`TieredKVStore` (alloc, free, demote, page retagging, eviction,
  misuse) against a Python model of the live slots and the K/V each must read back, with the page
  table's invariants checked after every operation. Page membership is computed from the *byte*
  addresses of the tensors the store reads and writes (not from the allocator's own arithmetic), so a
  slot counted on one page while its bytes live on another is caught.
* Capacity: the fp16 tier alone holds ``size`` tokens, and a page freed by demotion serves another tier.
* ``tier_max_share`` caps the pages of a packed tier.
"""

from __future__ import annotations

import random
import time

import pytest
import torch

from fade_sglang.config import FadeConfig
from fade_sglang.pool import (PagedRows, PageGeometry, PageTable, PoolExhaustedError, SlotError, Tier,
                              choose_page_geometry)
from fade_sglang.pool.tiered_store import TieredKVStore
from fade_sglang.quant import QuantFormat

LAYERS, HEADS, DIM = 2, 2, 64
FREE = PageTable.FREE
# Decoding a packed record goes through a matmul (the rotation) whose rounding depends on the batch,
# so packed slots are compared bit-exactly on their stored bytes and to this tolerance once decoded.
DECODE_TOL = dict(rtol=1e-5, atol=1e-4)
# Per token (all layers, K and V): max |read - original| / value range, and the relative L2 error
# ||read - original|| / ||original - mean||. Measured: INT4 <= 0.05 / 0.10, INT2 (also via INT4)
# <= 0.2 / 0.35; another token's record reads >= 0.45 / 1.1, so a misplaced record fails.
ERR_BOUND = {Tier.WARM: (0.2, 0.2), Tier.COLD: (0.5, 0.7)}
OUTLIER_CHANNELS = torch.tensor([3, 17, 40])



@pytest.fixture(autouse=True)
def one_thread():
    """Thousands of tiny tensor ops: intra-op threads only add overhead (and stall on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ====================================================================== geometry

REALISTIC = [(h, d, e) for h in (1, 2, 3, 4, 8) for d in (64, 80, 96, 128, 256) for e in (2, 4)]


def _payloads(heads: int, head_dim: int, fmts=(QuantFormat(4, 64), QuantFormat(2, 32))) -> tuple[int, ...]:
    return tuple(heads * f.bytes_per_token_head(head_dim) for f in fmts)


def _check_tiling(g: PageGeometry, fp16_row_bytes: int, payloads: tuple[int, ...]) -> None:
    assert g.payload_bytes == (fp16_row_bytes, *payloads)
    assert g.rows_per_page[0] * fp16_row_bytes == g.page_bytes
    assert g.record_bytes[0] == fp16_row_bytes
    assert 16 <= g.rows_per_page[0] <= 256
    for t, payload in enumerate(payloads, start=1):
        rows, rec = g.rows_per_page[t], g.record_bytes[t]
        if payload == 0:  # disabled tier
            assert rows == 0 and rec == 0
            continue
        assert rows > 0
        assert rows * rec == g.page_bytes, "records must tile the page exactly"
        assert rec >= payload and rec % 2 == 0, "a record holds its payload and keeps fp16 scales aligned"
        # the most records of an even size >= payload that tile the page
        assert not any(g.page_bytes % r == 0 and (g.page_bytes // r) % 2 == 0
                       for r in range(rows + 1, g.page_bytes // payload + 1))
        assert g.waste(t) == pytest.approx(1 - rows * payload / g.page_bytes)
        assert 0 <= g.waste(t) < 1


@pytest.mark.parametrize("heads,head_dim,elem", REALISTIC)
def test_geometry_tiles_realistic_shapes_with_little_waste(heads: int, head_dim: int, elem: int) -> None:
    fp16_row = heads * head_dim * elem
    payloads = _payloads(heads, head_dim)
    g = choose_page_geometry(fp16_row, payloads)
    _check_tiling(g, fp16_row, payloads)
    assert max(g.waste(1), g.waste(2)) <= 0.005
    # denser tiers hold more rows per page: the point of compressing
    assert g.rows_per_page[0] < g.rows_per_page[1] < g.rows_per_page[2]
    # INT8 and a single packed tier tile as well
    for fmts in ((QuantFormat(8, 32),), (QuantFormat(4, 32), QuantFormat(8, 64))):
        p = _payloads(heads, head_dim, fmts)
        g2 = choose_page_geometry(fp16_row, p)
        _check_tiling(g2, fp16_row, p)
        assert max(g2.waste(t) for t in range(1, len(p) + 1)) <= 0.005


def test_geometry_disabled_tiers_and_awkward_payloads() -> None:
    g = choose_page_geometry(256, (72, 0))  # cold disabled
    _check_tiling(g, 256, (72, 0))
    g = choose_page_geometry(256, (0, 0))  # plain fp16 pool: the smallest page
    assert g.rows_per_page == (16, 0, 0) and g.page_bytes == 16 * 256
    rng = random.Random(7)
    for _ in range(300):  # odd and prime payloads: records get padded, but always tile exactly
        row = 2 * rng.randint(1, 600)
        payloads = tuple(rng.choice([0, rng.randint(1, 3 * row)]) for _ in range(rng.randint(1, 3)))
        _check_tiling(choose_page_geometry(row, payloads), row, payloads)


@pytest.mark.parametrize("row,payloads", [(0, (72, 48)), (-256, (72,)), (255, (72, 48)), (1, ()),
                                          (2, (10_000,)), (256, (256 * 256 + 2,))])
def test_geometry_rejects_bad_input(row: int, payloads: tuple[int, ...]) -> None:
    with pytest.raises(ValueError):
        choose_page_geometry(row, payloads)


# ====================================================================== page table / rows


def test_page_table_claim_release_reserve_and_caps() -> None:
    table = PageTable(6, "cpu", reserve_pages=1, max_pages=(6, 2, 6))
    assert table.free_pages() == 6 and table.claimable(0) == 5 and table.claimable(1) == 2
    assert table.claim(0, 2) == [0, 1]  # fp16: lowest pages first
    assert table.claim(1, 2) == [5, 4]  # packed tiers: highest pages first (fp16 fills from the bottom)
    assert table.claimable(1) == 0  # at its cap although pages are free
    with pytest.raises(PoolExhaustedError):
        table.claim(1, 1)
    assert table.claimable(0) == 1 and table.claimable(2) == 2  # fp16 leaves the reserve page
    with pytest.raises(PoolExhaustedError):
        table.claim(0, 2)
    assert table.owner == [0, 0, FREE, FREE, 1, 1] and table.owned == [2, 2, 0]
    table.release([4, 0])
    assert table.owner == [FREE, 0, FREE, FREE, FREE, 1] and table.owned == [1, 1, 0]
    assert sorted(table.free_list) == [0, 2, 3, 4] and table.free_list[-1] == 0
    with pytest.raises(SlotError):
        table.release([4])
    assert table.claim(2, 1) == [4]  # a page warm gave back serves the cold tier
    assert table.claim(0, 1) == [0]  # and one fp16 gave back serves fp16 again
    with pytest.raises(ValueError):
        PageTable(0, "cpu")


def test_paged_rows_return_pages_and_reject_bad_frees() -> None:
    table = PageTable(4, "cpu")
    a = PagedRows("a", 0, 0, 4, table, pinned_rows=1)
    b = PagedRows("b", 1, 100, 8, table)
    assert table.owner[0] == 0 and int(table.live[0]) == 1 and a.available() == 3 + 3 * 4
    x = a.alloc(5)  # rows 1..3 of page 0, then page 1
    assert x.tolist() == [1, 2, 3, 4, 5] and table.owner[:2] == [0, 0] and table.live.tolist() == [4, 2, 0, 0]
    y = b.alloc(9)  # pages 2 and 3
    assert table.owner == [0, 0, 1, 1] and a.available() == 2 and b.try_alloc(8) is None
    a.free(x[3:])  # page 1 empties: back to the table, its rows leave a's free list
    assert table.owner[1] == FREE and a.available() == 4 and b.available() == 7 + 8
    with pytest.raises(SlotError):
        a.free(x[3:4])  # double free
    with pytest.raises(SlotError):
        b.free(torch.tensor([y[0], y[0]]))  # the same slot twice in one free
    with pytest.raises(SlotError):
        b.free(torch.tensor([99]))  # outside the tier's range
    b.free(y)
    a.free(x[:3])
    assert table.owner == [0, FREE, FREE, FREE] and table.live.tolist() == [1, 0, 0, 0]
    assert a.used() == 0 and b.used() == 0


# ====================================================================== the store, model-checked


def make_store(size: int = 300, dtype: torch.dtype = torch.float32, cfg: FadeConfig | None = None) -> TieredKVStore:
    return TieredKVStore(size, dtype, HEADS, DIM, LAYERS, "cpu", cfg or FadeConfig.from_preset("balanced"))


def gen_kv(gen: torch.Generator, n: int) -> torch.Tensor:
    """Distinct K/V ``[n, layers, 2, H, D]``: gaussian, outlier channels, a per-token offset (never zero)."""
    x = torch.randn(n, LAYERS, 2, HEADS, DIM, generator=gen)
    x[..., OUTLIER_CHANNELS] *= 8.0
    return x + torch.randn(n, LAYERS, 2, HEADS, 1, generator=gen)


def write(store: TieredKVStore, slots: torch.Tensor, x: torch.Tensor) -> None:
    for layer in range(LAYERS):
        store.write_kv(layer, slots, x[:, layer, 0], x[:, layer, 1])


def read(store: TieredKVStore, slots: torch.Tensor) -> torch.Tensor:
    return torch.stack([torch.stack(store.read_kv(layer, slots), dim=1) for layer in range(LAYERS)], dim=1)


def quant_error(got: torch.Tensor, orig: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    got, orig = got.flatten(1), orig.flatten(1)
    max_rel = (got - orig).abs().amax(1) / (orig.amax(1) - orig.amin(1))
    l2_rel = (got - orig).norm(dim=1) / (orig - orig.mean(1, keepdim=True)).norm(dim=1)
    return max_rel, l2_rel


class ByteAddress:
    """Page of each slot computed from the byte offsets of the tensors the store reads and writes."""

    def __init__(self, store: TieredKVStore):
        self.page_bytes = store.geometry.page_bytes
        arena0 = store.arena[0, 0]
        self.offset, self.stride = {}, {}
        fp = store.k_buffer[0]
        elem = fp.element_size()
        self.offset[Tier.FP16] = fp.storage_offset() * elem - arena0.storage_offset()
        self.stride[Tier.FP16] = fp.stride(0) * elem
        assert self.stride[Tier.FP16] == HEADS * DIM * elem
        for t, s in store.stores.items():
            assert s.key.data.untyped_storage().data_ptr() == store.arena.untyped_storage().data_ptr(), \
                "packed records must live in the arena's bytes"
            self.offset[t] = s.key.data[0].storage_offset() - arena0.storage_offset()
            self.stride[t] = s.key.data.stride(1)
        self.layout = store.layout
        self.last_byte = store.pages * self.page_bytes
        self.arena = store.arena
        self.payload = store.geometry.payload_bytes
        self._off = torch.tensor([self.offset.get(t, 0) for t in Tier])
        self._stride = torch.tensor([self.stride.get(t, 0) for t in Tier])
        # row of a slot in its tier's tensor = slot - this (the fp16 buffer is indexed by the global slot)
        self._local_base = torch.tensor([0 if t == Tier.FP16 else store.layout.base(t) for t in Tier])
        for t in self.offset:
            probe = torch.tensor([store.layout.base(t), store.layout.base(t) + 5])
            assert torch.equal(probe - self._local_base[t], self.layout.local_index(probe, t))

    def start(self, slots: torch.Tensor, tier: int) -> torch.Tensor:
        return self.offset[tier] + self.layout.local_index(slots, Tier(tier)) * self.stride[tier]

    def raw(self, slots: torch.Tensor, tier: int) -> torch.Tensor:
        """The stored bytes of ``slots`` (one tier; padding excluded): ``uint8 [n, layers, 2, payload]``."""
        idx = self.start(slots, tier)[:, None] + torch.arange(self.payload[tier])
        return self.arena[:, :, idx].permute(2, 0, 1, 3)

    def page_of(self, slots: torch.Tensor, tiers: torch.Tensor) -> torch.Tensor:
        stride = self._stride[tiers]
        start = self._off[tiers] + (slots - self._local_base[tiers]) * stride
        end = start + stride - 1
        assert bool((start >= 0).all()) and bool((end < self.last_byte).all()), "slot outside the arena"
        page = start // self.page_bytes
        assert torch.equal(page, end // self.page_bytes), "a row straddles two pages"
        return page


def state_snapshot(store: TieredKVStore) -> dict:
    pt = store.page_table
    return {
        "owner": list(pt.owner), "live": pt.live.clone(), "free_list": list(pt.free_list), "owned": list(pt.owned),
        "free_slots": [a.free_slots.clone() for a in store.allocators],
        "owned_mask": [a.owned_mask() for a in store.allocators],
        "used": [store.used(t) for t in Tier], "available": [store.available(t) for t in Tier],
        "demoted": dict(store.demoted_tokens), "arena": store.arena.clone(), "center": store.k_center.clone(),
    }


def assert_unchanged(before: dict, store: TieredKVStore) -> None:
    after = state_snapshot(store)
    for key, value in before.items():
        other = after[key]
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, other), f"{key} changed"
        elif isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
            assert all(torch.equal(a, b) for a, b in zip(value, other)), f"{key} changed"
        else:
            assert value == other, f"{key} changed"


class Model:
    """What the store must hold: tier of every live slot (-1 = free), the K/V it must read back
    (bit-exactly for fp16; packed: the stored record bytes, bit-exactly) and the original values
    (to bound the quantization error of packed slots)."""

    def __init__(self, store: TieredKVStore, seed: int):
        self.store = store
        self.rng = random.Random(seed)
        self.check_rng = random.Random(seed + 1)  # the checks' samples do not perturb the operations
        self.gen = torch.Generator().manual_seed(seed)
        end = store.layout.end
        self.tier = torch.full((end,), -1, dtype=torch.int64)
        self.expect = torch.zeros(end, LAYERS, 2, HEADS, DIM)
        self.orig = torch.zeros(end, LAYERS, 2, HEADS, DIM)
        self.addr = ByteAddress(store)
        self.raw = torch.zeros(end, LAYERS, 2, max(self.addr.payload[1:]), dtype=torch.uint8)
        self.rows = store.geometry.rows_per_page
        self.fresh_available = [store.available(t) for t in Tier]
        self.last_owner = list(store.page_table.owner)
        self.retags = 0  # pages that went from one tier to another (through the free list)
        self.counts: dict[str, int] = {}

    # ------------------------------------------------------------------ model helpers
    def live(self, tier: int | None = None) -> torch.Tensor:
        mask = self.tier >= 0 if tier is None else self.tier == tier
        return mask.nonzero().squeeze(1)

    def sample(self, slots: torch.Tensor, k: int, rng: random.Random | None = None) -> torch.Tensor:
        idx = (rng or self.rng).sample(range(slots.numel()), min(k, slots.numel()))
        return slots[torch.tensor(idx, dtype=torch.int64)]

    def count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1

    def check_new_slots(self, new: torch.Tensor, n: int, tier: int) -> None:
        assert new.numel() == n
        assert torch.unique(new).numel() == n, "the same slot handed out twice"
        assert bool((self.tier[new] == -1).all()), "a live slot handed out again"
        assert bool((store_tier := self.store.tier_of(new)).eq(tier).all()), f"tier_of {store_tier} != {tier}"
        assert bool((new >= self.store.layout.page_size).all()), "the padding slot handed out"

    def record(self, slots: torch.Tensor, tier: int) -> None:
        """Packed slots just written: from now on they must hold exactly these bytes and values."""
        if slots.numel() == 0:
            return
        self.expect[slots] = read(self.store, slots)
        self.raw[slots, :, :, :self.addr.payload[tier]] = self.addr.raw(slots, tier)
        self.check_close(slots, tier)

    def check_close(self, slots: torch.Tensor, tier: int) -> None:
        max_rel, l2_rel = quant_error(self.expect[slots], self.orig[slots])
        bound_max, bound_l2 = ERR_BOUND[Tier(tier)]
        assert float(max_rel.max()) < bound_max, f"{Tier(tier).name} max error {float(max_rel.max()):.3f}"
        assert float(l2_rel.max()) < bound_l2, f"{Tier(tier).name} l2 error {float(l2_rel.max()):.3f}"

    def fp16_expect(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.store.kv_fp16.dtype).float()

    def drop(self, slots: torch.Tensor) -> None:
        self.tier[slots] = -1

    # ------------------------------------------------------------------ operations
    def op_alloc(self, tier: int = Tier.FP16) -> None:
        r = self.rng.random()
        n = (self.rng.randint(1, 24) if r < 0.7 else self.rng.randint(25, 120) if r < 0.95
             else self.rng.randint(121, 330))
        if self.rng.random() < 0.02:
            n = 0
        before_avail = self.store.available(tier)
        before = state_snapshot(self.store) if n > before_avail else None
        new = self.store.try_alloc(n, tier)
        if n > before_avail:
            assert new is None, f"try_alloc({n}) succeeded with {before_avail} available"
            assert_unchanged(before, self.store)
            self.count(f"alloc{int(tier)}-full")
            return
        assert new is not None, f"try_alloc({n}) failed with {before_avail} available"
        self.check_new_slots(new, n, tier)
        if n == 0:
            return
        x = gen_kv(self.gen, n)
        write(self.store, new.to(torch.int32) if self.rng.random() < 0.2 else new, x)
        self.tier[new] = int(tier)
        self.orig[new] = x
        if tier == Tier.FP16:
            self.expect[new] = self.fp16_expect(x)
        else:  # a packed slot written directly is quantized on write
            self.record(new, tier)
        self.count(f"alloc{int(tier)}")

    def op_alloc_packed(self) -> None:
        self.op_alloc(self.rng.choice([Tier.WARM, Tier.COLD]))

    def op_free(self, slots: torch.Tensor | None = None) -> None:
        live = self.live()
        if slots is None:
            if live.numel() == 0:
                return
            slots = self.sample(live, self.rng.randint(1, 40))
        self.store.free(slots.to(torch.int32) if self.rng.random() < 0.2 else slots)
        self.drop(slots)
        self.count("free")

    def op_demote(self) -> None:
        to = Tier.WARM if self.rng.random() < 0.5 else Tier.COLD
        pick = []
        k = self.rng.randint(1, 24) if self.rng.random() < 0.7 else self.rng.randint(25, 150)
        sources = ([Tier.FP16] if to == Tier.WARM
                   else self.rng.choice([[Tier.FP16], [Tier.WARM], [Tier.FP16, Tier.WARM]]))
        for t in sources:
            pick.append(self.sample(self.live(t), k))
        if self.rng.random() < 0.2:  # slots already in the target tier come back unchanged
            pick.append(self.sample(self.live(to), 5))
        slots = torch.cat(pick)
        if slots.numel() == 0:
            return
        slots = slots[torch.randperm(slots.numel(), generator=self.gen)]
        tiers = self.tier[slots]
        move = tiers < to
        n_move = int(move.sum())
        avail = self.store.available(to)
        # refused exactly when the target tier has too few rows (a surprise refusal fails the assert below)
        before = state_snapshot(self.store) if n_move > avail else {"demoted": dict(self.store.demoted_tokens)}
        try:
            out = self.store.demote(slots, to)
        except PoolExhaustedError:
            assert n_move > avail, f"demote of {n_move} refused with {avail} available"
            assert_unchanged(before, self.store)
            self.count(f"demote{int(to)}-full")
            return
        assert n_move <= avail, f"demote of {n_move} succeeded with only {avail} available"
        assert out.shape == slots.shape
        assert torch.equal(out[~move], slots[~move])
        new = out[move]
        self.check_new_slots(new, n_move, to)
        for src in (t for t in Tier if t < to):
            n_src = int((tiers[move] == src).sum())
            assert self.store.demoted_tokens[(src, to)] - before["demoted"][(src, to)] == n_src
        old = slots[move]
        self.tier[old] = -1
        self.tier[new] = int(to)
        self.orig[new] = self.orig[old]
        self.record(new, to)
        self.count(f"demote{int(to)}")

    def op_retag(self) -> None:
        """Free every live slot of one page: it goes back to the free list for any tier to claim."""
        live = self.live()
        if live.numel() == 0:
            return
        pages = self.addr.page_of(live, self.tier[live])
        p = int(pages[self.rng.randrange(pages.numel())])
        self.op_free(live[pages == p])
        pt = self.store.page_table
        if p == 0:
            assert pt.owner[0] == Tier.FP16 and int(pt.live[0]) == self.store.layout.page_size
        else:
            assert pt.owner[p] == FREE and pt.free_list.count(p) == 1
        self.count("retag")

    def op_evict(self) -> None:
        live = self.live()
        if live.numel():
            self.op_free(self.sample(live, int(live.numel() * self.rng.uniform(0.5, 1.0)) or 1))
            self.count("evict")

    def op_misuse(self) -> None:
        """Wrong frees and demotions raise SlotError and change nothing."""
        store, live = self.store, self.live()
        choice = self.rng.randrange(7)
        if choice == 0 and live.numel():  # double free
            s = self.sample(live, 1)
            store.free(s)
            self.drop(s)
            bad, call = s, store.free
        elif choice == 1:  # a slot that is not allocated, in any tier's range
            t = self.rng.choice([t for t in Tier if store.layout.capacity(t)])
            base = store.layout.base(t)
            free = (self.tier[base:base + store.layout.capacity(t)] == -1).nonzero().squeeze(1) + base
            if free.numel() == 0:
                return
            bad, call = self.sample(free, 1), store.free
        elif choice == 2:  # the padding slot, and past the end
            bad, call = torch.tensor([self.rng.choice([0, store.layout.end, store.layout.end + 7])]), store.free
        elif choice == 3 and live.numel():  # the same slot twice in one free
            s = self.sample(live, 1)
            bad, call = torch.cat((s, s)), store.free
        elif choice == 4 and (movable := self.live()[self.tier[self.live()] < Tier.COLD]).numel():
            s = self.sample(movable, 1)  # the same slot twice in one demotion that moves it
            bad, call = torch.cat((s, s)), lambda x: store.demote(x, Tier.COLD)
        elif choice == 5 and self.live(Tier.COLD).numel():  # promotion
            bad, call = self.sample(self.live(Tier.COLD), 3), lambda x: store.demote(x, Tier.WARM)
        elif choice == 6 and live.numel():  # demote to the fp16 tier
            bad, call = self.sample(live, 3), lambda x: store.demote(x, Tier.FP16)
        else:
            return
        before = state_snapshot(store)
        with pytest.raises(SlotError):
            call(bad)
        assert_unchanged(before, store)
        self.count(f"misuse{choice}")

    # ------------------------------------------------------------------ invariants
    def quick_check(self) -> None:
        """Constant-time totals, after every operation."""
        store, pt = self.store, self.store.page_table
        n_live = int((self.tier >= 0).sum())
        assert sum(store.used(t) for t in Tier) == n_live
        assert int(pt.live.sum()) == n_live + store.layout.page_size
        assert sum(pt.owned) + pt.free_pages() == store.pages and len(set(pt.free_list)) == pt.free_pages()

    def check(self, deep: bool = True, all_values: bool = False, sample: int = 32) -> None:
        """Page-table invariants and the stored bytes of every live slot; ``deep`` adds the free rows and
        reads a sample back through ``read_kv`` (all live slots with ``all_values``)."""
        store, pt = self.store, self.store.page_table
        live = self.live()
        tiers = self.tier[live]
        assert torch.equal(store.tier_of(live), tiers)
        for t in Tier:
            assert store.used(t) == int((tiers == t).sum())
        assert sum(store.used(t) for t in Tier) == live.numel()

        # every tier's allocated rows are exactly the live slots of that tier (plus the padding slot)
        for t, a in zip(Tier, store.allocators):
            owned = a.owned_mask().nonzero().squeeze(1) + a.base
            want = live[tiers == t]
            if t == Tier.FP16:
                want = torch.cat((torch.arange(store.layout.page_size), want))
            assert torch.equal(owned, want), f"{t.name}: allocator rows differ from the live slots"

        # pages, from byte addresses
        pages = self.addr.page_of(live, tiers)
        page_size = store.layout.page_size
        pad_pages = self.addr.page_of(torch.arange(page_size), torch.zeros(page_size, dtype=torch.int64))
        assert bool((pad_pages == 0).all()), "the padding slot lives on page 0"
        count = torch.bincount(pages, minlength=store.pages) + torch.bincount(pad_pages, minlength=store.pages)
        assert torch.equal(pt.live.long(), count), "page_table.live differs from the live slots on each page"
        owner = torch.tensor(pt.owner)
        assert torch.equal(owner[pages], tiers), "a live slot sits on a page its tier does not own"
        assert pt.owner[0] == Tier.FP16
        assert torch.equal(owner != FREE, count > 0), "an owned page without live rows, or a free one with some"
        assert len(pt.free_list) == len(set(pt.free_list)), "a page is in the free list twice"
        assert sorted(pt.free_list) == (owner == FREE).nonzero().squeeze(1).tolist()
        assert sum(pt.owned) + pt.free_pages() == store.pages
        for t in Tier:
            assert pt.owned[t] == int((owner == t).sum())
            assert pt.owned[t] <= pt.max_pages[t], f"{t.name} owns more pages than its cap"

        for p, o in enumerate(pt.owner):  # pages that moved between tiers through the free list
            if o != FREE:
                if o != self.last_owner[p]:
                    self.retags += 1
                self.last_owner[p] = o

        # stored bytes of every live slot: a page reused by another tier never overwrote a live row
        fp = live[tiers == Tier.FP16]
        kv = store.kv_fp16[:, :, fp].permute(2, 0, 1, 3, 4)
        bad = fp[(kv != self.expect[fp].to(kv.dtype)).flatten(1).any(1)]
        assert bad.numel() == 0, f"fp16 slots {bad[:8].tolist()} changed"
        for t in (Tier.WARM, Tier.COLD):
            sl = live[tiers == t]
            if sl.numel():
                diff = (self.addr.raw(sl, t) != self.raw[sl, :, :, :self.addr.payload[t]]).flatten(1).any(1)
                assert not bool(diff.any()), f"{t.name} records {sl[diff][:8].tolist()} changed"
        if not deep:
            return

        # free rows, availability and conservation
        for t, a in zip(Tier, store.allocators):
            rpp = self.rows[t]
            fs = a.free_slots
            assert torch.unique(fs).numel() == fs.numel(), f"{t.name}: a free row listed twice"
            if fs.numel():
                ft = torch.full_like(fs, int(t))
                assert bool((self.tier[fs] == -1).all()), f"{t.name}: a live slot on the free list"
                assert bool((store.tier_of(fs) == t).all())
                assert bool((owner[self.addr.page_of(fs, ft)] == t).all()), f"{t.name}: free row on a foreign page"
            mine = owner == t
            assert fs.numel() == int((rpp - count[mine]).sum()), f"{t.name}: free rows lost or invented"
            claimable = len(pt.free_list) - (pt.reserve_pages if t == Tier.FP16 else 0)
            claimable = max(0, min(claimable, pt.max_pages[t] - pt.owned[t]))
            assert store.available(t) == fs.numel() + claimable * rpp
            assert store.used(t) + store.available(t) <= (pt.owned[t] + pt.free_pages()) * rpp
            assert store.available(t) <= self.fresh_available[t]
        assert sum(-(-store.used(t) // self.rows[t]) for t in Tier if store.used(t)) <= store.pages

        # read back through read_kv: fp16 bit-exactly, packed as decoded right after it was written
        check = live if all_values else self.sample(live, sample, self.check_rng)
        if check.numel():
            t_check = self.tier[check]
            got = read(store, check)
            exact = t_check == Tier.FP16
            bad = exact & (got != self.expect[check]).flatten(1).any(1)
            bad |= ~exact & ~torch.isclose(got, self.expect[check], **DECODE_TOL).flatten(1).all(1)
            assert not bool(bad.any()), (f"{int(bad.sum())} live slots changed, e.g. {check[bad][:5].tolist()} "
                                         f"(tiers {self.tier[check[bad][:5]].tolist()})")

    def drain(self) -> None:
        """Free everything: every page but page 0 must come back, and the fp16 capacity with it."""
        store, pt = self.store, self.store.page_table
        live = self.live()
        live = live[torch.randperm(live.numel(), generator=self.gen)]
        for chunk in live.split(97):  # mixed tiers in every free
            store.free(chunk)
            self.drop(chunk)
        self.check()
        assert pt.free_pages() == store.pages - 1
        assert pt.owner[0] == Tier.FP16 and pt.owned == [1, 0, 0]
        assert int(pt.live[0]) == store.layout.page_size and int(pt.live.sum()) == store.layout.page_size
        assert [store.used(t) for t in Tier] == [0, 0, 0]
        assert [store.available(t) for t in Tier] == self.fresh_available
        full = store.alloc(self.fresh_available[Tier.FP16])
        self.check_new_slots(full, self.fresh_available[Tier.FP16], Tier.FP16)
        x = gen_kv(self.gen, full.numel())
        write(store, full, x)
        self.tier[full] = int(Tier.FP16)
        self.expect[full] = self.fp16_expect(x)
        assert store.available(Tier.FP16) == 0 and store.try_alloc(1) is None
        self.check(all_values=True)
        store.free(full)
        self.drop(full)
        assert pt.free_pages() == store.pages - 1


OPS = [("op_alloc", 30), ("op_alloc_packed", 4), ("op_free", 14), ("op_demote", 30), ("op_retag", 6),
       ("op_evict", 1), ("op_misuse", 6)]
FREEING = {"op_free", "op_retag", "op_evict"}


def pick_op(m: Model) -> str:
    """Frees are rare while pages are free: the arena stays near full, where tiers compete for pages."""
    roomy = m.store.page_table.free_pages() > 2
    names, weights = zip(*OPS)
    weights = [w / 4 if roomy and n in FREEING else w for n, w in OPS]
    return m.rng.choices(names, weights)[0]


@pytest.mark.parametrize("dtype,cfg,ops,seed", [
    # clip search off: the page bookkeeping is under test here, not the quantizer (twice as fast)
    (torch.float32, FadeConfig.from_preset("balanced").with_overrides({"clip_search": False}), 10_000, 1234),
    (torch.float16, FadeConfig(tier_max_share={"warm": 1.0, "cold": 0.5}), 1_500, 99),
    # keys at more bits than values: K codes spill into the V half of each record row
    (torch.float16, FadeConfig(clip_search=False, warm_key_bits=8, cold_key_bits=4), 1_500, 7),
], ids=["float32-balanced", "float16-cold-cap", "float16-split-keys"])
def test_random_operations_keep_pages_consistent(dtype: torch.dtype, cfg: FadeConfig, ops: int, seed: int) -> None:
    start = time.perf_counter()
    store = make_store(200, dtype, cfg)  # 13 pages: the arena is full most of the time
    m = Model(store, seed)
    m.check(all_values=True)
    max_packed_pages = 0
    for step in range(ops):
        getattr(m, pick_op(m))()
        m.quick_check()
        if step % 3 == 2:  # the full checks every third operation, reading K/V back every 15th
            m.check(deep=step % 15 == 14, all_values=step % 1000 == 999)
        max_packed_pages = max(max_packed_pages, store.page_table.owned[1] + store.page_table.owned[2])
    m.check(all_values=True)
    m.drain()
    # the run exercised what it claims to: full tiers, refused demotions, pages moving between tiers
    for what in ("alloc0", "alloc0-full", "alloc1", "alloc2", "free", "demote1", "demote2", "retag", "evict",
                 *(f"misuse{i}" for i in range(7))):
        assert m.counts.get(what, 0) > 0, f"{what} never happened: {m.counts}"
    assert m.counts.get("demote1-full", 0) + m.counts.get("demote2-full", 0) > 0, f"no demotion refused: {m.counts}"
    assert m.retags >= ops // 100, f"only {m.retags} pages changed tier"
    assert max_packed_pages >= store.pages // 2
    print(f"{ops} ops in {time.perf_counter() - start:.1f}s, {m.retags} page retags, counts {m.counts}")


# ====================================================================== capacity and page reuse


def test_fp16_alone_holds_size_and_a_demoted_page_serves_another_tier() -> None:
    size = 300
    store = make_store(size)
    rpp = store.geometry.rows_per_page[Tier.FP16]
    pt = store.page_table
    assert store.available(Tier.FP16) >= size
    slots = store.alloc(size)
    assert torch.unique(slots).numel() == size and bool((store.tier_of(slots) == Tier.FP16).all())
    gen = torch.Generator().manual_seed(5)
    x = gen_kv(gen, size)
    write(store, slots, x)
    assert torch.equal(read(store, slots), x)

    # the fp16 rows of page 1 (the fp16 buffer is indexed by slot: page p holds slots [p * rpp, (p + 1) * rpp))
    assert pt.owner[1] == Tier.FP16
    page1 = torch.arange(rpp, 2 * rpp)
    assert bool(torch.isin(page1, slots).all())
    assert pt.owner.count(FREE) == pt.free_pages() == 1  # only the packed-only reserve page is left
    warm = store.demote(page1, Tier.WARM)
    assert bool((store.tier_of(warm) == Tier.WARM).all())
    assert pt.owner[1] == FREE and 1 in pt.free_list, "the emptied fp16 page did not return to the free list"
    assert pt.owned == [store.pages - 2, 1, 0]

    cold_src = slots[~torch.isin(slots, page1)][-10:]
    cold = store.demote(cold_src, Tier.COLD)
    assert pt.owner[1] == Tier.COLD, "the cold tier did not claim the freed page"
    cold_rows = store.layout.local_index(cold, Tier.COLD) * store.geometry.record_bytes[Tier.COLD]
    assert bool((cold_rows // store.geometry.page_bytes == 1).all())

    # everything still reads back: fp16 exactly, packed within quantization error
    keep = ~torch.isin(slots, torch.cat((page1, cold_src)))
    assert torch.equal(read(store, slots[keep]), x[keep])
    for new, orig, tier in ((warm, x[torch.isin(slots, page1)], Tier.WARM),
                            (cold, x[torch.isin(slots, cold_src)], Tier.COLD)):
        max_rel, l2_rel = quant_error(read(store, new), orig)
        assert float(max_rel.max()) < ERR_BOUND[tier][0] and float(l2_rel.max()) < ERR_BOUND[tier][1]


def test_plain_pool_fills_every_fp16_row() -> None:
    """Without packed tiers there is no reserve page: fp16 owns the whole arena, every row in range."""
    store = make_store(300, cfg=FadeConfig(tier_max_share={"warm": 0.0, "cold": 0.0}))
    n = store.available(Tier.FP16)
    assert n == store.layout.fp16_slots >= 300
    slots = store.alloc(n)
    lo, hi = int(slots.min()), int(slots.max())
    assert (lo, hi) == (store.layout.page_size, store.layout.page_size + n - 1), \
        f"fp16 slots span [{lo}, {hi}], not [{store.layout.page_size}, {store.layout.page_size + n - 1}]"
    assert torch.unique(slots).numel() == n
    assert bool((store.tier_of(slots) == Tier.FP16).all()) and int(slots.max()) < store.k_buffer[0].shape[0]
    x = gen_kv(torch.Generator().manual_seed(1), n)
    write(store, slots, x)
    assert torch.equal(read(store, slots), x)
    assert store.page_table.free_pages() == 0 and store.try_alloc(1) is None
    with pytest.raises(PoolExhaustedError):
        store.demote(slots[:4], Tier.WARM)
    store.free(slots)
    assert store.page_table.free_pages() == store.pages - 1 and store.available(Tier.FP16) == n


def test_tier_max_share_caps_packed_pages() -> None:
    cfg = FadeConfig(tier_max_share={"warm": 1.0, "cold": 0.25})
    store = make_store(300, cfg=cfg)
    pt = store.page_table
    cap = int(store.pages * 0.25)
    assert pt.max_pages[Tier.COLD] == cap and cap >= 2
    gen = torch.Generator().manual_seed(3)
    cold: list[torch.Tensor] = []
    refused = None
    for _ in range(100):
        n = min(64, store.available(Tier.FP16))
        assert n > 0
        slots = store.alloc(n)
        write(store, slots, gen_kv(gen, n))
        before = state_snapshot(store)
        try:
            cold.append(store.demote(slots, Tier.COLD))
        except PoolExhaustedError:
            refused = before
            break
        finally:
            assert pt.owned[Tier.COLD] <= cap
    assert refused is not None, "the cold tier never filled up"
    assert_unchanged(refused, store)
    assert pt.owned[Tier.COLD] == cap and store.available(Tier.COLD) < n
    assert pt.free_pages() > 0, "refused for want of free pages, not because of the cap"
    assert store.available(Tier.COLD) == int(store.allocators[Tier.COLD].free_slots.numel())
    assert store.tier_stats()["tiers"]["int2"]["pages"] == cap
    # the cap is per tier: warm still claims free pages
    warm = store.demote(slots, Tier.WARM)
    assert bool((store.tier_of(warm) == Tier.WARM).all()) and pt.owned[Tier.WARM] >= 1
    # cold slots are all there and the cap holds when they are moved around
    cold_slots = torch.cat(cold)
    assert cold_slots.numel() == store.used(Tier.COLD) == len(set(cold_slots.tolist()))
    store.free(cold_slots[: cold_slots.numel() // 2])
    rpp = store.geometry.rows_per_page[Tier.COLD]
    assert pt.owned[Tier.COLD] <= cap and pt.free_pages() >= cap - pt.owned[Tier.COLD]
    assert store.used(Tier.COLD) + store.available(Tier.COLD) == cap * rpp  # the cap, not the free pages, binds
    assert store.available(Tier.COLD) >= warm.numel()
    store.demote(warm, Tier.COLD)  # warm -> cold within the cap
    assert pt.owned[Tier.COLD] <= cap and pt.owned[Tier.WARM] == 0
