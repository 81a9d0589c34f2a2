"""tokopt.uncertainty.estimators: scores by name from records, and clear errors naming what is missing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import tokopt
from tokopt.errors import TokoptError
from tokopt.uncertainty import sequence_scores as ss
from tokopt.uncertainty.estimators import ESTIMATORS, ScoringContext, check_estimators, score_sequence


def records(n=4, seed=0, attention=True):
    rng = np.random.default_rng(seed)
    out = []
    for t in range(n):
        rec = {"token": t, "logprob": float(-rng.uniform(0, 3)), "entropy": float(rng.uniform(0, 4)),
               "self_certainty": float(rng.uniform(0, 5))}
        if attention:
            rec["prev_attention"] = rng.uniform(0, 1, size=(3, 2)).tolist()  # [layers, heads]
        out.append(rec)
    return out


def test_logit_scores_equal_the_reference_functions():
    recs = records()
    logp = [r["logprob"] for r in recs]
    got = score_sequence(recs, ("msp", "perplexity", "mean_entropy", "max_entropy", "self_certainty"))
    assert got["msp"] == pytest.approx(ss.max_sequence_probability(logp))
    assert got["perplexity"] == pytest.approx(math.exp(-np.mean(logp)))
    assert got["mean_entropy"] == pytest.approx(np.mean([r["entropy"] for r in recs]))
    assert got["max_entropy"] == pytest.approx(max(r["entropy"] for r in recs))
    assert got["self_certainty"] == pytest.approx(-np.mean([r["self_certainty"] for r in recs]))


def test_rauq_reads_attention_as_layers_heads_tokens():
    recs = records()
    att = np.array([r["prev_attention"] for r in recs]).transpose(1, 2, 0)
    p = np.exp([r["logprob"] for r in recs])
    assert score_sequence(recs, ("rauq",))["rauq"] == pytest.approx(ss.rauq(p, att, alpha=0.2))
    assert score_sequence(recs, ("rauq",), ScoringContext(rauq_alpha=0.5))["rauq"] == pytest.approx(
        ss.rauq(p, att, alpha=0.5))


def test_rauq_alpha_follows_the_model_kind(tokenizer):
    from tokopt.uncertainty.estimators import rauq_alpha

    assert rauq_alpha(ScoringContext()) == 0.2  # base model (no chat template known)
    assert tokenizer.chat_template and rauq_alpha(ScoringContext(tokenizer=tokenizer)) == 0.5  # SmolLM2-Instruct
    assert rauq_alpha(ScoringContext(tokenizer=tokenizer, rauq_alpha=0.3)) == 0.3


def test_unknown_estimator_lists_the_known_ones():
    with pytest.raises(TokoptError, match="unknown uncertainty estimator.*'entropyy'.*known: msp"):
        check_estimators(("msp", "entropyy"))
    assert check_estimators("msp") == ("msp",)


def test_rauq_without_attention_taps_names_the_pass_and_the_fix():
    with pytest.raises(TokoptError, match="rauq needs attention taps.*attention_taps.*--uncertainty"):
        score_sequence(records(attention=False), ("msp", "rauq"))


@pytest.mark.parametrize("name,needle", [("uqac", "needs model, tokenizer, prompt_ids"),
                                         ("ccp", "needs tokenizer"), ("token_sar", "needs tokenizer")])
def test_missing_context_is_named(name, needle):
    recs = [dict(r, topk=[(0, -0.1)]) for r in records()]
    with pytest.raises(TokoptError, match=needle):
        score_sequence(recs, (name,))


def test_records_without_logprobs_or_empty():
    with pytest.raises(TokoptError, match="no log-probabilities.*uncertainty=True"):
        score_sequence([{"token": 1, "entropy": 0.3}], ("msp",))
    with pytest.raises(TokoptError, match="no generated tokens"):
        score_sequence([], ("msp",))
    assert set(ESTIMATORS) >= {"msp", "rauq", "ccp", "token_sar", "uqac"}


def test_optimized_model_scores_each_row(tiny_model):
    opt = tokopt.optimize(tiny_model("llama", num_hidden_layers=3, vocab_size=256), uncertainty=True)
    ids = torch.tensor([[0, 5, 9, 17], [3, 8, 8, 2]])
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    opt.generate(ids, mask, max_new_tokens=5)
    scores = opt.sequence_uncertainty(("msp", "rauq", "perplexity"))
    assert len(scores) == 2
    for b, row in enumerate(scores):
        assert row == score_sequence(opt.last_uncertainty[b], ("msp", "rauq", "perplexity"))
        assert all(math.isfinite(v) for v in row.values())
    with pytest.raises(TokoptError, match="needs tokenizer"):
        opt.sequence_uncertainty(("ccp",))  # the tiny model has no tokenizer


def test_engine_exported_without_attention_taps_refuses_rauq(tiny_model, tmp_path):
    from tokopt.export.engine_dir import export_engine

    opt = tokopt.optimize(tiny_model("llama", num_hidden_layers=3, vocab_size=256),
                          tokopt.OptimizeConfig(passes=("logit_taps",)))
    path = export_engine(opt, tmp_path / "e", model_config=opt.model.config.to_dict(), model_name="tiny")
    ort = tokopt.load_engine(path, uncertainty=True)
    ort.generate(torch.tensor([[5, 9, 17]]), max_new_tokens=3)
    assert set(ort.sequence_uncertainty(("msp",))[0]) == {"msp"}
    with pytest.raises(TokoptError, match="rauq needs attention taps"):
        ort.sequence_uncertainty(("rauq",))
    with pytest.raises(TokoptError, match="no PyTorch model: pass model="):
        ort.sequence_uncertainty(("uqac",), tokenizer=object())
