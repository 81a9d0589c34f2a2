"""Greedy generation with a step program (``program.py``) on one rank of N, or on one process.

Every rank runs the same loop: a prefill step over all prompt tokens, then one decode step per new token;
each step starts with every sequence's new tokens at its home rank, and ends with every rank holding the
greedy choice of every sequence (so all ranks agree on the next tokens without another exchange).

Example::

    gm = capture_program(model)
    out = generate_on_rank(gm, [[1, 2, 3], [4, 5]], StepContext.single(gm, 2), max_new_tokens=8)
    out["tokens"]        # [[new ids of seq 0], [new ids of seq 1]]
"""

from __future__ import annotations

import time

import torch

from tokopt.runtime.distributed.program import StepContext, sync_pending_kv
from tokopt.runtime.distributed.tokens import Tokens


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


def generate_on_rank(gm, prompts, ctx: StepContext, *, max_new_tokens: int, eos_token_id=None,
                     keep_logits: bool = False) -> dict:
    """Greedy-decode every prompt (lists of token ids); return new tokens per sequence, step times, and
    (``keep_logits``) the logits that chose each token, ``[new, vocab]`` per sequence."""
    lengths = [len(p) for p in prompts]
    ctx.keep_logits = keep_logits
    out = [[] for _ in prompts]
    kept = [[] for _ in prompts]
    done = [False] * len(prompts)
    times = []
    start = time.perf_counter()
    tokens, last_rows = prefill_tokens(prompts, ctx)
    idx, choice, logits = run_step(gm, tokens, ctx, decode=False)
    times.append(time.perf_counter() - start)
    rows = {int(i): r for r, i in enumerate(idx)}
    step_rows = [rows[last_rows[s]] for s in range(len(prompts))]
    for _ in range(max_new_tokens):
        active = []
        for s, row in enumerate(step_rows):
            if done[s] or row is None:
                continue
            token = int(choice[row])
            out[s].append(token)
            if keep_logits:
                kept[s].append(logits[row])
            if (eos_token_id is not None and token == eos_token_id) or len(out[s]) >= max_new_tokens:
                done[s] = True
            else:
                active.append(s)
        if not active:
            break
        start = time.perf_counter()
        tokens = step_tokens(active, [lengths[s] + len(out[s]) - 1 for s in active], [out[s][-1] for s in active],
                             [True] * len(active), ctx)
        idx, choice, logits = run_step(gm, tokens, ctx, decode=True)
        times.append(time.perf_counter() - start)
        step_rows = [None] * len(prompts)
        for r, i in enumerate(idx.tolist()):
            step_rows[active[i]] = r
    result = {"tokens": out, "step_s": times}
    if keep_logits:
        result["logits"] = [torch.stack(k) if k else torch.empty(0) for k in kept]
    return result
