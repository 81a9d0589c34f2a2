"""Acceptance statistics of rank-indexed trees, and the best tree of each size under them.

A node of a recycling (or PPD) tree is a path of child ranks: rank r at depth d is the r-th best candidate
successor of its parent. ``RankAcceptance`` counts, over accepted nodes at depth d - 1, how often the
target's next token was the rank-r candidate, giving ``rate[d, r]`` = P(rank r at depth d is right | parent
accepted). Under these rates a node is accepted with the product of the rates along its path, so the
expected tokens per step of a tree is 1 + the sum of its nodes' path products. ``best_tree`` grows the tree
best-first (always adding the candidate node with the highest path product), which is optimal under the
model for every size at once; ``expected_tokens`` gives the curve over sizes that ``tree_size`` trades
against measured verify latency.

Example::

    stats = RankAcceptance(max_depth=8, ranks=8)
    stats.record(depth=1, rank=0)                 # the target's next token was the parent's top candidate
    template = best_tree(stats.rates(), size=12)  # [(parent, rank), ...], parents first
"""

from __future__ import annotations

import heapq

import torch


class RankAcceptance:
    """Counts per (depth, rank), with a prior worth ``prior_weight`` observations of ``prior``."""

    def __init__(self, max_depth: int = 8, ranks: int = 8, prior: torch.Tensor | None = None,
                 prior_weight: float = 20.0):
        self.max_depth, self.ranks = max_depth, ranks
        self.hits = torch.zeros(max_depth + 1, ranks, dtype=torch.float64)
        self.trials = torch.zeros(max_depth + 1, dtype=torch.float64)
        self.prior = default_prior(max_depth, ranks) if prior is None else prior.to(torch.float64)
        self.prior_weight = prior_weight

    def record(self, depth: int, rank: int | None) -> None:
        """One accepted parent at ``depth - 1``; ``rank`` of its candidate that was right (None: none was)."""
        d = min(depth, self.max_depth)
        self.trials[d] += 1
        if rank is not None and rank < self.ranks:
            self.hits[d, rank] += 1

    def rates(self) -> torch.Tensor:
        """``[max_depth + 1, ranks]`` posterior mean rates (row 0 unused)."""
        w = self.prior_weight
        return (self.hits + w * self.prior) / (self.trials[:, None] + w)

    def to_dict(self) -> dict:
        return {"hits": self.hits.tolist(), "trials": self.trials.tolist()}

    def load_dict(self, state: dict) -> None:
        self.hits = torch.tensor(state["hits"], dtype=torch.float64)
        self.trials = torch.tensor(state["trials"], dtype=torch.float64)


def default_prior(max_depth: int, ranks: int) -> torch.Tensor:
    """A cautious prior: rank r right with 0.3 / (r + 1) ** 1.5 (about what recycling shows on small models)."""
    per_rank = torch.tensor([0.3 / (r + 1) ** 1.5 for r in range(ranks)], dtype=torch.float64)
    return per_rank.expand(max_depth + 1, ranks).clone()


def best_tree(rates: torch.Tensor, size: int) -> list:
    """The ``size``-node tree (besides the root) maximizing expected accepted tokens under ``rates``:
    a list of (parent index, rank), parents first; index 0 is the root."""
    max_depth = rates.shape[0] - 1
    nodes, frontier, tie = [], [], 0

    def push(parent, depth, value):
        nonlocal tie
        if depth > max_depth:
            return
        for rank in range(rates.shape[1]):
            tie += 1
            heapq.heappush(frontier, (-value * float(rates[depth, rank]), tie, parent, rank, depth))

    push(0, 1, 1.0)
    while len(nodes) < size and frontier:
        neg, _, parent, rank, depth = heapq.heappop(frontier)
        nodes.append((parent, rank))
        push(len(nodes), depth + 1, -neg)
    return nodes


def expected_tokens(rates: torch.Tensor, max_size: int) -> list:
    """``curve[n]`` = expected tokens per step of ``best_tree(rates, n)``, n = 0..max_size."""
    values = path_values(rates, best_tree(rates, max_size))
    curve = [1.0]
    for v in values:
        curve.append(curve[-1] + v)
    return curve


def path_values(rates: torch.Tensor, template: list) -> list:
    """Each template node's acceptance probability (product of rates along its path)."""
    values, depths = [], []
    for parent, rank in template:
        depth = 1 if parent == 0 else depths[parent - 1] + 1
        base = 1.0 if parent == 0 else values[parent - 1]
        depths.append(depth)
        values.append(base * float(rates[min(depth, rates.shape[0] - 1), rank]))
    return values
