"""tokopt.models.kv_cache: the null-slot empty cache, extend, and compact (shared and per-row)."""

import torch

from tokopt.models.decoder_graph import GraphSpec
from tokopt.models.kv_cache import KVCache

SPEC = GraphSpec(num_layers=2, num_kv_heads=2, head_dim=3, vocab_size=10, max_positions=64, model_type="llama")


def _random_cache(batch=2, length=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(batch, SPEC.num_kv_heads, length, SPEC.head_dim, generator=g)
               for _ in range(2 * SPEC.num_layers)]
    valid = torch.rand(batch, length, generator=g) > 0.3
    return KVCache(tensors, valid)


def test_empty_holds_one_masked_null_slot():
    cache = KVCache.empty(SPEC, batch=3)
    assert len(cache.tensors) == 2 * SPEC.num_layers
    for t in cache.tensors:
        assert t.shape == (3, SPEC.num_kv_heads, 1, SPEC.head_dim)
        assert t.dtype == torch.float32 and not t.any()
    assert cache.valid.shape == (3, 1) and not cache.valid.any()
    assert cache.length == 1
    assert KVCache.empty(SPEC, batch=1, dtype=torch.float16).tensors[0].dtype == torch.float16


def test_extend_adopts_present_and_concatenates_validity():
    cache = _random_cache(batch=2, length=4)
    present = [torch.randn(2, SPEC.num_kv_heads, 7, SPEC.head_dim) for _ in range(2 * SPEC.num_layers)]
    new_valid = torch.tensor([[True, False, True], [False, True, True]])
    out = cache.extend(present, new_valid)
    assert len(out.tensors) == len(present)
    assert all(torch.equal(a, b) for a, b in zip(out.tensors, present))
    assert torch.equal(out.valid, torch.cat([cache.valid, new_valid], dim=1))
    assert out.length == 7
    assert cache.length == 4  # the original is not modified


def test_compact_shared_keep_equals_index_selection():
    cache = _random_cache(batch=2, length=7)
    keep = torch.tensor([0, 1, 2, 5, 3])  # not sorted: "in that order"
    out = cache.compact(keep)
    for got, t in zip(out.tensors, cache.tensors):
        assert torch.equal(got, t[:, :, keep.tolist(), :])
    assert torch.equal(out.valid, cache.valid[:, keep.tolist()])
    assert out.length == len(keep)


def test_compact_per_row_keep_equals_manual_selection():
    cache = _random_cache(batch=3, length=8, seed=1)
    keep = torch.tensor([[0, 1, 2, 5, 7],
                         [0, 1, 2, 3, 4],
                         [0, 6, 2, 7, 1]])
    out = cache.compact(keep)
    for got, t in zip(out.tensors, cache.tensors):
        assert got.shape == (3, SPEC.num_kv_heads, 5, SPEC.head_dim)
        for b in range(3):
            for j, slot in enumerate(keep[b].tolist()):
                assert torch.equal(got[b, :, j, :], t[b, :, slot, :])
    for b in range(3):
        assert out.valid[b].tolist() == [bool(cache.valid[b, s]) for s in keep[b].tolist()]


def test_compact_then_extend_round_trip():
    cache = _random_cache(batch=1, length=5, seed=2)
    kept = cache.compact(torch.tensor([0, 2, 4]))
    present = [torch.cat([t, torch.ones(1, SPEC.num_kv_heads, 1, SPEC.head_dim)], dim=2) for t in kept.tensors]
    grown = kept.extend(present, torch.ones(1, 1, dtype=torch.bool))
    assert grown.length == 4
    assert grown.valid[0].tolist() == cache.valid[0, [0, 2, 4]].tolist() + [True]


def test_compact_tail_moves_accepted_slots_per_row_and_kills_the_rest():
    cache = _random_cache(batch=2, length=9)
    before = [t.clone() for t in cache.tensors]
    start = 4  # slots 4..8 are a verify step's tree nodes
    index = torch.tensor([[0, 2, 3], [0, 4, 0]])  # row 0 accepted nodes 0, 2, 3; row 1 nodes 0, 4
    index_valid = torch.tensor([[True, True, True], [True, True, False]])
    out = cache.compact_tail(start, index, index_valid)
    assert out.length == 9  # dead slots stay until drop_dead
    for t, old in zip(out.tensors, before):
        assert torch.equal(t[:, :, :start], old[:, :, :start])  # the prefix is untouched
        assert torch.equal(t[0, :, start:start + 3], old[0, :, [4, 6, 7]])
        assert torch.equal(t[1, :, start:start + 2], old[1, :, [4, 8]])
    assert torch.equal(out.valid[:, :start], cache.valid[:, :start])
    assert out.valid[:, start:].tolist() == [[True, True, True, False, False], [True, True, False, False, False]]
    assert out.dead_slots() == 2


def test_drop_dead_removes_slots_no_row_sees_and_keeps_the_null_slot():
    cache = _random_cache(batch=2, length=6)
    cache.valid[:] = torch.tensor([[False, True, False, True, False, False], [False, False, False, True, True, False]])
    out = cache.drop_dead()
    assert out.length == 4  # null slot 0, then slots 1, 3, 4
    assert out.valid.tolist() == [[False, True, True, False], [False, False, True, True]]
    assert torch.equal(out.tensors[0], cache.tensors[0][:, :, [0, 1, 3, 4]])
