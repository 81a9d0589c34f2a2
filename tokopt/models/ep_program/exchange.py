"""Counted collectives: every byte an expert-parallel step moves between ranks goes through here.

``alltoall_rows(rows_for, ctx, kind, layer)`` sends ``rows_for[r]`` (a ``[m_r, w]`` float32 tensor) to rank r
with one ``all_to_all_single`` (after a tiny one for the split sizes) and returns what each rank sent here.
``allgather_rows`` does the same for rows every rank needs (K/V, logits). Both record, per step, layer and
kind: rows and bytes this rank sent to *other* ranks, and the collectives issued, in ``ctx.counters``.

Integer columns travel bit-exactly inside the float32 rows (``pack``/``unpack``: int32 bits viewed as float32).

Example::

    got = alltoall_rows([rows_to_0, rows_to_1], ctx, kind="dispatch", layer=3)   # got[r]: rows from rank r
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

ROW_DTYPE = torch.float32


@dataclass
class Counters:
    """Per-rank records ``{step, layer, kind, rows, bytes, collectives, tokens, seconds}``: rows/bytes sent to
    other ranks, distinct tokens leaving, and wall time in the collectives (waiting for other ranks included)."""

    records: list = field(default_factory=list)
    step: int = 0

    def add(self, layer: int, kind: str, rows: int, nbytes: int, collectives: int, tokens: int = 0,
            seconds: float = 0.0) -> None:
        self.records.append({"step": self.step, "layer": layer, "kind": kind, "rows": int(rows),
                             "bytes": int(nbytes), "collectives": int(collectives), "tokens": int(tokens),
                             "seconds": seconds})


def pack(*cols) -> torch.Tensor:
    """Concatenate columns into float32 rows; int columns keep their exact int32 bits."""
    parts = []
    for c in cols:
        c = c if c.dim() == 2 else c.unsqueeze(1)
        if c.dtype.is_floating_point:
            parts.append(c.to(ROW_DTYPE))
        else:
            parts.append(c.to(torch.int32).contiguous().view(ROW_DTYPE))
    return torch.cat(parts, dim=1)


def unpack(rows: torch.Tensor, widths, kinds) -> list[torch.Tensor]:
    """Split rows made by ``pack``: ``widths`` columns each, ``kinds`` 'f' (float32) or 'i' (int64)."""
    out, start = [], 0
    for w, kind in zip(widths, kinds):
        part = rows[:, start:start + w]
        start += w
        out.append(part.contiguous() if kind == "f" else part.contiguous().view(torch.int32).to(torch.int64))
    return out


def alltoall_rows(rows_for: list[torch.Tensor], ctx, *, kind: str, layer: int, width: int,
                  extra_counts: list[int] | None = None, tokens: int = 0, recv_counts: list[int] | None = None):
    """Send ``rows_for[r]`` to rank r; return ``(received per source rank, extra counts per source)``.

    ``extra_counts`` (one int per destination) ride along with the split sizes, so a flag can reach every
    rank without another collective. ``tokens``: how many distinct tokens leave this rank (for the counters).
    ``recv_counts``: rows this rank will get from each rank, when it knows (a combine returns what a dispatch
    sent): then the split sizes are not exchanged and only one collective runs.
    """
    world, rank = ctx.world, ctx.rank
    if world == 1:
        ctx.counters.add(layer, kind, 0, 0, collectives=0, tokens=0)
        return list(rows_for), list(extra_counts or [0])
    start = time.perf_counter()
    if recv_counts is None:
        counts = torch.tensor([[len(r), (extra_counts or [0] * world)[d]] for d, r in enumerate(rows_for)],
                              dtype=torch.int64)
        got_counts = torch.empty_like(counts)
        dist.all_to_all_single(got_counts, counts, group=ctx.group)
        recv_rows, extras = got_counts[:, 0].tolist(), got_counts[:, 1].tolist()
    else:
        recv_rows, extras = [int(c) for c in recv_counts], [0] * world
    send = torch.cat([r.reshape(-1, width) for r in rows_for]) if rows_for else torch.empty(0, width)
    recv = torch.empty(sum(recv_rows), width, dtype=ROW_DTYPE)
    dist.all_to_all_single(recv, send.to(ROW_DTYPE).contiguous(), recv_rows, [len(r) for r in rows_for],
                           group=ctx.group)
    remote = sum(len(r) for d, r in enumerate(rows_for) if d != rank)
    ctx.counters.add(layer, kind, remote, remote * width * 4, collectives=1 if recv_counts is not None else 2,
                     tokens=tokens, seconds=time.perf_counter() - start)
    return list(torch.split(recv, recv_rows)), extras


def allgather_rows(rows: torch.Tensor, ctx, *, kind: str, layer: int, width: int) -> list[torch.Tensor]:
    """Every rank's ``rows`` (``[m_r, width]``), on every rank, in rank order."""
    if ctx.world == 1:
        return [rows]
    start = time.perf_counter()
    n = torch.tensor([rows.shape[0]], dtype=torch.int64)
    sizes = [torch.empty_like(n) for _ in range(ctx.world)]
    dist.all_gather(sizes, n, group=ctx.group)
    sizes = [int(s) for s in sizes]
    top = max(sizes)
    padded = torch.zeros(top, width, dtype=ROW_DTYPE)
    padded[: rows.shape[0]] = rows
    parts = [torch.empty(top, width, dtype=ROW_DTYPE) for _ in range(ctx.world)]
    dist.all_gather(parts, padded, group=ctx.group)
    sent = rows.shape[0] * (ctx.world - 1)  # every row reaches the N-1 other ranks
    ctx.counters.add(layer, kind, sent, sent * width * 4, collectives=2, seconds=time.perf_counter() - start)
    return [p[:s] for p, s in zip(parts, sizes)]
