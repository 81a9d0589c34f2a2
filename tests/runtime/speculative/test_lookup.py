"""runtime.speculative.drafters.lookup: the incremental n-gram index and lookup trees."""

import pytest

from tokopt.errors import TokoptError
from tokopt.runtime.speculative.drafters.lookup import LookupConfig, NgramIndex, PromptLookup, lookup_tree
from tokopt.runtime.sampling import SamplingParams


def test_longest_ngram_match_wins_and_most_recent_first():
    history = [1, 2, 3, 4, 9, 2, 3, 5, 6, 1, 2, 3]
    index = NgramIndex(max_ngram=3)
    index.update(history)
    # "1 2 3" occurred at the start, followed by 4 9 ...; "2 3" also occurred followed by 5 6
    assert index.continuations(history, 3, 2) == [[4, 9, 2]]
    index2 = NgramIndex(max_ngram=2)
    index2.update(history)
    assert index2.continuations(history, 2, 2) == [[5, 6], [4, 9]]


def test_incremental_updates_equal_a_fresh_index():
    history = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4, 6]
    grown = NgramIndex(3)
    for end in range(1, len(history) + 1):
        grown.update(history[:end])
    fresh = NgramIndex(3)
    fresh.update(history)
    assert grown.seen == fresh.seen


def test_no_match_gives_a_root_only_tree_and_budget_caps_the_trie():
    assert lookup_tree(7, [], budget=4).size == 1
    tree = lookup_tree(7, [[1, 2, 3], [1, 4, 5], [6]], budget=4)
    assert tree.size == 5  # root + 1, 2, 3, 4 (the shared 1 is merged; the rest is cut at the budget)
    assert tree.tokens == [7, 1, 2, 3, 4]
    assert tree.parents == [-1, 0, 1, 2, 1]


def test_drafter_uses_prompt_and_output():
    drafter = PromptLookup(LookupConfig(budget=3, branches=1))
    drafter.start([[5, 6, 7, 8]], SamplingParams())
    tree = drafter.draft([[5, 6, 7, 8, 1, 5, 6]])[0]
    assert tree.tokens == [6, 7, 8, 1]


@pytest.mark.parametrize("kw", [dict(budget=0), dict(min_ngram=0), dict(min_ngram=3, max_ngram=2), dict(branches=0)])
def test_bad_config_is_refused(kw):
    with pytest.raises(TokoptError):
        LookupConfig(**kw)
