"""Numba CPU KV tail compaction equals the torch reference on every valid slot (kernels/kv_compact.py)."""

import numpy as np
import pytest
import torch

from tokopt.kernels import kv_compact as K
from tokopt.bench.cuda_check import random_paths, same_compaction


def _tensors(rng, batch, length, dtype=np.float32):
    return [torch.from_numpy(rng.standard_normal((batch, 3, length, 4)).astype(dtype)) for _ in range(4)]


@pytest.mark.parametrize("batch,k,tail", [(1, 1, 1), (1, 1, 6), (1, 5, 5), (1, 4, 20), (3, 6, 16), (4, 1, 3)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cpu_compact_tail_equals_reference(batch, k, tail, dtype):
    rng = np.random.default_rng(batch * 100 + k * 10 + tail)
    start = 7
    tensors = _tensors(rng, batch, start + tail, dtype)
    index, valid = random_paths(rng, batch, k, tail)
    want, got = [t.clone() for t in tensors], [t.clone() for t in tensors]
    K.compact_tail_reference(want, start, index, valid)
    K.compact_tail_cpu(got, start, index, valid)
    assert all(same_compaction(a, b, start, valid) for a, b in zip(want, got))


def test_in_place_paths_copy_nothing_and_decreasing_index_runs_the_gather():
    rng = np.random.default_rng(0)
    tensors = _tensors(rng, 2, 10)
    before = [t.clone() for t in tensors]
    K.compact_tail_cpu(tensors, 4, torch.tensor([[0, 1, 2], [0, 1, 0]]), torch.tensor([[True] * 3, [True, True, False]]))
    assert all(torch.equal(a, b) for a, b in zip(tensors, before))
    index, valid = torch.tensor([[3, 0]]), torch.tensor([[True, True]])  # not a path: moves that overlap
    one = [t[:1].clone() for t in before]
    want = [t.clone() for t in one]
    K.compact_tail_reference(want, 4, index, valid)
    K.compact_tail_cpu(one, 4, index, valid)
    assert all(torch.equal(a, b) for a, b in zip(want, one))


def test_float16_caches_run_the_reference():
    tensors = [torch.zeros(1, 1, 4, 2, dtype=torch.float16)]
    assert K.COMPACT_TAIL.pick(tensors, 1, torch.tensor([[0]]), torch.tensor([[True]])) is K.compact_tail_reference


def test_index_outside_the_tail_is_refused():
    tensors = _tensors(np.random.default_rng(0), 1, 6)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        K.compact_tail_cpu(tensors, 4, torch.tensor([[0, 2]]), torch.tensor([[True, True]]))
