"""Verification: which path of a draft tree the target model accepts, losslessly.

One function per rule, all taking the tree and the target's logits at every node (``[N, V]``, one verify
forward) and returning a ``Verdict``: the accepted nodes (root first) and the target's next token after them.

- ``verify_greedy``: descend while the target argmax at the current node is one of its children; the argmax
  after the last accepted node is the next token. Ties break as ``torch.argmax`` does in plain decoding.
- ``verify_sampling``: with p the processed target distribution at a node (temperature, top-k, top-p as in
  plain sampling),
  * deterministic children (``tree.draft_probs is None``: recycling, lookup, PPD): draw y ~ p; descend if y
    is a child, else y is the next token;
  * drafted children (draft model, DySpec, RSD): recursive rejection sampling. R = p, D = q; for each child y
    in drafted order accept with probability min(1, R[y] / D[y]); on rejection R <- norm(max(R - D, 0)) and,
    for siblings drawn without replacement, D[y] <- 0, D <- norm(D). If every child is rejected the next
    token is drawn from R. At a leaf the next token is drawn from p.
  Either way each emitted token is distributed exactly as plain sampling from the target would draw it.

Example::

    verdict = verify_greedy(tree, logits[b])
    emitted = tree.path_tokens(verdict.path[1:]) + [verdict.next_token]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokopt.kernels.accept import greedy_accept

from tokopt.runtime.sampling import SamplingParams, process_logits


@dataclass
class Verdict:
    path: list  # accepted node indices, root (0) first
    next_token: int  # the target's token after the last accepted node

    @property
    def accepted(self) -> int:
        """Tokens this step emits: accepted drafts plus the next token."""
        return len(self.path)


def verify_greedy(tree, logits: torch.Tensor) -> Verdict:
    """Longest path whose every token is the target argmax at its parent (see module docstring); the walk is
    the ``tokopt.kernels`` greedy acceptance (``kernels/accept.py``: Numba or the torch reference)."""
    return Verdict(*greedy_accept(tree, logits))


def target_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution plain sampling draws from: processed logits, softmax (float32)."""
    return process_logits(logits, params).softmax(dim=-1)


def _draw(probs: torch.Tensor, generator) -> int:
    return int(torch.multinomial(probs, 1, generator=generator))


def _uniform(generator) -> float:
    return float(torch.rand((), generator=generator))


def verify_sampling(tree, logits: torch.Tensor, params: SamplingParams, generator=None) -> Verdict:
    """Lossless acceptance under sampling (see module docstring for the rules)."""
    probs = target_probs(logits[: tree.size], params)
    node, path = 0, [0]
    while True:
        kids = tree.children[node]
        if not kids:
            return Verdict(path, _draw(probs[node], generator))
        if tree.draft_probs is None:
            y = _draw(probs[node], generator)
            child = next((c for c in kids if tree.tokens[c] == y), None)
            if child is None:
                return Verdict(path, y)
        else:
            child, residual = _rejection_round(kids, tree, probs[node], tree.draft_probs[node].float(), generator)
            if child is None:
                return Verdict(path, _draw(residual, generator))
        node = child
        path.append(node)


def _rejection_round(kids, tree, p, q, generator):
    """Try ``kids`` in drafted order; return (accepted child or None, residual distribution)."""
    residual, draft = p.clone(), q.clone()
    for child in kids:
        y = tree.tokens[child]
        d = float(draft[y])
        if d > 0 and _uniform(generator) * d < float(residual[y]):
            return child, residual
        residual = _normalized((residual - draft).clamp_min(0), fallback=residual)
        if not tree.replacement:
            draft[y] = 0
            draft = _normalized(draft, fallback=draft)
    return None, residual


def _normalized(x: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    total = float(x.sum())
    return x / total if total > 0 else fallback
