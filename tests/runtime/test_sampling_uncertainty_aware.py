"""Uncertainty-aware decoding: Locally Typical Sampling, and counterfactual (Gumbel-max) sampling that replays
exactly, also under speculative decoding, and draws from the processed distribution."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper,
                                                    TopKLogitsWarper, TopPLogitsWarper, TypicalLogitsWarper)

import tokopt
from tokopt.errors import TokoptError
from tokopt.runtime.sampling import SamplingParams, next_token, process_logits

PROMPT = torch.tensor([[5, 9, 17, 3, 5, 9, 17, 3, 5, 9]])


def test_typical_processing_equals_hf_chain():
    torch.manual_seed(0)
    logits = torch.randn(6, 300) * 3
    params = SamplingParams(True, 0.8, 40, 0.95, typical_p=0.9)
    hf = LogitsProcessorList([TemperatureLogitsWarper(0.8), TopKLogitsWarper(40), TopPLogitsWarper(0.95),
                              TypicalLogitsWarper(0.9)])
    want = hf(torch.zeros(6, 1, dtype=torch.long), logits.clone())
    assert torch.equal(torch.isfinite(process_logits(logits, params)), torch.isfinite(want))


def test_bad_typical_p():
    with pytest.raises(TokoptError, match="typical_p"):
        SamplingParams(True, typical_p=0.0)


def test_gumbel_needs_positions():
    with pytest.raises(TokoptError, match="positions"):
        next_token(torch.randn(1, 10), SamplingParams(True, gumbel_seed=1))


@pytest.fixture(scope="module")
def opt(tiny_model):
    return tokopt.optimize(tiny_model("llama", vocab_size=256))


def test_gumbel_replay_and_seed_dependence(opt):
    kw = dict(max_new_tokens=12, do_sample=True, temperature=1.5, top_k=0, eos_token_id=[])
    a = opt.generate(PROMPT, gumbel_seed=11, **kw)
    b = opt.generate(PROMPT, gumbel_seed=11, **kw)
    c = opt.generate(PROMPT, gumbel_seed=12, **kw)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("method", ["lookup", "recycling"])
def test_gumbel_speculative_identical_to_plain(opt, method):
    kw = dict(max_new_tokens=16, do_sample=True, temperature=0.3, top_k=5, gumbel_seed=3, eos_token_id=[])
    plain = opt.generate(PROMPT, **kw)
    spec = opt.with_speculative(method)
    assert torch.equal(spec.generate(PROMPT, **kw), plain)
    assert spec.last_stats.mat > 1.0  # guesses were accepted, so verification did the work


def test_gumbel_draws_follow_the_processed_distribution():
    """First-token frequencies over 4,000 seeds vs the processed softmax (chi-square); the unprocessed
    distribution (negative control) is rejected."""
    torch.manual_seed(1)
    logits = torch.randn(1, 12) * 1.5
    params = [SamplingParams(True, 0.7, 0, 1.0, gumbel_seed=s) for s in range(4000)]
    draws = np.array([int(next_token(logits, p, positions=[7])) for p in params])
    counts = np.bincount(draws, minlength=12)
    for temperature, should_fit in ((0.7, True), (1.0, False)):
        expected = (logits[0] / temperature).softmax(-1).numpy() * len(draws)
        keep = expected > 5
        chi2 = float((((counts - expected) ** 2 / expected)[keep]).sum())
        dof = int(keep.sum()) - 1
        assert (chi2 < dof + 4 * np.sqrt(2 * dof) + 10) == should_fit, (temperature, chi2, dof)


def test_counterfactual_intervention_keeps_the_past_and_replays(opt):
    kw = dict(max_new_tokens=14, do_sample=True, temperature=1.5, top_k=0, eos_token_id=[], gumbel_seed=21)
    base = opt.generate(PROMPT, **kw)
    n, t = PROMPT.shape[1], 6
    other = (int(base[0, n + t]) + 1) % 256
    what_if = opt.generate(PROMPT, interventions={t: other}, **kw)
    assert torch.equal(what_if[0, : n + t], base[0, : n + t])  # before the intervention: unchanged
    assert int(what_if[0, n + t]) == other
    assert not torch.equal(what_if, base)
    assert torch.equal(opt.generate(PROMPT, interventions={t: other}, **kw), what_if)  # replayable
    # the speculative model runs the intervention too (plain loop), with the same result
    assert torch.equal(opt.with_speculative("lookup").generate(PROMPT, interventions={t: other}, **kw), what_if)


def test_intervention_per_row_and_bad_input(opt):
    from tokopt.errors import TokoptError

    ids = torch.cat([PROMPT, PROMPT])
    base = opt.generate(ids, max_new_tokens=5)
    out = opt.generate(ids, max_new_tokens=5, interventions={2: [None, 7]})
    n = PROMPT.shape[1]
    assert torch.equal(out[0], base[0]) and int(out[1, n + 2]) == 7
    for bad, needle in (({9: 1}, "step 9"), ({1: 10 ** 6}, "not a token id"), ({1: [1, 2, 3]}, "3 tokens for 2 rows")):
        with pytest.raises(TokoptError, match=needle):
            opt.generate(ids, max_new_tokens=5, interventions=bad)
