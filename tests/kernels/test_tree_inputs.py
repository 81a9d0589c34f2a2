"""Numba CPU tree inputs and step mask equal the torch reference (kernels/tree_inputs.py)."""

import numpy as np
import pytest
import torch

from tokopt.kernels import tree_inputs as K
from tokopt.bench.cuda_check import random_tree_batch

SIZES = [[1], [2], [7], [1, 1], [1, 5, 12, 3], [16, 16, 2], [32]]


@pytest.mark.parametrize("sizes", SIZES, ids=str)
@pytest.mark.parametrize("shape", ["chain", "wide", "random"])
def test_cpu_tree_inputs_equal_reference(sizes, shape):
    rng = np.random.default_rng(len(sizes) * 100 + sum(sizes))
    parents, n, roots = random_tree_batch(rng, sizes, [shape] * len(sizes))
    want = K.tree_inputs_reference(parents, n, roots)
    got = K.tree_inputs_cpu(parents, n, roots)
    for name, a, b in zip(("positions", "structure", "valid"), want, got):
        assert a.dtype == b.dtype and torch.equal(a, b), name


def test_tree_inputs_of_a_known_tree():
    positions, structure, valid = K.tree_inputs_cpu(torch.tensor([[-1, 0, 0, 1], [-1, 0, 9, 9]]),
                                                    torch.tensor([4, 2]), torch.tensor([12, 7]))
    assert positions.tolist() == [[12, 13, 13, 14], [7, 8, 7, 7]]
    assert structure[0, 3].tolist() == [True, True, False, True]
    assert valid.tolist() == [[True] * 4, [True, True, False, False]]
    assert not structure[1, 2:].any() and not structure[1, :, 2:].any()


@pytest.mark.parametrize("impl", [K.tree_inputs_reference, K.tree_inputs_cpu], ids=["reference", "numba"])
def test_parent_after_its_node_is_refused(impl):
    with pytest.raises(ValueError, match="parent"):
        impl(torch.tensor([[-1, 2, 0]]), torch.tensor([3]), torch.tensor([0]))


@pytest.mark.parametrize("sizes", SIZES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_step_mask_equals_reference(sizes, dtype):
    rng = np.random.default_rng(sum(sizes))
    parents, n, roots = random_tree_batch(rng, sizes)
    _, structure, valid = K.tree_inputs_reference(parents, n, roots)
    past = torch.from_numpy(rng.random((len(sizes), 9)) < 0.5)
    assert torch.equal(K.step_mask_cpu(past, structure, valid, dtype), K.step_mask_reference(past, structure, valid, dtype))
    # no padding mask, and a [N, N] structure shared by the batch (prefill / plain decode)
    assert torch.equal(K.step_mask_cpu(past, structure), K.step_mask_reference(past, structure))
    causal = torch.ones(n.max(), n.max(), dtype=torch.bool).tril()
    assert torch.equal(K.step_mask_cpu(past, causal, valid, dtype), K.step_mask_reference(past, causal, valid, dtype))


def test_step_mask_in_other_dtypes_runs_the_reference():
    past, structure = torch.tensor([[False, True]]), torch.ones(1, 2, 2, dtype=torch.bool)
    assert K.STEP_MASK.pick(past, structure, None, torch.bfloat16) is K.step_mask_reference
    assert K.step_mask(past, structure, None, torch.bfloat16).dtype == torch.bfloat16
