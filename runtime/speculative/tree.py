"""Draft trees: the tokens one verify forward checks, and how they are batched into graph inputs.

Node 0 of every tree is the root: the last emitted token, not yet in the KV cache. Every other node is a
guess for the token after its parent. Nodes are listed parents-first; the order of a node's children is the
order they were drafted in (it matters for sampling verification).

Example::

    tree = DraftTree.from_parents([5, 7, 9, 11], [-1, 0, 0, 1])   # root 5; children 7, 9; 11 after 7
    batch = pack_trees([tree], positions=torch.tensor([12]))
    out = engine(batch.tokens, batch.positions, step_mask(cache.valid, batch.structure, batch.valid), ...)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from tokopt.kernels.tree_inputs import ancestor_matrix, tree_inputs  # noqa: F401 (ancestor_matrix: public here)


@dataclass
class DraftTree:
    """One row's tree. ``draft_probs[i]`` is the distribution node i's children were drawn from (None when
    children are deterministic guesses: recycling, lookup, PPD); ``replacement`` says whether siblings were
    drawn with replacement (SpecInfer-style) or without (RSD, DySpec)."""

    tokens: list
    parents: list
    draft_probs: torch.Tensor | None = None  # [N, V], rows of leaves unused
    replacement: bool = False
    depths: list = field(default_factory=list)
    children: list = field(default_factory=list)
    sources: list = field(default_factory=list)  # per node, which drafter part proposed it (stats only)

    def __post_init__(self):
        if len(self.tokens) != len(self.parents) or not self.tokens or self.parents[0] != -1:
            raise ValueError("a draft tree needs a root (node 0, parent -1) and one parent per token")
        self.depths = [0] * len(self.tokens)
        self.children = [[] for _ in self.tokens]
        for i in range(1, len(self.tokens)):
            p = self.parents[i]
            if not 0 <= p < i:
                raise ValueError(f"tree node {i} has parent {p}: parents must precede their children")
            self.depths[i] = self.depths[p] + 1
            self.children[p].append(i)

    @classmethod
    def from_parents(cls, tokens, parents, **kw) -> "DraftTree":
        return cls(list(map(int, tokens)), list(map(int, parents)), **kw)

    @classmethod
    def root_only(cls, token: int) -> "DraftTree":
        return cls([int(token)], [-1])

    @property
    def size(self) -> int:
        return len(self.tokens)

    def path_tokens(self, path) -> list:
        return [self.tokens[i] for i in path]


@dataclass
class TreeBatch:
    """Trees of a batch padded to one width: the verify forward's inputs."""

    tokens: torch.Tensor  # [B, N]
    positions: torch.Tensor  # [B, N] = position of the root + depth
    structure: torch.Tensor  # [B, N, N] ancestor-or-self
    valid: torch.Tensor  # [B, N] False on padding nodes


def pack_trees(trees, positions: torch.Tensor, pad_token: int = 0) -> TreeBatch:
    """Pad ``trees`` to the widest one; ``positions[b]`` is the position of row b's root. Positions, structure
    and validity come from the ``tokopt.kernels`` dispatch (``kernels/tree_inputs.py``)."""
    width = max(t.size for t in trees)
    batch = len(trees)
    tokens = np.full((batch, width), pad_token, dtype=np.int64)
    parents = np.zeros((batch, width), dtype=np.int64)
    for b, tree in enumerate(trees):
        tokens[b, : tree.size] = tree.tokens
        parents[b, : tree.size] = tree.parents
    sizes = torch.tensor([t.size for t in trees], dtype=torch.long)
    pos, structure, valid = tree_inputs(torch.from_numpy(parents), sizes, positions.long())
    return TreeBatch(torch.from_numpy(tokens), pos, structure, valid)
