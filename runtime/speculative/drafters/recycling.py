"""Token Recycling (arXiv 2408.08696): guesses recycled from the target's own logits, nothing trained.

State: ``adj[vocab, k]``, the target's top-k next tokens the last time it ran each token (int32; about
1.5 MB for a 49k vocabulary at k = 8), updated after every forward from the logits at every verified node
(and every prompt position). It is kept across requests: what the model said once is a guess next time.

A draft fills a tree template breadth-first: a node (parent, rank) gets ``adj[token of parent, rank]``;
nodes whose parent token was never seen are dropped. The template is the best tree of the chosen size under
acceptance rates learned online (``acceptance.RankAcceptance``: after each step, which rank of each accepted
node's candidates the target chose), so the tree's shape follows what this model accepts; its size comes from
``tree_size`` (measured latency) or the config. The prompt-lookup continuation of the latest n-gram is
merged into the same tree (``lookup_nodes``, default 4; 0 gives the paper's pure recycling): on SmolLM2 over
Spec-Bench this raised MAT from about 1.3 to 1.7 at the same tree cost (bench/RESULTS.md).

Across processes: with a model key (``persist_as``, done by the method's builder) and ``config.persist``, the
adjacency matrix and acceptance statistics are loaded from ``cache_dir()/recycling/<key hash>.npz`` when the
drafter is built and written back atomically at the end of every ``generate`` call, so a fresh process starts
warm (``persist``). With a latency profile, each verify forward's time is checked against it
(``tree_size.LatencyWatch``) and a profile that is off by more than 2x is measured again once.

Example::

    drafter = TokenRecycling(vocab_size=spec.vocab_size, config=RecyclingConfig(budget=8))
    result = speculative_generate(engine, ids, drafter=drafter, max_new_tokens=128)
"""

from __future__ import annotations

import atexit
import time
import weakref
from dataclasses import replace

import numpy as np
import torch

from tokopt.errors import TokoptError
from tokopt.kernels.recycling import recycling_fill, recycling_update
from tokopt.runtime.speculative.acceptance import RankAcceptance, best_tree, expected_tokens
from tokopt.runtime.speculative.configs import RecyclingConfig  # the method's config is the drafter's
from tokopt.runtime.speculative.drafters.base import Drafter, insert_path
from tokopt.runtime.speculative.drafters.lookup import NgramIndex
from tokopt.runtime.speculative.tree import DraftTree
from tokopt.runtime.speculative.persist import load_arrays, note, save_arrays, state_path
from tokopt.runtime.speculative.tree_size import LatencyWatch, best_size, remeasure

STATE_FORMAT = 1  # of the persisted adjacency + statistics file
SAVE_EVERY_S = 30.0  # a drafter writes its state at most this often (the first change at once); the rest at exit


class TokenRecycling(Drafter):
    name = "recycling"

    def __init__(self, vocab_size: int, config: RecyclingConfig = RecyclingConfig()):
        config = config.resolved()  # budget "auto": start from 8 nodes until set_profile sizes the tree
        self.config = config
        self.adj = torch.full((vocab_size, config.k), -1, dtype=torch.int32)
        self._adj = self.adj.numpy()  # shares memory; scalar lookups are faster in numpy
        self.stats = RankAcceptance(config.max_depth, config.k)
        self.template = best_tree(self.stats.rates(), config.budget)
        self.profile, self.max_nodes = None, config.budget
        self._steps = 0
        self._snapshots = []
        self._ngrams = []
        self._watch = None
        self._state_path, self._state_header, self._dirty = None, None, False
        self._saved_at = None  # perf_counter of the last save

    @property
    def wants_prefill_logits(self) -> bool:
        return self.config.update_from_prefill

    def set_budget(self, budget: int) -> None:
        if budget < 1:
            raise TokoptError(f"recycling tree budget must be >= 1 draft node, got {budget}")
        self.config = replace(self.config, budget=budget)
        self.template = best_tree(self.stats.rates(), budget)

    def set_profile(self, profile, max_nodes: int = 32) -> None:
        """Size the tree from measured latency from now on (re-chosen whenever the template is reshaped)."""
        self.profile, self.max_nodes = profile, max_nodes
        self._watch = LatencyWatch(profile) if profile is not None and profile.source is not None else None
        self._reshape()

    def verify_timed(self, batch: int, nodes: int, seconds: float) -> None:
        """The decode loop's time for one verify forward of ``nodes`` per row: checked against the profile (batch
        1 only, what the profile measures); a profile off by more than 2x is measured again and trees resized."""
        if self._watch is None or batch != 1:
            return
        ratio = self._watch.observe(nodes, seconds)
        if ratio is None:
            return
        self._watch = None  # checked once per profile
        fresh = remeasure(self.profile, f"verify steps ran at {ratio:.2g}x the cached profile's times")
        if fresh is not None:
            self.set_profile(fresh, self.max_nodes)
            self._watch = None

    # -- persistence across processes ----------------------------------------------------------------------------
    def persist_as(self, model_key: str) -> "TokenRecycling":
        """Load this model's saved adjacency and statistics (if any, and matching) and save them after every
        ``generate`` call from now on; a no-op without a key or with ``config.persist`` off."""
        if not model_key or not self.config.persist:
            return self
        self._state_path = state_path("recycling", model_key)
        self._state_header = {"format": STATE_FORMAT, "vocab_size": int(self.adj.shape[0]), "k": self.config.k,
                              "max_depth": self.config.max_depth, "model_key": model_key}
        arrays = load_arrays(self._state_path, self._state_header)
        if arrays is not None:
            try:
                adj, hits, trials = arrays["adj"], arrays["hits"], arrays["trials"]
                if (adj.shape != tuple(self.adj.shape) or hits.shape != tuple(self.stats.hits.shape)
                        or trials.shape != tuple(self.stats.trials.shape)):
                    raise ValueError("array shapes differ")
                self._adj[...] = adj.astype(np.int32)
                self.stats.load_dict({"hits": hits.tolist(), "trials": trials.tolist()})
                self._reshape()
            except (KeyError, ValueError) as e:
                note(f"ignoring {self._state_path}: {e}")
        return self

    def end(self) -> None:
        """The end of a ``generate`` call: save the state if it changed, at most every ``SAVE_EVERY_S`` (a server's
        requests do not each write the file; what is left is written when the process exits)."""
        if self._state_path is None or not self._dirty:
            return
        if self._saved_at is not None and time.perf_counter() - self._saved_at < SAVE_EVERY_S:
            return
        self.save()

    def save(self) -> None:
        """Write the adjacency and statistics now, if they changed since the last save."""
        if self._state_path is None or not self._dirty:
            return
        if self._saved_at is None:  # the first save: also flush what later calls leave at exit
            atexit.register(_save_at_exit, weakref.ref(self))
        self._dirty = False
        self._saved_at = time.perf_counter()
        try:
            save_arrays(self._state_path, {"adj": self._adj, "hits": self.stats.hits.numpy(),
                                           "trials": self.stats.trials.numpy()}, self._state_header)
        except OSError as e:  # a read-only cache must not fail decoding
            note(f"could not save Token Recycling state to {self._state_path}: {e}")

    def _reshape(self) -> None:
        rates = self.stats.rates()
        if self.profile is not None:
            budget = best_size(expected_tokens(rates, self.max_nodes), self.profile, self.config.lookup_nodes)
            self.config = replace(self.config, budget=budget)
        self.template = best_tree(rates, self.config.budget)

    def start(self, prompts, sampling):
        super().start(prompts, sampling)
        if self._watch is not None:
            self._watch.restart()
        self._ngrams = [NgramIndex(3, 1) for _ in prompts] if self.config.lookup_nodes else []

    def draft(self, histories):
        self._snapshots = []
        return [self._draft_row(b, history) for b, history in enumerate(histories)]

    def _draft_row(self, b, history) -> DraftTree:
        tree = self._fill(history[-1])
        if self.config.lookup_nodes:
            self._merge_lookup(tree, b, history)
        self._snapshots.append(self._adj[tree[0]].copy())
        return DraftTree(*tree)

    def _fill(self, root: int):
        return recycling_fill(self.adj, [root], self.template)[0]

    def _merge_lookup(self, tree, b, history):
        tokens, parents = tree
        index = self._ngrams[b]
        index.update(history)
        conts = index.continuations(history, self.config.lookup_nodes, 1)
        if conts:
            children = {(p, t): i for i, (t, p) in enumerate(zip(tokens, parents)) if i}
            insert_path(tokens, parents, children, conts[0], limit=len(tokens) + self.config.lookup_nodes)

    def observe(self, tokens, logits, valid):
        recycling_update(self.adj, tokens, valid, logits)
        self._dirty = True

    def feedback(self, trees, verdicts):
        for b, (tree, verdict, cand) in enumerate(zip(trees, verdicts, self._snapshots)):
            if verdict is None:
                continue
            emitted = tree.path_tokens(verdict.path[1:]) + [verdict.next_token]
            for depth, (node, nxt) in enumerate(zip(verdict.path, emitted), start=1):
                hit = np.flatnonzero(cand[node] == nxt)
                self._stats_of_row(b).record(depth, int(hit[0]) if hit.size else None)
        self._steps += 1
        if self._steps % self.config.reshape_every == 0:
            self._reshape()

    def _stats_of_row(self, b: int) -> RankAcceptance:
        """The acceptance statistics row b's last tree was shaped by."""
        return self.stats

    def state_bytes(self) -> int:
        return self.adj.numel() * self.adj.element_size()


def _save_at_exit(ref) -> None:
    drafter = ref()
    if drafter is not None:
        drafter.save()
