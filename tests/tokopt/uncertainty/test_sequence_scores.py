"""Sequence and claim scores: the design note's hand cases, RAUQ by hand, bad input."""

import doctest
import math

import numpy as np
import pytest
import torch

from tokopt.errors import TokoptError
from tokopt.uncertainty import sequence_scores as ss


def test_simple_sequence_scores():
    lp = [math.log(0.5), math.log(0.25)]
    assert ss.max_sequence_probability(lp) == pytest.approx(math.log(8), abs=1e-15)
    assert ss.perplexity(lp) == pytest.approx(math.sqrt(8), rel=1e-14)
    assert ss.perplexity(torch.tensor(lp)) == pytest.approx(math.sqrt(8), rel=1e-6)
    assert ss.mean_entropy(np.array([0.5, 1.5, 4.0])) == pytest.approx(2.0)


def test_token_sar_hand_case():
    # (0.1 * 0.1 + 2.0 * 0.8) / (0.1 + 0.8) = 1.61 / 0.9
    assert ss.token_sar([-0.1, -2.0], [0.9, 0.2]) == pytest.approx(1.61 / 0.9, abs=1e-14)
    assert round(ss.token_sar([-0.1, -2.0], [0.9, 0.2]), 4) == 1.7889
    # equal relevance: plain mean surprisal
    assert ss.token_sar([-0.1, -2.0], [0.3, 0.3]) == pytest.approx(1.05)


def test_ccp_hand_case():
    lp = [math.log(p) for p in (0.6, 0.1, 0.25, 0.05)]  # Paris (generated), paris, Lyon, "the"
    ccp = ss.ccp_from_labels(lp, [None, "entail", "contra", "neutral"])
    assert ccp == pytest.approx(0.7 / 0.95, abs=1e-14)
    assert round(ccp, 4) == 0.7368
    assert ss.ccp_from_labels(lp, ["entail", "neutral", "neutral", "neutral"]) == 1.0
    assert ss.ccp_from_labels(lp[:1], [None]) == 1.0


def test_combine_nli_rule():
    table = {("entail", "entail"): "entail", ("contra", "contra"): "contra", ("neutral", "neutral"): "neutral",
             ("entail", "contra"): "neutral", ("contra", "entail"): "neutral",
             ("entail", "neutral"): "entail", ("neutral", "entail"): "entail",
             ("contra", "neutral"): "contra", ("neutral", "contra"): "contra"}
    for (fwd, bwd), expected in table.items():
        assert ss.combine_nli(fwd, bwd) == expected


def test_claim_ccp_stopwords_count_one():
    assert ss.claim_ccp([0.5, 0.1, 0.8], [False, True, False]) == pytest.approx(-0.4)
    assert ss.claim_ccp([0.2], [True]) == -1.0


def test_rauq_hand_case():
    p = [0.9, 0.5, 0.4]
    # layer 0: head 1 attends more to the previous token (mean 0.8 vs 0.3 over t >= 1)
    # layer 1: head 0 (mean 0.5 vs 0.1); column 0 is never read
    att = np.array([[[9.0, 0.2, 0.4], [9.0, 0.6, 1.0]],
                    [[0.0, 0.5, 0.5], [0.0, 0.1, 0.1]]])
    a = 0.5
    c0 = [0.9, a * 0.5 + a * 0.6 * 0.9, None]
    c0[2] = a * 0.4 + a * 1.0 * c0[1]                  # 0.47, 0.435
    c1 = [0.9, a * 0.5 + a * 0.5 * 0.9, None]
    c1[2] = a * 0.4 + a * 0.5 * c1[1]                  # 0.475, 0.31875
    u0 = 1 - np.mean(np.log(c0))
    u1 = 1 - np.mean(np.log(c1))
    assert u1 > u0
    assert ss.rauq(p, att, alpha=a) == pytest.approx(u1, abs=1e-14)
    assert ss.rauq(p, att[:1], alpha=a) == pytest.approx(u0, abs=1e-14)
    # alpha = 1: attention plays no part, the score is 1 - mean log p
    assert ss.rauq(p, att, alpha=1.0) == pytest.approx(1 - np.mean(np.log(p)), abs=1e-14)
    assert ss.rauq([0.5], np.zeros((2, 3, 1))) == pytest.approx(1 - math.log(0.5))


def test_rauq_layers_match_lm_polygraph():
    assert ss.rauq_layers(30) == list(range(10, 21))
    assert ss.rauq_layers(24) == list(range(8, 17))
    assert ss.rauq_layers(2) == [0, 1]


def test_bad_input_names_the_problem():
    with pytest.raises(TokoptError, match="logprobs is empty"):
        ss.max_sequence_probability([])
    with pytest.raises(TokoptError, match="entropies is empty"):
        ss.mean_entropy([])
    with pytest.raises(TokoptError, match="log-probabilities"):
        ss.perplexity([0.5, -1.0])
    with pytest.raises(TokoptError, match="got lengths 2 and 3"):
        ss.token_sar([-0.1, -2.0], [0.9, 0.2, 0.1])
    assert ss.token_sar([-0.1, -2.0], [1.0, 1.0]) == pytest.approx(1.05)  # no token matters: equal weights
    with pytest.raises(TokoptError, match="3 labels for 4 alternatives"):
        ss.ccp_from_labels([-0.5, -1, -2, -3], [None, "entail", "contra"])
    with pytest.raises(TokoptError, match="label 2 is 'maybe'"):
        ss.ccp_from_labels([-0.5, -1, -2], [None, "entail", "maybe"])
    with pytest.raises(TokoptError, match="generated token"):
        ss.ccp_from_labels([-0.5, -1], ["contra", "entail"])
    with pytest.raises(TokoptError, match="unknown NLI label 'entailment'"):
        ss.combine_nli("entailment", "neutral")
    with pytest.raises(TokoptError, match="one flag per token"):
        ss.claim_ccp([0.5, 0.4], [True])
    with pytest.raises(TokoptError, match=r"shape \[layers, heads, T=3\]"):
        ss.rauq([0.9, 0.5, 0.4], np.zeros((2, 3, 4)))
    with pytest.raises(TokoptError, match="token_probs is empty"):
        ss.rauq([], np.zeros((1, 1, 0)))


def test_docstring_examples():
    from tokopt.uncertainty import sequence_scores
    result = doctest.testmod(sequence_scores)
    assert result.attempted > 0 and result.failed == 0
