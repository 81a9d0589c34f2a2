"""runtime.speculative.drafters.recycling: the adjacency matrix, tree filling, acceptance-shaped templates."""

import pytest
import torch

from tokopt.errors import TokoptError
from tokopt.runtime.sampling import SamplingParams
from tokopt.runtime.speculative.drafters.recycling import RecyclingConfig, TokenRecycling
from tokopt.runtime.speculative.verify import Verdict


def test_observe_stores_topk_successors_of_every_valid_node():
    drafter = TokenRecycling(10, RecyclingConfig(k=3))
    logits = torch.tensor([[[0, 5, 4, 3, 0, 0, 0, 0, 0, 0.], [9, 0, 0, 0, 0, 0, 0, 0, 8, 7]]])
    drafter.observe(torch.tensor([[2, 6]]), logits, torch.tensor([[True, False]]))
    assert drafter.adj[2].tolist() == [1, 2, 3]
    assert (drafter.adj[6] == -1).all()  # padding nodes teach nothing


def test_draft_fills_the_template_breadth_first_and_drops_unknown_tokens():
    drafter = TokenRecycling(10, RecyclingConfig(budget=4, k=2))
    drafter.template = [(0, 0), (0, 1), (1, 0), (2, 0)]  # two children of the root, one under each
    drafter.adj[3] = torch.tensor([4, 5], dtype=torch.int32)
    drafter.adj[4] = torch.tensor([6, 7], dtype=torch.int32)
    drafter.start([[1, 3]], SamplingParams())
    tree = drafter.draft([[1, 3]])[0]
    assert tree.tokens == [3, 4, 5, 6]  # 5 was never seen: its child is dropped
    assert tree.parents == [-1, 0, 0, 1]


def test_feedback_records_which_rank_the_target_chose():
    drafter = TokenRecycling(10, RecyclingConfig(budget=2, k=2))
    drafter.template = [(0, 0), (1, 0)]
    drafter.adj[3] = torch.tensor([4, 5], dtype=torch.int32)
    drafter.adj[4] = torch.tensor([6, 7], dtype=torch.int32)
    drafter.start([[3]], SamplingParams())
    tree = drafter.draft([[3]])[0]
    drafter.feedback([tree], [Verdict([0, 1], 7)])  # accepted 4 (rank 0), then the target said 7 (rank 1)
    assert drafter.stats.hits[1].tolist() == [1, 0] and drafter.stats.hits[2].tolist() == [0, 1]


def test_lookup_nodes_merge_into_the_tree():
    drafter = TokenRecycling(10, RecyclingConfig(budget=1, k=2, lookup_nodes=2))
    drafter.template = [(0, 0)]
    drafter.adj[2] = torch.tensor([8, 9], dtype=torch.int32)
    drafter.start([[2, 5, 6, 2]], SamplingParams())
    tree = drafter.draft([[2, 5, 6, 2]])[0]
    assert tree.tokens == [2, 8, 5, 6] and tree.parents == [-1, 0, 0, 2]


def test_state_fits_in_4_mb_for_a_49k_vocabulary():
    drafter = TokenRecycling(49152)
    assert drafter.state_bytes() < 4 * 2 ** 20
    assert drafter.state_bytes() == 49152 * 8 * 4


@pytest.mark.parametrize("kw", [dict(budget=0), dict(k=0), dict(lookup_nodes=-1)])
def test_bad_config_is_refused(kw):
    with pytest.raises(TokoptError):
        RecyclingConfig(**kw)
