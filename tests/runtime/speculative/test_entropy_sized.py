"""runtime.speculative.drafters.entropy_sized: per-entropy-bucket trees; lossless on the real model."""

import pytest
import torch

from tokopt.errors import TokoptError
from tokopt.runtime.sampling import SamplingParams
from tokopt.runtime.speculative.drafters.entropy_sized import EntropySizedRecycling
from tokopt.runtime.speculative.drafters.recycling import RecyclingConfig
from tokopt.runtime.speculative.tree_size import LatencyProfile
from tokopt.runtime.speculative.verify import Verdict


def test_buckets_by_entropy():
    drafter = EntropySizedRecycling(10, RecyclingConfig(budget=2, k=2, lookup_nodes=0), edges=(0.5, 2.0))
    assert [drafter.bucket(h) for h in (0.0, 0.49, 0.5, 1.9, 2.0, 7.0)] == [0, 0, 1, 1, 2, 2]


def test_each_row_drafts_with_its_bucket_template_and_feeds_back_to_its_bucket():
    drafter = EntropySizedRecycling(10, RecyclingConfig(budget=2, k=2, lookup_nodes=0), edges=(1.0,))
    drafter.bucket_templates = [[(0, 0), (1, 0)], []]  # confident: a chain of 2; uncertain: root only
    drafter.adj[3] = torch.tensor([4, 5], dtype=torch.int32)
    drafter.adj[4] = torch.tensor([6, 7], dtype=torch.int32)
    drafter.start([[3], [3]], SamplingParams())
    drafter.root_entropy([0.1, 4.0])
    confident, uncertain = drafter.draft([[3], [3]])
    assert confident.tokens == [3, 4, 6] and uncertain.tokens == [3]
    drafter.feedback([confident, uncertain], [Verdict([0, 1], 7), Verdict([0], 4)])
    assert drafter.bucket_stats[0].hits[1].tolist() == [1, 0] and drafter.bucket_stats[0].hits[2].tolist() == [0, 1]
    assert drafter.bucket_stats[1].hits[1].tolist() == [1, 0] and drafter.bucket_stats[1].trials[2] == 0


def test_sizes_follow_acceptance_per_bucket():
    """A bucket whose guesses are always right grows its tree; one whose guesses are never right shrinks to the
    root (under a latency profile where extra nodes cost time)."""
    drafter = EntropySizedRecycling(10, RecyclingConfig(budget=4, k=2, lookup_nodes=0), edges=(1.0,))
    for _ in range(500):
        for depth in range(1, 9):
            drafter.bucket_stats[0].record(depth, 0)
        drafter.bucket_stats[1].record(1, None)
    profile = LatencyProfile({n: 0.01 * (1 + 0.1 * (n - 1)) for n in range(1, 33)}, past=64, machine="test",
                             engine="test")
    drafter.set_profile(profile, max_nodes=16)
    assert drafter.bucket_budgets[0] >= 8 and drafter.bucket_budgets[1] == 0


def test_bad_edges_are_refused():
    for edges in ((), (2.0, 1.0), (0.0, 1.0), (1.0, 1.0)):
        with pytest.raises(TokoptError, match="edges"):
            EntropySizedRecycling(10, edges=edges)


def test_greedy_output_equals_plain_on_real_questions(opt, tokenizer, spec_bench_questions, pick_questions):
    from tokopt.runtime.prompts import encode_prompts

    spec = opt.with_speculative("recycling-entropy")
    steps_by_bucket = set()
    for q in pick_questions(spec_bench_questions, 3):
        ids, mask = encode_prompts(tokenizer, [q["turns"][0]])
        plain = opt.generate(ids, mask, max_new_tokens=48)
        assert torch.equal(spec.generate(ids, mask, max_new_tokens=48), plain), q["turns"][0][:80]
        steps_by_bucket |= set(spec.drafter._row_bucket)
    assert len(steps_by_bucket) > 1, "every step fell in one entropy bucket: the test would not exercise sizing"
