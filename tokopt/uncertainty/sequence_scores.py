"""Sequence- and claim-level uncertainty scores built from per-token numbers (higher = more uncertain).

Pure functions over plain arrays: the per-token inputs (logprobs, entropies, NLI labels, relevances,
previous-token attention) come from the taps and the auxiliary models; nothing here loads a model.

- ``max_sequence_probability``: -sum log p.  ``perplexity``: exp(-mean log p).  ``mean_entropy``.
- ``token_sar`` (arXiv 2307.01379): relevance-weighted surprisal.
- ``ccp_from_labels``, ``combine_nli``, ``claim_ccp`` (arXiv 2403.04696, lm-polygraph's CCP).
- ``rauq``, ``rauq_layers`` (arXiv 2505.20045, lm-polygraph ``estimators/rauq.py``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from tokopt.errors import TokoptError
from tokopt.passes.attention_taps import rauq_layers

NLI_LABELS = ("entail", "contra", "neutral")


def _vector(values, name: str, allow_empty: bool = False) -> np.ndarray:
    if hasattr(values, "detach"):  # torch tensor
        values = values.detach().cpu().double().numpy()
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TokoptError(f"{name} must be a sequence of numbers: {exc}") from None
    if arr.ndim != 1:
        raise TokoptError(f"{name} must be one-dimensional (one value per token), got shape {arr.shape}")
    if arr.size == 0 and not allow_empty:
        raise TokoptError(f"{name} is empty: a score needs at least one token")
    if np.isnan(arr).any():
        raise TokoptError(f"{name} contains NaN at positions {np.flatnonzero(np.isnan(arr)).tolist()[:10]}")
    return arr


def _logprobs(values, name: str = "logprobs") -> np.ndarray:
    arr = _vector(values, name)
    if (arr > 1e-9).any():
        raise TokoptError(f"{name} must be log-probabilities (<= 0), got a maximum of {arr.max():.6g}")
    return arr


def _same_length(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise TokoptError(f"{name_a} and {name_b} must have one value per token each, "
                          f"got lengths {a.size} and {b.size}")


def max_sequence_probability(logprobs) -> float:
    """Maximum Sequence Probability uncertainty: ``-sum_i log p_i`` of the generated tokens.

    Example::

        >>> max_sequence_probability([-0.5, -1.5])
        2.0
    """
    return float(-_logprobs(logprobs).sum())


def perplexity(logprobs) -> float:
    """Perplexity ``exp(-mean_i log p_i)`` of the generated tokens.

    Example::

        >>> round(perplexity([math.log(0.5)] * 3), 12)
        2.0
    """
    return float(math.exp(-_logprobs(logprobs).mean()))


def mean_entropy(entropies) -> float:
    """Mean per-token entropy of the generated sequence.

    Example::

        >>> mean_entropy([1.0, 2.0, 3.0])
        2.0
    """
    arr = _vector(entropies, "entropies")
    if (arr < -1e-9).any():
        raise TokoptError(f"entropies must be >= 0, got a minimum of {arr.min():.6g}")
    return float(arr.mean())


def token_sar(logprobs, relevance) -> float:
    """TokenSAR: ``sum_i -log p_i (1 - s_i) / sum_j (1 - s_j)``, ``s_i`` = similarity without token i.

    ``s_i`` near 1 means dropping token i changes nothing (an irrelevant token), so its surprisal counts little.
    When no token matters (every ``s_i`` = 1, e.g. a one-token answer the similarity model does not see), the
    weights are equal: the limit of equal relevances, the mean surprisal.

    Example::

        >>> round(token_sar([-0.1, -2.0], [0.9, 0.2]), 4)
        1.7889
    """
    lp = _logprobs(logprobs)
    s = _vector(relevance, "relevance")
    _same_length(lp, s, "logprobs", "relevance")
    if ((s < -1e-9) | (s > 1 + 1e-9)).any():
        raise TokoptError(f"relevance values are similarities in [0, 1], got range [{s.min():.6g}, {s.max():.6g}]")
    weights = 1.0 - s
    total = weights.sum()
    if total <= 1e-12:
        return float(-lp.mean())
    return float((-lp * weights).sum() / total)


def combine_nli(forward_label: str, backward_label: str) -> str:
    """CCP's rule for NLI run both ways between the generated word and an alternative.

    Equal labels give that label; {entail, contra} gives neutral; entail or contra with neutral gives that one.

    Example::

        >>> combine_nli("entail", "neutral"), combine_nli("entail", "contra"), combine_nli("contra", "contra")
        ('entail', 'neutral', 'contra')
    """
    for label in (forward_label, backward_label):
        if label not in NLI_LABELS:
            raise TokoptError(f"combine_nli: unknown NLI label {label!r}; expected one of {NLI_LABELS}")
    if forward_label == backward_label:
        return forward_label
    if {forward_label, backward_label} == {"entail", "contra"}:
        return "neutral"
    return forward_label if backward_label == "neutral" else backward_label


def ccp_from_labels(alt_logprobs, labels: Sequence[str | None]) -> float:
    """Claim Conditioned Probability of one token from its alternatives' logprobs and NLI labels.

    Index 0 is the generated token (its label must be ``None`` or ``"entail"``); ``labels[i]`` for i >= 1 is the
    combined NLI label (see ``combine_nli``) of alternative i against the generated word. Neutral alternatives
    are dropped: ``CCP = sum p(generated and entail) / sum p(generated, entail and contra)``.

    Example::

        >>> lp = [math.log(p) for p in (0.6, 0.1, 0.25, 0.05)]  # Paris, paris, Lyon, "the"
        >>> round(ccp_from_labels(lp, [None, "entail", "contra", "neutral"]), 4)
        0.7368
    """
    lp = _logprobs(alt_logprobs, "alt_logprobs")
    labels = list(labels)
    if len(labels) != lp.size:
        raise TokoptError(f"ccp_from_labels: {len(labels)} labels for {lp.size} alternatives; give one label per "
                          f"alternative, index 0 (the generated token) being None or 'entail'")
    if labels[0] not in (None, "entail"):
        raise TokoptError(f"ccp_from_labels: index 0 is the generated token and entails itself; "
                          f"got label {labels[0]!r}")
    for i, label in enumerate(labels[1:], start=1):
        if label not in NLI_LABELS:
            raise TokoptError(f"ccp_from_labels: label {i} is {label!r}; expected one of {NLI_LABELS}")
    entail = np.array([i == 0 or label == "entail" for i, label in enumerate(labels)])
    contra = np.array([i > 0 and label == "contra" for i, label in enumerate(labels)])
    log_num = np.logaddexp.reduce(lp[entail])
    log_den = np.logaddexp.reduce(lp[entail | contra])
    return float(math.exp(log_num - log_den))


def claim_ccp(token_ccps, is_stopword) -> float:
    """Claim-level CCP uncertainty: ``-prod_t CCP_t`` over the claim's tokens, stopwords counting as 1.

    Lies in [-1, 0); closer to 0 = more uncertain (a claim with no content tokens scores -1).

    Example::

        >>> claim_ccp([0.5, 0.1, 0.8], [False, True, False])
        -0.4
    """
    ccp = _vector(token_ccps, "token_ccps")
    stop = np.asarray(is_stopword, dtype=bool)
    if stop.shape != ccp.shape:
        raise TokoptError(f"claim_ccp: is_stopword must have one flag per token, "
                          f"got {stop.size} flags for {ccp.size} tokens")
    if ((ccp < 0) | (ccp > 1 + 1e-9)).any():
        raise TokoptError(f"claim_ccp: token CCPs are probabilities in [0, 1], got range "
                          f"[{ccp.min():.6g}, {ccp.max():.6g}]")
    return float(-np.prod(np.where(stop, 1.0, ccp)))


def rauq(token_probs, prev_attn, alpha: float = 0.2) -> float:
    """RAUQ sequence uncertainty from token probabilities and previous-token attention.

    ``prev_attn[l, h, t]`` is the attention of generated token t to token t - 1 in (selected) layer l, head h;
    column 0 is not read. Per layer, the head with the largest mean previous-token attention (t >= 1) is used;
    ``c_0 = p_0``, ``c_t = alpha * p_t + (1 - alpha) * att[t] * c_{t-1}``; the layer's score is
    ``1 - mean_t log c_t`` (lm-polygraph's form; the paper's ``-mean log c`` plus 1) and RAUQ is the maximum
    over layers. ``alpha`` is 0.2 for base models and 0.5 for instruct models. Pass only the layers to read
    (``rauq_layers``).

    Example::

        >>> att = np.array([[[0.0, 1.0]]])  # one layer, one head, full attention to the previous token
        >>> round(rauq([1.0, 0.5], att, alpha=0.5), 6)  # c = [1, 0.75]
        1.143841
    """
    p = _vector(token_probs, "token_probs")
    if ((p < 0) | (p > 1 + 1e-9)).any():
        raise TokoptError(f"rauq: token_probs are probabilities in [0, 1], got range [{p.min():.6g}, {p.max():.6g}]")
    if hasattr(prev_attn, "detach"):
        prev_attn = prev_attn.detach().cpu().double().numpy()
    att = np.asarray(prev_attn, dtype=np.float64)
    if att.ndim != 3 or att.shape[2] != p.size or att.shape[0] < 1 or att.shape[1] < 1:
        raise TokoptError(f"rauq: prev_attn must have shape [layers, heads, T={p.size}], got {att.shape}")
    if not (0.0 <= alpha <= 1.0):
        raise TokoptError(f"rauq: alpha must be in [0, 1], got {alpha!r}")
    if np.isnan(att[:, :, 1:]).any():
        raise TokoptError("rauq: prev_attn contains NaN")
    scores = []
    for layer_att in att:
        head = int(layer_att[:, 1:].mean(-1).argmax()) if p.size > 1 else 0
        c = np.empty_like(p)
        c[0] = p[0]
        for t in range(1, p.size):
            c[t] = alpha * p[t] + (1 - alpha) * layer_att[head, t] * c[t - 1]
        with np.errstate(divide="ignore"):
            scores.append(1.0 - np.log(c).mean())
    return float(max(scores))
