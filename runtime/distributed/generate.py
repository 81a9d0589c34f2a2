"""Greedy generation with a step program (``program.py``) on one rank of N, or on one process.

Every rank runs the same loop: a prefill step over all prompt tokens, then one decode step per new token;
each step starts with every sequence's new tokens at its home rank, and ends with every rank holding the
greedy choice of every sequence (so all ranks agree on the next tokens without another exchange). The request
(prompts, budget, EOS ids) and the rows' stopping are every tokopt loop's (``runtime.request``); what is this
loop's own is the step program and the exchange of tokens between ranks.

Example::

    gm = capture_program(model)
    out = generate_on_rank(gm, [[1, 2, 3], [4, 5]], StepContext.single(gm, 2), max_new_tokens=8)
    out["tokens"]        # [[new ids of seq 0], [new ids of seq 1]]
"""

from __future__ import annotations

import time

import torch

from tokopt.models.ep_program.program import StepContext, sync_pending_kv
from tokopt.models.ep_program.tokens import Tokens
from tokopt.runtime.prompts import left_pad
from tokopt.runtime.request import GenerationRequest, Rows


def step_tokens(seqs, positions, ids, wants_logits, ctx: StepContext) -> Tokens:
    """The tokens of this step that start on this rank (those of sequences homed here), ``idx`` = their
    index in the step's full list."""
    seqs, positions, ids = (torch.as_tensor(x, dtype=torch.int64) for x in (seqs, positions, ids))
    wants = torch.as_tensor(wants_logits, dtype=torch.bool)
    mine = ctx.home[seqs] == ctx.rank
    idx = torch.arange(len(seqs))[mine]
    return Tokens(hidden=torch.empty(int(mine.sum()), 0), seq=seqs[mine], pos=positions[mine], idx=idx,
                  wants_logits=wants[mine], ids=ids[mine])


def prefill_tokens(prompts, ctx: StepContext) -> tuple[Tokens, list[int]]:
    """All prompt tokens; the last of each prompt wants logits. Returns the tokens and, per sequence, the
    step index of its logits row."""
    seqs, pos, ids, wants, last = [], [], [], [], []
    for s, prompt in enumerate(prompts):
        for p, t in enumerate(prompt):
            seqs.append(s), pos.append(p), ids.append(int(t)), wants.append(p == len(prompt) - 1)
        last.append(len(seqs) - 1)
    return step_tokens(seqs, pos, ids, wants, ctx), last


def run_step(gm, tokens: Tokens, ctx: StepContext, decode: bool):
    """One forward of the step program; returns, in step order, token indices, greedy choices and logits
    (``None`` unless ``ctx.keep_logits``)."""
    ctx.decode = decode
    out = gm(tokens, ctx)
    sync_pending_kv(None, ctx)
    ctx.counters.step += 1
    return out


def _emit_choices(rows: Rows, step_rows: list, choice, logits) -> list:
    """Emit each live sequence's greedy choice (at its row of this step's output, with its ``logits`` row when
    kept); return the sequences still live."""
    for s in rows.live():
        row = step_rows[s]
        rows.emit(s, [int(choice[row])], None if logits is None else {"logits": [logits[row]]})
    return rows.live()


def generate_on_rank(gm, prompts, ctx: StepContext, *, max_new_tokens: int, eos_token_id=None,
                     keep_logits: bool = False) -> dict:
    """Greedy-decode every prompt (lists of token ids); return new tokens per sequence, step times, and
    (``keep_logits``) the logits that chose each token, ``[new, vocab]`` per sequence. ``eos_token_id``: one id
    or several; rows stop as in every tokopt loop (``runtime.request.Rows``).

    Example::

        out = generate_on_rank(gm, [[1, 2, 3], [4, 5]], StepContext.single(gm, 2), max_new_tokens=8,
                               eos_token_id=2)
        out["tokens"], out["step_s"]
    """
    request = GenerationRequest.create(*left_pad(prompts, pad_id=0), max_new_tokens=max_new_tokens,
                                       eos_token_ids=eos_token_id)
    rows = Rows(request)
    lengths = request.prompt_lengths().tolist()
    ctx.keep_logits = keep_logits
    start = time.perf_counter()
    tokens, last_rows = prefill_tokens(request.prompts(), ctx)
    idx, choice, logits = run_step(gm, tokens, ctx, decode=False)
    times = [time.perf_counter() - start]
    at = {int(i): r for r, i in enumerate(idx)}
    step_rows = [at[last_rows[s]] for s in range(request.batch)]
    while active := _emit_choices(rows, step_rows, choice, logits if keep_logits else None):
        start = time.perf_counter()
        tokens = step_tokens(active, [lengths[s] + len(rows.tokens[s]) - 1 for s in active],
                             [rows.tokens[s][-1] for s in active], [True] * len(active), ctx)
        idx, choice, logits = run_step(gm, tokens, ctx, decode=True)
        times.append(time.perf_counter() - start)
        step_rows = [None] * request.batch
        for r, i in enumerate(idx.tolist()):
            step_rows[active[i]] = r
    result = {"tokens": rows.tokens, "step_s": times}
    if keep_logits:
        result["logits"] = [torch.stack(taps["logits"]) for taps in rows.taps]
    return result
