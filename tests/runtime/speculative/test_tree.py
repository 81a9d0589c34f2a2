"""runtime.speculative.tree: tree validation, depths/children, and batching trees into verify inputs."""

import pytest
import torch

from tokopt.models.masks import step_mask
from tokopt.runtime.speculative.tree import DraftTree, ancestor_matrix, pack_trees


def test_tree_depths_children_and_paths():
    tree = DraftTree.from_parents([5, 7, 9, 11, 13], [-1, 0, 0, 1, 3])
    assert tree.depths == [0, 1, 1, 2, 3]
    assert tree.children == [[1, 2], [3], [], [4], []]
    assert tree.path_tokens([0, 1, 3]) == [5, 7, 11]
    assert DraftTree.root_only(4).size == 1


@pytest.mark.parametrize("tokens,parents", [([1, 2], [-1, 1]), ([1, 2], [0, 0]), ([1], [-1, 0]), ([], [])])
def test_malformed_trees_are_refused(tokens, parents):
    with pytest.raises(ValueError):
        DraftTree(tokens, parents)


def test_ancestor_matrix_is_ancestor_or_self():
    seen = ancestor_matrix([-1, 0, 0, 1])
    assert seen.tolist() == [[True, False, False, False], [True, True, False, False],
                             [True, False, True, False], [True, True, False, True]]


def test_pack_trees_pads_and_positions_by_depth():
    a = DraftTree.from_parents([5, 7, 9], [-1, 0, 1])
    b = DraftTree.from_parents([4, 6, 8, 10], [-1, 0, 0, 2])
    batch = pack_trees([a, b], positions=torch.tensor([10, 3]), pad_token=0)
    assert batch.tokens.tolist() == [[5, 7, 9, 0], [4, 6, 8, 10]]
    assert batch.valid.tolist() == [[True, True, True, False], [True] * 4]
    assert batch.positions[0, :3].tolist() == [10, 11, 12]
    assert batch.positions[1].tolist() == [3, 4, 4, 5]
    assert torch.equal(batch.structure[1], ancestor_matrix(b.parents))
    mask = step_mask(torch.ones(2, 2, dtype=torch.bool), batch.structure, batch.valid)
    assert mask.shape == (2, 1, 4, 6)
    assert (mask[0, 0, :, 5] < 0).all()  # nobody attends to row 0's padding node
    assert (mask[1, 0, 3, 2:] == 0).tolist() == [True, False, True, True]  # node 3 sees root, node 2, itself
