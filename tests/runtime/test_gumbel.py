"""Counter-based Gumbel noise: replay, seed sensitivity, interventions, distribution."""

import doctest
import math

import numpy as np
import pytest
import torch

from tokopt.errors import TokoptError
from tokopt.runtime.gumbel import _splitmix64_int, gumbel, gumbel_argmax, uniform

VOCAB = 12


def _bigram_table():
    return torch.log_softmax(torch.randn(VOCAB, VOCAB, generator=torch.Generator().manual_seed(3)) * 2, -1)


def _generate(seed, steps=30, request=0, force=None):
    """Toy autoregressive loop over a fixed bigram table; ``force=(t, token)`` overrides step t."""
    table = _bigram_table()
    tokens = [0]
    for t in range(steps):
        if force is not None and t == force[0]:
            tokens.append(force[1])
        else:
            tokens.append(gumbel_argmax(table[tokens[-1]], seed, request, t))
    return tokens[1:]


def test_replay_is_identical():
    assert _generate(seed=11) == _generate(seed=11)
    assert np.array_equal(gumbel(5, 2, 9, np.arange(100)), gumbel(5, 2, 9, np.arange(100)))


def test_changing_the_key_changes_the_tokens():
    assert _generate(seed=11) != _generate(seed=12)
    assert _generate(seed=11, request=0) != _generate(seed=11, request=1)
    ids = np.arange(50)
    assert not np.array_equal(gumbel(0, 0, 0, ids), gumbel(0, 0, 1, ids))
    assert not np.array_equal(gumbel(0, 0, 0, ids), gumbel(1, 0, 0, ids))


def test_intervention_leaves_the_past_unchanged():
    base = _generate(seed=11)
    t = 10
    other = (base[t] + 1) % VOCAB
    changed = _generate(seed=11, force=(t, other))
    assert changed[:t] == base[:t]
    assert changed[t] == other
    assert changed != base


def test_noise_does_not_depend_on_the_vocabulary_slice():
    # the noise of token 7 is the same whether drawn alone or with the whole row
    assert gumbel(3, 1, 4, [7])[0] == gumbel(3, 1, 4, np.arange(20))[7]
    assert gumbel(3, 1, 4, torch.arange(20)).tolist() == gumbel(3, 1, 4, np.arange(20)).tolist()


def test_known_values_are_platform_independent():
    # pinned: a change in the hash would silently break replay of stored generations. The values are exact
    # (53-bit integers scaled by 2**-53), so they hold bit for bit on every platform.
    assert _splitmix64_int(0) == 0xE220A8397B1DCDAF  # the published first output of splitmix64 from state 0
    assert uniform(0, 0, 0, [0, 1, 2]).tolist() == [0.12964561829974747, 0.16526896395580143, 0.310596303453656]
    assert uniform(2**64 - 1, 5, 7, [123456]).tolist() == [0.06687348874640725]
    assert uniform(0, 0, 0, np.array([0, 1, 2], dtype=np.int32)).tolist() == uniform(0, 0, 0, [0, 1, 2]).tolist()


def test_noise_is_standard_gumbel():
    g = np.concatenate([gumbel(42, r, pos, np.arange(1000)) for r in range(4) for pos in range(10)])
    assert g.size == 40_000
    assert g.mean() == pytest.approx(0.5772156649, abs=0.02)
    assert g.var() == pytest.approx(math.pi ** 2 / 6, rel=0.03)
    # Kolmogorov-Smirnov distance against the Gumbel CDF exp(-exp(-x)); 1.36/sqrt(n) is the 5% critical value
    x = np.sort(g)
    cdf = np.exp(-np.exp(-x))
    n = x.size
    ks = max((np.arange(1, n + 1) / n - cdf).max(), (cdf - np.arange(n) / n).max())
    assert ks < 1.63 / math.sqrt(n)  # 1% level


def test_gumbel_argmax_samples_the_distribution():
    p = np.array([0.1, 0.2, 0.3, 0.4])
    draws = np.array([gumbel_argmax(np.log(p), 9, 0, pos) for pos in range(8000)])
    freq = np.bincount(draws, minlength=4) / draws.size
    np.testing.assert_allclose(freq, p, atol=0.02)
    assert gumbel_argmax(np.array([-np.inf, 0.0, -np.inf]), 1, 2, 3) == 1


def test_bad_input_names_the_problem():
    with pytest.raises(TokoptError, match="seed must be an integer"):
        gumbel(1.5, 0, 0, [0])
    with pytest.raises(TokoptError, match="position must be in"):
        gumbel(0, 0, -1, [0])
    with pytest.raises(TokoptError, match="token_ids must be integers"):
        gumbel(0, 0, 0, [0.5])
    with pytest.raises(TokoptError, match="one row"):
        gumbel_argmax(np.zeros((2, 3)), 0, 0, 0)
    with pytest.raises(TokoptError, match="at least one finite"):
        gumbel_argmax(np.full(3, -np.inf), 0, 0, 0)


def test_docstring_examples():
    from tokopt.runtime import gumbel
    result = doctest.testmod(gumbel)
    assert result.attempted > 0 and result.failed == 0
