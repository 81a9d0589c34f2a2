"""What flows through an expert-parallel step: the tokens resident on a rank, and rows of expert work.

A decode or prefill step over many sequences is a set of tokens, each with a place in the step (``idx``, the
same on every rank), a sequence and a position. On one rank at one point of the step only some tokens are
*resident* (their hidden state lives here): at home under two-Alltoall expert parallelism, wherever their
last expert ran under context-coherent execution. ``Tokens`` holds them; ``Work`` holds rows sent to this
rank's experts (a token's normed hidden state, its top-k experts and gate weights, and where the result goes).

Example::

    t = Tokens(hidden, seq, pos, idx, wants_logits)    # one row per resident token
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch


@dataclass
class Tokens:
    hidden: torch.Tensor  # [n, d] residual stream
    seq: torch.Tensor  # [n] int64 sequence index
    pos: torch.Tensor  # [n] int64 position in its sequence
    idx: torch.Tensor  # [n] int64 index of the token in this step (the same on every rank)
    wants_logits: torch.Tensor  # [n] bool
    ids: torch.Tensor | None = None  # [n] int64 token ids (before the embedding)
    # set by routing (per MoE layer):
    normed: torch.Tensor | None = None  # [n, d] post-attention norm of hidden (the experts' input)
    experts: torch.Tensor | None = None  # [n, k] int64 expert ids (in the program's numbering)
    weights: torch.Tensor | None = None  # [n, k] gate weights
    extra: torch.Tensor | None = None  # [n, d] what does not go through routed experts (a shared expert)

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def select(self, rows) -> "Tokens":
        """The tokens at ``rows`` (an index or bool tensor), routing fields included."""
        pick = {}
        for name in ("hidden", "seq", "pos", "idx", "wants_logits", "ids", "normed", "experts", "weights", "extra"):
            value = getattr(self, name)
            pick[name] = None if value is None else value[rows]
        return Tokens(**pick)

    def routed(self, **fields) -> "Tokens":
        return replace(self, **fields)


@dataclass
class Work:
    """Rows for this rank's experts: ``normed`` inputs, top-k ``experts``/``weights``, and for each row the
    ``origin`` rank its result goes back to (two-Alltoall) and its token ``idx``. ``out`` is filled by the experts."""

    normed: torch.Tensor  # [m, d]
    experts: torch.Tensor  # [m, k]
    weights: torch.Tensor  # [m, k]
    origin: torch.Tensor  # [m] int64 rank the row came from (== this rank for local rows)
    idx: torch.Tensor  # [m] int64 token index in the step
    out: torch.Tensor | None = None  # [m, d] sum over this rank's experts of weight * expert(normed)
    resident: Tokens | None = None  # the tokens resident here while the work runs
    meta: dict = field(default_factory=dict)
