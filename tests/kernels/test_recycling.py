"""Numba CPU Token Recycling update (top-k into the adjacency) and tree fill equal the reference."""

import numpy as np
import pytest
import torch

from tokopt.kernels import recycling as K
from tokopt.bench.cuda_check import random_adjacency, random_template


SHAPES = [(1, 1, 1), (8, 1, 12), (8, 2, 5), (3, 3, 1)]  # (k, batch, nodes); tokens distinct, so B * N <= V
UPDATE_CASES = [(v, *s) for v in (8, 100, 511, 512, 1300, 49152) for s in SHAPES if s[0] <= v and s[1] * s[2] <= v]


@pytest.mark.parametrize("vocab,k,batch,n", UPDATE_CASES)
def test_cpu_update_equals_reference(vocab, k, batch, n):
    rng = np.random.default_rng(vocab + k)
    tokens = torch.from_numpy(rng.choice(vocab, size=batch * n, replace=False)).view(batch, n)
    valid = torch.from_numpy(rng.random((batch, n)) < 0.7)
    logits = torch.from_numpy(rng.standard_normal((batch, n, vocab)).astype(np.float32))
    adj = random_adjacency(rng, vocab, k)
    want, got = adj.clone(), adj.clone()
    K.recycling_update_reference(want, tokens, valid, logits)
    K.recycling_update_cpu(got, tokens, valid, logits)
    assert torch.equal(want, got)


def test_update_ranks_nan_above_inf_above_finite_and_breaks_ties_by_index():
    logits = torch.zeros(1, 2, 1100)
    logits[0, 0, [900, 30, 700]] = torch.tensor([float("inf"), 5.0, float("nan")])
    logits[0, 1, [1000, 4, 600]] = 7.0  # a three-way tie: lower index first
    adj = torch.full((10, 4), -1, dtype=torch.int32)
    K.recycling_update_cpu(adj, torch.tensor([[2, 3]]), torch.tensor([[True, True]]), logits)
    assert adj[2, :3].tolist() == [700, 900, 30]
    assert adj[3, :3].tolist() == [4, 600, 1000]
    ref = adj.clone()
    K.recycling_update_reference(ref, torch.tensor([[2, 3]]), torch.tensor([[True, True]]), logits)
    assert ref[2, :3].tolist() == [700, 900, 30]  # torch.topk agrees where no ties are involved


def test_update_duplicate_tokens_last_node_wins():
    logits = torch.tensor([[[0.0, 1.0, 2.0], [2.0, 1.0, 0.0]]])
    adj = torch.full((4, 1), -1, dtype=torch.int32)
    K.recycling_update_cpu(adj, torch.tensor([[3, 3]]), torch.tensor([[True, True]]), logits)
    assert adj[3].tolist() == [0]


def test_update_with_fewer_logits_than_k_is_refused():
    with pytest.raises(ValueError, match="k = 8"):
        K.recycling_update_cpu(torch.full((4, 8), -1, dtype=torch.int32), torch.tensor([[1]]), torch.tensor([[True]]),
                               torch.zeros(1, 1, 4))


@pytest.mark.parametrize("m", [0, 1, 5, 16, 80])
@pytest.mark.parametrize("unseen", [0.0, 0.5, 1.0])
def test_cpu_fill_equals_reference(m, unseen):
    rng = np.random.default_rng(m)
    adj = random_adjacency(rng, 200, 8, unseen)
    template = random_template(rng, m, 8)
    roots = [int(r) for r in rng.integers(0, 200, size=5)]
    assert K.recycling_fill_cpu(adj, roots, template) == K.recycling_fill_reference(adj, roots, template)


def test_fill_of_a_known_table():
    adj = torch.full((5, 2), -1, dtype=torch.int32)
    adj[3] = torch.tensor([1, 4])
    adj[1, 0] = 2
    template = [(0, 0), (0, 1), (1, 0), (2, 0), (4, 0)]  # 4th node hangs under node 2 (token 4, unseen): dropped
    for fill in (K.recycling_fill_reference, K.recycling_fill_cpu):
        assert fill(adj, [3], template) == [([3, 1, 4, 2], [-1, 0, 0, 1])]


def test_bad_template_is_refused():
    adj = torch.full((5, 2), -1, dtype=torch.int32)
    with pytest.raises(ValueError, match="parent"):
        K.recycling_fill_cpu(adj, [1], [(1, 0)])
    with pytest.raises(ValueError, match="rank 5"):
        K.recycling_fill_cpu(adj, [1], [(0, 5)])
