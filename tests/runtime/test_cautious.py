"""CNTP: batched trials over one shared prefix cache equal private per-trial runs; selection, stopping, the
trial-count formula, equivalence to plain decoding with one trial, determinism."""

import math

import pytest
import torch

from tokopt.errors import TokoptError
from tokopt.runtime.cautious import (CautiousStats, cautious_generate, num_trials, punctuation_token_ids,
                                     run_trials)
from tokopt.runtime.generate import decode_one_token, generate, prefill
from tokopt.models.kv_cache import KVCache
from tokopt.runtime.sampling import SamplingParams, process_logits

PROMPT = "The weather today is"


# --- the trial-count formula ----------------------------------------------------------------------------------

def test_num_trials_formula_and_clamps():
    assert num_trials(0.0) == 1 and num_trials(-3.0) == 1 and num_trials(0.01) == 1
    assert num_trials(1.5) == 40 and num_trials(7.0) == 40
    for h in (0.2, 0.5, 0.755, 1.1, 1.49):
        assert num_trials(h, 40) == math.floor(1 + 39 * (h - 0.01) / 1.49 + 0.5)
    assert num_trials(1.0, 40) == 27 and num_trials(1.0, 5) == 4
    assert num_trials(0.01 + 1.49 * 0.5 + 1e-9, 40) == 21  # 20.5 rounds up
    assert all(num_trials(h, 1) == 1 for h in (0.0, 1.0, 9.0))
    with pytest.raises(TokoptError, match="n_max"):
        num_trials(1.0, 0)


def test_punctuation_token_ids(punct, tokenizer):
    for text in (".", ",", "?", "!", ";", ":"):
        assert tokenizer.convert_tokens_to_ids(text) in punct
    assert tokenizer.encode(" the", add_special_tokens=False)[0] not in punct
    assert all(tokenizer.decode([t]).strip() for t in punct)


@pytest.fixture(scope="module")
def punct(tokenizer):
    return frozenset(punctuation_token_ids(tokenizer))


@pytest.fixture(scope="module")
def ids(tokenizer):
    return tokenizer(PROMPT, return_tensors="pt").input_ids


def copy(cache):
    return KVCache([t.clone() for t in cache.tensors], cache.valid.clone())


# --- batched trials over a shared prefix ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trials(opt, ids, punct):
    """Four trials of up to 4 tokens from the prompt, with every fed token's logits kept."""
    out, cache = prefill(opt.engine, ids, torch.ones_like(ids, dtype=torch.bool))
    pending = out.logits[0, -1]
    private = copy(cache)
    sampling = SamplingParams(do_sample=True, temperature=1.5)
    trial_set, compacted, next_logits = run_trials(
        opt.engine, cache, pending, ids.shape[1], 4, sampling=sampling, generator=torch.Generator().manual_seed(3),
        max_tokens=4, stop_ids=punct, keep_logits=True)
    return dict(pending=pending, prefix=private, sampling=sampling, set=trial_set, cache=compacted,
                next_logits=next_logits, prefix_len=ids.shape[1])


def test_batched_trials_equal_private_runs(opt, trials):
    """Each trial's logits from the shared-prefix batched forwards equal running it alone on a private copy of
    the prefix cache: the masks give every branch the prefix and its own chain only."""
    ts = trials["set"]
    assert ts.forwards == max(len(c) for c in ts.chains)  # one forward per depth, every chain's tokens fed
    for chain, kept in zip(ts.chains, ts.logits):
        cache, position = copy(trials["prefix"]), trials["prefix_len"]
        assert kept.shape[0] == len(chain)
        for depth, token in enumerate(chain):
            out, cache = decode_one_token(opt.engine, cache, torch.tensor([token]), torch.tensor([position + depth]))
            assert torch.allclose(out.logits[0, -1], kept[depth], atol=1e-4), (depth, chain)


def test_cache_is_compacted_to_prefix_plus_chosen_chain(opt, trials):
    ts = trials["set"]
    chosen = ts.chains[ts.chosen]
    cache = trials["cache"]
    assert int(cache.valid.sum()) == trials["prefix_len"] + len(chosen)
    assert torch.equal(trials["next_logits"], ts.logits[ts.chosen][-1])
    # one more token decodes as it would after the chosen chain alone
    private, position = copy(trials["prefix"]), trials["prefix_len"]
    for depth, token in enumerate(chosen):
        _, private = decode_one_token(opt.engine, private, torch.tensor([token]), torch.tensor([position + depth]))
    probe = torch.tensor([int(trials["next_logits"].argmax())])
    at = torch.tensor([position + len(chosen)])
    a, _ = decode_one_token(opt.engine, cache, probe, at)
    b, _ = decode_one_token(opt.engine, private, probe, at)
    assert torch.allclose(a.logits, b.logits, atol=1e-4)


def test_chosen_trial_has_lowest_perplexity_and_trials_stop_at_punctuation(trials, punct):
    ts, sampling = trials["set"], trials["sampling"]
    for chain, logprobs, ppl, kept in zip(ts.chains, ts.logprobs, ts.perplexities, ts.logits):
        assert all(t not in punct for t in chain[:-1])
        assert chain[-1] in punct or len(chain) == 4
        # each token's log-probability under the processed distribution it was drawn from
        before = torch.cat([trials["pending"][None], kept[:-1]])
        expected = torch.log_softmax(process_logits(before, sampling).double(), -1)[torch.arange(len(chain)), chain]
        assert logprobs == pytest.approx(expected.tolist(), abs=1e-6)
        assert ppl == pytest.approx(math.exp(-sum(logprobs) / len(logprobs)))
    assert ts.chosen == min(range(len(ts.chains)), key=lambda i: (ts.perplexities[i], i))


# --- the decode loop -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("do_sample", [True, False])
def test_one_trial_equals_plain_decoding(opt, ids, punct, do_sample):
    sampling = SamplingParams(do_sample=do_sample, seed=7)
    plain = generate(opt.engine, ids, max_new_tokens=6, sampling=sampling)
    cautious = cautious_generate(opt.engine, ids, max_new_tokens=6, sampling=sampling, n_max=1,
                                 punctuation_ids=punct)
    assert torch.equal(cautious.sequences, plain.sequences)
    assert cautious.forwards == plain.forwards == 6
    assert cautious.stats.trials == [1] * 6


@pytest.fixture(scope="module")
def cautious_runs(opt, ids, punct):
    kw = dict(max_new_tokens=8, sampling=SamplingParams(do_sample=True, temperature=1.3), n_max=3,
              max_trial_tokens=3, punctuation_ids=punct, seed=5)
    return cautious_generate(opt.engine, ids, **kw), cautious_generate(opt.engine, ids, **kw)


def test_deterministic_under_seed_and_consistent_stats(cautious_runs):
    a, b = cautious_runs
    assert torch.equal(a.sequences, b.sequences)
    stats = a.stats
    assert isinstance(stats, CautiousStats) and stats.trials == b.stats.trials
    assert any(n > 1 for n in stats.trials)  # trials did run
    assert stats.trials == [num_trials(h, 3) for h in stats.entropies]
    assert sum(stats.emitted) == a.new_tokens.shape[1] == 8
    assert a.forwards == stats.forwards
    # every multi-trial step emitted its chosen (lowest-perplexity) chain
    sets = iter(stats.trial_sets)
    emitted, at = a.new_tokens[0].tolist(), 0
    for n, count in zip(stats.trials, stats.emitted):
        if n > 1:
            ts = next(sets)
            assert len(ts.chains) == n and emitted[at: at + count] == ts.chains[ts.chosen]
        at += count


def test_eos_ends_generation(opt, ids, punct):
    plain = generate(opt.engine, ids, max_new_tokens=3, sampling=SamplingParams())
    eos = int(plain.new_tokens[0, 1])  # greedy's second token plays EOS
    out = cautious_generate(opt.engine, ids, max_new_tokens=3, sampling=SamplingParams(), n_max=1,
                            punctuation_ids=punct, eos_token_ids=[eos])
    assert out.new_tokens[0].tolist() == plain.new_tokens[0, :2].tolist()


def test_errors(opt, ids):
    with pytest.raises(TokoptError, match="batch 1"):
        cautious_generate(opt.engine, ids.repeat(2, 1), max_new_tokens=2, punctuation_ids=())
    with pytest.raises(TokoptError, match="punctuation_ids"):
        cautious_generate(opt.engine, ids, max_new_tokens=2)
    with pytest.raises(TokoptError, match="gumbel_seed"):
        cautious_generate(opt.engine, ids, max_new_tokens=2, punctuation_ids=(),
                          sampling=SamplingParams(do_sample=True, gumbel_seed=1))
    with pytest.raises(TokoptError, match="max_trial_tokens"):
        cautious_generate(opt.engine, ids, max_new_tokens=2, punctuation_ids=(), max_trial_tokens=0)


def test_optimized_model_generate_cautious(opt, ids, tokenizer, cautious_runs):
    """``opt.generate_cautious`` runs the same loop (same seed, same settings: same tokens)."""
    out = opt.generate_cautious(ids, max_new_tokens=8, n_max=3, max_trial_tokens=3, temperature=1.3, top_k=50,
                                seed=5, eos_token_id=[])
    assert torch.equal(out, cautious_runs[0].sequences)
    assert opt.last_result.stats.trials == cautious_runs[0].stats.trials
