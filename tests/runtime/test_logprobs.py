"""Every logit statistic against an independent float64 numpy computation; HF warper equality; bad input."""

import doctest
import math

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper,
                                                    TypicalLogitsWarper)

from tokopt.errors import TokoptError
from tokopt.runtime import logprobs as ls
from tokopt.runtime.sampling import typical_mask


def _np_logp(z: np.ndarray) -> np.ndarray:
    m = z.max(-1, keepdims=True)
    return z - (m + np.log(np.exp(z - m).sum(-1, keepdims=True)))


def _cases():
    g = torch.Generator().manual_seed(0)
    yield torch.randn(3, 5, 50, generator=g) * 3          # batch x rows x V
    yield torch.randn(7, generator=g)                      # one row
    yield torch.zeros(4, 6)                                # uniform, all tied
    yield torch.tensor([[1.0, 1.0, -2.0, 0.5], [30.0, -30.0, 0.0, 0.0]])  # top-2 tie; near one-hot
    yield torch.randn(2, 1, generator=g)                   # V == 1


@pytest.mark.parametrize("case", range(5))
def test_stats_match_float64_numpy(case):
    logits = list(_cases())[case]
    z = logits.double().numpy()
    logp = _np_logp(z)
    p = np.exp(logp)
    H = -(p * logp).sum(-1)
    np.testing.assert_allclose(ls.entropy(logits).numpy(), H, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ls.max_prob(logits).numpy(), p.max(-1), rtol=1e-12)
    sp = np.sort(p, axis=-1)
    expected_margin = sp[..., -1] - (sp[..., -2] if z.shape[-1] > 1 else 0.0)
    np.testing.assert_allclose(ls.margin(logits).numpy(), expected_margin, rtol=1e-12, atol=1e-15)
    V = z.shape[-1]
    lse = (z - logp)[..., 0]
    np.testing.assert_allclose(ls.self_certainty(logits).numpy(), lse - z.mean(-1) - math.log(V),
                               rtol=1e-10, atol=1e-12)
    # self-certainty is KL(uniform || p)
    np.testing.assert_allclose(ls.self_certainty(logits).numpy(), (-np.log(V) - logp).mean(-1), atol=1e-10)
    ids = np.argsort(z, axis=-1)[..., V // 2]
    np.testing.assert_allclose(ls.chosen_logprob(logits, torch.from_numpy(ids)).numpy(),
                               np.take_along_axis(logp, ids[..., None], -1)[..., 0], rtol=1e-12)
    np.testing.assert_allclose(ls.typicality_deviation(logits, torch.from_numpy(ids)).numpy(),
                               np.abs(-np.take_along_axis(logp, ids[..., None], -1)[..., 0] - H), atol=1e-12)
    k = min(3, V)
    top_ids, top_lp = ls.topk_logprobs(logits, k)
    np.testing.assert_allclose(top_lp.numpy(), -np.sort(-logp, axis=-1)[..., :k], rtol=1e-12)
    np.testing.assert_allclose(np.take_along_axis(logp, top_ids.numpy(), -1), top_lp.numpy(), rtol=1e-12)
    assert ls.entropy(logits).dtype == torch.float64


def test_stats_with_removed_tokens():
    logits = torch.tensor([[2.0, -float("inf"), 0.5, -float("inf")]])
    z = np.array([2.0, 0.5])
    logp = _np_logp(z)
    assert ls.entropy(logits).item() == pytest.approx(-(np.exp(logp) * logp).sum(), abs=1e-14)
    assert ls.max_prob(logits).item() == pytest.approx(np.exp(logp[0]), rel=1e-14)
    assert ls.margin(logits).item() == pytest.approx(np.exp(logp[0]) - np.exp(logp[1]), rel=1e-13)
    assert ls.self_certainty(logits).item() == math.inf
    assert ls.chosen_logprob(logits, [1]).item() == -math.inf


def test_hand_values():
    assert ls.entropy(torch.zeros(8)).item() == pytest.approx(math.log(8), abs=1e-15)
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    assert ls.margin(p.log()).item() == pytest.approx(0.2, abs=1e-15)
    assert ls.chosen_logprob(p.log(), 1).item() == pytest.approx(math.log(0.3), abs=1e-15)


def _hf(warpers, scores):
    ids = torch.zeros(scores.shape[0], 1, dtype=torch.long)
    for w in warpers:
        scores = w(ids, scores)
    return scores


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 10, 0.9), (1.0, None, 0.5), (1.3, 3, None),
                                                     (0.5, 1, 0.99), (2.0, 100, 0.1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_processed_logits_equal_hf_warpers(temperature, top_k, top_p, dtype):
    scores = (torch.randn(16, 40, generator=torch.Generator().manual_seed(1)) * 2).to(dtype)
    scores[0, :5] = scores[0, 5]  # ties across the cut
    warpers = [TemperatureLogitsWarper(temperature)]
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p is not None:
        warpers.append(TopPLogitsWarper(top_p))
    expected = _hf(warpers, scores.clone())
    got = ls.processed_logits(scores, temperature=temperature, top_k=top_k, top_p=top_p)
    assert torch.equal(got, expected)
    got3d = ls.processed_logits(scores.view(4, 4, 40), temperature=temperature, top_k=top_k, top_p=top_p)
    assert torch.equal(got3d.view(16, 40), expected)


def test_processed_logits_defaults_are_identity():
    x = torch.randn(3, 9)
    assert torch.equal(ls.processed_logits(x), x)


@pytest.mark.parametrize("mass", [0.9, 0.2, 0.5, 0.999])
@pytest.mark.parametrize("vocab", [1, 2, 3, 17, 256])
@pytest.mark.parametrize("min_keep", [1, 2])
def test_typical_mask_equals_hf(mass, vocab, min_keep):
    g = torch.Generator().manual_seed(vocab)
    scores = torch.randn(32, vocab, generator=g) * 3
    scores[1] = 0.0                                                  # all tied
    scores[2] = torch.randint(0, 3, (vocab,), generator=g).float()   # many ties
    scores[3, :] = -10.0
    scores[3, 0] = 10.0                                              # near one-hot
    expected = torch.isfinite(TypicalLogitsWarper(mass=mass, min_tokens_to_keep=min_keep)(
        torch.zeros(32, 1, dtype=torch.long), scores.clone()))
    got = typical_mask(scores, mass=mass, min_tokens_to_keep=min_keep)
    assert torch.equal(got, expected)
    assert torch.equal(typical_mask(scores.view(4, 8, vocab), mass, min_keep).view(32, vocab), expected)


def test_bad_input_names_the_problem():
    x = torch.randn(2, 30)
    with pytest.raises(TokoptError, match="k=21 is above the tap limit of 20"):
        ls.topk_logprobs(x, 21)
    with pytest.raises(TokoptError, match="larger than the vocabulary size 5"):
        ls.topk_logprobs(torch.randn(30)[:5], 6)
    with pytest.raises(TokoptError, match="ids must have the logits' shape"):
        ls.chosen_logprob(x, [1, 2, 3])
    with pytest.raises(TokoptError, match=r"ids must lie in \[0, 30\)"):
        ls.typicality_deviation(x, [0, 30])
    with pytest.raises(TokoptError, match="floating-point"):
        ls.entropy(torch.ones(3, dtype=torch.long))
    with pytest.raises(TokoptError, match="V >= 1"):
        ls.entropy(torch.zeros(3, 0))
    with pytest.raises(TokoptError, match="torch.Tensor"):
        ls.max_prob([1.0, 2.0])
    with pytest.raises(TokoptError, match="temperature must be > 0"):
        ls.processed_logits(x, temperature=0.0)
    with pytest.raises(TokoptError, match="top_p must be in"):
        ls.processed_logits(x, top_p=1.5)
    with pytest.raises(TokoptError, match="mass must be in"):
        typical_mask(x, mass=1.0)


def test_docstring_examples():
    from tokopt.runtime import logprobs, sampling
    for module in (logprobs, sampling):
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0
