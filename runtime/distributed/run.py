"""Expert-parallel generation across N processes: what ``tokopt generate --ep N`` runs.

``ep_generate(model, prompts, ranks=N, strategy=...)`` starts N ranks (``launch.run_ranks``; under
``torchrun`` call ``rank_main`` on each), each of which captures the step program, runs the passes for the
strategy (``expert_placement`` if a placement is given, ``expert_parallel``, and ``fuse_alltoall`` for
``context_coherent``), and greedy-decodes every prompt. Ranks agree on every token; rank 0's view is returned
with every rank's counters.

Example::

    res = ep_generate(model, [[1, 2, 3]], ranks=2, strategy="context_coherent", max_new_tokens=8)
    res.tokens, res.reports, res.summary()["alltoalls_per_layer"]
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from tokopt.errors import TokoptError
from tokopt.models.ep_program.program import StepContext, alltoalls_per_layer, check_moe
from tokopt.models.graph_meta import ep_meta
from tokopt.models.loading import load
from tokopt.passes.expert_placement import check_placement
from tokopt.runtime.distributed.generate import generate_on_rank
from tokopt.runtime.distributed.launch import DEFAULT_TIMEOUT_S, in_torchrun, init_group, run_ranks
from tokopt.runtime.distributed.rank_program import EPEngine, build_rank_program, drop_full_experts, strategy_passes
from tokopt.runtime.distributed.stats import summarize

def _rank_device(rank: int) -> torch.device:
    """This rank's GPU (``cuda:rank % devices``), made the default so every buffer the runtime makes lives there."""
    device = torch.device("cuda", rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    torch.set_default_device(device)
    return device


def rank_main(rank, world, model, prompts, strategy, placement, max_new_tokens, eos_token_id, keep_logits,
              backend="gloo"):
    """One rank's whole run (the process group is already initialised); returns its results and counters.
    With NCCL the rank works on its own GPU (``cuda:rank % devices``); results come back on the CPU."""
    if isinstance(model, EPEngine):  # an exported engine: this rank's program from its own file
        gm, reports = model.rank_program(rank)
        if backend == "nccl":
            gm = gm.to(_rank_device(rank))
    else:
        own_copy = isinstance(model, str) or not in_torchrun()  # loaded here, or a forked/spawned rank's copy
        if isinstance(model, str):
            model = load(model, progress=rank == 0)[0]
        if backend == "nccl":
            model = model.to(_rank_device(rank))
        gm, reports = build_rank_program(model, rank, world, strategy, placement)
        if own_copy:
            drop_full_experts(model)
    group = dist.group.WORLD if world > 1 else None
    ctx = StepContext.single(gm, len(prompts), rank=rank, world=world, group=group)
    with torch.no_grad():
        result = generate_on_rank(gm, prompts, ctx, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                                  keep_logits=keep_logits)
    result["counters"] = ctx.counters.records
    result["routes"] = [(s, layer, idx.cpu().numpy(), experts.cpu().numpy(), r)
                        for s, layer, idx, experts, r in ctx.routes]
    result["kv_bytes"] = ctx.kv.bytes_held()
    filled = [int(ctx.kv.filled[i].max()) for i in range(len(ctx.kv.k))]
    result["kv_replica"] = [(k[:, :, :n].cpu(), v[:, :, :n].cpu())
                            for k, v, n in zip(ctx.kv.k, ctx.kv.v, filled)] if keep_logits else None
    if keep_logits:
        result["logits"] = [t.cpu() for t in result["logits"]]
    result["reports"] = [r.to_dict() for r in reports]
    result["alltoalls_per_layer"] = alltoalls_per_layer(gm)
    result["moe_layers"] = ep_meta(gm).moe_layers
    return result


@dataclass
class EPResult:
    """What every rank returned; ``tokens``/``logits`` are rank 0's (all ranks agree)."""

    strategy: str
    world: int
    ranks: list = field(repr=False)

    @property
    def tokens(self) -> list[list[int]]:
        return self.ranks[0]["tokens"]

    @property
    def reports(self) -> list[dict]:
        return self.ranks[0]["reports"]

    def summary(self) -> dict:
        """Per MoE layer: tokens crossing ranks, bytes (max and mean per rank), collectives; K/V traffic;
        measured cross-rank fraction; step times."""
        return summarize(self)


def ep_generate(model, prompts, *, ranks: int | None = None, strategy: str | None = None, placement=None,
                max_new_tokens: int = 32, eos_token_id=None, keep_logits: bool = False,
                timeout_s: float = DEFAULT_TIMEOUT_S, backend: str = "gloo") -> EPResult:
    """Greedy-decode ``prompts`` (lists of token ids) with the experts sharded over ``ranks`` processes.

    ``model``: a loaded HF MoE model, a name/path ``tokopt.load`` accepts (each rank loads it then), or an
    ``EPEngine`` (``tokopt.export.ep_engine``: each rank loads only its own file; its ranks, strategy and placement).
    ``placement``: ``[MoE layers, experts]`` rank per expert (``tokopt.place``), default contiguous.
    """
    if isinstance(model, EPEngine):  # its ranks, strategy and placement unless given
        ranks = model.world if ranks is None else ranks
        strategy = model.strategy if strategy is None else strategy
    elif ranks is None:
        raise TokoptError("ep_generate needs ranks= (the number of processes) for a model")
    strategy = strategy or "context_coherent"
    strategy_passes(strategy, placement)  # a bad strategy fails before any process starts
    if not prompts or any(len(p) == 0 for p in prompts):
        raise TokoptError("prompts must be a non-empty list of non-empty token id lists")
    if isinstance(model, EPEngine):
        if (ranks, strategy, placement) != (model.world, model.strategy, None):
            raise TokoptError(f"{model.path} was exported for {model.world} ranks with {model.strategy} (placement "
                              f"built in); asked for {ranks} ranks with {strategy}"
                              f"{' and a placement' if placement is not None else ''}: re-export it with "
                              f"`tokopt export --ep {ranks} --ep-strategy {strategy}` or run it as exported")
    elif not isinstance(model, str):  # what can be checked here fails before any process starts
        moe_layers = check_moe(model)
        experts = model.model.layers[moe_layers[0]].mlp.experts.num_experts
        if experts % ranks:
            raise TokoptError(f"the model has {experts} experts per layer, which do not divide over {ranks} ranks; "
                              f"use a rank count dividing {experts}")
        if placement is not None:
            check_placement(placement, moe_layers, experts, ranks)
    args = (model, [list(map(int, p)) for p in prompts], strategy, placement, max_new_tokens, eos_token_id,
            keep_logits, backend)
    if in_torchrun():  # this process is one rank of a group torchrun started: run here, gather the counters
        if not dist.is_initialized():
            init_group(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), backend=backend, timeout_s=timeout_s)
        world = dist.get_world_size()
        if world != ranks:
            raise TokoptError(f"--ep {ranks} but torchrun started {world} processes; make them agree")
        mine = rank_main(dist.get_rank(), world, *args)
        results = [None] * world
        dist.all_gather_object(results, mine)
        return EPResult(strategy, world, results)
    results = run_ranks(rank_main, ranks, *args, timeout_s=timeout_s, backend=backend)
    return EPResult(strategy, ranks, results)
