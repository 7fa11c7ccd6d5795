"""Which radix-tree tokens may leave the fp16 tier (pure functions over SGLang ``TreeNode``s).

Rules (FadeConfig):
* attention sinks: the first ``sink_tokens`` positions of every root path stay fp16;
* shared prefixes: a node stays fp16 whole when ``hit_count >= shared_prefix_min_hits``
  (0 disables this test) or when it is a prefix of two or more cached leaves
  (a node with >= 2 children, and every ancestor of such a node); idle aging never moves
  it, memory pressure demotes it after every unshared node and before evicting anything;
* locked nodes (``lock_ref > 0``) are referenced by running rows: never moved here;
* recent tokens (idle demotion only, ``idle_recent_tokens``): the last positions of a
  branch's root path stay fp16.

``walk_tree`` / ``movable_positions`` state the rules over the whole tree (the reference, used by checks).
Between scheduler steps the cache instead reads :class:`TreeBook`: host-side per-node tier counts and
totals updated when a node changes (insert, split, demotion, eviction, lock), and an age index of the
nodes idle demotion may still move, so per-step work scales with what changed, not with the tree.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch

__all__ = ["NodeRecord", "NodeView", "PressureScan", "TreeBook", "iter_candidates", "movable_positions", "movable_range",
           "tier_positions", "walk_sorted", "walk_tree"]

FP16, WARM, COLD = 0, 1, 2  # tier ids (fade_sglang.pool.Tier)


@dataclass(slots=True)
class NodeView:
    node: Any  # sglang TreeNode
    start: int  # tokens on the root path before this node
    shared: bool  # covers a shared prefix: whole node stays fp16
    leaf_end: int  # path length of the deepest cached token below (unique for unshared nodes)

    def sink_keep(self, sink_tokens: int) -> int:
        """Leading positions of this node that are attention sinks."""
        return min(max(sink_tokens - self.start, 0), len(self.node.value))


def _is_hot(node: Any, min_hits: int) -> bool:
    return min_hits > 0 and node.hit_count >= min_hits


def walk_tree(root: Any, min_hits: int) -> list[NodeView]:
    """Every cached non-root node with its path offset and shared flag (one iterative DFS)."""
    order: list[tuple[Any, int]] = []
    stack: list[tuple[Any, int]] = [(c, 0) for c in root.children.values()]
    while stack:
        node, start = stack.pop()
        if node.value is None:  # evicted (host-only) node: holds no device slots
            continue
        order.append((node, start))
        end = start + len(node.value)
        stack.extend((c, end) for c in node.children.values())
    # Leaf counts and deepest path ends bottom-up: reversed pre-order visits children first.
    leaves: dict[int, int] = {}
    ends: dict[int, int] = {}
    for node, start in reversed(order):
        kids = [c for c in node.children.values() if c.value is not None]
        leaves[id(node)] = sum(leaves[id(c)] for c in kids) if kids else 1
        ends[id(node)] = max((ends[id(c)] for c in kids), default=start + len(node.value))
    return [NodeView(n, s, leaves[id(n)] >= 2 or _is_hot(n, min_hits), ends[id(n)]) for n, s in order]


def iter_candidates(views: list[NodeView]) -> Iterator[NodeView]:
    """Nodes whose non-sink tokens may be demoted: unlocked and not shared."""
    return (v for v in views if v.node.lock_ref == 0 and not v.shared)


def movable_range(start: int, length: int, leaf_end: int, sink_tokens: int, recent_tokens: int) -> tuple[int, int]:
    """[keep, stop): the positions of a node (``start`` tokens into its root path, ``length`` long, deepest
    cached token below at ``leaf_end``) that are neither sinks nor among the branch's recent tokens."""
    keep = min(max(sink_tokens - start, 0), length)
    return keep, min(length, max(keep, leaf_end - recent_tokens - start))


def movable_positions(view: NodeView, tiers: torch.Tensor, sink_tokens: int,
                      src_tiers: tuple[int, ...], recent_tokens: int = 0) -> torch.Tensor:
    """Positions in ``view.node.value`` past the sinks, before the branch's last
    ``recent_tokens`` positions, whose tier is one of ``src_tiers``."""
    keep, stop = movable_range(view.start, len(tiers), view.leaf_end, sink_tokens, recent_tokens)
    t = tiers[keep:stop]
    mask = torch.zeros_like(t, dtype=torch.bool)
    for src in src_tiers:
        mask |= t == src
    return torch.nonzero(mask).reshape(-1) + keep


# ----------------------------------------------------------------------------- host-side bookkeeping


def tier_positions(tiers: bytearray, lo: int, hi: int, src_tiers: Sequence[int]) -> list[int]:
    """Ascending positions in ``[lo, hi)`` whose tier (one byte per position) is one of ``src_tiers``."""
    out: list[int] = []
    for src in src_tiers:
        i = tiers.find(src, lo, hi) if lo < hi else -1
        while i >= 0:
            out.append(i)
            i = tiers.find(src, i + 1, hi)
    if len(src_tiers) > 1:
        out.sort()
    return out


def _walk_key(node: Any, index: dict[int, dict[int, int]]) -> tuple[int, ...]:
    """Rank of ``node`` in :func:`walk_tree`'s order: pre-order, a parent's children last-inserted first."""
    key: list[int] = []
    while node.parent is not None:
        parent = node.parent
        ranks = index.get(id(parent))
        if ranks is None:
            ranks = index[id(parent)] = {id(c): -i for i, c in enumerate(parent.children.values())}
        key.append(ranks[id(node)])
        node = parent
    key.reverse()
    return tuple(key)


def walk_sorted(nodes: Iterable[Any], key: Callable[[Any], Any],
                walk_key: Callable[[Any], tuple[int, ...]] | None = None) -> list[Any]:
    """``nodes`` sorted by ``key``, equal keys in :func:`walk_tree`'s order: what a stable sort of the
    walk gives, without walking the tree (only tied nodes climb to the root). ``walk_key``: a faster
    rank with the same order (:meth:`TreeBook.walk_key`); by default siblings are ranked by scanning."""
    items = sorted(((key(n), n) for n in nodes), key=lambda kn: kn[0])
    out = [n for _, n in items]
    if walk_key is None:
        index: dict[int, dict[int, int]] = {}
        walk_key = lambda n: _walk_key(n, index)  # noqa: E731
    i = 0
    while i < len(items):
        j = i + 1
        while j < len(items) and items[j][0] == items[i][0]:
            j += 1
        if j - i > 1:
            out[i:j] = sorted(out[i:j], key=walk_key)
        i = j
    return out


class NodeRecord:
    """What the book knows about one tree node (kept on the node, so it goes when the node goes)."""

    __slots__ = ("value", "tiers", "start", "counts", "sink", "branchy", "alive", "accounted", "pending",
                 "in_min", "in_cold", "seq", "p_entry")

    def __init__(self, start: int, branchy: int, seq: int):
        self.value: Any = None  # the node.value tensor ``tiers`` describes
        self.tiers: bytearray | None = None  # tier id per position (None: not read back yet)
        self.start = start  # tokens on the root path before this node
        self.counts = [0, 0, 0]  # tokens per tier
        self.sink = [0, 0, 0]  # tokens per tier among this node's sink positions
        self.branchy = branchy  # nodes at or below this one with >= 2 children (> 0: a shared prefix)
        self.alive = True
        self.accounted = False  # counts are in the book's totals
        self.pending = False  # queued for read-back
        self.in_min = self.in_cold = False  # in the idle index's heaps
        self.seq = seq  # rises with the node's position in its parent's children (dict insertion order)
        self.p_entry: list[Any] = [None, None]  # its live entry in the fp16 / warm pressure heap


class TreeBook:
    """Per-node tier counts and tree totals on the host, updated on change, plus the idle-age index.

    The cache calls the ``on_*`` hooks whenever SGLang or fade changes a node (insert, split, value
    rewrite, eviction, lock transitions). New or rewritten values whose tiers are not known on the host
    are read back in one batch (``tiers_of``: values -> one tier byte string per value) at the next
    :meth:`flush`, so there is at most one device sync per pass however many nodes changed.

    Totals: ``counts`` (tokens per tier), ``unlocked`` and ``unlocked_sink`` (per tier, unlocked nodes;
    their sink positions). ``movable[t]`` holds the nodes with tier-``t`` tokens past their sinks
    (fp16 and warm: what pressure demotion can move).

    Idle index: two heaps keyed by ``last_access_time`` (a lower bound: access only moves it forward, and
    a stale entry is re-pushed with the current time when it surfaces). ``min`` holds nodes that may hold
    fp16 work (due after the shorter enabled idle threshold), ``cold`` nodes whose remaining work is
    warm -> cold (due after ``cold_idle``). A node with idle work that is unlocked and unshared is always
    in one of them; others are dropped when they surface and re-added by the event that could give them
    work back (unlock, a branch evicted below them, a new value, a new node below with recent tokens).

    Pressure index (built on first use, for priorities that never decrease over a node's life, e.g. LRU):
    per source tier, a heap of the nodes holding that tier past their sinks, keyed by (shared, priority,
    walk rank) as of when they were filed: a lower bound, so an entry whose key moved is re-filed when it
    surfaces. Locked nodes are dropped when they surface (unlock files them again); a node that stops
    being shared is re-filed at once (its key fell).
    """

    ATTR = "_fade_record"
    P_SLACK = 1024  # pressure heaps are rebuilt once they hold this many more entries than twice the live ones

    def __init__(self, tiers_of: Callable[[list[Any]], list[bytes]], sink_tokens: int, min_hits: int,
                 recent_tokens: int, warm_idle: float | None, cold_idle: float | None):
        self.tiers_of = tiers_of
        self.sink_tokens, self.min_hits, self.recent_tokens = sink_tokens, min_hits, recent_tokens
        self.warm_idle, self.cold_idle = warm_idle, cold_idle  # None: that tier is disabled
        enabled = [t for t in (warm_idle, cold_idle) if t is not None]
        self.min_idle = min(enabled) if enabled else None
        self.counts = [0, 0, 0]
        self.unlocked = [0, 0, 0]
        self.unlocked_sink = [0, 0, 0]
        self.live = 0  # accounted nodes
        self.movable: tuple[set[Any], set[Any]] = (set(), set())
        self.pending: list[Any] = []
        self.heap_min: list[tuple[float, int, Any]] = []
        self.heap_cold: list[tuple[float, int, Any]] = []
        self._seq = 0  # heap tie-breaker
        self._child_seq = 0
        self.heap_p: list[list[tuple]] = [[], []]
        self._p_owner: Any = None  # whose priority the pressure heaps follow (None: not built)
        self._p_priority: Callable[[Any], Any] | None = None
        self._p_epoch = 0

    # ------------------------------------------------------------------ records
    def rec(self, node: Any) -> NodeRecord | None:
        return getattr(node, self.ATTR, None)

    def _new(self, node: Any, start: int, branchy: int) -> NodeRecord:
        self._child_seq += 1  # appended to its parent's children: after every sibling
        rec = NodeRecord(start, branchy, self._child_seq)
        setattr(node, self.ATTR, rec)
        self._pend(node, rec)
        return rec

    def _pend(self, node: Any, rec: NodeRecord) -> None:
        rec.tiers = None
        if not rec.pending:
            rec.pending = True
            self.pending.append(node)

    def _set_tiers(self, node: Any, rec: NodeRecord, tiers: bytearray) -> None:
        rec.value, rec.tiers = node.value, tiers
        rec.counts = [tiers.count(FP16), tiers.count(WARM), tiers.count(COLD)]
        keep = min(max(self.sink_tokens - rec.start, 0), len(tiers))
        head = tiers[:keep]
        rec.sink = [head.count(FP16), head.count(WARM), head.count(COLD)] if keep else [0, 0, 0]

    def _account(self, node: Any, rec: NodeRecord, sign: int) -> None:
        if rec.accounted == (sign > 0):
            return
        rec.accounted = sign > 0
        self.live += sign
        unlocked = node.lock_ref == 0
        for t in (FP16, WARM, COLD):
            self.counts[t] += sign * rec.counts[t]
            if unlocked:
                self.unlocked[t] += sign * rec.counts[t]
                self.unlocked_sink[t] += sign * rec.sink[t]
        for t in (FP16, WARM):
            if sign > 0 and rec.counts[t] > rec.sink[t]:
                self.movable[t].add(node)
                if self._p_owner is not None and not self._p_in(rec, t):
                    self._p_push(node, t)
            else:
                self.movable[t].discard(node)

    def flush(self) -> None:
        """Read back the tiers of new / rewritten values (one batch) and account them."""
        if not self.pending:
            return
        nodes = [n for n in self.pending if self.rec(n).alive and n.value is not None]
        for n in self.pending:
            self.rec(n).pending = False
        self.pending = []
        if not nodes:
            return
        for node, tiers in zip(nodes, self.tiers_of([n.value for n in nodes])):
            rec = self.rec(node)
            self._set_tiers(node, rec, bytearray(tiers))
            self._account(node, rec, +1)
            self.requeue(node)

    def shared(self, node: Any) -> bool:
        rec = self.rec(node)
        return rec.branchy > 0 or (self.min_hits > 0 and node.hit_count >= self.min_hits)

    def leaf_end(self, node: Any) -> int:
        """Path length of the deepest token below an unshared node (below it the tree is one chain)."""
        while node.children:
            node = next(iter(node.children.values()))
        return self.rec(node).start + len(node.value)

    def walk_key(self, node: Any) -> tuple[int, ...]:
        """:func:`walk_tree`'s order as a key: per level, later-inserted siblings first."""
        key = []
        rec = self.rec(node)
        while rec is not None:
            key.append(-rec.seq)
            node = node.parent
            rec = self.rec(node)
        key.reverse()
        return tuple(key)

    def movable_range(self, node: Any, recent_tokens: int) -> tuple[int, int]:
        rec = self.rec(node)
        n = len(node.value)
        leaf_end = self.leaf_end(node) if recent_tokens else rec.start + n
        return movable_range(rec.start, n, leaf_end, self.sink_tokens, recent_tokens)

    # ------------------------------------------------------------------ tree events
    def on_insert(self, node: Any) -> None:
        """A new leaf (SGLang's ``_insert_helper``)."""
        parent = node.parent
        prec = self.rec(parent)
        self._new(node, 0 if prec is None else prec.start + len(parent.value), 0)
        if prec is not None and len(parent.children) == 2:
            self._branch(parent, +1)
        if self.recent_tokens and prec is not None:  # the chain above has fewer recent tokens now
            p = parent
            while self.rec(p) is not None:
                self.requeue(p)
                p = p.parent

    def on_split(self, new_node: Any, child: Any, split_len: int) -> None:
        """SGLang's ``_split_node``: ``new_node`` (the first ``split_len`` tokens) now sits above ``child``."""
        crec = self.rec(child)
        old_tiers = crec.tiers
        self._account(child, crec, -1)
        nrec = NodeRecord(crec.start, crec.branchy, crec.seq)  # takes the child's key (and place) in the parent
        setattr(new_node, self.ATTR, nrec)
        crec.start += split_len
        if old_tiers is None:  # not read back yet: both halves read their new values at the next flush
            self._pend(new_node, nrec)
            self._pend(child, crec)
        else:
            for node, rec, tiers in ((new_node, nrec, old_tiers[:split_len]), (child, crec, old_tiers[split_len:])):
                self._set_tiers(node, rec, tiers)
                self._account(node, rec, +1)
        self.requeue(new_node)
        self.requeue(child)

    def on_delete(self, node: Any, parent: Any) -> None:
        """A leaf left the tree (eviction)."""
        rec = self.rec(node)
        self._account(node, rec, -1)
        rec.alive = False
        if self.rec(parent) is not None and len(parent.children) == 1:
            self._branch(parent, -1)

    def on_value(self, node: Any, tiers: bytearray | None) -> None:
        """``node.value`` was rewritten (demotion); ``tiers``: its new tiers when known on the host."""
        rec = self.rec(node)
        self._account(node, rec, -1)
        if tiers is None:
            self._pend(node, rec)
            return
        self._set_tiers(node, rec, tiers)
        self._account(node, rec, +1)
        self.requeue(node)

    def on_lock(self, nodes: Iterable[Any], locked: bool) -> None:
        """``nodes`` just changed lock state (0 -> 1 references, or 1 -> 0)."""
        sign = -1 if locked else 1
        for node in nodes:
            rec = self.rec(node)
            if rec is None:
                continue
            if rec.accounted:
                for t in (FP16, WARM, COLD):
                    self.unlocked[t] += sign * rec.counts[t]
                    self.unlocked_sink[t] += sign * rec.sink[t]
            if not locked:
                self.requeue(node)
                if self._p_owner is not None and rec.accounted:
                    for t in (FP16, WARM):
                        if rec.counts[t] > rec.sink[t] and not self._p_in(rec, t):
                            self._p_push(node, t)

    def _branch(self, node: Any, delta: int) -> None:
        """``node`` started (+1) or stopped (-1) having >= 2 children: update it and its ancestors."""
        while True:
            rec = self.rec(node)
            if rec is None:
                return
            rec.branchy += delta
            if rec.branchy == 0:  # no longer a shared prefix: idle aging may move it again
                self.requeue(node)
                if self._p_owner is not None and rec.accounted:  # its pressure key fell: file it anew
                    for t in (FP16, WARM):
                        if rec.counts[t] > rec.sink[t]:
                            self._p_push(node, t)
            node = node.parent

    # ------------------------------------------------------------------ idle index
    def _push(self, heap: list, node: Any) -> None:
        self._seq += 1
        heapq.heappush(heap, (node.last_access_time, self._seq, node))

    def requeue(self, node: Any) -> None:
        """``node`` may hold fp16 idle work: make sure the ``min`` heap has it."""
        rec = self.rec(node)
        if rec is None or not rec.alive or rec.in_min or self.min_idle is None:
            return
        rec.in_min = True
        self._push(self.heap_min, node)

    def requeue_exact(self, node: Any) -> None:
        """After an idle pass looked at ``node``: index it by the work it still holds."""
        rec = self.rec(node)
        if rec is None or not rec.alive or rec.tiers is None:
            return
        keep, stop = self.movable_range(node, self.recent_tokens)
        if self.min_idle is not None and rec.tiers.find(FP16, keep, stop) >= 0:
            self.requeue(node)
        elif self.cold_idle is not None and rec.tiers.find(WARM, keep, stop) >= 0 and not rec.in_cold:
            rec.in_cold = True
            self._push(self.heap_cold, node)

    def _pop_due(self, heap: list, threshold: float, now: float, flag: str, out: dict[int, Any]) -> None:
        while heap and now - heap[0][0] >= threshold:
            t, _, node = heapq.heappop(heap)
            rec = self.rec(node)
            if node.last_access_time != t and rec.alive:  # touched since: re-file under its current time
                self._seq += 1
                heapq.heappush(heap, (node.last_access_time, self._seq, node))
                continue
            setattr(rec, flag, False)
            if rec.alive:
                out[id(node)] = node

    def pop_idle(self, now: float) -> list[Any]:
        """Nodes idle long enough for some enabled threshold that are unlocked and unshared (any order);
        the caller demotes them and calls :meth:`requeue_exact` on each. Others surfacing are dropped."""
        if self.min_idle is None:
            return []
        due: dict[int, Any] = {}
        self._pop_due(self.heap_min, self.min_idle, now, "in_min", due)
        if self.cold_idle is not None:
            self._pop_due(self.heap_cold, self.cold_idle, now, "in_cold", due)
        return [n for n in due.values() if n.lock_ref == 0 and not self.shared(n) and n.value is not None]

    def idle_work(self, node: Any) -> tuple[bool, bool]:
        """(fp16 tokens idle aging could move, warm tokens it could move to cold), ignoring age."""
        rec = self.rec(node)
        keep, stop = self.movable_range(node, self.recent_tokens)
        return (self.min_idle is not None and rec.tiers.find(FP16, keep, stop) >= 0,
                self.cold_idle is not None and rec.tiers.find(WARM, keep, stop) >= 0)

    # ------------------------------------------------------------------ pressure index
    def pressure_key(self, node: Any) -> tuple:
        return (self.shared(node), self._p_priority(node), self.walk_key(node))

    def _p_in(self, rec: NodeRecord, t: int) -> bool:
        entry = rec.p_entry[t]
        return entry is not None and entry[3] == self._p_epoch

    def _p_push(self, node: Any, t: int) -> None:
        self._seq += 1
        entry = (self.pressure_key(node), self._seq, node, self._p_epoch)
        self.rec(node).p_entry[t] = entry
        heap = self.heap_p[t]
        heapq.heappush(heap, entry)
        if len(heap) > 2 * len(self.movable[t]) + self.P_SLACK:  # mostly superseded or evicted entries
            self._p_build()

    def _p_build(self) -> None:
        self._p_epoch += 1  # every filed entry is void
        self.heap_p = [[], []]
        for t in (FP16, WARM):
            for node in self.movable[t]:
                self._seq += 1
                entry = (self.pressure_key(node), self._seq, node, self._p_epoch)
                self.rec(node).p_entry[t] = entry
                self.heap_p[t].append(entry)
            heapq.heapify(self.heap_p[t])

    def pressure_scan(self, t: int, owner: Any, priority: Callable[[Any], Any]) -> "PressureScan":
        """Unlocked nodes holding tier-``t`` tokens past their sinks, lowest (shared, priority, walk rank)
        first. ``priority`` must never decrease over a node's life; the heaps are rebuilt when ``owner``
        (the object the priority belongs to) changes."""
        if self._p_owner is not owner:
            self._p_owner, self._p_priority = owner, priority
            self._p_build()
        return PressureScan(self, t)

    def index_snapshot(self) -> tuple[dict[int, float], dict[int, float]]:
        """Earliest time each node is filed under in the ``min`` and ``cold`` heaps (checks only)."""
        out: tuple[dict[int, float], dict[int, float]] = ({}, {})
        for heap, flag, seen in ((self.heap_min, "in_min", out[0]), (self.heap_cold, "in_cold", out[1])):
            for t, _, node in heap:
                if getattr(self.rec(node), flag):
                    seen[id(node)] = min(t, seen.get(id(node), t))
        return out


class PressureScan:
    """Pops a :class:`TreeBook` pressure heap in order; nodes taken are filed again by the demotion that
    rewrites them (or by :meth:`restore`, for those it did not)."""

    def __init__(self, book: TreeBook, tier: int):
        self.book, self.tier = book, tier
        self.taken: list[Any] = []

    def __iter__(self) -> Iterator[Any]:
        book, t = self.book, self.tier
        taken: set[int] = set()
        while book.heap_p[t]:
            heap = book.heap_p[t]  # re-read: a re-file below may rebuild the heaps
            entry = heap[0]
            key, _, node, _ = entry
            rec = book.rec(node)
            if rec.p_entry[t] is not entry:  # superseded
                heapq.heappop(heap)
                continue
            if (not rec.alive or not rec.accounted or rec.counts[t] <= rec.sink[t] or node.lock_ref
                    or id(node) in taken):  # (taken: filed again by a rebuild during this scan)
                heapq.heappop(heap)
                rec.p_entry[t] = None
                continue
            if book.pressure_key(node) != key:  # accessed (or more shared) since filed: re-file
                heapq.heappop(heap)
                book._p_push(node, t)
                continue
            heapq.heappop(heap)
            rec.p_entry[t] = None
            taken.add(id(node))
            self.taken.append(node)
            yield node

    def restore(self) -> None:
        book, t = self.book, self.tier
        for node in self.taken:
            rec = book.rec(node)
            if rec.alive and rec.accounted and rec.counts[t] > rec.sink[t] and not book._p_in(rec, t):
                book._p_push(node, t)
