"""fuse_alltoall: context-coherent expert parallelism, one Alltoall per MoE layer (ExFlow).

After ``expert_parallel`` each MoE layer sends tokens to their experts and back home (two Alltoalls). If every
rank keeps every sequence's K/V, a token need not go home: the next layer's attention can run where its
expert ran. This pass replaces each ``dispatch -> experts -> combine`` with ``migrate -> experts -> merge``:
the combine is fused into the next layer's dispatch, leaving one ``all_to_all_single`` per layer (plus a
partial exchange, only in steps where some top-k token's experts span ranks: exact one-Alltoall is top-1, or
top-k with co-located experts). Attention switches to coherent mode: new K/V reach every rank (an all-gather
per layer in prefill, one per decode step), the traffic the runtime counts as ``kv_sync``.

Example::

    gm, report = fuse_alltoall(expert_parallel(gm)[0])   # report.detail: "... Alltoalls per MoE layer: 2 -> 1"
"""

from __future__ import annotations

import torch

from tokopt.models.graph_meta import ep_meta
from tokopt.passes.registry import PassReport, register_pass
from tokopt.passes.expert_parallel import NOT_EP
from tokopt.models.ep_program.ops import Exchange
from tokopt.models.ep_program.program import Attention, alltoalls_per_layer

NAME = "fuse_alltoall"


@register_pass(NAME, "context-coherent EP: fuses each combine into the next dispatch (1 Alltoall per MoE layer)")
def fuse_alltoall(gm: torch.fx.GraphModule, config=None):
    ep = ep_meta(gm)
    if ep is None:
        return gm, PassReport(NAME, why_not=NOT_EP)
    pairs = []
    for node in gm.graph.nodes:
        mod = gm.get_submodule(node.target) if node.op == "call_module" else None
        if isinstance(mod, Exchange) and mod.op == "dispatch":
            experts_node = next(iter(node.users))
            combine_node = next(iter(experts_node.users))
            pairs.append((node, combine_node))
    if not pairs:
        return gm, PassReport(NAME, why_not="no dispatch/combine pair: run expert_parallel first")
    before = alltoalls_per_layer(gm)
    for dispatch_node, combine_node in pairs:
        d, c = gm.get_submodule(dispatch_node.target), gm.get_submodule(combine_node.target)
        layer = d.layer
        route = gm.get_submodule(f"route_{layer}")
        gm.add_submodule(f"migrate_{layer}", Exchange("migrate", layer, per_rank=d.per_rank, norm=route.norm))
        gm.add_submodule(f"merge_{layer}", Exchange("merge", layer, experts=c.experts))
        dispatch_node.target, combine_node.target = f"migrate_{layer}", f"merge_{layer}"
        dispatch_node._rename(f"migrate_{layer}")
        combine_node._rename(f"merge_{layer}")
        dispatch_node.meta["ep"] = {"layer": layer, "op": "migrate", "alltoall": True}
        combine_node.meta["ep"] = {"layer": layer, "op": "merge", "alltoall": False, "partial": True}
        gm.delete_submodule(f"dispatch_{layer}")
        gm.delete_submodule(f"combine_{layer}")
    for module in gm.modules():
        if isinstance(module, Attention):
            module.coherent = True
    gm.recompile()
    ep.strategy = "context_coherent"
    after = alltoalls_per_layer(gm)
    fmt = lambda c: "/".join(map(str, sorted(set(c.values()))))  # noqa: E731
    return gm, PassReport(NAME, matched=len(pairs), changed=True,
                          detail=f"fused {len(pairs)} combines into the next dispatch: Alltoalls per MoE layer "
                                 f"{fmt(before)} -> {fmt(after)} (+ partial exchange for split top-k tokens); "
                                 "attention is context-coherent (K/V synced to all ranks)")
