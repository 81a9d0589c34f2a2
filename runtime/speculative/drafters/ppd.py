"""Parallel Prompt Decoding (arXiv 2405.18628): trained prompt tokens ride along the verify forward and guess ahead.

The graph has k prompt-token slots (``passes.ppd_slots``: ids V..V+k-1). A prompt chain is k tree nodes
``V, V+1, ..., V+k-1`` hung below a tree node as a chain, so the existing tree mask and positions are exactly
PPD's: prompt token j sees what its node sees, the node, and the chain's earlier prompt tokens, at position
node + 1 + j, and its logits guess the token at node + 2 + j. Verification never accepts an id >= V (no target
token is one), so the shared lossless verification runs unchanged and the chains' cache slots die at
compaction like any rejected node: the decode loop needs no change.

After verification the chain of the last accepted node gives the next step's guesses (top ``ranks`` tokens per
depth); when that node carries no chain, the nearest ancestor's chain is used shifted by the depth between them
(its prompt token d guesses the same position), with fewer levels. The next tree is the best tree under
per-(depth, rank) acceptance rates (``acceptance.best_tree``: a dynamic sparse tree), the rates starting from
the artifact's held-out rank accuracies and learned online (``RankAcceptance``). Which nodes carry chains: the
root and the nodes most likely to be the last accepted one. Tree size, chain count and chain length (a chain
may carry fewer than k prompt tokens: each costs a verify row, and the far guesses are the weakest) are chosen
together from the measured verify latency (``tree_size.LatencyProfile``): the shape maximizing expected tokens
per second, where a step whose last accepted node has no chain is assumed to get ``FALLBACK_SHARE`` of the draft
gain next time.

``ppd+recycling`` merges Token Recycling's tree (recycled successors and prompt lookup, sized by recycling's
own latency rule) into the PPD tree (``insert_path``), then attaches the chains.

Example::

    opt = tokopt.optimize(model, speculative="ppd")        # needs `tokopt train-ppd` once for the model
    opt.generate(ids, max_new_tokens=128); opt.last_stats.mat
"""

from __future__ import annotations

import numpy as np
import torch

from tokopt.runtime.speculative.acceptance import RankAcceptance, best_tree, path_values
from tokopt.runtime.speculative.configs import PPDConfig  # the method's config is the drafter's
from tokopt.runtime.speculative.drafters.base import Drafter, insert_path
from tokopt.runtime.speculative.tree import DraftTree

FALLBACK_SHARE = 0.5  # draft gain kept when the last accepted node had no chain (shifted ancestor guesses)
PRIOR_WEIGHT = 50.0  # the artifact's accuracies count as this many observations per depth


def rank_prior(rank_accuracy, ranks: int) -> torch.Tensor:
    """``[k + 1, ranks]`` rates (row 0 unused) from the artifact's ``rank_accuracy[j][r]``."""
    acc = torch.tensor(rank_accuracy, dtype=torch.float64)[:, :ranks]
    if acc.shape[1] < ranks:
        acc = torch.cat([acc, torch.zeros(acc.shape[0], ranks - acc.shape[1], dtype=torch.float64)], 1)
    return torch.cat([acc[:1], acc], 0).clamp(1e-4, 1.0)


class ParallelPromptDecoding(Drafter):
    """PPD guesses (and, with ``recycling``, Token Recycling's) in one tree; see the module docstring."""

    def __init__(self, vocab_size: int, k: int, rank_accuracy, config: PPDConfig = PPDConfig(), recycling=None):
        config = config.resolved()  # budget "auto": start from 6 guess nodes until set_profile shapes the tree
        self.vocab, self.k, self.config = vocab_size, k, config
        self.recycling = recycling
        self.name = "ppd+recycling" if recycling is not None else "ppd"
        self.stats = RankAcceptance(k, config.ranks, prior=rank_prior(rank_accuracy, config.ranks),
                                    prior_weight=PRIOR_WEIGHT)
        self.budget, self.chain_nodes = config.budget, config.chain_nodes
        self.chain_len = min(config.chain_len or k, k)
        self.profile, self.max_nodes = None, config.budget
        self.template = best_tree(self.stats.rates()[: self.chain_len + 1], self.budget)
        self._steps = 0
        self._guesses, self._used, self._chains, self._logits = [], [], [], None

    # -- sizing ---------------------------------------------------------------------------------------------------
    def set_profile(self, profile, max_nodes: int = 32) -> None:
        """Choose tree size and chain count from measured latency from now on."""
        self.profile, self.max_nodes = profile, max_nodes
        if self.recycling is not None:
            self.recycling.set_profile(profile, max_nodes)
        self._reshape()

    def _extra_nodes(self) -> int:
        rc = self.recycling.config if self.recycling is not None else None
        return rc.budget + rc.lookup_nodes if rc is not None else 0

    def _reshape(self) -> None:
        rates = self.stats.rates()
        if self.profile is not None:
            self.budget, self.chain_nodes, self.chain_len = self._best_shape(rates)
        self.template = best_tree(rates[: self.chain_len + 1], self.budget)

    def _best_shape(self, rates) -> tuple:
        """(guess nodes, chains, prompt tokens per chain) maximizing expected tokens per second."""
        best = None
        for c in range(1, self.k + 1):  # a chain of c prompt tokens guesses c levels of the next tree
            template = best_tree(rates[: c + 1], self.max_nodes)
            values = path_values(rates, template)
            for n in range(1, len(template) + 1):
                order = sorted(_last_probs(template[:n], values[:n]), reverse=True)
                gain = sum(values[:n])
                for m in range(1, min(n + 1, self.config.max_chain_nodes) + 1):
                    covered = sum(order[:m])
                    tokens = 1 + gain * (covered + (1 - covered) * FALLBACK_SHARE)
                    rate = tokens / self.profile(1 + n + self._extra_nodes() + c * m)
                    if best is None or rate > best[0]:
                        best = (rate, n, m, c)
        return best[1:]

    # -- the Drafter interface ------------------------------------------------------------------------------------
    @property
    def wants_prefill_logits(self) -> bool:
        return self.recycling is not None and self.recycling.wants_prefill_logits

    def start(self, prompts, sampling):
        super().start(prompts, sampling)
        self._guesses = [None] * len(prompts)
        if self.recycling is not None:
            self.recycling.start(prompts, sampling)

    def draft(self, histories):
        rec_trees = self.recycling.draft(histories) if self.recycling is not None else [None] * len(histories)
        trees, self._used, self._chains = [], [], []
        for b, history in enumerate(histories):
            tree, used, chains = self._draft_row(history[-1], self._guesses[b], rec_trees[b])
            trees.append(tree)
            self._used.append(used)
            self._chains.append(chains)
        if self.recycling is not None:  # recycling's acceptance statistics read its candidates at our node indices
            adj = self.recycling._adj
            self.recycling._snapshots = [adj[np.minimum(np.array(t.tokens), self.vocab - 1)].copy() for t in trees]
        return trees

    def _draft_row(self, root: int, guesses, rec_tree):
        tokens, parents, children = [root], [-1], {}
        values = [1.0]  # estimated acceptance per node (picks the nodes that carry chains)
        used = guesses or []
        if guesses:
            rates = self.stats.rates()
            where, depth_of = {0: 0}, {0: 0}
            for i, ((parent, rank), v) in enumerate(zip(self.template, path_values(rates, self.template)), 1):
                depth = depth_of[parent] + 1
                depth_of[i] = depth
                at = where.get(parent)
                if at is None or depth > len(guesses) or rank >= len(guesses[depth - 1]):
                    continue
                tok = guesses[depth - 1][rank]
                nxt = children.get((at, tok))
                if nxt is None:
                    nxt = len(tokens)
                    tokens.append(tok)
                    parents.append(at)
                    values.append(v)
                    children[(at, tok)] = nxt
                where[i] = nxt
        if rec_tree is not None:  # recycled paths merged in, reusing PPD nodes with the same token
            for leaf in range(1, rec_tree.size):
                if rec_tree.children[leaf]:
                    continue
                chain, node = [], leaf
                while node > 0:
                    chain.append(rec_tree.tokens[node])
                    node = rec_tree.parents[node]
                before = len(tokens)
                insert_path(tokens, parents, children, chain[::-1])
                for i in range(before, len(tokens)):
                    values.append(values[parents[i]] * 0.3)  # about recycling's rank-0 rate
        chains = {}
        for node in self._chain_nodes(parents, values):
            rows = []
            for j in range(self.chain_len):
                parents.append(node if j == 0 else len(tokens) - 1)
                rows.append(len(tokens))
                tokens.append(self.vocab + j)
            chains[node] = rows
        return DraftTree(tokens, parents), used, chains

    def _chain_nodes(self, parents, values) -> list:
        last = list(values)  # P(node is the last accepted) = P(accepted) - P(some child accepted)
        for i in range(1, len(values)):
            last[parents[i]] -= values[i]
        order = sorted(range(len(values)), key=lambda i: (i != 0, -last[i]))  # the root always carries one
        return sorted(order[: self.chain_nodes])

    def observe(self, tokens, logits, valid):
        self._logits = logits
        if self.recycling is not None:
            self.recycling.observe(tokens, logits, valid & (tokens < self.vocab))

    def feedback(self, trees, verdicts):
        for b, (tree, verdict) in enumerate(zip(trees, verdicts)):
            if verdict is None or b >= len(self._chains):
                continue
            emitted = tree.path_tokens(verdict.path[1:]) + [verdict.next_token]
            used = self._used[b]
            for depth in range(1, min(len(used), len(emitted)) + 1):
                guess = used[depth - 1]
                tok = emitted[depth - 1]
                self.stats.record(depth, guess.index(tok) if tok in guess else None)
                if tok not in guess:
                    break
            self._guesses[b] = self._next_guesses(b, tree, verdict.path[-1])
        if self.recycling is not None:
            self.recycling.feedback(trees, verdicts)
        self._steps += 1
        if self._steps % self.config.reshape_every == 0:
            self._reshape()

    def _next_guesses(self, b, tree, last):
        node, shift, chains = last, 0, self._chains[b]
        while node not in chains:
            node, shift = tree.parents[node], shift + 1
        rows = chains[node][shift:]
        if not rows:
            return None
        return self._logits[b, rows].topk(self.config.ranks, dim=-1).indices.tolist()

    def state_bytes(self) -> int:
        return self.recycling.state_bytes() if self.recycling is not None else 0


def _last_probs(template, values) -> list:
    """P(the last accepted node is i) for the root and each template node, under the template's values."""
    last = [1.0] + list(values)
    for i, (parent, _) in enumerate(template, 1):
        last[parent] -= values[i - 1]
    return last
