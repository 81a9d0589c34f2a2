"""Sequence uncertainty of a generation, by estimator name: one call, every estimator, clear errors for what is
missing.

Every score is oriented the same way: **higher = more uncertain** (what PRR and ROC-AUC expect).

==================  ==========================================================  ================================
estimator           score                                                       needs
==================  ==========================================================  ================================
``msp``             -sum log p(y_t) (maximum sequence probability)              records (logit taps)
``perplexity``      exp(-mean log p(y_t))                                       records
``mean_entropy``    mean raw entropy of the distributions that chose the tokens records
``max_entropy``     the largest of those entropies                              records
``self_certainty``  -mean self-certainty (KL from uniform)                      records
``rauq``            RAUQ (previous-token attention recurrence, middle layers)   records with ``prev_attention``
``ccp``             claim CCP, -prod CCP_t (NLI stand-in, see ``ccp.py``)       records + tokenizer (+ models)
``token_sar``       TokenSAR (MiniLM relevance, see ``relevance.py``)           records + tokenizer
``uqac``            -log UQAC confidence (attention chains, see ``uqac.py``)    PyTorch model + tokenizer + ids
==================  ==========================================================  ================================

Example::

    opt = tokopt.optimize(model, uncertainty=True)
    out = opt.generate(ids, max_new_tokens=16)
    score_sequence(opt.last_uncertainty[0], ("msp", "rauq"))     # {'msp': -0.41, 'rauq': 0.93}
    opt.sequence_uncertainty(("perplexity", "ccp"))               # the same, per row, context filled in
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tokopt.errors import TokoptError
import tokopt.uncertainty.sequence_scores as ss
from tokopt.uncertainty.ccp import sequence_ccp
from tokopt.uncertainty.relevance import token_sar_score
from tokopt.uncertainty.uqac import uqac

LOGIT_ESTIMATORS = ("msp", "perplexity", "mean_entropy", "max_entropy", "self_certainty")
ESTIMATORS = (*LOGIT_ESTIMATORS, "rauq", "ccp", "token_sar", "uqac")
DEFAULT_ESTIMATORS = (*LOGIT_ESTIMATORS, "rauq")  # the ones that cost nothing beyond the taps
RAUQ_ALPHA_BASE, RAUQ_ALPHA_INSTRUCT = 0.2, 0.5  # the paper's values for base and instruction-tuned models


@dataclass
class ScoringContext:
    """What estimators beyond the logit taps need: the ``tokenizer`` (ccp, token_sar, uqac), the prompt as
    ``prompt_text`` (ccp, token_sar) and ``prompt_ids`` (uqac), the PyTorch ``model`` (uqac), the answer's
    ``answer_span`` in the generated tokens (uqac; default: all of them), and RAUQ's ``rauq_alpha`` (default: the
    paper's 0.5 for a chat model, i.e. a tokenizer with a chat template, else 0.2)."""

    tokenizer: object = None
    prompt_text: str = ""
    prompt_ids: object = None
    model: object = None
    answer_span: tuple | None = None
    rauq_alpha: float | None = None
    nli: object = None  # ccp's NLI model (default: the offline aux model)
    similarity: object = None  # ccp's and token_sar's sentence model (default: the offline aux model)


def rauq_alpha(context: ScoringContext) -> float:
    """The context's alpha, else 0.5 for instruction-tuned (chat-template) models and 0.2 for base ones."""
    if context.rauq_alpha is not None:
        return float(context.rauq_alpha)
    chat = bool(getattr(context.tokenizer, "chat_template", None))
    return RAUQ_ALPHA_INSTRUCT if chat else RAUQ_ALPHA_BASE


def check_estimators(estimators, records=None, context: ScoringContext | None = None) -> tuple:
    """Raise a TokoptError naming every unknown estimator, or what a known one needs and is missing."""
    if isinstance(estimators, str):
        estimators = (estimators,)
    estimators = tuple(estimators)
    unknown = [e for e in estimators if e not in ESTIMATORS]
    if unknown:
        raise TokoptError(f"unknown uncertainty estimator(s) {', '.join(map(repr, unknown))}; "
                          f"known: {', '.join(ESTIMATORS)}")
    context = context or ScoringContext()
    if records is not None:
        if not records:
            raise TokoptError("no records to score: the sequence has no generated tokens")
        first = records[0]
        if "logprob" not in first:
            raise TokoptError("these records have no log-probabilities: generate with uncertainty=True "
                              "(tokopt.optimize(model, uncertainty=True) or load_engine(dir, uncertainty=True))")
        if "rauq" in estimators and "prev_attention" not in first:
            raise TokoptError("rauq needs attention taps (per-token 'prev_attention'), and this engine has none: "
                              "it was built without the attention_taps pass. Use tokopt.optimize(model, "
                              "uncertainty=True), or re-export the engine with `tokopt export --uncertainty`")
        if "ccp" in estimators and "topk" not in first:
            raise TokoptError("ccp needs each token's top-k alternatives ('topk' in the records): build the "
                              "engine with the logit_taps pass (uncertainty=True)")
    needs = {"ccp": ("tokenizer",), "token_sar": ("tokenizer",), "uqac": ("model", "tokenizer", "prompt_ids")}
    for name in estimators:
        missing = [field for field in needs.get(name, ()) if getattr(context, field) is None]
        if missing:
            hint = " (an engine loaded from a directory has no PyTorch model: pass model=...)" if "model" in missing \
                else ""
            raise TokoptError(f"estimator {name!r} needs {', '.join(missing)} in the scoring context{hint}")
    return estimators


def score_sequence(records, estimators=DEFAULT_ESTIMATORS, context: ScoringContext | None = None) -> dict:
    """Scores of one generated sequence (``records``: ``opt.last_uncertainty[row]``), higher = more uncertain.

    Example::

        score_sequence(records, ("msp", "perplexity", "rauq"))
    """
    context = context or ScoringContext()
    estimators = check_estimators(estimators, records, context)
    logprobs = np.array([r["logprob"] for r in records], dtype=np.float64)
    out = {}
    for name in estimators:
        if name == "msp":
            out[name] = ss.max_sequence_probability(logprobs)
        elif name == "perplexity":
            out[name] = ss.perplexity(logprobs)
        elif name == "mean_entropy":
            out[name] = ss.mean_entropy([r["entropy"] for r in records])
        elif name == "max_entropy":
            out[name] = float(max(r["entropy"] for r in records))
        elif name == "self_certainty":
            out[name] = -float(np.mean([r["self_certainty"] for r in records]))
        elif name == "rauq":
            att = np.array([r["prev_attention"] for r in records], dtype=np.float64)  # [T, layers, heads]
            out[name] = ss.rauq(np.exp(logprobs), att.transpose(1, 2, 0), alpha=rauq_alpha(context))
        elif name == "ccp":
            out[name] = sequence_ccp(records, context.tokenizer, context.prompt_text, context.nli,
                                     context.similarity)
        elif name == "token_sar":
            out[name] = token_sar_score(records, context.tokenizer, context.prompt_text, context.similarity)
        elif name == "uqac":
            result = uqac(context.model, context.tokenizer, context.prompt_ids, [r["token"] for r in records],
                          answer_span=context.answer_span)
            out[name] = result.uncertainty
    return out
