"""Per-row uncertainty statistics of next-token logits: the float64 references the graph taps must match.

Every function takes logits ``[..., V]`` (any float dtype) and returns float64 tensors of shape ``[...]``
(``topk_logprobs`` adds a trailing ``k``). Logits may hold ``-inf`` (tokens removed by top-k/top-p); those
tokens have probability 0 and drop out of every sum. ``processed_logits`` and ``typical_mask`` reproduce
transformers' warpers step for step in the input dtype, so a mask computed here equals HF's bit for bit.

Formulas (design note ``uncertainty.md``): with z = logits, lse = logsumexp(z), logp = z - lse,
entropy H = -sum p logp; max_prob = exp(max z - lse); margin = p1 - p2; self-certainty = lse - mean(z) - log V
(= KL(uniform || p)); chosen logprob = z[y] - lse; typicality deviation = |-logp(y) - H|.
"""

from __future__ import annotations

import math

import torch

from tokopt.errors import TokoptError
from tokopt.runtime.sampling import SamplingParams, check_logits, process_logits

MAX_TOP_K = 20


def _check_ids(logits: torch.Tensor, ids) -> torch.Tensor:
    ids = torch.as_tensor(ids)
    if ids.is_floating_point() or ids.dtype == torch.bool:
        raise TokoptError(f"ids must be integer token ids, got dtype {ids.dtype}")
    if tuple(ids.shape) != tuple(logits.shape[:-1]):
        raise TokoptError(f"ids must have the logits' shape without the vocabulary axis, "
                          f"{tuple(logits.shape[:-1])}; got {tuple(ids.shape)}")
    vocab = logits.shape[-1]
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise TokoptError(f"ids must lie in [0, {vocab}), got values in [{int(ids.min())}, {int(ids.max())}]")
    return ids.to(device=logits.device, dtype=torch.long)


def log_probs(logits) -> torch.Tensor:
    """Float64 log-probabilities ``z - logsumexp(z)`` over the last axis.

    Example::

        >>> log_probs(torch.tensor([0.0, 0.0])).exp()
        tensor([0.5000, 0.5000], dtype=torch.float64)
    """
    z = check_logits(logits).double()
    return z - torch.logsumexp(z, dim=-1, keepdim=True)


def entropy(logits) -> torch.Tensor:
    """Shannon entropy (nats) of softmax(logits); ``-inf`` logits contribute 0.

    Example::

        >>> float(entropy(torch.zeros(4)))  # uniform over 4 tokens: log 4
        1.3862943611198906
    """
    logp = log_probs(logits)
    p = logp.exp()
    return -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1)


def max_prob(logits) -> torch.Tensor:
    """Probability of the most likely token.

    Example::

        >>> float(max_prob(torch.tensor([0.0, 0.0, 0.0, 0.0])))
        0.25
    """
    return log_probs(logits).max(dim=-1).values.exp()


def margin(logits) -> torch.Tensor:
    """``p1 - p2``: top probability minus the runner-up (``p1`` when V == 1).

    Example::

        >>> p = torch.tensor([0.5, 0.3, 0.2])
        >>> round(float(margin(p.log())), 6)
        0.2
    """
    logp = log_probs(logits)
    if logp.shape[-1] == 1:
        return logp[..., 0].exp()
    top2 = logp.topk(2, dim=-1).values.exp()
    return top2[..., 0] - top2[..., 1]


def topk_logprobs(logits, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` most likely token ids and their float64 logprobs, most likely first (``k <= 20``).

    Ties are broken as ``torch.topk`` breaks them; the logprob values are the same either way.

    Example::

        >>> ids, lp = topk_logprobs(torch.tensor([0.0, 2.0, 1.0]), 2)
        >>> ids.tolist()
        [1, 2]
    """
    logp = log_probs(logits)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise TokoptError(f"topk_logprobs: k must be a positive int, got {k!r}")
    if k > MAX_TOP_K:
        raise TokoptError(f"topk_logprobs: k={k} is above the tap limit of {MAX_TOP_K} "
                          f"(full-vocabulary logprobs are what collapses serving throughput)")
    if k > logp.shape[-1]:
        raise TokoptError(f"topk_logprobs: k={k} is larger than the vocabulary size {logp.shape[-1]}")
    values, ids = logp.topk(k, dim=-1)
    return ids, values


def self_certainty(logits) -> torch.Tensor:
    """Self-certainty ``lse - mean(z) - log V`` = KL(uniform || p) >= 0; ``inf`` when some logit is ``-inf``.

    Example::

        >>> float(self_certainty(torch.zeros(8)))  # uniform: no certainty
        0.0
    """
    z = check_logits(logits).double()
    vocab = z.shape[-1]
    return torch.logsumexp(z, dim=-1) - z.mean(-1) - math.log(vocab)


def chosen_logprob(logits, ids) -> torch.Tensor:
    """Logprob ``z[y] - lse`` of the chosen token ``y`` per row; ``ids`` has the shape ``logits.shape[:-1]``.

    Example::

        >>> float(chosen_logprob(torch.zeros(2, 4), [1, 3])[0].exp())
        0.25
    """
    logp = log_probs(logits)
    ids = _check_ids(logits, ids)
    return logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1)


def typicality_deviation(logits, ids) -> torch.Tensor:
    """``|-logp(y) - H|``: how far the chosen token's surprisal is from the entropy (Locally Typical Sampling).

    Example::

        >>> float(typicality_deviation(torch.zeros(4), 0))  # uniform: every token is typical
        0.0
    """
    return (-chosen_logprob(logits, ids) - entropy(logits)).abs()


def _as_rows(logits: torch.Tensor) -> torch.Tensor:
    return logits.reshape(-1, logits.shape[-1])


def processed_logits(logits, temperature: float | None = 1.0, top_k: int | None = None,
                     top_p: float | None = None) -> torch.Tensor:
    """Logits after HF's sampling warpers: temperature, then top-k, then top-p; removed tokens become ``-inf``.

    The very function tokopt samples with (``runtime.sampling.process_logits``), so the "processed" statistics
    are those of the distribution the decode loop draws from, and that equals transformers'
    ``TemperatureLogitsWarper``, ``TopKLogitsWarper`` and ``TopPLogitsWarper``. ``None`` (or 1.0 / 0) switches a
    step off.

    Example::

        >>> processed_logits(torch.tensor([3.0, 2.0, 1.0]), temperature=0.5, top_k=2)
        tensor([6., 4., -inf])
    """
    logits = check_logits(logits)
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)):
        raise TokoptError(f"processed_logits: top_k must be a non-negative int or None, got {top_k!r}")
    params = SamplingParams(True, 1.0 if temperature is None else temperature, top_k or 0,
                            1.0 if top_p is None else top_p)
    return process_logits(_as_rows(logits), params).reshape(logits.shape)
