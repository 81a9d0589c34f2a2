"""Inter-layer expert affinity: how strongly a token's expert at layer l predicts its expert at layer l+1.

``C[l, i, j]`` counts tokens at expert i in layer l and expert j in layer l+1 (top-1, or all k x k pairs
weighted by the product of their gate weights, normalized per token so every token counts once). The affinity
``A[l, i, :]`` is row i of C normalized to a distribution, with additive smoothing for rarely seen experts.

Example::

    from tokopt.moe.affinity import transition_counts, affinity, mutual_information
    C = transition_counts(trace, top1=True)           # [L-1, E, E]
    A = affinity(C, smoothing=0.1)                    # rows sum to 1
    mutual_information(trace)["mi_bits"]              # per adjacent layer pair, vs a shuffled baseline
"""

from __future__ import annotations

import numpy as np

from tokopt.errors import TokoptError


def _pair_weights(trace, top1: bool):
    """Per token and layer, the weight of each of its k slots, normalized to sum 1 (top-1: slot 0 only)."""
    T, L, k = trace.experts.shape
    if top1 or k == 1:
        w = np.zeros((T, L, k), dtype=np.float64)
        w[:, :, 0] = 1.0
        return w
    if trace.weights is None:
        return np.full((T, L, k), 1.0 / k)
    w = trace.weights.astype(np.float64)
    s = w.sum(axis=2, keepdims=True)
    return np.where(s > 0, w / np.where(s > 0, s, 1.0), 1.0 / k)


def transition_counts(trace, top1: bool = True) -> np.ndarray:
    """``C[L-1, E, E]``: token transitions from expert i at layer l to expert j at layer l+1.

    ``top1=False`` counts all k x k pairs of a token, each weighted by (normalized) gate weight products,
    or 1/k^2 without weights; every token then still adds exactly 1 to ``C[l].sum()``.

    Example::

        t = RoutingTrace(np.array([[[0], [1]], [[0], [1]], [[1], [1]]]), None, num_experts=2)
        transition_counts(t)[0]     # [[0, 2], [0, 1]]
    """
    T, L, k = trace.experts.shape
    E = trace.num_experts
    if L < 2:
        raise TokoptError(f"affinity needs at least 2 MoE layers; the trace has {L}")
    w = _pair_weights(trace, top1)
    kk = 1 if (top1 or k == 1) else k
    C = np.zeros((L - 1, E, E), dtype=np.float64)
    for l in range(L - 1):
        a, b = trace.experts[:, l, :kk], trace.experts[:, l + 1, :kk]
        wa, wb = w[:, l, :kk], w[:, l + 1, :kk]
        src = np.repeat(a, kk, axis=1).ravel()
        dst = np.tile(b, (1, kk)).ravel()
        ww = (wa[:, :, None] * wb[:, None, :]).reshape(T, -1).ravel()
        np.add.at(C[l], (src, dst), ww)
    return C


def affinity(C: np.ndarray, smoothing: float = 0.0) -> np.ndarray:
    """Row-normalized ``(C + smoothing) / (row sum + E * smoothing)``; an unseen row with no smoothing is uniform.

    Example::

        affinity(np.array([[[0., 2.], [0., 1.]]]), smoothing=1.0)[0]    # [[0.25, 0.75], [1/3, 2/3]]
    """
    C = np.asarray(C, dtype=np.float64)
    if smoothing < 0:
        raise TokoptError(f"smoothing must be >= 0, got {smoothing}")
    E = C.shape[-1]
    num = C + smoothing
    den = num.sum(axis=-1, keepdims=True)
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), 1.0 / E)


def expert_load(trace, top1: bool = False) -> np.ndarray:
    """``[L, E]`` tokens per expert (each token counts once per slot; ``top1`` counts only its first expert)."""
    T, L, k = trace.experts.shape
    kk = 1 if top1 else k
    load = np.zeros((L, trace.num_experts), dtype=np.float64)
    for l in range(L):
        load[l] = np.bincount(trace.experts[:, l, :kk].ravel(), minlength=trace.num_experts)
    return load


def mi_bits(a: np.ndarray, b: np.ndarray, E: int) -> float:
    """Mutual information (bits) between two arrays of expert ids in ``0..E-1``."""
    joint = np.zeros((E, E))
    np.add.at(joint, (a, b), 1.0)
    joint /= joint.sum()
    pa, pb = joint.sum(1, keepdims=True), joint.sum(0, keepdims=True)
    nz = joint > 0
    return float((joint[nz] * np.log2(joint[nz] / (pa @ pb)[nz])).sum())


def mutual_information(trace, seed: int = 0) -> dict:
    """Top-1 mutual information (bits) between adjacent layers, and the same with layer l+1 shuffled.

    The plug-in estimate is biased upward on few tokens; the shuffled baseline shows how much. Returns
    ``{"mi_bits": [L-1], "shuffled_bits": [L-1], "excess_bits": [L-1]}``.
    """
    rng = np.random.default_rng(seed)
    t1 = trace.top1
    mi, sh = [], []
    for l in range(trace.num_layers - 1):
        mi.append(mi_bits(t1[:, l], t1[:, l + 1], trace.num_experts))
        sh.append(mi_bits(t1[:, l], rng.permutation(t1[:, l + 1]), trace.num_experts))
    return {"mi_bits": mi, "shuffled_bits": sh, "excess_bits": [a - b for a, b in zip(mi, sh)]}
