"""Prompt lookup: guesses copied from earlier text (prompt and output) that followed the latest n-gram.

For each row an ``NgramIndex`` maps every n-gram (n = ``min_ngram``..``max_ngram``) of the history to where
it occurred, updated incrementally as tokens are emitted. A draft takes the continuations of the longest
n-gram that matches the end of the history, most recent occurrences first, up to ``branches`` of them, and
merges them into one trie of at most ``budget`` nodes (the classic prompt-lookup baseline is
``branches=1``). Nothing is trained or stored across requests.

Example::

    drafter = PromptLookup(budget=8)
    result = speculative_generate(engine, ids, drafter=drafter, max_new_tokens=128)
"""

from __future__ import annotations

from tokopt.runtime.speculative.configs import LookupConfig  # the method's config is the drafter's
from tokopt.runtime.speculative.drafters.base import Drafter, insert_path
from tokopt.runtime.speculative.tree import DraftTree


class NgramIndex:
    """Where each n-gram of a growing token list occurred (positions of the token after it)."""

    def __init__(self, max_ngram: int, min_ngram: int = 1):
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.seen: dict = {}
        self.length = 0

    def update(self, history: list) -> None:
        for end in range(self.length + 1, len(history) + 1):
            for n in range(self.min_ngram, min(self.max_ngram, end) + 1):
                self.seen.setdefault(tuple(history[end - n:end]), []).append(end)
        self.length = len(history)

    def continuations(self, history: list, length: int, branches: int) -> list:
        """Up to ``branches`` continuations (each up to ``length`` tokens) of the longest matching n-gram."""
        for n in range(min(self.max_ngram, len(history)), self.min_ngram - 1, -1):
            ends = self.seen.get(tuple(history[-n:]), [])
            found, distinct = [], set()
            for end in reversed(ends):
                if end >= len(history):
                    continue  # the history's own tail: nothing follows it yet
                cont = tuple(history[end:end + length])
                if cont and cont not in distinct:
                    distinct.add(cont)
                    found.append(list(cont))
                    if len(found) == branches:
                        break
            if found:
                return found
        return []


def lookup_tree(root: int, continuations: list, budget: int) -> DraftTree:
    tokens, parents, children = [root], [-1], {}
    for cont in continuations:
        insert_path(tokens, parents, children, cont, limit=budget + 1)
    return DraftTree(tokens, parents)


class PromptLookup(Drafter):
    name = "lookup"

    def __init__(self, config: LookupConfig = LookupConfig()):
        self.config = config.resolved()  # budget "auto": 8 nodes
        self.indexes = []

    def start(self, prompts, sampling):
        super().start(prompts, sampling)
        self.indexes = [NgramIndex(self.config.max_ngram, self.config.min_ngram) for _ in prompts]

    def draft(self, histories):
        trees = []
        for index, history in zip(self.indexes, histories):
            index.update(history)
            conts = index.continuations(history, self.config.budget, self.config.branches)
            trees.append(lookup_tree(history[-1], conts, self.config.budget))
        return trees
