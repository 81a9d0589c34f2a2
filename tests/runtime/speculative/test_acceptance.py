"""runtime.speculative.acceptance: rank statistics, the best tree of each size, expected tokens."""

import itertools

import torch

from tokopt.runtime.speculative.acceptance import RankAcceptance, best_tree, expected_tokens, path_values


def test_rates_move_from_the_prior_towards_observations():
    stats = RankAcceptance(max_depth=3, ranks=4, prior_weight=10)
    prior = stats.rates()[1, 0].item()
    for _ in range(200):
        stats.record(1, 0)
    assert stats.rates()[1, 0] > 0.9 > prior
    for _ in range(200):
        stats.record(2, None)
    assert stats.rates()[2].max() < 0.05
    stats.record(99, 1)  # deeper than max_depth counts at max_depth
    assert stats.trials[3] == 1


def _all_trees(rates, size):
    """Every ancestor-closed set of ``size`` (depth, rank)-paths, for brute force."""
    depth, ranks = rates.shape[0] - 1, rates.shape[1]
    paths = [p for d in range(1, depth + 1) for p in itertools.product(range(ranks), repeat=d)]
    for combo in itertools.combinations(paths, size):
        chosen = set(combo)
        if all(p[:-1] in chosen or len(p) == 1 for p in chosen):
            yield chosen


def _value(rates, paths):
    total = 0.0
    for p in paths:
        v = 1.0
        for d, r in enumerate(p, start=1):
            v *= float(rates[d, r])
        total += v
    return total


def test_best_tree_is_optimal_by_brute_force():
    g = torch.Generator().manual_seed(0)
    rates = torch.rand(4, 3, generator=g, dtype=torch.float64) * 0.6
    for size in range(1, 6):
        template = best_tree(rates, size)
        assert len(template) == size
        assert all(parent < i for i, (parent, _) in enumerate(template, start=1))
        got = sum(path_values(rates, template))
        best = max(_value(rates, t) for t in _all_trees(rates, size))
        assert abs(got - best) < 1e-12, size


def test_expected_tokens_grows_with_diminishing_returns():
    rates = RankAcceptance(6, 8).rates()
    curve = expected_tokens(rates, 20)
    assert curve[0] == 1.0 and len(curve) == 21
    gains = [b - a for a, b in zip(curve, curve[1:])]
    assert all(g > 0 for g in gains)
    assert all(a >= b - 1e-12 for a, b in zip(gains, gains[1:]))
