"""Demotion of running requests' old tokens (fp16 -> warm), keeping rows and tree nodes in step.

A running request's KV row holds two kinds of slots:
* ``[0, tree_len)``: tree-owned (matched or checkpointed), i.e. the ``value`` of the
  nodes on the path to the request's lock node. Only nodes locked by this request
  alone (``lock_ref == 1``), not hot, with no branch other than this path, and whose
  ``value`` equals the row there, are rewritten: anything else is a shared prefix.
* ``[tree_len, seq_len)``: request-owned, demoted freely.
Positions below ``sink_tokens`` and the last ``recent_window`` committed tokens stay fp16.

Per step, most running requests have nothing to demote: fewer than ``demote_chunk`` fp16 tokens aged
past the window since their last demotion. A per-request memo makes that check host-only (no tensor op,
no device sync): planning a request records how many fp16 slots its row holds in ``[lo, hi)``, a bound
on the eligible ones. Only this demoter turns them into warm slots (and subtracts what it moved); any
other rewrite of the row comes with a new lock, ``cache_protected_len`` or row, which the memo is keyed
on. So ``eligible now <= memo count + positions added since``, and while that is below the chunk the
request is skipped without reading its row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from fade_sglang.pool import Tier

__all__ = ["RunningDemoter"]


@dataclass
class _Plan:
    req: Any
    row_idx: int
    positions: torch.Tensor  # row positions to demote (int64, ascending: oldest first)
    spans: list[tuple[Any, int, int]] = field(default_factory=list)  # exclusive nodes and their row ranges
    memo: "_Memo | None" = None


@dataclass(slots=True)
class _Memo:
    """fp16 slots of a request's row in ``[lo, hi)`` when last planned (see the module doc)."""
    kv: Any
    row_idx: int
    lock: Any
    protected: int
    rows: torch.Tensor
    lo: int
    hi: int
    count: int


# On the request, one memo per kind of pass: generated tokens only, or prompt tokens too (fp16 pressure).
_MEMO_ATTRS = ("_fade_running_memo", "_fade_running_memo_prompt")


class RunningDemoter:
    def __init__(self, cache: Any):
        self.cache = cache  # the TieredRadixCache that owns this demoter (not imported: no import cycle)

    def demote(self, reqs: list[Any], req_to_token_pool: Any, recent_window: int | None = None,
               demote_chunk: int | None = None, include_prompt: bool = False, limit: int | None = None) -> int:
        """Demote generated tokens older than the window; ``include_prompt`` also takes prompt tokens.
        ``limit``: at most this many tokens (oldest positions of each request first).

        Prompt tokens are normally left to the radix policy, which sees sharing: a system prompt
        demoted by its first request would reach the tree already quantized. Under fp16 pressure
        the scheduler passes a smaller ``recent_window`` / ``demote_chunk`` and ``include_prompt``.
        """
        cache, cfg, pool = self.cache, self.cache.fade_config, self.cache.pool
        window = cfg.recent_window if recent_window is None else recent_window
        chunk = cfg.demote_chunk if demote_chunk is None else demote_chunk
        rows = req_to_token_pool.req_to_token
        sink, attr, verify = cfg.sink_tokens, _MEMO_ATTRS[bool(include_prompt)], cache.verify_decisions
        plans: list[_Plan] = []
        for req in reqs:  # every running request, every step: host-only checks first
            kv = req.kv
            row_idx = kv.req_pool_idx
            if row_idx is None:
                continue
            hi = kv.kv_committed_len - window
            lo = sink if include_prompt else max(sink, len(req.origin_input_ids))
            if hi - lo < chunk:
                continue
            memo = getattr(req, attr, None)
            if (memo is not None and memo.kv is kv and memo.row_idx == row_idx and memo.lock is req.lock
                    and memo.lo == lo and memo.protected == kv.cache_protected_len and memo.rows is rows
                    and memo.count + max(0, hi - memo.hi) < chunk):  # bound on eligible slots: nothing to do
                if verify:
                    full = self._full_plan(req, rows, lo, hi, chunk, None)
                    assert full is None, f"running memo skipped a request with {full.positions.numel()} eligible"
                continue
            plan = self._full_plan(req, rows, lo, hi, chunk, attr)
            if plan is not None:
                plans.append(plan)
        want = sum(p.positions.numel() for p in plans)
        if limit is not None:
            want = min(want, limit)
        if want == 0:
            return 0
        short = want - pool.available(Tier.WARM)
        if short > 0 and cache._tier_enabled(Tier.COLD):  # make warm room from idle, unlocked tree nodes
            cache._demote_coldest((Tier.WARM,), Tier.COLD, short, "running")
        room = pool.available(Tier.WARM) if limit is None else min(limit, pool.available(Tier.WARM))
        chosen: list[_Plan] = []
        for plan in plans:
            take = min(plan.positions.numel(), room)
            if take <= 0 or (limit is None and take < chunk):
                break
            plan.positions = plan.positions[:take]  # oldest positions first
            chosen.append(plan)
            room -= take
        if not chosen:
            return 0
        slots = torch.cat([rows[p.row_idx, p.positions].to(torch.int64) for p in chosen])
        new = pool.demote(slots, Tier.WARM)
        off = 0
        for plan in chosen:
            n = plan.positions.numel()
            rows[plan.row_idx, plan.positions] = new[off:off + n].to(rows.dtype)
            off += n
            self._sync_owners(plan, rows)
            if plan.memo is not None:
                plan.memo.count -= n  # these fp16 slots in [lo, hi) are warm now
        cache.demoted[("running", "fp16->warm")] += slots.numel()  # eligible slots are fp16 by definition
        return slots.numel()

    # ------------------------------------------------------------------ planning
    def _full_plan(self, req: Any, rows: torch.Tensor, lo: int, hi: int, chunk: int,
                   memo_attr: str | None) -> _Plan | None:
        """Read the row: eligible = fp16 slots in ``[lo, hi)`` the request owns (alone, or through exclusive
        nodes). ``memo_attr``: where to remember the fp16 count (None: a check, remember nothing)."""
        pool, kv = self.cache.pool, req.kv
        path, tree_len = self._path(req)
        if tree_len <= lo:  # every position in range is request-owned: eligible = fp16 (the usual decode case)
            fp16 = pool.tier_of(rows[kv.req_pool_idx, lo:hi]) == Tier.FP16
            n_fp16 = n_eligible = int(fp16.sum())  # one host sync
            positions = torch.nonzero(fp16).reshape(-1) + lo if n_fp16 >= chunk else None
            spans = []  # exclusive nodes end below lo: rewriting them would only copy what they hold
            if self.cache.verify_decisions:
                ref = self._span_plan(path, tree_len, rows[kv.req_pool_idx], lo, hi)
                got = positions.tolist() if positions is not None else None
                want = ref[2].tolist() if ref[1] >= chunk else None
                assert (n_fp16, got) == (ref[0], want), f"row plan {got} != span plan {want}"
        else:
            n_fp16, n_eligible, positions, spans = self._span_plan(path, tree_len, rows[kv.req_pool_idx], lo, hi)
        memo = self._remember(req, rows, lo, hi, n_fp16, memo_attr) if memo_attr else None
        if n_eligible < chunk:
            return None
        return _Plan(req, kv.req_pool_idx, positions, spans, memo)

    def _span_plan(self, path: list[tuple[Any, int, int]], tree_len: int, row: torch.Tensor, lo: int,
                   hi: int) -> tuple[int, int, torch.Tensor, list[tuple[Any, int, int]]]:
        """(fp16 slots in [lo, hi), eligible ones, their positions, exclusive spans) with tree-owned positions."""
        row = row[:max(hi, tree_len)].to(torch.int64)
        spans = self._exclusive_spans(path, row)
        fp16 = self.cache.pool.tier_of(row[lo:hi]) == Tier.FP16
        eligible = torch.zeros(hi, dtype=torch.bool, device=row.device)
        eligible[lo:] = fp16
        tree_ok = torch.zeros(max(hi, tree_len), dtype=torch.bool, device=row.device)
        tree_ok[tree_len:] = True
        for _, s, e in spans:
            tree_ok[s:e] = True
        eligible &= tree_ok[:hi]
        n_fp16, n_eligible = torch.stack((fp16.sum(), eligible.sum())).tolist()  # one host sync
        return n_fp16, n_eligible, torch.nonzero(eligible).reshape(-1), spans

    @staticmethod
    def _remember(req: Any, rows: torch.Tensor, lo: int, hi: int, n_fp16: int, attr: str) -> _Memo | None:
        lock = getattr(req, "lock", None)
        kv = req.kv
        # No lock: no identity to tell a re-admitted row from this one, so no memo.
        memo = None if lock is None else _Memo(kv, kv.req_pool_idx, lock, kv.cache_protected_len, rows, lo, hi, n_fp16)
        setattr(req, attr, memo)
        return memo

    def _path(self, req: Any) -> tuple[list[tuple[Any, int, int]], int]:
        """Nodes root -> lock node with their row ranges, and the tree-owned prefix length."""
        lock = getattr(req, "lock", None)
        node = lock.node if lock is not None else None
        chain = []
        while node is not None and node is not self.cache.root_node:
            chain.append(node)
            node = node.parent
        path, start = [], 0
        for n in reversed(chain):
            path.append((n, start, start + len(n.value)))
            start += len(n.value)
        # Positions below either bound may be tree slots: never treat them as request-owned.
        return path, max(start, req.kv.cache_protected_len)

    def _exclusive_spans(self, path: list[tuple[Any, int, int]], row: torch.Tensor) -> list[tuple[Any, int, int]]:
        """Deepest-first nodes owned by this request alone; stops at the first shared one (ancestors are shared too)."""
        min_hits = self.cache.fade_config.shared_prefix_min_hits
        out: list[tuple[Any, int, int]] = []
        below = None  # the path child of the node being checked
        for node, s, e in reversed(path):
            kids = list(node.children.values())
            alone = node.lock_ref == 1 and not (min_hits > 0 and node.hit_count >= min_hits)
            no_branch = (not kids) if below is None else (len(kids) == 1 and kids[0] is below)
            if not (alone and no_branch and torch.equal(node.value, row[s:e])):
                break
            out.append((node, s, e))
            below = node
        return out

    # ------------------------------------------------------------------ write-back
    def _sync_owners(self, plan: _Plan, rows: torch.Tensor) -> None:
        """Point exclusive nodes (and any legacy cached prefix indices) at the rewritten row."""
        row = rows[plan.row_idx]
        for node, s, e in plan.spans:
            node.value = row[s:e].to(torch.int64).clone()
            self.cache._node_value_changed(node)
        prefix = getattr(plan.req, "prefix_indices", None)  # older SGLang kept a copy on the Req
        if isinstance(prefix, torch.Tensor) and prefix.numel():
            plan.req.prefix_indices = row[:prefix.numel()].to(prefix.dtype).clone()
