"""PRR and ROC-AUC: oracle, reversed and random orderings; hand cases; bad input."""

import doctest

import numpy as np
import pytest

from tokopt.errors import TokoptError
from tokopt.uncertainty.evaluation import prr, roc_auc


def test_prr_oracle_reversed_random():
    rng = np.random.default_rng(0)
    quality = rng.random(200)
    assert prr(-quality, quality) == pytest.approx(1.0, abs=1e-12)
    assert prr(1.0 - 3 * quality, quality) == pytest.approx(1.0, abs=1e-12)  # only the order counts
    assert prr(quality, quality) < -0.9
    wrong = (rng.random(200) < 0.3).astype(float)
    assert prr(wrong + 0.0, 1 - wrong) == pytest.approx(1.0, abs=1e-12)        # binary quality, tied scores
    draws = [prr(rng.random(200), quality) for _ in range(300)]
    assert abs(np.mean(draws)) < 0.03
    assert prr(np.zeros(200), quality) == pytest.approx(0.0, abs=1e-12)       # constant score = random


def test_prr_hand_case():
    # quality [1, 0, 1], uncertainty ranks them 1 < 2 < 3 (the wrong answer in the middle)
    # curve: keep 1 -> 1, keep 2 -> 0.5, keep 3 -> 2/3; mean = 13/18
    # oracle: 1, 1, 2/3 -> 8/9; random: 2/3
    expected = (13 / 18 - 2 / 3) / (8 / 9 - 2 / 3)
    assert prr([0.1, 0.2, 0.3], [1, 0, 1]) == pytest.approx(expected, abs=1e-14)


def test_roc_auc_hand_cases():
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert roc_auc([0.5, 0.5, 0.5, 0.5], [0, 1, 0, 1]) == 0.5
    assert roc_auc([0.1, 0.2, 0.9], [False, False, True]) == 1.0
    assert roc_auc([0.9, 0.2, 0.1], [False, False, True]) == 0.0
    # ties across classes count half: pairs (w=0.5 vs r=0.5): 0.5, (w=0.5 vs r=0.1): 1, (0.9 vs both): 2
    assert roc_auc([0.1, 0.5, 0.5, 0.9], [0, 0, 1, 1]) == pytest.approx(3.5 / 4)


def test_roc_auc_matches_pairwise_count():
    rng = np.random.default_rng(1)
    u = rng.integers(0, 5, 60).astype(float)  # many ties
    w = rng.random(60) < 0.4
    pos, neg = u[w], u[~w]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    expected = wins / (pos.size * neg.size)
    assert roc_auc(u, w) == pytest.approx(expected, abs=1e-14)


def test_bad_input_names_the_problem():
    with pytest.raises(TokoptError, match="got lengths 3 and 2"):
        prr([0.1, 0.2, 0.3], [1, 0])
    with pytest.raises(TokoptError, match="uncertainty is empty"):
        prr([], [])
    with pytest.raises(TokoptError, match="same quality"):
        prr([0.1, 0.2], [1, 1])
    with pytest.raises(TokoptError, match="both right and wrong"):
        roc_auc([0.1, 0.2], [0, 0])
    with pytest.raises(TokoptError, match="0/1"):
        roc_auc([0.1, 0.2], [0, 2])
    with pytest.raises(TokoptError, match="finite"):
        roc_auc([0.1, float("nan")], [0, 1])


def test_docstring_examples():
    from tokopt.uncertainty import evaluation
    result = doctest.testmod(evaluation)
    assert result.attempted > 0 and result.failed == 0
