"""tokopt.runtime.sampling: logits processing equals Hugging Face's warpers; greedy; seeded and faithful sampling."""

import math
from statistics import NormalDist

import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from tokopt.errors import TokoptError
from tokopt.runtime.sampling import SamplingParams, next_token, process_logits

SETTINGS = [  # (temperature, top_k, top_p)
    (1.0, 0, 1.0),
    (0.7, 0, 1.0),
    (1.0, 5, 1.0),
    (1.0, 0, 0.9),
    (0.7, 10, 0.9),
    (1.3, 50, 0.5),
    (0.5, 3, 0.3),
    (2.0, 1, 0.8),
    (1.0, 200, 1.0),  # top_k larger than the vocabulary
    (0.9, 0, 1e-3),  # top_p so small that only the most likely token survives
]


def hf_process(logits, temperature, top_k, top_p):
    """Hugging Face's sampling warpers, applied in generate's order."""
    ids = torch.zeros(logits.shape[0], 1, dtype=torch.long)
    scores = TemperatureLogitsWarper(temperature)(ids, logits.clone())
    if top_k:
        scores = TopKLogitsWarper(top_k)(ids, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(ids, scores)
    return scores


def _logit_batches():
    g = torch.Generator().manual_seed(0)
    normal = torch.randn(6, 100, generator=g) * 3
    ties = torch.randint(-3, 4, (6, 100), generator=g).float()  # many exact ties, also at the top-k boundary
    flat = torch.zeros(2, 100)  # all tied
    flat[1, :3] = 5.0  # a tied top group
    return torch.cat([normal, ties, flat])


@pytest.mark.parametrize("temperature,top_k,top_p", SETTINGS)
def test_process_logits_equals_hf_warpers(temperature, top_k, top_p):
    logits = _logit_batches()
    ours = process_logits(logits, SamplingParams(True, temperature, top_k, top_p))
    ref = hf_process(logits, temperature, top_k, top_p)
    assert ours.shape == ref.shape
    assert torch.equal(torch.isneginf(ours), torch.isneginf(ref)), "filtered entries differ from HF's"
    finite = torch.isfinite(ref)
    assert torch.isfinite(ours[finite]).all()
    torch.testing.assert_close(ours[finite], ref[finite], rtol=1e-6, atol=1e-6)
    assert (~torch.isneginf(ours)).any(-1).all(), "every row keeps at least one token"


def test_process_logits_does_not_modify_input():
    logits = _logit_batches()
    before = logits.clone()
    process_logits(logits, SamplingParams(True, 0.5, 5, 0.5))
    assert torch.equal(logits, before)


def test_greedy_next_token_is_argmax_whatever_the_sampling_knobs():
    logits = torch.randn(5, 37, generator=torch.Generator().manual_seed(1))
    for params in (SamplingParams(), SamplingParams(False, 0.3, 2, 0.2, seed=4)):
        assert torch.equal(next_token(logits, params), logits.argmax(-1))


def test_sampling_never_draws_a_filtered_token():
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(2))
    params = SamplingParams(True, 1.0, 3, 1.0, seed=0)
    allowed = torch.topk(logits, 3, dim=-1).indices
    gen = params.generator()
    for _ in range(200):
        tok = next_token(logits, params, gen)
        assert (allowed == tok[:, None]).any(-1).all()


def test_seeded_sampling_is_repeatable_and_seed_dependent():
    logits = torch.randn(64, 20, generator=torch.Generator().manual_seed(3))

    def draws(seed):
        params = SamplingParams(True, 1.5, 0, 1.0, seed=seed)
        gen = params.generator()
        return torch.stack([next_token(logits, params, gen) for _ in range(5)])

    a, b, c = draws(7), draws(7), draws(8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert SamplingParams(True, seed=None).generator() is None


# --- goodness of fit ------------------------------------------------------------------------------------------


def chi_square_critical(df: int, alpha: float) -> float:
    """Upper ``alpha`` quantile of chi-square(df), Wilson-Hilferty: ((X/df)^(1/3) is about normal)."""
    z = NormalDist().inv_cdf(1 - alpha)
    c = 2 / (9 * df)
    return df * (1 - c + z * math.sqrt(c)) ** 3


def chi_square_stat(counts: torch.Tensor, probs: torch.Tensor):
    """Pearson's statistic and degrees of freedom over the cells of positive probability; +inf when a draw
    fell in a cell of probability zero."""
    n = counts.sum().item()
    support = probs > 0
    if counts[~support].sum() > 0:
        return math.inf, int(support.sum()) - 1
    expected = probs[support].double() * n
    observed = counts[support].double()
    return float(((observed - expected) ** 2 / expected).sum()), int(support.sum()) - 1


def test_chi_square_critical_value_matches_tables():
    # textbook table values of the chi-square upper quantile
    # (Wilson-Hilferty is within about 1% here; the approximation errs on the high, lenient side at df=6)
    assert chi_square_critical(9, 0.05) == pytest.approx(16.919, rel=2e-2)
    assert chi_square_critical(6, 0.001) == pytest.approx(22.458, rel=2e-2)
    assert chi_square_critical(30, 0.01) == pytest.approx(50.892, rel=2e-2)


LOGITS_V10 = torch.tensor([2.0, 1.6, 1.3, 1.0, 0.8, 0.5, 0.2, 0.0, -0.5, -3.0])
DRAWS = 40_000
ALPHA = 1e-3


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.8, 8, 0.95), (0.8, 0, 1.0), (1.25, 9, 0.9)])
def test_sampling_draws_from_processed_softmax_chi_square(temperature, top_k, top_p):
    params = SamplingParams(True, temperature, top_k, top_p, seed=1234)
    probs = process_logits(LOGITS_V10[None], params).softmax(-1)[0]
    assert (probs[probs > 0] * DRAWS).min() >= 5, "test design: every kept cell needs an expected count >= 5"
    tokens = next_token(LOGITS_V10.expand(DRAWS, -1), params, params.generator())
    assert tokens.shape == (DRAWS,)
    counts = torch.bincount(tokens, minlength=10)

    # filtered tokens are never drawn
    assert counts[probs == 0].sum() == 0
    stat, df = chi_square_stat(counts, probs)
    critical = chi_square_critical(df, ALPHA)
    assert stat < critical, f"chi-square {stat:.1f} >= {critical:.1f} (df={df}): draws do not follow the distribution"

    # negative control: the same test must reject a deliberately wrong distribution (temperature applied twice)
    wrong = process_logits(LOGITS_V10[None] / temperature, params).softmax(-1)[0]
    assert not torch.allclose(wrong, probs)
    wrong_stat, wrong_df = chi_square_stat(counts, wrong)
    assert wrong_stat > chi_square_critical(wrong_df, ALPHA), "the test cannot tell a wrong distribution apart"


def test_chi_square_negative_control_same_support():
    """Temperature applied twice without truncation keeps the support: rejection comes from the shape alone."""
    params = SamplingParams(True, 0.8, 0, 1.0, seed=99)
    probs = process_logits(LOGITS_V10[None], params).softmax(-1)[0]
    wrong = (LOGITS_V10 / 0.8 / 0.8).softmax(-1)
    assert torch.equal(probs > 0, wrong > 0)
    counts = torch.bincount(next_token(LOGITS_V10.expand(DRAWS, -1), params, params.generator()), minlength=10)
    stat, df = chi_square_stat(counts, wrong)
    assert math.isfinite(stat) and stat > chi_square_critical(df, ALPHA)


# --- parameter validation -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [
    dict(temperature=0.0), dict(temperature=-1.0),
    dict(top_p=0.0), dict(top_p=1.5), dict(top_p=-0.1),
    dict(top_k=-1),
])
def test_invalid_sampling_params_raise(kwargs):
    with pytest.raises(TokoptError):
        SamplingParams(do_sample=True, **kwargs)


def test_boundary_sampling_params_are_accepted():
    SamplingParams(True, temperature=1e-3, top_k=0, top_p=1.0)
    SamplingParams(True, temperature=5.0, top_k=1, top_p=1e-6)
