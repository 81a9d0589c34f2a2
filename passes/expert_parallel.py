"""expert_parallel: shard every MoE layer's experts over N ranks, with dispatch and combine Alltoalls.

Rewrites each ``moe_l`` node of an expert-parallel step program (``tokopt.models.ep_program.program``) into::

    route_l -> dispatch_l (all_to_all_single) -> experts_l (this rank's E/N experts) -> combine_l (all_to_all_single)

so each MoE layer does two Alltoalls, as DeepSpeed-MoE, Tutel and Megatron do. The rank and world size come
from the pass config (``ExpertParallelConfig``); rank r keeps experts ``[r*E/N, (r+1)*E/N)`` of the program's
numbering (``expert_placement`` first, to place them otherwise). The program's metadata records them.

Example::

    gm = capture_program(model)
    gm, reports = run_passes(gm, [ExpertParallelConfig(world=4, rank=1)])   # "... 2 Alltoalls per MoE layer"
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from tokopt.errors import TokoptError
from tokopt.models.graph_meta import ep_meta
from tokopt.passes.registry import PassConfig, PassReport, register_pass
from tokopt.models.ep_program.ops import Exchange, LocalExperts, Route
from tokopt.models.ep_program.program import MoE, alltoalls_per_layer

NAME = "expert_parallel"
NOT_EP = ("no MoE step program: this pass rewrites tokopt's expert-parallel program "
          "(tokopt.models.ep_program.program.capture_program), run by `tokopt generate --ep N`")


@dataclass(frozen=True)
class ExpertParallelConfig(PassConfig):
    """Shard for ``world`` ranks, as rank ``rank``."""

    pass_name: ClassVar[str] = NAME
    world: int = 1
    rank: int = 0

    def __post_init__(self):
        if not 0 <= self.rank < self.world:
            raise TokoptError(f"expert_parallel: rank must be in 0..world-1 (world {self.world}), got {self.rank}")


def moe_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), MoE)]


@register_pass(NAME, "shards MoE experts over N ranks: dispatch + combine all_to_all_single per layer",
               config=ExpertParallelConfig)
def expert_parallel(gm: torch.fx.GraphModule, config: ExpertParallelConfig = ExpertParallelConfig()):
    ep = ep_meta(gm)
    if ep is None:
        return gm, PassReport(NAME, why_not=NOT_EP)
    if not ep.moe_layers:
        raise TokoptError(f"the model ({ep.model_type}) has no Mixture-of-Experts layers: expert_parallel "
                          "shards experts and needs an MoE model (mixtral, qwen2_moe, qwen3_moe, olmoe)")
    nodes = moe_nodes(gm)
    if not nodes:
        return gm, PassReport(NAME, why_not="no unsharded MoE layer left (already sharded)")
    world, rank = config.world, config.rank
    for node in nodes:
        moe = gm.get_submodule(node.target)
        if moe.num_experts % world:
            raise TokoptError(
                f"layer {moe.index} has {moe.num_experts} experts, which do not divide over {world} ranks; use a "
                f"rank count dividing {moe.num_experts} (redundant experts are a placement option, not a runtime one)")
        per = moe.num_experts // world
        layer = moe.index
        route = Route(moe)
        experts = LocalExperts(moe, rank, world)
        gm.add_submodule(f"route_{layer}", route)
        gm.add_submodule(f"experts_{layer}", experts)
        gm.add_submodule(f"dispatch_{layer}", Exchange("dispatch", layer, per_rank=per))
        gm.add_submodule(f"combine_{layer}", Exchange("combine", layer, experts=experts))
        tokens, ctx = node.args
        with gm.graph.inserting_before(node):
            routed = gm.graph.call_module(f"route_{layer}", (tokens, ctx))
            work = gm.graph.call_module(f"dispatch_{layer}", (routed, ctx))
            done = gm.graph.call_module(f"experts_{layer}", (work, ctx))
            out = gm.graph.call_module(f"combine_{layer}", (done, ctx))
        routed.meta["ep"] = {"layer": layer, "op": "route"}
        work.meta["ep"] = {"layer": layer, "op": "dispatch", "alltoall": True}
        done.meta["ep"] = {"layer": layer, "op": "experts"}
        out.meta["ep"] = {"layer": layer, "op": "combine", "alltoall": True}
        node.replace_all_uses_with(out)
        gm.graph.erase_node(node)
        gm.delete_submodule(node.target)  # the unsharded experts are not kept on this rank
    gm.recompile()
    ep.world, ep.rank, ep.strategy = world, rank, "two_alltoall"
    counts = alltoalls_per_layer(gm)
    per_layer = sorted(set(counts.values()))
    return gm, PassReport(NAME, matched=len(nodes), changed=True,
                          detail=f"sharded {len(nodes)} MoE layers over {world} ranks (rank {rank} keeps "
                                 f"{per} experts per layer): {'/'.join(map(str, per_layer))} Alltoalls per MoE layer")
