"""Numba CPU greedy acceptance equals the torch reference (kernels/accept.py)."""

import numpy as np
import pytest
import torch

from tokopt.kernels import accept as K
from tokopt.bench.cuda_check import planted_logits, random_draft_tree
from tokopt.runtime.speculative.tree import DraftTree

CASES = [(1, "chain"), (2, "chain"), (8, "chain"), (8, "wide"), (20, "wide"), (5, "random"), (30, "random")]


@pytest.mark.parametrize("n,shape", CASES)
@pytest.mark.parametrize("seed", range(4))
def test_cpu_greedy_accept_equals_reference(n, shape, seed):
    rng = np.random.default_rng(seed * 1000 + n)
    tree = random_draft_tree(rng, n, shape, vocab=97)
    logits = planted_logits(rng, tree, 97, accept_p=0.8)
    padded = torch.cat([logits, torch.randn(3, 97)])  # rows past the tree (batch padding) are ignored
    assert K.greedy_accept_cpu(tree, padded) == K.greedy_accept_reference(tree, padded)


def test_ties_and_nan_follow_torch_argmax():
    tree = DraftTree.from_parents([0, 3, 5], [-1, 0, 0])
    logits = torch.zeros(3, 8)
    logits[0, [3, 5]] = 2.0  # a tie: the first index (3) wins, as torch.argmax
    logits[1, 6] = float("nan")  # a NaN wins, as torch.argmax
    assert K.greedy_accept_cpu(tree, logits) == K.greedy_accept_reference(tree, logits) == ([0, 1], 6)


def test_float64_logits_and_the_public_dispatch():
    rng = np.random.default_rng(3)
    tree = random_draft_tree(rng, 10, "random", 50)
    logits = planted_logits(rng, tree, 50, dtype=torch.float64)
    assert K.greedy_accept(tree, logits) == K.greedy_accept_reference(tree, logits)
    assert K.GREEDY_ACCEPT.pick(tree, logits.half()) is K.greedy_accept_reference  # float16: the reference
