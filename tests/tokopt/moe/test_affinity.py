"""Transition counts, affinity, load, mutual information and stability on traces small enough to check by hand."""

import numpy as np
import pytest

from tokopt.errors import TokoptError
from tokopt.moe.affinity import affinity, expert_load, mutual_information, transition_counts
from tokopt.moe.placement import stability
from tokopt.moe.traces import RoutingTrace


def _tiny():
    # 4 tokens, 2 layers, top-1, 3 experts: 0->1, 0->1, 0->2, 2->0
    return RoutingTrace(np.array([[[0], [1]], [[0], [1]], [[0], [2]], [[2], [0]]]), None, num_experts=3)


def test_counts_and_affinity_by_hand():
    t = _tiny()
    C = transition_counts(t)
    assert C.shape == (1, 3, 3)
    assert C[0].tolist() == [[0, 2, 1], [0, 0, 0], [1, 0, 0]]
    A = affinity(C)
    assert A[0, 0].tolist() == pytest.approx([0, 2 / 3, 1 / 3])
    assert A[0, 1].tolist() == pytest.approx([1 / 3] * 3)  # never seen: uniform
    As = affinity(C, smoothing=1.0)
    assert As[0, 0].tolist() == pytest.approx([1 / 6, 3 / 6, 2 / 6])
    assert expert_load(t).tolist() == [[3, 0, 1], [1, 2, 1]]


def test_topk_pairs_weighted_by_gate_products():
    # one token, top-2: layer 0 experts (0: 0.75, 1: 0.25), layer 1 experts (2: 0.5, 3: 0.5)
    t = RoutingTrace(np.array([[[0, 1], [2, 3]]]), np.array([[[0.75, 0.25], [0.5, 0.5]]]), num_experts=4)
    C = transition_counts(t, top1=False)[0]
    assert C[0, 2] == pytest.approx(0.375) and C[0, 3] == pytest.approx(0.375)
    assert C[1, 2] == pytest.approx(0.125) and C.sum() == pytest.approx(1.0)
    t.weights = None  # no weights: 1/k^2 per pair
    assert transition_counts(t, top1=False)[0, 1, 3] == pytest.approx(0.25)
    assert transition_counts(t, top1=True)[0].sum() == 1 and transition_counts(t, top1=True)[0, 0, 2] == 1


def test_mutual_information_deterministic_vs_shuffled():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 8, 4000)
    t = RoutingTrace(np.stack([a, (a + 3) % 8], axis=1)[:, :, None], None, num_experts=8)
    mi = mutual_information(t)
    assert mi["mi_bits"][0] == pytest.approx(3.0, abs=0.01)
    assert mi["shuffled_bits"][0] < 0.05


def test_stability_same_process_is_close():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 8, 4000)
    b = np.where(rng.random(4000) < 0.8, (a + 3) % 8, rng.integers(0, 8, 4000))
    t = RoutingTrace(np.stack([a, b], axis=1)[:, :, None], None, num_experts=8)
    s = stability(t.subset(slice(0, 2000)), t.subset(slice(2000, None)), gpus=4)
    assert s["tv"] < 0.1
    assert s["cross_a_on_b"] == pytest.approx(s["cross_b_on_b"], abs=0.02)
    assert s["cross_a_on_b"] < 0.25 < s["cross_contiguous"]


def test_single_layer_has_no_affinity():
    with pytest.raises(TokoptError, match="at least 2 MoE layers"):
        transition_counts(RoutingTrace(np.zeros((3, 1, 1), dtype=np.int64), None, num_experts=2))
