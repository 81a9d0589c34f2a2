"""Counterfactual generation noise: Gumbel-max sampling from a keyed, counter-based hash (arXiv 2409.17027).

The noise of token ``v`` at ``position`` of ``request`` under ``seed`` is a pure function of those four integers
(a splitmix64 chain in uint64 arithmetic, identical on every platform), so

- replaying a generation needs no stored RNG state, only the seed;
- forcing a different token at step t changes nothing before t, and after t only through the changed context:
  the noise itself stays the same, which is what makes the two runs counterfactuals of each other.

``argmax(log p + g)`` with standard Gumbel ``g`` is an exact sample from ``p``.
"""

from __future__ import annotations

import numpy as np

from tokopt.errors import TokoptError

_MASK = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_MUL1 = 0xBF58476D1CE4E5B9
_MUL2 = 0x94D049BB133111EB


def _splitmix64_int(x: int) -> int:
    z = (x + _GOLDEN) & _MASK
    z = ((z ^ (z >> 30)) * _MUL1) & _MASK
    z = ((z ^ (z >> 27)) * _MUL2) & _MASK
    return z ^ (z >> 31)


def _splitmix64_array(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = x + np.uint64(_GOLDEN)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(_MUL1)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(_MUL2)
        return z ^ (z >> np.uint64(31))


def _key(name: str, value) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TokoptError(f"gumbel: {name} must be an integer, got {value!r}")
    value = int(value)
    if not 0 <= value <= _MASK:
        raise TokoptError(f"gumbel: {name} must be in [0, 2**64), got {value}")
    return value


def uniform(seed: int, request: int, position: int, token_ids) -> np.ndarray:
    """Uniform numbers in (0, 1), one per token id, keyed on ``(seed, request, position, token id)``.

    Example::

        >>> u = uniform(0, 0, 0, [0, 1, 2])
        >>> bool(((u > 0) & (u < 1)).all()), bool((u == uniform(0, 0, 0, [0, 1, 2])).all())
        (True, True)
    """
    h = _splitmix64_int(_key("seed", seed))
    h = _splitmix64_int(h ^ _key("request", request))
    h = _splitmix64_int(h ^ _key("position", position))
    if hasattr(token_ids, "detach"):
        token_ids = token_ids.detach().cpu().numpy()
    ids = np.asarray(token_ids)
    if ids.dtype.kind not in "iu":
        raise TokoptError(f"gumbel: token_ids must be integers, got dtype {ids.dtype}")
    if ids.size and ids.min() < 0:
        raise TokoptError(f"gumbel: token_ids must be >= 0, got {int(ids.min())}")
    bits = _splitmix64_array(ids.astype(np.uint64) ^ np.uint64(h))
    return ((bits >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0 ** -53


def gumbel(seed: int, request: int, position: int, token_ids) -> np.ndarray:
    """Standard Gumbel noise ``-log(-log u)``, one value per token id, keyed on (seed, request, position, id).

    Example::

        >>> g = gumbel(7, 0, 3, np.arange(5))
        >>> g.shape, bool((g == gumbel(7, 0, 3, np.arange(5))).all())
        ((5,), True)
    """
    return -np.log(-np.log(uniform(seed, request, position, token_ids)))


def gumbel_argmax(logprobs, seed: int, request: int, position: int) -> int:
    """The token ``argmax_v(logprobs[v] + g_v)``: a sample from ``softmax(logprobs)``, replayable from the key.

    ``logprobs`` is one row ``[V]`` (numpy or torch; unnormalized logits give the same token); ``-inf`` entries
    are never chosen.

    Example::

        >>> lp = np.log([0.1, 0.2, 0.7])
        >>> gumbel_argmax(lp, seed=1, request=0, position=5) == gumbel_argmax(lp, seed=1, request=0, position=5)
        True
    """
    if hasattr(logprobs, "detach"):
        logprobs = logprobs.detach().cpu().double().numpy()
    lp = np.asarray(logprobs, dtype=np.float64)
    if lp.ndim != 1 or lp.size == 0:
        raise TokoptError(f"gumbel_argmax: logprobs must be one row [V] with V >= 1, got shape {lp.shape}")
    if np.isnan(lp).any() or not np.isfinite(lp).any():
        raise TokoptError("gumbel_argmax: logprobs must hold no NaN and at least one finite value")
    return int(np.argmax(lp + gumbel(seed, request, position, np.arange(lp.size))))
