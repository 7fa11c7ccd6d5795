"""Demotion of running requests' old tokens (fp16 -> warm), keeping rows and tree nodes in step.

A running request's KV row holds two kinds of slots:
* ``[0, tree_len)``: tree-owned (matched or checkpointed), i.e. the ``value`` of the
  nodes on the path to the request's lock node. Only nodes locked by this request
  alone (``lock_ref == 1``), not hot, with no branch other than this path, and whose
  ``value`` equals the row there, are rewritten: anything else is a shared prefix.
* ``[tree_len, seq_len)``: request-owned, demoted freely.
Positions below ``sink_tokens`` and the last ``recent_window`` committed tokens stay fp16.
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


class RunningDemoter:
    def __init__(self, cache: Any):
        self.cache = cache  # the TieredRadixCache that owns this demoter (not imported: no import cycle)

    def demote(self, reqs: list[Any], req_to_token_pool: Any, recent_window: int | None = None,
               demote_chunk: int | None = None, include_prompt: bool = False) -> int:
        """Demote generated tokens older than the window; ``include_prompt`` also takes prompt tokens.

        Prompt tokens are normally left to the radix policy, which sees sharing: a system prompt
        demoted by its first request would reach the tree already quantized. Under fp16 pressure
        the scheduler passes a smaller ``recent_window`` / ``demote_chunk`` and ``include_prompt``.
        """
        cache, cfg, pool = self.cache, self.cache.fade_config, self.cache.pool
        window = cfg.recent_window if recent_window is None else recent_window
        chunk = cfg.demote_chunk if demote_chunk is None else demote_chunk
        rows = req_to_token_pool.req_to_token
        plans = [p for p in (self._plan(r, rows, window, chunk, include_prompt) for r in reqs) if p is not None]
        want = sum(p.positions.numel() for p in plans)
        if want == 0:
            return 0
        short = want - pool.available(Tier.WARM)
        if short > 0 and cache._tier_enabled(Tier.COLD):  # make warm room from idle, unlocked tree nodes
            cache._demote_coldest((Tier.WARM,), Tier.COLD, short, "running")
        room = pool.available(Tier.WARM)
        chosen: list[_Plan] = []
        for plan in plans:
            take = min(plan.positions.numel(), room)
            if take < chunk:
                break
            plan.positions = plan.positions[:take]  # oldest positions first
            chosen.append(plan)
            room -= take
        if not chosen:
            return 0
        slots = torch.cat([rows[p.row_idx, p.positions].to(torch.int64) for p in chosen])
        src_tiers = pool.tier_of(slots)
        new = pool.demote(slots, Tier.WARM)
        off = 0
        for plan in chosen:
            n = plan.positions.numel()
            rows[plan.row_idx, plan.positions] = new[off:off + n].to(rows.dtype)
            off += n
            self._sync_owners(plan, rows)
        cache._count_demotion("running", src_tiers, Tier.WARM)
        return slots.numel()

    # ------------------------------------------------------------------ planning
    def _plan(self, req: Any, rows: torch.Tensor, window: int, chunk: int, include_prompt: bool) -> _Plan | None:
        cfg, pool = self.cache.fade_config, self.cache.pool
        kv = req.kv
        if kv.req_pool_idx is None:
            return None
        lo, hi = cfg.sink_tokens, kv.kv_committed_len - window
        if not include_prompt:
            lo = max(lo, len(req.origin_input_ids))
        if hi - lo < chunk:
            return None
        path, tree_len = self._path(req)
        row = rows[kv.req_pool_idx, :max(hi, tree_len)].to(torch.int64)
        spans = self._exclusive_spans(path, row)
        eligible = torch.zeros(hi, dtype=torch.bool, device=row.device)
        eligible[lo:] = pool.tier_of(row[lo:hi]) == Tier.FP16
        tree_ok = torch.zeros(max(hi, tree_len), dtype=torch.bool, device=row.device)
        tree_ok[tree_len:] = True
        for _, s, e in spans:
            tree_ok[s:e] = True
        eligible &= tree_ok[:hi]
        positions = torch.nonzero(eligible).reshape(-1)
        if positions.numel() < chunk:
            return None
        return _Plan(req, kv.req_pool_idx, positions, spans)

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
        prefix = getattr(plan.req, "prefix_indices", None)  # older SGLang kept a copy on the Req
        if isinstance(prefix, torch.Tensor) and prefix.numel():
            plan.req.prefix_indices = row[:prefix.numel()].to(prefix.dtype).clone()
