"""Conditional entropy reduction (arXiv 2508.20395): how much a provisional answer's entropy falls as the
reasoning steps are read.

For steps ``s_1..s_K`` and answer tokens ``a_0..a_{m-1}``, probe k (k = 0..K) is the answer teacher-forced
after ``prompt + s_1..s_k``; its score is the mean over j of the entropy (nats) of the model's next-token
distribution that predicts ``a_j``. A falling curve (large ``reduction``, negative ``slope``) goes with
correct answers.

Two forwards, whatever K: one prefill of ``prompt + s_1..s_K`` (logits at the end of every step, which predict
each probe's ``a_0``), then one forward holding all K+1 probes' ``a_0..a_{m-2}`` as branches over the shared
prefix cache: probe k's tokens see the cache up to the end of step k and their own earlier tokens only, at
positions starting at that end (``runtime.cautious.shared_prefix_mask``).

Example::

    opt = tokopt.optimize(tokopt.load()[0]); tok = opt.tokenizer
    steps = split_steps(tok, " 6 times 7 is 6 sevens. Six sevens are 42.")
    curve = entropy_curve(opt.engine, tok("What is 6 times 7?").input_ids, steps,
                          tok("\\nAnswer: 42", add_special_tokens=False).input_ids)
    print(curve.entropies, curve.reduction, curve.slope)
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from tokopt.errors import TokoptError
from tokopt.runtime.cautious import shared_prefix_mask
from tokopt.runtime.generate import check_prompt, prefill_rows
from tokopt.runtime.logprobs import entropy


@dataclass
class EntropyCurve:
    entropies: list  # [K + 1] mean answer-span entropy (nats) after 0..K steps
    reduction: float  # entropies[0] - entropies[-1]; higher = more confident after reasoning
    slope: float  # least-squares slope of entropies against k (0 for K = 0)
    token_entropies: list | None = None  # [K + 1][m] per answer token
    forwards: int = 0  # engine forwards used (2, or 1 for a one-token answer)


def _ids(value, what: str, allow_empty: bool = False) -> list:
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() or value.dtype == torch.bool or value.dim() > 2 or (
                value.dim() == 2 and value.shape[0] != 1):
            raise TokoptError(f"{what} must be a list of int token ids (or a [T] / [1, T] integer tensor), "
                              f"got a {value.dtype} tensor of shape {tuple(value.shape)}")
        value = value.reshape(-1).tolist()
    if not isinstance(value, (list, tuple)) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise TokoptError(f"{what} must be a list of int token ids, got {type(value).__name__}"
                          + (f" holding {type(value[0]).__name__}" if isinstance(value, (list, tuple)) and value
                             else ""))
    if not value and not allow_empty:
        raise TokoptError(f"{what} is empty: it needs at least one token id")
    return [int(t) for t in value]


def _slope(values: list) -> float:
    n = len(values)
    if n < 2:
        return 0.0
    mean_x, mean_y = (n - 1) / 2, sum(values) / n
    num = sum((k - mean_x) * (y - mean_y) for k, y in enumerate(values))
    den = sum((k - mean_x) ** 2 for k in range(n))
    return num / den


def entropy_curve(engine, prompt_ids, steps, answer_ids) -> EntropyCurve:
    """The answer span's mean entropy after 0..K reasoning steps, in two forwards (module docstring).

    ``prompt_ids``, each of ``steps`` and ``answer_ids``: non-empty lists of token ids.

    Example::

        curve = entropy_curve(opt.engine, [1, 2, 3], [[4, 5], [6, 7, 8]], [9, 10])
        curve.entropies   # 3 values: after no step, after step 1, after both
    """

    prompt = _ids(prompt_ids, "prompt_ids")
    if not isinstance(steps, (list, tuple)):
        raise TokoptError(f"steps must be a list of reasoning steps, each a list of int token ids; "
                          f"got {type(steps).__name__}")
    steps = [_ids(s, f"steps[{i}]") for i, s in enumerate(steps)]
    answer = _ids(answer_ids, "answer_ids")
    vocab = engine.spec.vocab_size
    named = [("prompt_ids", prompt), ("answer_ids", answer)] + [(f"steps[{i}]", s) for i, s in enumerate(steps)]
    for what, ids in named:
        if min(ids) < 0 or max(ids) >= vocab:
            raise TokoptError(f"{what} holds ids outside the vocabulary [0, {vocab}): {min(ids)}..{max(ids)}")
    prefix = prompt + [t for s in steps for t in s]
    ends = [len(prompt)]
    for s in steps:
        ends.append(ends[-1] + len(s))
    m = len(answer)
    ids = torch.tensor([prefix])
    check_prompt(ids, torch.ones_like(ids, dtype=torch.bool), m, engine.spec.max_positions)

    out, cache = prefill_rows(engine, ids, torch.ones_like(ids, dtype=torch.bool), torch.tensor(ends) - 1)
    first = entropy(out.logits[0])  # [K + 1]: the distribution predicting a_0 after each probe's prefix
    forwards = 1
    probes = len(ends)
    rest = torch.zeros(probes, 0, dtype=torch.float64)
    if m > 1:
        width = m - 1
        n = probes * width
        tokens = torch.tensor(answer[:-1]).repeat(probes)[None]  # probe k's a_0..a_{m-2}, probe after probe
        depth = torch.arange(width).repeat(probes)
        probe = torch.arange(probes).repeat_interleave(width)
        end = torch.tensor(ends)[probe]
        positions = (end + depth)[None]
        # cache slot s (s >= 1) holds prefix token s - 1; probe k sees slots 1..ends[k]
        slot = torch.arange(cache.length)
        visible = cache.valid[0][None, :] & (slot[None, :] <= end[:, None])
        structure = (probe[:, None] == probe[None, :]) & (depth[None, :] <= depth[:, None])
        mask = shared_prefix_mask(visible, structure, engine.spec.torch_dtype)
        out = engine(tokens, positions, mask, torch.arange(n), cache.tensors)
        forwards += 1
        rest = entropy(out.logits[0]).reshape(probes, width)
    token_entropies = torch.cat([first[:, None], rest], dim=1)  # [K + 1, m]
    means = token_entropies.mean(dim=1).tolist()
    return EntropyCurve(entropies=means, reduction=means[0] - means[-1], slope=_slope(means),
                        token_entropies=token_entropies.tolist(), forwards=forwards)


_STEP_END = re.compile(r"(?<=[.!?])(?=\s)|(?<=\n)")


def split_steps(tokenizer, text: str) -> list:
    """Split reasoning ``text`` into steps at sentence ends (``.``, ``!``, ``?`` before whitespace) and after
    newlines; each step is the token ids of its piece (whitespace between sentences starts the next piece, as
    the tokenizer would see it in running text). Empty and whitespace-only pieces join their neighbour.

    Example::

        split_steps(tok, "First, 6 * 7 = 42. So the answer is 42.\\nDone")
        # -> ids of "First, 6 * 7 = 42.", " So the answer is 42.\\n", "Done"
    """
    if not isinstance(text, str):
        raise TokoptError(f"text must be a str, got {type(text).__name__}")
    if tokenizer is None or not hasattr(tokenizer, "encode"):
        raise TokoptError("split_steps needs a Hugging Face tokenizer (with .encode)")
    pieces = []
    for piece in _STEP_END.split(text):
        if not piece:
            continue
        if pieces and not pieces[-1].strip():
            pieces[-1] += piece  # whitespace-only piece: glue it onto the next one
        elif not piece.strip() and pieces:
            pieces[-1] += piece
        else:
            pieces.append(piece)
    steps = [tokenizer.encode(p, add_special_tokens=False) for p in pieces if p.strip()]
    return [s for s in steps if s]
