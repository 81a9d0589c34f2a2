"""DySpec (arXiv 2410.11744): grow the draft tree where the draft model is confident, under a node budget.

A max-heap holds candidate expansions (value v, residual distribution R, parent). Popping one draws a child
y from R (the most likely under greedy, a sample under sampling), adds it, and pushes its sibling entry
(value v * (1 - R[y]), R with y removed and renormalized: siblings without replacement) and, once the draft
model has run on y, its child entry (value v * R[y], the draft distribution after y). Values estimate how
likely a node is to be needed, so the budget goes where acceptance is likely.

The draft model runs once per tree depth, not once per node: a round pops entries while they beat every
node still waiting for its draft distribution, then one batched forward computes all waiting nodes (the
exact greedy order, since a waiting node's child entry can never beat its own value).

Example::

    drafter = DraftModelDrafter(runner, DySpecPolicy(budget=8))
"""

from __future__ import annotations

import heapq

from tokopt.errors import TokoptError


class DySpecPolicy:
    name = "dyspec"
    replacement = False  # siblings are drawn without replacement

    def __init__(self, budget: int = 8, max_depth: int = 6, threshold: float = 0.0):
        if budget < 1:
            raise TokoptError(f"dyspec tree budget must be >= 1 draft node, got {budget}")
        if max_depth < 1:
            raise TokoptError(f"dyspec max_depth must be >= 1, got {max_depth}")
        self.budget, self.max_depth, self.threshold = budget, max_depth, threshold

    def build(self, session) -> None:
        batch = len(session.nodes)
        heaps = [[(-1.0, 0, 0, session.nodes[b][0].probs)] for b in range(batch)]
        ties = [1] * batch
        added = [0] * batch
        while True:
            waiting = [[] for _ in range(batch)]
            for b in range(batch):
                self._round(session, b, heaps[b], waiting[b], ties, added)
            if not any(waiting):
                return
            session.compute([[node for _, node in w] for w in waiting])
            for b, w in enumerate(waiting):
                for value, node in w:
                    ties[b] += 1
                    heapq.heappush(heaps[b], (-value, ties[b], node, session.nodes[b][node].probs))

    def _round(self, session, b, heap, waiting, ties, added) -> None:
        while heap and added[b] < self.budget:
            neg, _, parent, residual = heap[0]
            value = -neg
            if value < self.threshold or (waiting and max(v for v, _ in waiting) > value):
                return
            heapq.heappop(heap)
            y = session.pick(residual)
            share = float(residual[y])
            node = session.add(b, parent, y, value=value * share)
            added[b] += 1
            rest = residual.clone()
            rest[y] = 0
            total = float(rest.sum())
            if total > 1e-9:
                ties[b] += 1
                heapq.heappush(heap, (-value * (1 - share), ties[b], parent, rest / total))
            if session.nodes[b][node].depth < self.max_depth:
                waiting.append((value * share, node))
