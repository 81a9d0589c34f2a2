"""tokopt.models.masks: tree ancestry, additive step masks, positions of left-padded prompts."""

import pytest
import torch

from tokopt.models.masks import causal_structure, prompt_positions, step_mask, tree_structure


def _ancestors_by_walking(parents):
    """Reference: node i sees j iff j is i or one of i's ancestors (walk the parent chain)."""
    n = len(parents)
    out = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        j = i
        while j >= 0:
            out[i, j] = True
            j = parents[j]
    return out


def test_tree_structure_hand_made_tree():
    #        0
    #      /   \
    #     1     2
    #    / \     \
    #   3   4     5
    #   |
    #   6
    parents = [-1, 0, 0, 1, 1, 2, 3]
    expected = torch.tensor([
        # 0  1  2  3  4  5  6
        [1, 0, 0, 0, 0, 0, 0],  # 0
        [1, 1, 0, 0, 0, 0, 0],  # 1
        [1, 0, 1, 0, 0, 0, 0],  # 2
        [1, 1, 0, 1, 0, 0, 0],  # 3
        [1, 1, 0, 0, 1, 0, 0],  # 4
        [1, 0, 1, 0, 0, 1, 0],  # 5
        [1, 1, 0, 1, 0, 0, 1],  # 6
    ], dtype=torch.bool)
    got = tree_structure(torch.tensor(parents))
    assert got.dtype == torch.bool and got.shape == (7, 7)
    assert torch.equal(got, expected)
    assert torch.equal(got, _ancestors_by_walking(parents))


def test_tree_structure_forest_and_chain():
    forest = [-1, -1, 0, 1, 3]  # two roots: 0 -> 2 and 1 -> 3 -> 4
    assert torch.equal(tree_structure(torch.tensor(forest)), _ancestors_by_walking(forest))
    chain = [-1, 0, 1, 2, 3]  # a chain is plain causal attention
    assert torch.equal(tree_structure(torch.tensor(chain)), torch.ones(5, 5, dtype=torch.bool).tril())


@pytest.mark.parametrize("parents", [[-1, 2, 0], [-1, 0, 2], [0], [-1, 0, 3, 1]])
def test_tree_structure_rejects_parent_after_child(parents):
    with pytest.raises(ValueError, match="parent"):
        tree_structure(torch.tensor(parents))


def test_causal_structure_is_lower_triangular_per_batch():
    s = causal_structure(4, batch=3)
    assert s.shape == (3, 4, 4)
    for b in range(3):
        assert torch.equal(s[b], torch.ones(4, 4, dtype=torch.bool).tril())


def _expected_mask(past_valid, structure, new_valid, dtype):
    batch, p = past_valid.shape
    n = structure.shape[-1]
    low = torch.finfo(dtype).min
    out = torch.full((batch, 1, n, p + n), low, dtype=dtype)
    for b in range(batch):
        for i in range(n):
            for s in range(p):
                if past_valid[b, s]:
                    out[b, 0, i, s] = 0
            for j in range(n):
                if structure[b, i, j] and (new_valid is None or new_valid[b, j]):
                    out[b, 0, i, p + j] = 0
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_step_mask_padding_past_validity_and_causality(dtype):
    past_valid = torch.tensor([[False, True, True, False, True],
                               [False, False, False, True, True]])
    new_valid = torch.tensor([[False, True, True],
                              [True, True, True]])
    structure = causal_structure(3, batch=2)
    mask = step_mask(past_valid, structure, new_valid=new_valid, dtype=dtype)
    assert mask.shape == (2, 1, 3, 8) and mask.dtype == dtype
    assert torch.equal(mask, _expected_mask(past_valid, structure, new_valid, dtype))
    # only two values ever appear: 0 (attend) and finfo.min (not), never -inf
    values = set(mask.unique().tolist())
    assert values == {0.0, float(torch.finfo(dtype).min)}
    # spot checks against the definition
    low = torch.finfo(dtype).min
    assert mask[0, 0, 0, 0] == low  # null slot 0 is never valid
    assert mask[0, 0, 2, 1] == 0  # valid past slot
    assert mask[0, 0, 2, 3] == low  # invalid past slot
    assert mask[0, 0, 1, 5] == low  # padded new token 0 is never attended to
    assert mask[0, 0, 1, 6] == 0  # itself
    assert mask[0, 0, 1, 7] == low  # the future
    assert mask[1, 0, 2, 5] == 0 and mask[1, 0, 0, 6] == low


def test_step_mask_tree_structure_broadcasts_over_batch():
    parents = torch.tensor([-1, 0, 0, 1])
    tree = tree_structure(parents)
    past_valid = torch.tensor([[False, True], [False, True]])
    mask = step_mask(past_valid, tree)
    assert mask.shape == (2, 1, 4, 6)
    expected = _expected_mask(past_valid, tree.expand(2, 4, 4), None, torch.float32)
    assert torch.equal(mask, expected)
    # siblings 1 and 2 do not see each other; 3 sees 0 and 1 but not 2
    assert mask[0, 0, 2, 2 + 1] != 0 and mask[0, 0, 1, 2 + 2] != 0
    assert (mask[0, 0, 3, 2:] == 0).tolist() == [True, True, False, True]


def test_fully_masked_rows_stay_finite_in_attention():
    """The module's reason for finfo.min over -inf: a padding row with nothing to attend to stays finite."""
    past_valid = torch.zeros(1, 1, dtype=torch.bool)
    mask = step_mask(past_valid, causal_structure(3, 1), new_valid=torch.tensor([[False, True, True]]))
    q, k, v = (torch.randn(1, 2, 3, 4) for _ in range(3))
    k = torch.cat([torch.zeros(1, 2, 1, 4), k], dim=2)
    v = torch.cat([torch.zeros(1, 2, 1, 4), v], dim=2)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.isfinite(out).all()


def test_prompt_positions_left_padded():
    valid = torch.tensor([[0, 0, 1, 1, 1],
                          [1, 1, 1, 1, 1],
                          [0, 0, 0, 0, 1]], dtype=torch.bool)
    pos = prompt_positions(valid)
    assert pos.dtype == torch.long and pos.shape == valid.shape
    for b in range(valid.shape[0]):
        real = int(valid[b].sum())
        assert pos[b][valid[b]].tolist() == list(range(real))  # real tokens count from 0
        assert (pos[b][~valid[b]] >= 0).all()  # pads get a harmless, non-negative position
    assert pos[0].tolist() == [0, 0, 0, 1, 2]
    assert pos[2].tolist() == [0, 0, 0, 0, 0]
