"""Turning logits into the next token: greedy, or sampling with temperature, top-k and top-p.

Processing follows Hugging Face's order and rules (temperature, then top-k, then top-p keeping at least one
token), so a distribution here is the one HF would sample from. Speculative verification applies the same
``process_logits`` to target and draft.

Example::

    params = SamplingParams(do_sample=True, temperature=0.7, top_p=0.9, seed=0)
    token = next_token(logits[:, -1], params, generator=params.generator())
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tokopt.errors import TokoptError
from tokopt.runtime.gumbel import gumbel


@dataclass(frozen=True)
class SamplingParams:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50  # HF's default; 0 disables
    top_p: float = 1.0
    seed: int | None = None
    typical_p: float = 1.0  # Locally Typical Sampling mass (HF's typical_p); 1 disables
    gumbel_seed: int | None = None  # counterfactual sampling: Gumbel-max with noise keyed on (seed, row, position)

    def __post_init__(self):
        if self.temperature <= 0:
            raise TokoptError(f"temperature must be > 0, got {self.temperature} (use do_sample=False for greedy)")
        if self.top_k < 0:
            raise TokoptError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise TokoptError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 < self.typical_p <= 1:
            raise TokoptError(f"typical_p must be in (0, 1], got {self.typical_p}")

    def generator(self, device="cpu") -> torch.Generator | None:
        if self.seed is None:
            return None
        return torch.Generator(device=device).manual_seed(self.seed)


def process_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, top-k, top-p over the last dimension (as HF's warpers, in that order); filtered entries
    become ``-inf``. Half-precision logits are processed in float32, others in their own dtype."""
    scores = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    if params.temperature != 1.0:
        scores = scores / params.temperature
    if params.top_k and params.top_k < scores.shape[-1]:
        kth = torch.topk(scores, params.top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative <= (1 - params.top_p)
        drop_sorted[..., -1:] = False  # always keep the most likely token
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    if params.typical_p < 1.0:  # after top-p, as HF orders its warpers
        scores = scores.masked_fill(~typical_mask(scores, params.typical_p), float("-inf"))
    return scores


def gumbel_noise(params: SamplingParams, rows, positions, vocab: int) -> torch.Tensor:
    """``[n, V]`` standard Gumbel noise for the tokens at (row, position): a function of the key alone, so a
    replay draws the same tokens and a changed prefix changes only what follows (counterfactual generation)."""
    ids = np.arange(vocab)
    return torch.from_numpy(np.stack([gumbel(params.gumbel_seed, int(r), int(p), ids)
                                      for r, p in zip(rows, positions)])).float()


def next_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None,
               positions=None) -> torch.Tensor:
    """``[B, V]`` logits -> ``[B]`` token ids: argmax when greedy, else a draw from the processed distribution
    (with ``params.gumbel_seed``: the Gumbel-max draw keyed on each row and its token's ``positions``)."""
    if not params.do_sample:
        return logits.argmax(dim=-1)
    if params.gumbel_seed is not None:
        if positions is None:
            raise TokoptError("Gumbel-max sampling needs the positions of the tokens being drawn")
        processed = process_logits(logits, params)
        return (processed + gumbel_noise(params, range(len(logits)), positions, logits.shape[-1])).argmax(dim=-1)
    probs = process_logits(logits, params).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def typical_mask(logits, mass: float = 0.9, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Boolean keep-mask of Locally Typical Sampling: True where HF's ``TypicalLogitsWarper`` keeps the token.

    Tokens are ranked by ``|-logp - H|`` and kept until their probability mass reaches ``mass``
    (every token tied with the last one kept is kept too). Computed with the warper's own operations in the
    input dtype, so it equals ``isfinite(TypicalLogitsWarper(mass)(ids, logits))`` for finite logits.

    Example::

        >>> typical_mask(torch.tensor([2.0, 1.0, 0.0, -5.0]), mass=0.5).tolist()
        [True, False, False, False]
    """
    logits = check_logits(logits)
    if not (0.0 < mass < 1.0):
        raise TokoptError(f"typical_mask: mass must be in (0, 1), got {mass!r}")
    if isinstance(min_tokens_to_keep, bool) or not isinstance(min_tokens_to_keep, int) or min_tokens_to_keep < 1:
        raise TokoptError(f"typical_mask: min_tokens_to_keep must be an int >= 1, got {min_tokens_to_keep!r}")
    scores = logits.reshape(-1, logits.shape[-1])
    normalized = torch.nn.functional.log_softmax(scores, dim=-1)
    p = torch.exp(normalized)
    ent = -(normalized * p).nansum(-1, keepdim=True)
    shifted = torch.abs((-normalized) - ent)
    sorted_scores, sorted_indices = torch.sort(shifted, descending=False)
    cumulative = scores.gather(-1, sorted_indices).softmax(dim=-1).cumsum(dim=-1)
    last_ind = (cumulative < mass).sum(dim=1)
    last_ind.clamp_(max=sorted_scores.shape[-1] - 1)
    sorted_remove = sorted_scores > sorted_scores.gather(1, last_ind.view(-1, 1))
    sorted_remove[..., :min_tokens_to_keep] = 0
    remove = sorted_remove.scatter(1, sorted_indices, sorted_remove)
    return (~remove).reshape(logits.shape)


def check_logits(logits) -> torch.Tensor:
    """``logits`` if it is a floating-point tensor ``[..., V]`` with V >= 1, else a TokoptError saying what it is."""
    if not isinstance(logits, torch.Tensor):
        raise TokoptError(f"logits must be a torch.Tensor of shape [..., V], got {type(logits).__name__}")
    if not logits.is_floating_point():
        raise TokoptError(f"logits must be a floating-point tensor, got dtype {logits.dtype}")
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise TokoptError(f"logits must have shape [..., V] with V >= 1, got {tuple(logits.shape)}")
    return logits
