"""Entropy-sized Token Recycling: each step's tree is sized from the target's current uncertainty.

SpecDec++ stops drafting when a trained head predicts rejection. The target already says how sure it is: the
entropy of the distribution that chose the root token (the graph's ``entropy`` tap, free). Acceptance follows
it — after a confident token the next guesses are mostly right, after an uncertain one mostly wrong — so this
drafter keeps Token Recycling's acceptance statistics per entropy bucket (``edges`` in nats) and gives each
bucket its own tree: shape from that bucket's acceptance rates, size from the measured verify latency
(``tree_size.best_size``, down to a root-only step). No head to train, nothing to tune per model; verification
is unchanged, so decoding stays lossless.

Example::

    opt = tokopt.optimize(model, speculative="recycling-entropy")
    opt.generate(ids, max_new_tokens=128); opt.drafter.bucket_budgets     # e.g. [12, 6, 2, 0]
"""

from __future__ import annotations

import bisect

from tokopt.errors import TokoptError
from tokopt.runtime.speculative.acceptance import RankAcceptance, best_tree, expected_tokens
from tokopt.runtime.speculative.configs import DEFAULT_EDGES
from tokopt.runtime.speculative.drafters.recycling import RecyclingConfig, TokenRecycling
from tokopt.runtime.speculative.tree_size import best_size


class EntropySizedRecycling(TokenRecycling):
    name = "recycling-entropy"
    wants_root_entropy = True

    def __init__(self, vocab_size: int, config: RecyclingConfig = RecyclingConfig(), edges=None):
        if edges is None:  # a RecyclingEntropyConfig carries its edges
            edges = getattr(config, "edges", DEFAULT_EDGES)
        edges = tuple(float(e) for e in edges)
        if not edges or list(edges) != sorted(set(edges)) or edges[0] <= 0:
            raise TokoptError(f"entropy bucket edges must be positive and strictly increasing nats, got {edges}")
        super().__init__(vocab_size, config)
        self.edges = edges
        buckets = len(edges) + 1
        self.bucket_stats = [RankAcceptance(config.max_depth, config.k) for _ in range(buckets)]
        self.bucket_budgets = [self.config.budget] * buckets  # the resolved budget ("auto": 8 until profiled)
        self.bucket_templates = [best_tree(s.rates(), self.config.budget) for s in self.bucket_stats]
        self._entropy = []
        self._row_bucket = []

    def bucket(self, entropy: float) -> int:
        """Index of the bucket an entropy (nats) falls in."""
        return bisect.bisect_right(self.edges, float(entropy))

    def root_entropy(self, entropies):
        self._entropy = [float(h) for h in entropies]

    def draft(self, histories):
        self._snapshots, self._row_bucket, trees = [], [], []
        for b, history in enumerate(histories):
            k = self.bucket(self._entropy[b]) if b < len(self._entropy) else 0
            self._row_bucket.append(k)
            self.template = self.bucket_templates[k]
            trees.append(self._draft_row(b, history))
        return trees

    def _stats_of_row(self, b):
        return self.bucket_stats[self._row_bucket[b]]

    def _reshape(self):
        for k, stats in enumerate(self.bucket_stats):
            rates = stats.rates()
            if self.profile is not None:
                self.bucket_budgets[k] = best_size(expected_tokens(rates, self.max_nodes), self.profile,
                                                   self.config.lookup_nodes, min_size=0)
            self.bucket_templates[k] = best_tree(rates, self.bucket_budgets[k])
