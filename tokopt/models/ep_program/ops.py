"""The ops of a sharded MoE layer: routing, local experts, and the exchanges between ranks.

Two-Alltoall expert parallelism (tokens stay home)::

    route_l -> dispatch (all_to_all_single: normed rows to every rank hosting one of the token's experts)
            -> experts_l (this rank's experts) -> combine (all_to_all_single: partial sums back home; residual)

Context-coherent (ExFlow; every rank holds every sequence's K/V)::

    route_l -> migrate (ONE all_to_all_single: the token moves to its primary expert's rank, staying if this
               rank hosts any of its experts; copies go to ranks hosting its other experts)
            -> experts_l -> merge (residual on the new rank; partial results of split top-k tokens come in
               with a second, partial exchange only when some token's experts span ranks)

Ranks own contiguous blocks of ``E / N`` experts of the program's numbering (``expert_placement`` permutes the
weights so any placement becomes contiguous).

Example::

    work = dispatch(route(tokens, ctx), ctx, layer=3)
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from tokopt.models.ep_program.exchange import alltoall_rows, pack, unpack
from tokopt.models.ep_program.tokens import Tokens, Work

MOVE, PARTIAL = 0, 1


class Route(nn.Module):
    """Post-attention norm and the router: fills ``normed``, ``experts``, ``weights`` of the resident tokens."""

    def __init__(self, moe):
        super().__init__()
        self.norm = moe.norm
        self.gate = moe.block.gate
        self.index = moe.index
        self.experts_per_rank = moe.num_experts  # set by the sharding pass
        self.register_buffer("perm", moe.perm.clone(), persistent=False)

    def forward(self, tokens: Tokens, ctx) -> Tokens:
        normed = self.norm(tokens.hidden)
        _, weights, experts = self.gate(normed)
        ctx.routes.append((ctx.counters.step, self.index, tokens.idx, self.perm[experts], ctx.rank))
        return tokens.routed(normed=normed, experts=experts, weights=weights.to(normed.dtype))


class LocalExperts(nn.Module):
    """This rank's block of experts (copies of the HF expert weights) and, replicated, any shared expert."""

    def __init__(self, moe, rank: int, world: int):
        super().__init__()
        experts = moe.block.experts
        per = experts.num_experts // world
        self.first, self.count = rank * per, per
        shard = copy.copy(experts)  # same class and forward, only this rank's weights
        shard._parameters = dict(experts._parameters)
        shard.gate_up_proj = nn.Parameter(experts.gate_up_proj.detach()[self.first: self.first + per].clone(),
                                          requires_grad=False)
        shard.down_proj = nn.Parameter(experts.down_proj.detach()[self.first: self.first + per].clone(),
                                       requires_grad=False)
        shard.num_experts = per
        if hasattr(shard, "config"):  # the sentinel id ``per`` (not this rank's) is only skipped by HF's eager loop
            shard.config = copy.copy(shard.config)
            shard.config._experts_implementation = "eager"
        self.shard = shard
        self.shared_expert = getattr(moe.block, "shared_expert", None)
        self.shared_expert_gate = getattr(moe.block, "shared_expert_gate", None)
        self.norm = moe.norm

    def forward(self, work: Work, ctx) -> Work:
        local = work.experts - self.first
        local = torch.where((local >= 0) & (local < self.count), local, torch.full_like(local, self.count))
        out = self.shard(work.normed, local, work.weights) if len(work.normed) else torch.zeros_like(work.normed)
        return Work(work.normed, work.experts, work.weights, work.origin, work.idx, out, work.resident, work.meta)

    def shared(self, normed):
        """What a shared expert (Qwen2-MoE) adds, computed where the token is: zero for other families."""
        if self.shared_expert is None:
            return 0.0
        return torch.sigmoid(self.shared_expert_gate(normed)) * self.shared_expert(normed)


def _rank_of(experts, per_rank: int):
    """The rank hosting each expert id (ranks own contiguous blocks of ``per_rank`` experts)."""
    return torch.div(experts, per_rank, rounding_mode="floor")


def dispatch(tokens: Tokens, ctx, *, layer: int, per_rank: int) -> Work:
    """Two-Alltoall dispatch: each token's normed state goes once to every rank hosting one of its experts."""
    ranks = _rank_of(tokens.experts, per_rank)
    k = tokens.experts.shape[1]
    d = tokens.normed.shape[1]
    rows_for = []
    for r in range(ctx.world):
        sel = (ranks == r).any(dim=1)
        rows_for.append(pack(tokens.idx[sel], tokens.experts[sel], tokens.weights[sel], tokens.normed[sel]))
    sent_tokens = int((ranks != ctx.rank).any(dim=1).sum())  # tokens with at least one expert elsewhere
    got, _ = alltoall_rows(rows_for, ctx, kind="dispatch", layer=layer, width=1 + 2 * k + d, tokens=sent_tokens)
    parts = [unpack(g, (1, k, k, d), "iiff") for g in got]
    origin = torch.cat([torch.full((len(g),), r, dtype=torch.int64) for r, g in enumerate(got)])
    work = Work(normed=torch.cat([p[3] for p in parts]), experts=torch.cat([p[1] for p in parts]),
                weights=torch.cat([p[2] for p in parts]), origin=origin, idx=torch.cat([p[0][:, 0] for p in parts]),
                resident=tokens)
    work.meta["sent_order"] = [tokens.idx[(ranks == r).any(dim=1)] for r in range(ctx.world)]
    return work


def combine(work: Work, ctx, *, layer: int, experts: LocalExperts) -> Tokens:
    """Two-Alltoall combine: partial sums go back to their home rank, which adds them to the residual."""
    tokens = work.resident
    d = work.out.shape[1]
    rows_for = [work.out[work.origin == r] for r in range(ctx.world)]
    sent = work.meta["sent_order"]  # results come back for exactly the rows this rank dispatched
    got, _ = alltoall_rows(rows_for, ctx, kind="combine", layer=layer, width=d,
                           tokens=int(sum(len(r) for i, r in enumerate(rows_for) if i != ctx.rank)),
                           recv_counts=[len(x) for x in sent])
    total = torch.zeros_like(tokens.hidden)
    where = _positions(tokens.idx)
    for r, rows in enumerate(got):  # back in the order this rank sent them
        if len(rows):
            total.index_add_(0, where(work.meta["sent_order"][r]), rows)
    hidden = tokens.hidden + (total + experts.shared(tokens.normed))
    return Tokens(hidden, tokens.seq, tokens.pos, tokens.idx, tokens.wants_logits)


def migrate(tokens: Tokens, ctx, *, layer: int, per_rank: int, norm) -> Work:
    """Context-coherent dispatch, the layer's one Alltoall: tokens move to their primary expert's rank (or stay
    if this rank hosts any of their experts); ranks hosting their other experts get a copy to compute."""
    ranks = _rank_of(tokens.experts, per_rank)
    here = (ranks == ctx.rank).any(dim=1)
    primary = torch.where(here, torch.full_like(ranks[:, 0], ctx.rank), ranks[:, 0])
    k, d = tokens.experts.shape[1], tokens.hidden.shape[1]
    split = (ranks != primary[:, None]).any(dim=1)
    rows_for, moved = [], 0
    for r in range(ctx.world):
        if r == ctx.rank:
            rows_for.append(torch.empty(0, 6 + 2 * k + d))
            continue
        go = primary == r
        help_ = split & (primary != r) & (ranks == r).any(dim=1)
        moved += int(go.sum())
        n_go, n_help = int(go.sum()), int(help_.sum())
        kind = torch.cat([torch.full((n_go,), MOVE), torch.full((n_help,), PARTIAL)])
        rows_for.append(pack(kind, torch.cat([tokens.idx[go], tokens.idx[help_]]),
                             torch.cat([tokens.seq[go], tokens.seq[help_]]),
                             torch.cat([tokens.pos[go], tokens.pos[help_]]),
                             torch.cat([tokens.wants_logits[go], tokens.wants_logits[help_]]).long(),
                             torch.cat([primary[go], primary[help_]]),
                             torch.cat([tokens.experts[go], tokens.experts[help_]]),
                             torch.cat([tokens.weights[go], tokens.weights[help_]]),
                             torch.cat([tokens.hidden[go], tokens.normed[help_]])))
    any_split = int(split.any())
    got, flags = alltoall_rows(rows_for, ctx, kind="migrate", layer=layer, width=6 + 2 * k + d,
                               extra_counts=[any_split] * ctx.world, tokens=moved)
    stay = tokens.select(primary == ctx.rank)
    arrived = [unpack(g, (1, 1, 1, 1, 1, 1, k, k, d), "iiiiiiiff") for g in got if len(g)]
    if arrived:
        cols = [torch.cat([a[i] for a in arrived]) for i in range(9)]
        kind, idx, seq, pos, wants, ret = (c[:, 0] for c in cols[:6])
        ex, w, vec = cols[6], cols[7], cols[8]
        m = kind == MOVE
        moved_in = Tokens(vec[m], seq[m], pos[m], idx[m], wants[m].bool(), normed=None, experts=ex[m], weights=w[m])
        resident = _concat(stay, moved_in)
        p = kind == PARTIAL
        helper_rows = (vec[p], ex[p], w[p], ret[p], idx[p])
    else:
        resident = stay
        none = torch.empty(0, dtype=torch.int64)
        helper_rows = (torch.empty(0, d), torch.empty(0, k, dtype=torch.int64), torch.empty(0, k), none, none)
    resident = resident.routed(normed=norm(resident.hidden))  # arrivals carry hidden only: a row-wise norm
    n = len(resident)
    work = Work(normed=torch.cat([resident.normed, helper_rows[0]]),
                experts=torch.cat([resident.experts, helper_rows[1]]),
                weights=torch.cat([resident.weights, helper_rows[2]]),
                origin=torch.cat([torch.full((n,), ctx.rank, dtype=torch.int64), helper_rows[3]]),
                idx=torch.cat([resident.idx, helper_rows[4]]), resident=resident)
    work.meta["any_split"] = any(flags)  # some rank has a token whose experts span ranks
    return work


def merge(work: Work, ctx, *, layer: int, experts: LocalExperts) -> Tokens:
    """Context-coherent combine on the token's new rank: its experts' outputs (local, plus the partial results
    of split top-k tokens, exchanged only when some rank has any) and the residual."""
    tokens = work.resident
    n, d = len(tokens), tokens.hidden.shape[1]
    total = work.out[:n].clone()
    if work.meta["any_split"]:
        helper_out, helper_ret, helper_idx = work.out[n:], work.origin[n:], work.idx[n:]
        rows_for = [pack(helper_idx[helper_ret == r], helper_out[helper_ret == r]) for r in range(ctx.world)]
        # a resident token gets one partial result from every other rank hosting one of its experts
        ranks = _rank_of(tokens.experts, experts.count)
        expect = [int(((ranks == r).any(dim=1)).sum()) if r != ctx.rank else 0 for r in range(ctx.world)]
        got, _ = alltoall_rows(rows_for, ctx, kind="partial", layer=layer, width=1 + d,
                               tokens=int(sum(len(r) for i, r in enumerate(rows_for) if i != ctx.rank)),
                               recv_counts=expect)
        where = _positions(tokens.idx)
        for rows in got:
            if len(rows):
                idx, out = unpack(rows, (1, d), "if")
                total.index_add_(0, where(idx[:, 0]), out)
    hidden = tokens.hidden + (total + experts.shared(tokens.normed))
    return Tokens(hidden, tokens.seq, tokens.pos, tokens.idx, tokens.wants_logits)


def _concat(a: Tokens, b: Tokens) -> Tokens:
    return Tokens(torch.cat([a.hidden, b.hidden]), torch.cat([a.seq, b.seq]), torch.cat([a.pos, b.pos]),
                  torch.cat([a.idx, b.idx]), torch.cat([a.wants_logits, b.wants_logits]),
                  experts=torch.cat([a.experts, b.experts]), weights=torch.cat([a.weights, b.weights]))


def _positions(idx: torch.Tensor):
    """A function mapping step indices to rows of ``idx``."""
    lookup = torch.full((int(idx.max()) + 1 if len(idx) else 1,), -1, dtype=torch.int64)
    lookup[idx] = torch.arange(len(idx))

    def where(wanted):
        rows = lookup[wanted]
        assert bool((rows >= 0).all()), "a result arrived for a token that is not resident here"
        return rows

    return where


class Exchange(nn.Module):
    """A graph node for one of the exchanges above (so collectives are nodes a pass can count and replace):
    ``op`` is dispatch, combine, migrate or merge; ``alltoall`` says whether it always issues a payload
    Alltoall (merge issues one only when some token's experts span ranks)."""

    OPS = {"dispatch": dispatch, "combine": combine, "migrate": migrate, "merge": merge}

    def __init__(self, op: str, layer: int, *, per_rank: int = 0, experts: LocalExperts | None = None, norm=None):
        super().__init__()
        self.op, self.layer, self.per_rank = op, layer, per_rank
        self.experts = experts
        self.norm = norm

    def forward(self, value, ctx):
        if self.op in ("dispatch", "migrate"):
            extra = {"norm": self.norm} if self.op == "migrate" else {}
            return self.OPS[self.op](value, ctx, layer=self.layer, per_rank=self.per_rank, **extra)
        return self.OPS[self.op](value, ctx, layer=self.layer, experts=self.experts)

    def extra_repr(self) -> str:
        return f"{self.op}, layer={self.layer}"
