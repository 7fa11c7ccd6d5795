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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import torch

__all__ = ["NodeView", "iter_candidates", "movable_positions", "walk_tree"]


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


def movable_positions(view: NodeView, tiers: torch.Tensor, sink_tokens: int,
                      src_tiers: tuple[int, ...], recent_tokens: int = 0) -> torch.Tensor:
    """Positions in ``view.node.value`` past the sinks, before the branch's last
    ``recent_tokens`` positions, whose tier is one of ``src_tiers``."""
    keep = view.sink_keep(sink_tokens)
    stop = min(len(tiers), max(keep, view.leaf_end - recent_tokens - view.start))
    t = tiers[keep:stop]
    mask = torch.zeros_like(t, dtype=torch.bool)
    for src in src_tiers:
        mask |= t == src
    return torch.nonzero(mask).reshape(-1) + keep
