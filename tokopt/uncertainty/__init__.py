"""Uncertainty scoring (layer: above export, beside MoE planning, below the API; design note: uncertainty.md):
pure reference functions over the taps' records, the estimators that run an auxiliary model or the LM itself (CCP, TokenSAR, UQAC, conditional entropy reduction),
and their evaluation.

- ``tokopt.runtime.logprobs`` (re-exported here): per-row statistics of logits ``[..., V]`` in float64 — ``entropy``, ``max_prob``, ``margin``,
  ``topk_logprobs`` (k <= 20), ``self_certainty``, ``chosen_logprob``, ``typicality_deviation``; the processed
  distribution via ``processed_logits`` (HF's temperature / top-k / top-p) and ``typical_mask`` (equals HF's
  ``TypicalLogitsWarper``).
- ``sequence_scores``: ``max_sequence_probability``, ``perplexity``, ``mean_entropy``, ``token_sar``,
  ``ccp_from_labels`` / ``combine_nli`` / ``claim_ccp`` (on given NLI labels), ``rauq`` / ``rauq_layers``.
- ``evaluation``: ``prr`` (prediction rejection ratio) and ``roc_auc``, lm-polygraph's conventions.
- ``tokopt.runtime.gumbel`` (re-exported here): counter-based Gumbel noise ``gumbel`` and ``gumbel_argmax`` for replayable,
  intervenable sampling.
"""

from tokopt.runtime.gumbel import gumbel, gumbel_argmax
from tokopt.uncertainty.evaluation import prr, roc_auc
from tokopt.runtime.logprobs import (chosen_logprob, entropy, margin, max_prob, processed_logits, self_certainty,
                                     topk_logprobs, typicality_deviation)
from tokopt.runtime.sampling import typical_mask
from tokopt.uncertainty.sequence_scores import (ccp_from_labels, claim_ccp, combine_nli, max_sequence_probability,
                                                mean_entropy, perplexity, rauq, rauq_layers, token_sar)

__all__ = ["ccp_from_labels", "chosen_logprob", "claim_ccp", "combine_nli", "entropy", "gumbel", "gumbel_argmax",
           "margin", "max_prob", "max_sequence_probability", "mean_entropy", "perplexity", "processed_logits",
           "prr", "rauq", "rauq_layers", "roc_auc", "self_certainty", "token_sar", "topk_logprobs",
           "typical_mask", "typicality_deviation"]

# UQAC (arXiv 2503.19168): attention-chain confidence of an answer span; runs the model (see ``uqac.py``).
from tokopt.uncertainty.uqac import UQACConfig, uqac  # noqa: E402

__all__ += ["UQACConfig", "uqac"]

# CCP and TokenSAR with the offline auxiliary models (``aux_models``; labelled stand-ins, see ``ccp.py`` and
# ``relevance.py``). Models load lazily, at the first score that needs them.
from tokopt.uncertainty.aux_models import load_nli, load_similarity  # noqa: E402
from tokopt.uncertainty.ccp import sequence_ccp, token_ccp  # noqa: E402
from tokopt.uncertainty.relevance import token_relevance, token_sar_score  # noqa: E402

__all__ += ["load_nli", "load_similarity", "sequence_ccp", "token_ccp", "token_relevance", "token_sar_score"]

# Sequence scores by estimator name, with clear errors for what an estimator needs (``estimators.py``).
from tokopt.uncertainty.estimators import ESTIMATORS, ScoringContext, score_sequence  # noqa: E402

__all__ += ["ESTIMATORS", "ScoringContext", "score_sequence"]

# Conditional entropy reduction over reasoning steps (one forward of probes over a shared prefix cache).
from tokopt.uncertainty.entropy_reduction import EntropyCurve, entropy_curve, split_steps  # noqa: E402

__all__ += ["EntropyCurve", "entropy_curve", "split_steps"]
