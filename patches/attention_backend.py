"""``fade_torch`` / ``fade_triton``: attention backends that read every tier of the tiered KV pool.

Registered with ``sglang.srt.layers.attention.attention_registry.register_attention_backend``
and added to the ``--attention-backend`` choices. Under ``--kv-compression fade`` the
default is ``fade_triton`` on CUDA (the fused mixed-tier Triton kernels in ``kernels/``)
and ``fade_torch`` on CPU (gather + dequantize per request, then SDPA called exactly as SGLang's
``torch_native`` backend calls it: a request with nothing compressed is bit-identical to plain SGLang;
``fade_sglang.attention.sdpa``).
``fade_triton`` also runs on CPU under ``TRITON_INTERPRET=1`` (slow; used by tests).

One seam for the compute: ``decode_impl(q, view, kv_indptr, kv_indices, sm_scale)``
and ``extend_impl(q, k_new, v_new, view, qo_indptr, kv_indptr, kv_indices, sm_scale)``
over a ``TieredLayerKV`` (``pool.layer_view(layer_id)``) and a FlashInfer-style page
table (page size 1: slot = page). Decode tables cover the whole sequence; extend
tables cover only the cached prefix, the new chunk's K/V come in full precision.

CUDA graphs (``fade_triton``, decode only): SGLang 0.5.23's decode graph runner
(``model_executor/runner/decode_cuda_graph_runner.py``) calls ``init_cuda_graph_state(max_bs,
max_num_tokens)`` once, then per captured batch size ``init_forward_metadata_out_graph(fb,
in_capture=True)`` before the capture and ``init_forward_metadata_in_graph(fb)`` inside it (first thing of
the captured forward, before any layer), and per replay ``init_forward_metadata_out_graph(fb_view)``
before ``graph.replay()``. The backend keeps fixed buffers sized for ``max_bs`` (``kv_indptr``,
the tier-partitioned ``kv_indices``, ``tier_indptr`` and the decode split-K workspace) and builds
the step's metadata *inside* the graph: one small Triton kernel per step reads each request's
``req_to_token`` row and writes its slots already partitioned into [fp16 | warm | cold] runs
(O(tokens of the batch), not O(buffer); no host sync, no data-dependent shape). Replay only
re-binds the captured buffers; the replayed graph re-reads the runner's static
``req_pool_indices`` / ``seq_lens`` and the live ``req_to_token`` rows, so demotions between steps
are seen. Padded rows (``req_pool_indices == 0``, SGLang's padding row; ``seq_lens`` = the fill value 1)
read slot 0 (the padding slot, fp16 tier) only. ``fade_torch`` (the CPU reference) has no graph path.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional

import torch
from sglang.srt.layers.attention.base_attn_backend import AttentionBackend, SharedReadEnds

from fade_sglang.pool.layout import Tier
from fade_sglang.pool.view import TieredLayerKV

from .cli import resolved_device

try:  # SGLang itself needs triton; the guard only keeps this module importable without it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

logger = logging.getLogger("fade_sglang")

TORCH_BACKEND = "fade_torch"
TRITON_BACKEND = "fade_triton"
BACKEND_NAMES = (TORCH_BACKEND, TRITON_BACKEND)
DecodeImpl = Callable[[torch.Tensor, TieredLayerKV, torch.Tensor, torch.Tensor, float], torch.Tensor]
ExtendImpl = Callable[..., torch.Tensor]


def default_backend(device: str | None) -> str:
    """The Triton kernels where they run natively (CUDA), the torch reference elsewhere."""
    return TRITON_BACKEND if resolved_device(device).startswith("cuda") else TORCH_BACKEND


# ----------------------------------------------------------------------------- backend


class _Metadata:
    """One step's page table. ``graph_bs`` is set on the CUDA-graph metadata of one captured batch
    size: its tensors are views of the fixed graph buffers, filled inside the graph."""

    __slots__ = ("kv_indptr", "kv_indices", "qo_indptr", "partition", "max_extend_len", "num_kv_splits",
                 "workspace", "graph_bs")

    def __init__(self, kv_indptr: torch.Tensor, kv_indices: torch.Tensor, qo_indptr: Optional[torch.Tensor],
                 partition: Any = None, max_extend_len: Optional[int] = None, num_kv_splits: Optional[int] = None,
                 workspace: Any = None, graph_bs: Optional[int] = None):
        self.kv_indptr, self.kv_indices, self.qo_indptr = kv_indptr, kv_indices, qo_indptr
        self.partition, self.max_extend_len = partition, max_extend_len
        self.num_kv_splits, self.workspace, self.graph_bs = num_kv_splits, workspace, graph_bs


def _indptr(lens: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(lens.numel() + 1, dtype=torch.int64, device=lens.device)
    out[1:] = torch.cumsum(lens, 0)
    return out


# ----------------------------------------------------------------------------- CUDA graphs

# Slots per iteration of the gather / partition kernel (one program per request).
_GATHER_BLOCK = 1024

if triton is not None:

    @triton.jit
    def _gather_partition_kernel(ReqToToken, stride_req, ReqIdx, Lens, Indptr, Out, TierIndptr, warm_base, cold_base,
                                 DROP_PACKED: tl.constexpr, BLOCK: tl.constexpr):
        """Request b's slots ``req_to_token[req_pool_indices[b], :lens[b]]`` -> ``Out[indptr[b]:]`` as
        [fp16 | warm | cold] runs (stable within a run) and ``TierIndptr[b] = run bounds``.

        Two passes over the row (count, then scatter with a prefix sum), so the work is the
        request's length whatever the buffer size. Row 0 is SGLang's padding row: its entries are
        read as slot 0. ``DROP_PACKED`` (eviction baseline): the warm / cold runs are left empty.
        """
        b = tl.program_id(0)
        req = tl.load(ReqIdx + b).to(tl.int64)
        n = tl.load(Lens + b).to(tl.int64)
        start = tl.load(Indptr + b).to(tl.int64)
        src = ReqToToken + req * stride_req
        is_pad = req == 0
        offs = tl.arange(0, BLOCK)
        cnt_f = tl.zeros([BLOCK], tl.int32)
        cnt_w = tl.zeros([BLOCK], tl.int32)
        for off in range(0, n, BLOCK):
            valid = off + offs < n
            slot = tl.load(src + off + offs, mask=valid, other=0)
            slot = tl.where(is_pad, 0, slot)
            cnt_f += (valid & (slot < warm_base)).to(tl.int32)
            cnt_w += (valid & (slot >= warm_base) & (slot < cold_base)).to(tl.int32)
        n_f = tl.sum(cnt_f, 0).to(tl.int64)
        n_w = tl.sum(cnt_w, 0).to(tl.int64)
        pos_f = start
        pos_w = start + n_f
        pos_c = start + n_f + n_w
        for off in range(0, n, BLOCK):
            valid = off + offs < n
            slot = tl.load(src + off + offs, mask=valid, other=0)
            slot = tl.where(is_pad, 0, slot)
            in_f = valid & (slot < warm_base)
            f = in_f.to(tl.int32)
            tl.store(Out + pos_f + tl.cumsum(f, 0) - 1, slot, mask=in_f)
            pos_f += tl.sum(f, 0).to(tl.int64)
            if not DROP_PACKED:
                in_w = valid & (slot >= warm_base) & (slot < cold_base)
                w = in_w.to(tl.int32)
                tl.store(Out + pos_w + tl.cumsum(w, 0) - 1, slot, mask=in_w)
                pos_w += tl.sum(w, 0).to(tl.int64)
                in_c = valid & (slot >= cold_base)
                c = in_c.to(tl.int32)
                tl.store(Out + pos_c + tl.cumsum(c, 0) - 1, slot, mask=in_c)
                pos_c += tl.sum(c, 0).to(tl.int64)
        end = start + n
        if DROP_PACKED:
            end = start + n_f
            n_w = n_w * 0
        tl.store(TierIndptr + b * 4, start.to(tl.int32))
        tl.store(TierIndptr + b * 4 + 1, (start + n_f).to(tl.int32))
        tl.store(TierIndptr + b * 4 + 2, (start + n_f + n_w).to(tl.int32))
        tl.store(TierIndptr + b * 4 + 3, end.to(tl.int32))


class _GraphState:
    """Fixed buffers shared by every captured decode graph (sized for ``max_bs``); the graph of batch
    size ``bs`` uses their first ``bs`` rows. Nothing here is reallocated after capture."""

    def __init__(self, max_bs: int, max_context_len: int, device: Any, splits: Callable[[int], int]):
        self.max_bs, self.max_context_len, self.splits = max_bs, max_context_len, splits
        i64 = dict(dtype=torch.int64, device=device)
        self.kv_lens = torch.zeros(max_bs, **i64)
        self.kv_indptr = torch.zeros(max_bs + 1, **i64)
        # int32 like req_to_token; every request's run fits: sum(seq_lens) <= max_bs * max_context_len.
        self.kv_indices = torch.zeros(max_bs * max_context_len, dtype=torch.int32, device=device)
        self.tier_indptr = torch.zeros(max_bs, 4, dtype=torch.int32, device=device)
        # Split-K scratch: [bs, Hq, splits(bs), D] views of one flat allocation big enough for every bs.
        self.workspace_rows = max(bs * splits(bs) for bs in range(1, max_bs + 1))
        self.device = device
        self.scratch: Optional[tuple[torch.Tensor, ...]] = None  # allocated at the first decode (needs Hq, D)
        self.metadata: dict[int, _Metadata] = {}

    def metadata_for(self, bs: int) -> _Metadata:
        md = self.metadata.get(bs)
        if md is None:
            from fade_sglang.kernels import TierPartition

            md = _Metadata(self.kv_indptr[: bs + 1], self.kv_indices, None,
                           TierPartition(self.kv_indices, self.tier_indptr[:bs]),
                           num_kv_splits=self.splits(bs), graph_bs=bs)
            self.metadata[bs] = md
        return md

    def workspace(self, md: _Metadata, q_heads: int, head_dim: int) -> Any:
        if md.workspace is not None:
            ws = md.workspace
            if ws.q_rot.shape[1:] != (q_heads, head_dim):
                raise ValueError(f"fade_triton CUDA graphs: a layer with {q_heads} query heads x head_dim {head_dim} "
                                 f"after one with {tuple(ws.q_rot.shape[1:])}: mixed layer shapes are not supported")
            return ws
        from fade_sglang.kernels import DecodeWorkspace

        if self.scratch is None:
            f32 = dict(dtype=torch.float32, device=self.device)
            rows = self.workspace_rows
            self.scratch = (torch.zeros(rows * q_heads * head_dim, **f32), torch.zeros(rows * q_heads * head_dim, **f32),
                            torch.zeros(rows * q_heads, **f32), torch.zeros(self.max_bs, q_heads, head_dim, **f32))
        mid_fp, mid_rot, mid_lse, q_rot = self.scratch
        if q_rot.shape[1:] != (q_heads, head_dim):
            raise ValueError(f"fade_triton CUDA graphs: a layer with {q_heads} query heads x head_dim {head_dim} "
                             f"after one with {tuple(q_rot.shape[1:])}: mixed layer shapes are not supported")
        bs, s = md.graph_bs, md.num_kv_splits
        n = bs * q_heads * s
        md.workspace = DecodeWorkspace(mid_fp[: n * head_dim].view(bs, q_heads, s, head_dim),
                                       mid_rot[: n * head_dim].view(bs, q_heads, s, head_dim),
                                       mid_lse[:n].view(bs, q_heads, s), q_rot[:bs])
        return md.workspace


class FadeAttnBackend(AttentionBackend):
    def __init__(self, model_runner: Any, use_triton: bool):
        super().__init__()
        from fade_sglang.patches.pool import TieredKVPool

        self.name = TRITON_BACKEND if use_triton else TORCH_BACKEND
        self.use_triton = use_triton
        self.device = model_runner.device
        self.req_to_token_pool = model_runner.req_to_token_pool
        self.pool = model_runner.token_to_kv_pool
        if not isinstance(self.pool, TieredKVPool):
            raise ValueError(f"--attention-backend {self.name} needs --kv-compression fade "
                             f"(the KV pool is a {type(self.pool).__name__})")
        self.forward_metadata: Optional[_Metadata] = None
        self.drop_packed = self.pool.fade_config.evict_instead_of_demote
        self._graph: Optional[_GraphState] = None
        logger.info("[fade] attention backend %s (%s)", self.name,
                    "Triton mixed-tier kernels" if use_triton else "torch SDPA, torch_native's numerics")

    def shared_read_ends(self, fm: Any) -> SharedReadEnds:
        """Where this backend's reads of scheduler-written data end: at the end of the forward, in every mode.

        Under the overlap schedule the scheduler's stream runs the next step's bookkeeping while a forward
        is in flight, and fade's demotion is such bookkeeping: it reads fp16 slots, writes packed rows into
        pages the forward may just have released, and rewrites ``req_to_token`` rows. Every layer of the
        forward reads the pool, so no earlier point is safe; UNKNOWN makes SGLang's write-after-read
        barrier wait for the whole forward (``Scheduler._apply_war_barrier``), which orders each demotion
        after the forward before it and before the forward after it."""
        return SharedReadEnds.UNKNOWN

    def init_forward_metadata(self, forward_batch: Any) -> None:
        mode = forward_batch.forward_mode
        if mode.is_idle():
            self.forward_metadata = None
            return
        # Decode reads the whole sequence from the pool; extend reads the cached prefix
        # from the pool and takes the new chunk's K/V directly.
        kv_lens = (forward_batch.seq_lens if mode.is_decode() else forward_batch.extend_prefix_lens).to(torch.int64)
        rows = self.req_to_token_pool.req_to_token[forward_batch.req_pool_indices.to(torch.int64)]
        kv_indptr = _indptr(kv_lens)
        # Row-major mask keeps each request's slots contiguous in kv_indices.
        mask = torch.arange(rows.shape[1], device=rows.device)[None, :] < kv_lens[:, None]
        kv_indices = rows[mask].to(torch.int64)
        if self.drop_packed:
            kv_indptr, kv_indices = self._keep_fp16_only(kv_lens, kv_indices)
        qo_indptr = None if mode.is_decode() else _indptr(forward_batch.extend_seq_lens.to(torch.int64))
        partition = max_extend_len = None
        if self.use_triton:  # one tier partition per step, shared by every layer
            from fade_sglang.kernels import partition_by_tier

            partition = partition_by_tier(kv_indptr, kv_indices, self.pool.layer_view(self.pool.start_layer))
            if not mode.is_decode():
                lens = getattr(forward_batch, "extend_seq_lens_cpu", None)
                max_extend_len = max(lens) if lens else None
        self.forward_metadata = _Metadata(kv_indptr, kv_indices, qo_indptr, partition, max_extend_len)

    def _keep_fp16_only(self, kv_lens: torch.Tensor, kv_indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Eviction baseline (``evict_instead_of_demote``): attention skips every packed slot."""
        keep = self.pool.tier_of(kv_indices) == Tier.FP16
        owner = torch.repeat_interleave(torch.arange(kv_lens.numel(), device=kv_lens.device), kv_lens)
        kept_lens = torch.zeros_like(kv_lens).index_add_(0, owner[keep], torch.ones_like(owner[keep]))
        return _indptr(kept_lens), kv_indices[keep]

    def _decode(self, q: torch.Tensor, view: TieredLayerKV, md: _Metadata, scale: float) -> torch.Tensor:
        if self.use_triton:
            from fade_sglang.kernels import decode_attention

            workspace = None
            if md.graph_bs is not None:
                workspace = self._graph.workspace(md, q.shape[1], q.shape[2])
            return decode_attention(q, view, md.kv_indptr, md.kv_indices, scale, partition=md.partition,
                                    num_kv_splits=md.num_kv_splits, workspace=workspace)
        from fade_sglang.attention.sdpa import decode_attention_sdpa

        return decode_attention_sdpa(q, view, md.kv_indptr, md.kv_indices, scale)

    def _extend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, view: TieredLayerKV, md: _Metadata,
                scale: float) -> torch.Tensor:
        if self.use_triton:
            from fade_sglang.kernels import extend_attention

            return extend_attention(q, k, v, view, md.qo_indptr, md.kv_indptr, md.kv_indices, scale,
                                    partition=md.partition, max_extend_len=md.max_extend_len)
        from fade_sglang.attention.sdpa import extend_attention_sdpa

        return extend_attention_sdpa(q, k, v, view, md.qo_indptr, md.kv_indptr, md.kv_indices, scale)

    def _save(self, layer: Any, forward_batch: Any, k: Optional[torch.Tensor], v: Optional[torch.Tensor],
              save_kv_cache: bool) -> None:
        if save_kv_cache and k is not None and v is not None:
            self.pool.set_kv_buffer(layer, forward_batch.out_cache_loc, k, v)

    def _check_layer(self, layer: Any) -> None:
        if layer.is_cross_attention or (layer.sliding_window_size is not None and layer.sliding_window_size > -1):
            raise NotImplementedError(f"{self.name}: cross attention / sliding window are not supported")
        if layer.logit_cap and layer.logit_cap > 0:
            raise NotImplementedError(f"{self.name}: attention logit soft-capping is not supported")

    def forward_decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: Any, forward_batch: Any,
                       save_kv_cache: bool = True, **kwargs: Any) -> torch.Tensor:
        self._check_layer(layer)
        self._save(layer, forward_batch, k, v, save_kv_cache)
        md = self.forward_metadata
        q3 = q.reshape(-1, layer.tp_q_head_num, layer.qk_head_dim)
        out = self._decode(q3, self.pool.layer_view(layer.layer_id), md, layer.scaling)
        return out.to(q.dtype).reshape(-1, layer.tp_q_head_num * layer.v_head_dim)

    def forward_extend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: Any, forward_batch: Any,
                       save_kv_cache: bool = True, **kwargs: Any) -> torch.Tensor:
        self._check_layer(layer)
        if k is None or v is None:
            raise NotImplementedError(f"{self.name}: extend without the new chunk's K/V is not supported")
        self._save(layer, forward_batch, k, v, save_kv_cache)
        md = self.forward_metadata
        q3 = q.reshape(-1, layer.tp_q_head_num, layer.qk_head_dim)
        self.pool.observe_queries(layer.layer_id, q3)  # query-aware key rounding: prefill queries only
        out = self._extend(q3, k.reshape(-1, layer.tp_k_head_num, layer.qk_head_dim),
                           v.reshape(-1, layer.tp_v_head_num, layer.v_head_dim),
                           self.pool.layer_view(layer.layer_id), md, layer.scaling)
        return out.to(q.dtype).reshape(-1, layer.tp_q_head_num * layer.v_head_dim)

    def support_triton(self) -> bool:
        return False

    # ------------------------------------------------------------------ CUDA graphs (decode, fade_triton)
    def get_cuda_graph_seq_len_fill_value(self) -> int:
        # Padded rows get seq_len 1 and req_pool_indices 0 (SGLang's all-zero padding row of
        # req_to_token): one read of slot 0, the padding slot in the fp16 tier.
        return 1

    def _graph_num_kv_splits(self, bs: int) -> int:
        """Split-K factor of the graph of batch size ``bs``: fixed at capture, so it cannot follow the
        batch's lengths; sized for the longest context (the wave count then decides)."""
        from fade_sglang.kernels import default_num_kv_splits

        return default_num_kv_splits(bs, self.pool.head_num, bs * self._max_context_len(), self.device)

    def _max_context_len(self) -> int:
        return int(self.req_to_token_pool.req_to_token.shape[1])

    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int) -> None:
        if not self.use_triton:
            raise NotImplementedError(f"{self.name} (the torch reference) has no CUDA-graph path: run it with "
                                      f"--disable-cuda-graph, or use --attention-backend {TRITON_BACKEND}")
        if max_num_tokens != max_bs:
            raise NotImplementedError(f"{self.name} captures plain decode graphs only (one token per request); "
                                      f"got max_num_tokens={max_num_tokens} for max_bs={max_bs}")
        if torch.device(self.device).type == "cuda" and getattr(self.pool, "strict", False):
            raise ValueError(f"{self.name}: the KV pool runs strict write checks, which sync the host; "
                             "they cannot run inside a CUDA graph (construct the pool with strict=False)")
        if triton is None:  # pragma: no cover
            raise RuntimeError(f"{self.name} CUDA graphs need triton")
        if 0 in (getattr(self.req_to_token_pool, "free_slots", None) or ()):
            # Padded graph rows are recognised by req_pool_indices == 0 and read slot 0 only.
            raise ValueError(f"{self.name} CUDA graphs need req_to_token row 0 to be the padding row "
                             f"(SGLang's ReqToTokenPool never hands it out); {type(self.req_to_token_pool).__name__} "
                             "can allocate it")
        self._graph = _GraphState(max_bs, self._max_context_len(), self.device, self._graph_num_kv_splits)
        logger.info("[fade] %s CUDA-graph buffers for max_bs=%d, context %d (kv_indices %.1f MiB)", self.name,
                    max_bs, self._max_context_len(), self._graph.kv_indices.numel() * 4 / 2**20)

    def init_forward_metadata_out_graph(self, forward_batch: Any, in_capture: bool = False) -> None:
        """Capture and replay (outside the graph): bind the captured buffers of this batch size.

        Nothing is computed here: the replayed graph rebuilds the metadata from the runner's
        static ``req_pool_indices`` / ``seq_lens`` (see :meth:`init_forward_metadata_in_graph`).
        """
        g = self._graph
        if g is None:
            raise RuntimeError(f"{self.name}: init_cuda_graph_state was not called before graph metadata")
        mode = forward_batch.forward_mode
        if not mode.is_decode():
            raise NotImplementedError(f"{self.name} captures decode CUDA graphs only (got {mode}); prefill CUDA "
                                      "graphs must stay off (--disable-prefill-cuda-graph)")
        bs = int(forward_batch.batch_size)
        if bs > g.max_bs:
            raise ValueError(f"{self.name}: graph batch size {bs} > max_bs {g.max_bs} of init_cuda_graph_state")
        self.forward_metadata = g.metadata_for(bs)

    def init_forward_metadata_in_graph(self, forward_batch: Any) -> None:
        """Inside the graph (recorded at capture, re-run by every replay): build the step's page table.

        Fixed shapes only: ``kv_lens`` / ``kv_indptr`` from the first ``bs`` rows of ``seq_lens``
        (padding rows clamped to one slot), then one program per request gathers its
        ``req_to_token`` row straight into [fp16 | warm | cold] runs.
        """
        md = self.forward_metadata
        if md is None or md.graph_bs is None:
            return
        g, bs = self._graph, md.graph_bs
        req = forward_batch.req_pool_indices[:bs]
        lens = g.kv_lens[:bs]
        lens.copy_(forward_batch.seq_lens[:bs])
        lens.clamp_(0, g.max_context_len)
        lens.masked_fill_((req == 0) & (lens > 1), 1)
        torch.cumsum(lens, 0, out=g.kv_indptr[1: bs + 1])
        req_to_token = self.req_to_token_pool.req_to_token
        view = self.pool.layer_view(self.pool.start_layer)
        _gather_partition_kernel[(bs,)](
            req_to_token, req_to_token.stride(0), req, lens, g.kv_indptr, g.kv_indices, g.tier_indptr,
            view.warm_base, view.cold_base, DROP_PACKED=bool(self.drop_packed), BLOCK=_GATHER_BLOCK, num_warps=4,
        )


def _creator(use_triton: bool) -> Callable[[Any], FadeAttnBackend]:
    def create(runner: Any) -> FadeAttnBackend:
        if runner.use_mla_backend:
            raise ValueError(f"--attention-backend {TRITON_BACKEND if use_triton else TORCH_BACKEND} "
                             "does not support MLA models")
        return FadeAttnBackend(runner, use_triton)

    return create


def register_attention_backend() -> None:
    """Register the backends and their CLI choices; must run before SGLang builds its argument parser."""
    from sglang.srt.arg_groups.choices import ATTENTION_BACKEND_CHOICES, add_attention_backend_choices
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
    from sglang.srt.layers.attention.attention_registry import register_attention_backend as _register

    for name, use_triton in ((TORCH_BACKEND, False), (TRITON_BACKEND, True)):
        if name not in ATTENTION_BACKENDS:
            _register(name)(_creator(use_triton))
    missing = [n for n in BACKEND_NAMES if n not in ATTENTION_BACKEND_CHOICES]
    if missing:
        add_attention_backend_choices(missing)
