"""The CUDA-graph path of the ``fade_triton`` backend, driven on CPU the way SGLang's decode graph runner drives it.

SGLang 0.5.23 (``sglang/srt/model_executor/runner/decode_cuda_graph_runner.py``):
  * ``DecodeCudaGraphRunner.__init__``: ``attn_backend.init_cuda_graph_state(max_bs, max_num_token)``,
    then ``get_cuda_graph_seq_len_fill_value()`` (the ``seq_lens`` padding sentinel);
  * ``capture_one_shape`` (largest bs first): ``init_forward_metadata_out_graph(fb, in_capture=True)``,
    then ``run_once`` (two warmups + the capture) = ``init_forward_metadata_in_graph(fb)`` followed by
    the model forward (``forward_decode`` of every layer), on ``fb``'s static buffers;
  * ``load_batch`` / replay: ``buffer_registry.fill_from`` copies the batch into the static buffers
    (``req_pool_indices`` / ``out_cache_loc`` padded with 0, ``seq_lens`` with the fill value),
    ``init_forward_metadata_out_graph(build_replay_fb_view(...))``, then ``graph.replay()``, which
    re-runs the recorded ``in_graph`` prep and the layers on the same buffers.

There is no CUDA graph on CPU, so "replay" re-runs the captured calls on the capture-time ``fb``
(the same static buffer views a graph would read). What makes that faithful is checked directly:
the graph body issues no host sync and no data-dependent-shape op (a TorchDispatchMode watches
every aten op), every tensor the kernels get keeps its address and shape from capture through
every replay, and each replay's output equals the eager path's on the same batch.
"""

from __future__ import annotations

import importlib
import os

os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of triton (see tests/test_kernels.py)

from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fade_sglang.config import FadeConfig
from fade_sglang.eval.synthetic import synthetic_kv
from fade_sglang.patches.pool import TieredKVPool
from fade_sglang.pool.layout import Tier

pytestmark = pytest.mark.triton

KV_HEADS, GROUP, DIM, LAYERS = 2, 2, 64, 2
Q_HEADS = KV_HEADS * GROUP
CTX = 192  # req_to_token width (SGLang's max_context_len)
CAPTURE_BS = (1, 2, 4)  # SGLang captures a list of batch sizes; replays pad up to the next one
TOL = 2e-4


def _modules():
    """fade_sglang.kernels and the backend module bound to the Triton interpreter (as tests/test_kernels.py)."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(tl.standard.max, InterpretedFunction):
        pytest.skip("triton was imported before TRITON_INTERPRET=1 was set: export it", allow_module_level=True)
    import fade_sglang.kernels as kernels
    import fade_sglang.patches.attention_backend as ab

    if not isinstance(kernels.decode._decode_stage1, InterpretedFunction):
        for name in ("decode", "extend", "quantize", "dispatch"):
            importlib.reload(importlib.import_module(f"fade_sglang.kernels.{name}"))
        kernels = importlib.reload(kernels)
    if not isinstance(ab._gather_partition_kernel, InterpretedFunction):
        ab = importlib.reload(ab)
    return kernels, ab


K, AB = _modules()


# ---------------------------------------------------------------------------- fixtures: pool, rows, fakes


class World:
    """A mixed-tier pool (2 layers), SGLang's ReqToTokenPool (row 0 = padding row) and the backend."""

    def __init__(self, drop_packed: bool = False, seed: int = 0):
        from sglang.srt.mem_cache.memory_pool import ReqToTokenPool

        # Default tier_max_share: INT4 and INT2 share the arena with fp16 (this used a fixed 50/30/20% byte split,
        # tier_budget, before). drop_packed is the eviction baseline: packed tokens are dropped from attention.
        cfg = FadeConfig(evict_instead_of_demote=drop_packed)
        # strict=False: the pool's GPU default (strict write checks sync the host).
        self.pool = TieredKVPool(2400, 1, torch.float32, KV_HEADS, DIM, LAYERS, "cpu", False, fade_config=cfg,
                                 strict=False)
        self.rtp = ReqToTokenPool(8, CTX, "cpu", False)
        self.gen = torch.Generator().manual_seed(seed)
        self.seed = seed
        runner = SimpleNamespace(device="cpu", req_to_token_pool=self.rtp, token_to_kv_pool=self.pool,
                                 use_mla_backend=False)
        self.backend = AB.FadeAttnBackend(runner, use_triton=True)
        self.layers = [SimpleNamespace(layer_id=l, tp_q_head_num=Q_HEADS, tp_k_head_num=KV_HEADS,
                                       tp_v_head_num=KV_HEADS, qk_head_dim=DIM, v_head_dim=DIM, scaling=DIM ** -0.5,
                                       is_cross_attention=False, sliding_window_size=None, logit_cap=0.0)
                       for l in range(LAYERS)]
        self.lens: dict[int, int] = {}

    def write(self, n: int) -> torch.Tensor:
        """n new fp16 tokens, all layers."""
        slots = self.pool.alloc(n)
        for l in range(LAYERS):
            k, v = synthetic_kv(n, KV_HEADS, DIM, seed=self.seed * 100 + l * 10 + int(slots[0]))
            self.pool.set_kv_buffer(SimpleNamespace(layer_id=l), slots, k, v)
        return slots

    def add_request(self, row: int, length: int, warm: float = 0.35, cold: float = 0.25) -> None:
        """Row ``row`` gets ``length - 1`` cached tokens of mixed tiers (shuffled) plus one fp16 slot for
        the token this decode step writes (``out_cache_loc``)."""
        cached = self.write(length - 1) if length > 1 else torch.zeros(0, dtype=torch.int64)
        perm = torch.randperm(cached.numel(), generator=self.gen)
        n_w, n_c = int(warm * cached.numel()), int(cold * cached.numel())
        if n_w:
            cached[perm[:n_w]] = self.pool.demote(cached[perm[:n_w]], Tier.WARM)
        if n_c:
            cached[perm[n_w:n_w + n_c]] = self.pool.demote(cached[perm[n_w:n_w + n_c]], Tier.COLD)
        cached = cached[torch.randperm(cached.numel(), generator=self.gen)]  # tiers interleaved in the row
        new = self.pool.alloc(1)
        self.rtp.req_to_token[row, :length] = torch.cat((cached, new)).to(torch.int32)
        self.lens[row] = length

    def batch(self, rows: list[int]) -> SimpleNamespace:
        """What a decode step hands the runner: rows, seq_lens, out_cache_loc, and q/k/v per layer."""
        lens = torch.tensor([self.lens[r] for r in rows], dtype=torch.int64)
        loc = self.rtp.req_to_token[rows, lens - 1].to(torch.int64)
        qkv = [tuple(torch.randn(len(rows), h * DIM, generator=self.gen) for h in (Q_HEADS, KV_HEADS, KV_HEADS))
               for _ in range(LAYERS)]
        return SimpleNamespace(req_pool_indices=torch.tensor(rows, dtype=torch.int64), seq_lens=lens,
                               out_cache_loc=loc, qkv=qkv)


def _heads(x: torch.Tensor) -> torch.Tensor:
    """RadixAttention.forward hands the backend k / v as [tokens, kv_heads, head_dim] (q stays 2-D)."""
    return x.view(-1, KV_HEADS, DIM)


def _forward_batch(mode_bs: int, req_pool_indices, seq_lens, out_cache_loc, **extra) -> SimpleNamespace:
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    return SimpleNamespace(forward_mode=ForwardMode.DECODE, batch_size=mode_bs, req_pool_indices=req_pool_indices,
                           seq_lens=seq_lens, out_cache_loc=out_cache_loc, **extra)


class FakeGraphRunner:
    """SGLang's decode graph runner, minus the CUDA graph: static buffers, capture order, padding, replay."""

    def __init__(self, world: World, capture_bs=CAPTURE_BS):
        self.world, self.backend = world, world.backend
        self.capture_bs = sorted(capture_bs)
        self.max_bs = max(capture_bs)
        self.backend.init_cuda_graph_state(self.max_bs, self.max_bs)  # max_num_token = max_bs * 1 token
        self.fill = self.backend.get_cuda_graph_seq_len_fill_value()
        # DecodeInputBuffers / the buffer registry's slots.
        self.req_pool_indices = torch.zeros(self.max_bs, dtype=torch.int64)
        self.seq_lens = torch.full((self.max_bs,), self.fill, dtype=torch.int64)
        self.out_cache_loc = torch.zeros(self.max_bs, dtype=torch.int64)
        self.q = [torch.zeros(self.max_bs, Q_HEADS * DIM) for _ in range(LAYERS)]
        self.k = [torch.zeros(self.max_bs, KV_HEADS * DIM) for _ in range(LAYERS)]
        self.v = [torch.zeros(self.max_bs, KV_HEADS * DIM) for _ in range(LAYERS)]
        self.fb: dict[int, SimpleNamespace] = {}
        self.outputs: dict[int, list[torch.Tensor]] = {}

    def run_once(self, bs: int) -> list[torch.Tensor]:
        """The captured body: in-graph metadata prep, then every layer's attention on the static buffers."""
        fb = self.fb[bs]
        self.backend.init_forward_metadata_in_graph(fb)
        return [self.backend.forward_decode(self.q[l][:bs], _heads(self.k[l][:bs]), _heads(self.v[l][:bs]),
                                            self.world.layers[l], fb) for l in range(LAYERS)]

    def capture(self) -> None:
        for bs in reversed(self.capture_bs):
            self.fb[bs] = _forward_batch(bs, self.req_pool_indices[:bs], self.seq_lens[:bs], self.out_cache_loc[:bs])
            self.backend.init_forward_metadata_out_graph(self.fb[bs], in_capture=True)
            self.run_once(bs)  # FullCudaGraphBackend.capture_one warms up (twice) before the capture
            self.outputs[bs] = self.run_once(bs)

    def replay(self, b: SimpleNamespace) -> list[torch.Tensor]:
        raw = b.req_pool_indices.numel()
        bs = next(c for c in self.capture_bs if c >= raw)
        # buffer_registry.fill_from: copy the head, reset the padded tail per slot policy.
        self.req_pool_indices[:raw] = b.req_pool_indices
        self.req_pool_indices[raw:bs] = 0
        self.seq_lens[:raw] = b.seq_lens
        self.seq_lens[raw:bs] = self.fill
        self.out_cache_loc[:raw] = b.out_cache_loc
        self.out_cache_loc[raw:bs] = 0
        for l in range(LAYERS):  # the model's q/k/v for the padded rows are whatever the graph computes
            for buf, src in zip((self.q[l], self.k[l], self.v[l]), b.qkv[l]):
                buf[:raw] = src
                buf[raw:bs] = torch.randn(bs - raw, buf.shape[1], generator=self.world.gen)
        view = _forward_batch(bs, self.req_pool_indices[:bs], self.seq_lens[:bs], self.out_cache_loc[:bs],
                              num_padding=bs - raw, actual_forward_mode=self.fb[bs].forward_mode)
        self.backend.init_forward_metadata_out_graph(view)  # in_capture=False
        self.outputs[bs] = self.run_once(bs)  # graph.replay()
        return [o[:raw] for o in self.outputs[bs]]


def eager(world: World, b: SimpleNamespace) -> list[torch.Tensor]:
    fb = _forward_batch(b.req_pool_indices.numel(), b.req_pool_indices, b.seq_lens, b.out_cache_loc)
    world.backend.init_forward_metadata(fb)
    return [world.backend.forward_decode(q, _heads(k), _heads(v), world.layers[l], fb)
            for l, (q, k, v) in enumerate(b.qkv)]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


# ---------------------------------------------------------------------------- watchers


class _NoSyncMode(TorchDispatchMode):
    """Fails on any aten op that syncs the host or whose output shape depends on tensor data."""

    FORBIDDEN = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "repeat_interleave", "item",
                 "masked_scatter", "_assert_async")

    def __init__(self):
        super().__init__()
        self.bad: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__ if hasattr(func, "__name__") else str(func)
        if any(name.split(".")[0] == f or name.startswith(f + ".") for f in self.FORBIDDEN):
            self.bad.append(name)
        if name.startswith("index.") or name.startswith("index_put"):
            idx = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in idx):
                self.bad.append(f"{name} (boolean mask)")
        return func(*args, **(kwargs or {}))


class _KernelArgs:
    """Records what each decode_attention call got: addresses, shapes and the Python ints it launches with."""

    def __init__(self, monkeypatch):
        self.calls: list[dict] = []
        real = K.decode_attention

        def spy(q, view, kv_indptr, kv_indices, sm_scale, out=None, *, partition=None, num_kv_splits=None,
                workspace=None):
            rec = {"bs": q.shape[0], "num_kv_splits": num_kv_splits, "graph": workspace is not None}
            for name, t in (("kv_indptr", kv_indptr), ("kv_indices", kv_indices), ("part.indices", partition.indices),
                            ("part.tier_indptr", partition.tier_indptr)):
                rec[name] = (t.data_ptr(), tuple(t.shape))
            if workspace is not None:
                for name in ("mid_fp", "mid_rot", "mid_lse", "q_rot"):
                    t = getattr(workspace, name)
                    rec[f"ws.{name}"] = (t.data_ptr(), tuple(t.shape), t.stride())
            self.calls.append(rec)
            return real(q, view, kv_indptr, kv_indices, sm_scale, out, partition=partition,
                        num_kv_splits=num_kv_splits, workspace=workspace)

        monkeypatch.setattr(K, "decode_attention", spy)

    def take(self) -> list[dict]:
        out, self.calls = self.calls, []
        return out


# ---------------------------------------------------------------------------- tests


def _world_with_requests(drop_packed: bool = False) -> World:
    w = World(drop_packed=drop_packed)
    for row, length in ((1, 37), (2, 100), (3, 5), (4, 60), (5, 1), (6, 48)):
        w.add_request(row, length)
    return w


def test_capture_then_replays_match_eager_with_fixed_buffers(monkeypatch):
    w = _world_with_requests()
    spy = _KernelArgs(monkeypatch)
    runner = FakeGraphRunner(w)
    assert runner.fill == 1
    g = w.backend._graph
    fixed = {name: getattr(g, name).data_ptr() for name in ("kv_lens", "kv_indptr", "kv_indices", "tier_indptr")}
    runner.capture()
    captured = {}
    for rec in spy.take():
        assert rec["graph"]
        captured.setdefault(rec["bs"], rec)
        assert rec == captured[rec["bs"]]  # warmups, capture and every layer: the same arguments
    assert sorted(captured) == list(CAPTURE_BS)
    for bs, rec in captured.items():
        assert rec["kv_indices"] == rec["part.indices"] == (fixed["kv_indices"], (max(CAPTURE_BS) * CTX,))
        assert rec["kv_indptr"] == (fixed["kv_indptr"], (bs + 1,))
        assert rec["part.tier_indptr"] == (fixed["tier_indptr"], (bs, 4))
        assert rec["num_kv_splits"] == w.backend._graph_num_kv_splits(bs)
    # Capture-time rows are all padding (req 0, seq_len = fill): one read of slot 0 each.
    assert g.tier_indptr[:1].tolist() == [[0, 1, 1, 1]]

    # Row 0 is SGLang's all-zero padding row; padded rows must read slot 0 even if it were dirty.
    w.rtp.req_to_token[0] = w.rtp.req_to_token[2, 0]
    batches = [
        [1, 2, 3, 4],  # full captured batch
        [2, 6, 4],  # padded: 3 -> 4
        [3],  # bs 1
        [5, 1],  # a one-token request (only the new token)
        [4, 2],
    ]
    for i, rows in enumerate(batches):
        if i == 4:  # between steps: demote part of row 2 (running demotion rewrites req_to_token)
            row = w.rtp.req_to_token[2, : w.lens[2] - 1].to(torch.int64)
            fp = (row < w.pool.layout.warm_base).nonzero()[:20, 0]
            row[fp] = w.pool.demote(row[fp], Tier.WARM)
            w.rtp.req_to_token[2, : w.lens[2] - 1] = row.to(torch.int32)
        b = w.batch(rows)
        mode = _NoSyncMode()
        with mode:
            graph_out = runner.replay(b)
        assert not mode.bad, f"host sync / data-dependent shape in the graph path: {sorted(set(mode.bad))}"
        recs = spy.take()
        bs = next(c for c in CAPTURE_BS if c >= len(rows))
        assert len(recs) == LAYERS and all(r == captured[bs] for r in recs), "a replay moved or reshaped a buffer"
        assert {name: getattr(g, name).data_ptr() for name in fixed} == fixed

        # The graph's page table is the eager one: same tier runs, same stable order, padding rows on slot 0.
        eager_out = eager(w, b)
        md = w.backend.forward_metadata
        part = K.partition_by_tier(md.kv_indptr, md.kv_indices, w.pool.layer_view(0))
        total = int(md.kv_indptr[-1])
        assert torch.equal(g.tier_indptr[: len(rows)], part.tier_indptr)
        assert torch.equal(g.kv_indices[:total].long(), part.indices.long())
        for p in range(len(rows), bs):
            start = int(g.tier_indptr[p, 0])
            assert g.tier_indptr[p].tolist() == [start, start + 1, start + 1, start + 1]
            assert int(g.kv_indices[start]) == 0

        for l in range(LAYERS):
            err = rel_err(graph_out[l], eager_out[l])
            assert err < TOL, f"batch {rows} layer {l}: graph vs eager rel err {err:.2e}"
            if l:
                continue
            # Same partition and split count through the kernel API: bit-identical.
            q = b.qkv[l][0].reshape(len(rows), Q_HEADS, DIM)
            same = K.decode_attention(q, w.pool.layer_view(l), md.kv_indptr, md.kv_indices, DIM ** -0.5,
                                      partition=part, num_kv_splits=captured[bs]["num_kv_splits"])
            assert torch.equal(graph_out[l], same.reshape(len(rows), -1))
        spy.take()


def test_drop_packed_eviction_baseline_replays_match_eager(monkeypatch):
    w = _world_with_requests(drop_packed=True)
    runner = FakeGraphRunner(w, capture_bs=(2, 4))
    runner.capture()
    for rows in ([1, 2, 4], [6, 3]):
        b = w.batch(rows)
        graph_out = runner.replay(b)
        eager_out = eager(w, b)
        for l in range(LAYERS):
            assert rel_err(graph_out[l], eager_out[l]) < TOL
    # Only fp16 slots are attended: every packed run is empty.
    t = w.backend._graph.tier_indptr[:2]
    assert torch.equal(t[:, 1], t[:, 2]) and torch.equal(t[:, 2], t[:, 3])


def test_graph_state_contract():
    w = _world_with_requests()
    with pytest.raises(NotImplementedError, match="plain decode"):
        w.backend.init_cuda_graph_state(4, 8)  # speculative (several tokens per request)
    runner = SimpleNamespace(device="cpu", req_to_token_pool=w.rtp, token_to_kv_pool=w.pool, use_mla_backend=False)
    with pytest.raises(NotImplementedError, match="--disable-cuda-graph"):
        AB.FadeAttnBackend(runner, use_triton=False).init_cuda_graph_state(4, 4)
    w.rtp.free_slots.append(0)  # a req_to_token pool that could hand out the padding row
    with pytest.raises(ValueError, match="padding row"):
        w.backend.init_cuda_graph_state(4, 4)
    w.rtp.free_slots.remove(0)
    w.backend.init_cuda_graph_state(4, 4)
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    extend = SimpleNamespace(forward_mode=ForwardMode.EXTEND, batch_size=2)
    with pytest.raises(NotImplementedError, match="decode CUDA graphs only"):
        w.backend.init_forward_metadata_out_graph(extend, in_capture=True)
    with pytest.raises(ValueError, match="max_bs"):
        w.backend.init_forward_metadata_out_graph(_forward_batch(8, None, None, None), in_capture=True)
    # The watcher sees what the graph path must avoid: the eager prep's boolean-mask gather.
    mode = _NoSyncMode()
    with mode:
        w.backend.init_forward_metadata(_forward_batch(2, torch.tensor([1, 2]), torch.tensor([37, 100]), None))
    assert mode.bad
    # Workspace sizing: every batch size up to max_bs fits the flat scratch with its own split count.
    g = w.backend._graph
    assert g.workspace_rows == max(bs * w.backend._graph_num_kv_splits(bs) for bs in range(1, 5))
