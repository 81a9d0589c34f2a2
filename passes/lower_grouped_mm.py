"""lower_grouped_mm: replace transformers' ``grouped_mm_fallback`` custom op (MoE experts) by standard ops.

transformers 5 runs the experts of Mixtral/Qwen-MoE/OLMoE-style layers through the opaque custom op
``transformers::grouped_mm_fallback(input [S, K], weight [E, K, N], offs [E]) -> [S, N]`` (rows sorted by expert,
``offs`` the cumulative row count per expert). ONNX Runtime and TensorRT have no lowering for it, so export fails
on every MoE model. This pass rewrites each call as::

    group = sum(arange(S)[:, None] >= offs[None, :], -1)          # the expert of every row
    out   = sum_e (input @ weight[e]) * (group == e)               # [E, S, N] products, one kept per row

which lowers to MatMul/ReduceSum/Equal in ONNX and native TensorRT layers. It computes all E experts for every
row (E times the expert FLOPs of the grouped kernel, E x S x N floats of scratch): right for export targets
without a grouped GEMM, not for the eager engine, so ``tokopt export`` runs it on a copy of the graph for the onnx
and tensorrt targets only. Outputs equal the custom op's to float rounding (a batched MatMul instead of per-expert
slices).

Example::

    gm, report = lower_grouped_mm(capture(mixtral))     # report.detail: "lowered 2 grouped_mm_fallback call(s)"
"""

from __future__ import annotations

import torch

from tokopt.pass_manager import PassReport, register_pass

NAME = "lower_grouped_mm"


def grouped_mm_nodes(gm) -> list:
    """The graph's ``transformers::grouped_mm_fallback`` calls."""
    return [n for n in gm.graph.nodes if n.op == "call_function"
            and str(getattr(n.target, "name", lambda: "")()) == "transformers::grouped_mm_fallback"]


def grouped_mm_dense(input: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """``grouped_mm_fallback`` from standard ops (see module docstring); rows past ``offs[-1]`` give zeros."""
    rows = torch.arange(input.shape[0], device=input.device)
    group = (rows[:, None] >= offs[None, :].to(rows.dtype)).sum(-1)  # [S]
    experts = torch.arange(weight.shape[0], device=input.device)
    onehot = (group[None, :] == experts[:, None]).to(input.dtype)  # [E, S]
    return (torch.matmul(input.unsqueeze(0), weight) * onehot[..., None]).sum(0)


@register_pass(NAME, "MoE experts' transformers::grouped_mm_fallback -> standard ops (export to ONNX/TensorRT)")
def lower_grouped_mm(gm: torch.fx.GraphModule):
    nodes = grouped_mm_nodes(gm)
    if not nodes:
        return gm, PassReport(NAME, why_not="no transformers::grouped_mm_fallback call in the graph (dense model, "
                                            "or experts run another way)")
    for node in nodes:
        with gm.graph.inserting_before(node):
            dense = gm.graph.call_function(grouped_mm_dense, node.args, node.kwargs)
        dense.meta = dict(node.meta)
        node.replace_all_uses_with(dense)
        gm.graph.erase_node(node)
    gm.recompile()
    return gm, PassReport(NAME, matched=len(nodes), changed=True,
                          detail=f"lowered {len(nodes)} grouped_mm_fallback call(s) to MatMul over all experts")
