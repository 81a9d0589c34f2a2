"""Recursive Speculative Decoding, RSD-C (arXiv 2402.14160): a fixed-shape tree whose siblings are drawn
without replacement (Gumbel-top-k over the draft distribution).

``widths[d]`` children per node at depth d (the classic chain is ``(1, 1, 1, 1)``); the draft model runs
once per depth. Verification is recursive rejection sampling with the drafted token removed from the draft
distribution after each rejected sibling, which makes the result exactly the target's distribution.

Example::

    drafter = DraftModelDrafter(runner, RSDPolicy(widths=(3, 2, 1)))
"""

from __future__ import annotations

from tokopt.errors import TokoptError


class RSDPolicy:
    name = "rsd"
    replacement = False

    def __init__(self, widths=(2, 2, 1, 1), budget: int | None = None):
        widths = tuple(int(w) for w in widths)
        if not widths or min(widths) < 1:
            raise TokoptError(f"rsd widths must be >= 1 child per depth, got {widths}")
        if budget is not None and budget < 1:
            raise TokoptError(f"rsd tree budget must be >= 1 draft node, got {budget}")
        self.widths, self.budget = widths, budget

    def build(self, session) -> None:
        batch = len(session.nodes)
        frontier = [[0] for _ in range(batch)]
        added = [0] * batch
        for depth, width in enumerate(self.widths):
            if depth:
                session.compute(frontier)
            nxt = [[] for _ in range(batch)]
            for b in range(batch):
                for parent in frontier[b]:
                    for y in session.children(b, parent, width, replacement=False):
                        if self.budget is not None and added[b] >= self.budget:
                            break
                        nxt[b].append(session.add(b, parent, y))
                        added[b] += 1
            frontier = nxt
            if not any(frontier):
                return
