"""Attention masks and positions for prefill, decode and tree verification.

All masks are additive float ``[B, 1, N, P + N]``: 0 where a query may attend, ``finfo.min`` where not
(``finfo.min`` rather than ``-inf`` keeps fully masked padding rows finite).

Example::

    mask = step_mask(cache.valid, causal_structure(3, batch=1))
"""

from __future__ import annotations

import torch

from tokopt.kernels.tree_inputs import step_mask as kernel_step_mask


def causal_structure(n: int, batch: int, device="cpu") -> torch.Tensor:
    """``[B, N, N]`` bool: new token i sees new tokens 0..i."""
    return torch.ones(n, n, dtype=torch.bool, device=device).tril().expand(batch, n, n)


def tree_structure(parents: torch.Tensor) -> torch.Tensor:
    """``[N, N]`` bool ancestor-or-self matrix of a tree given each node's parent index (-1 for a root).

    Nodes must be listed parents-first (a node's parent has a smaller index).

    Example::

        tree_structure(torch.tensor([-1, 0, 0, 1]))   # root, two children, one grandchild
    """
    n = parents.shape[0]
    seen = torch.eye(n, dtype=torch.bool)
    for i in range(n):
        p = int(parents[i])
        if p >= i:
            raise ValueError(f"tree node {i} has parent {p}: parents must precede their children")
        if p >= 0:
            seen[i] |= seen[p]
    return seen


def step_mask(past_valid: torch.Tensor, new_structure: torch.Tensor, new_valid: torch.Tensor | None = None,
              dtype=torch.float32) -> torch.Tensor:
    """Additive mask ``[B, 1, N, P + N]`` for N new tokens after a cache whose slots are ``past_valid``.

    ``new_structure`` ``[B, N, N]`` (or ``[N, N]``) says which new tokens see which; ``new_valid`` ``[B, N]``
    marks padding among the new tokens (pads are never attended to). Runs the ``tokopt.kernels`` dispatch
    (Numba or the torch reference, ``kernels/tree_inputs.py``).
    """
    return kernel_step_mask(past_valid, new_structure, new_valid, dtype)


def prompt_positions(prompt_valid: torch.Tensor) -> torch.Tensor:
    """Positions of left-padded prompts: 0.. over real tokens (pads get 0; they are never attended to)."""
    pos = prompt_valid.long().cumsum(-1) - 1
    return pos.clamp(min=0)
