"""How well an uncertainty score separates good answers from bad ones (lm-polygraph's conventions).

- ``prr``: prediction rejection ratio. Reject the most uncertain answers first; the rejection curve is the mean
  quality of the retained answers at each rejection level (0, 1, ..., n-1 answers rejected), averaged over the
  levels. Normalized as ``(PRR - random) / (oracle - random)``: 1 = ranks like the true quality, 0 = no better
  than chance, negative = worse than chance.
- ``roc_auc``: ROC-AUC of the uncertainty as a detector of wrong answers (Mann-Whitney, ties count half).

Plain numpy; no sklearn.
"""

from __future__ import annotations

import numpy as np

from tokopt.errors import TokoptError


def _pair(uncertainty, other, other_name: str) -> tuple[np.ndarray, np.ndarray]:
    u = np.asarray(uncertainty, dtype=np.float64)
    q = np.asarray(other, dtype=np.float64)
    if u.ndim != 1 or q.ndim != 1:
        raise TokoptError(f"uncertainty and {other_name} must be one-dimensional, got shapes {u.shape} and {q.shape}")
    if u.shape != q.shape:
        raise TokoptError(f"uncertainty and {other_name} must have one value per answer each, "
                          f"got lengths {u.size} and {q.size}")
    if u.size == 0:
        raise TokoptError("no answers to evaluate: uncertainty is empty")
    if not (np.isfinite(u).all() and np.isfinite(q).all()):
        raise TokoptError(f"uncertainty and {other_name} must be finite (no NaN or inf)")
    return u, q


def _rejection_curve_mean(uncertainty: np.ndarray, quality: np.ndarray) -> float:
    """Mean over rejection levels of the retained answers' mean quality; tied scores get their group's mean
    quality (the expectation over tie-breaking orders)."""
    order = np.argsort(uncertainty, kind="stable")
    u, q = uncertainty[order], quality[order].copy()
    starts = np.flatnonzero(np.r_[True, u[1:] != u[:-1]])
    ends = np.r_[starts[1:], u.size]
    for a, b in zip(starts, ends):
        q[a:b] = q[a:b].mean()
    n = q.size
    retained_means = np.cumsum(q) / np.arange(1, n + 1)  # keeping the k least uncertain, k = 1..n
    return float(retained_means.mean())


def prr(uncertainty, quality) -> float:
    """Prediction rejection ratio ``(PRR - random) / (oracle - random)`` of an uncertainty score.

    ``quality`` is any per-answer quality (1/0 for right/wrong, or a graded metric; higher is better). The
    random baseline is its exact expectation, the mean quality; raises when every answer has the same quality
    (oracle = random, nothing to rank).

    Example::

        >>> prr([0.1, 0.2, 0.9], [1, 1, 0])  # the wrong answer is the most uncertain: oracle ranking
        1.0
    """
    u, q = _pair(uncertainty, quality, "quality")
    oracle = _rejection_curve_mean(-q, q)
    random = float(q.mean())
    if oracle - random <= 1e-12 * max(1.0, abs(random)):
        raise TokoptError("prr: every answer has the same quality, so no ranking beats random (PRR undefined)")
    return (_rejection_curve_mean(u, q) - random) / (oracle - random)


def roc_auc(uncertainty, is_wrong) -> float:
    """ROC-AUC of ``uncertainty`` for detecting wrong answers: P(u_wrong > u_right) + 0.5 P(tie).

    Example::

        >>> roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
        0.75
    """
    u, w = _pair(uncertainty, is_wrong, "is_wrong")
    if not np.isin(w, (0.0, 1.0)).all():
        raise TokoptError("roc_auc: is_wrong must hold booleans or 0/1 values")
    wrong = w == 1.0
    n_pos, n_neg = int(wrong.sum()), int((~wrong).sum())
    if n_pos == 0 or n_neg == 0:
        raise TokoptError(f"roc_auc needs both right and wrong answers; got {n_pos} wrong and {n_neg} right")
    order = np.argsort(u, kind="stable")
    sorted_u = u[order]
    ranks = np.empty(u.size, dtype=np.float64)
    starts = np.flatnonzero(np.r_[True, sorted_u[1:] != sorted_u[:-1]])
    ends = np.r_[starts[1:], u.size]
    for a, b in zip(starts, ends):
        ranks[order[a:b]] = (a + b + 1) / 2.0  # average of 1-based ranks a+1 .. b
    return float((ranks[wrong].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))
