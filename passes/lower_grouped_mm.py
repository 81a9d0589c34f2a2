"""lower_grouped_mm: replace transformers' ``grouped_mm_fallback`` custom op (MoE experts) by standard ops.

transformers 5 runs the experts of Mixtral/Qwen-MoE/OLMoE-style layers through the opaque custom op
``transformers::grouped_mm_fallback(input [S, K], weight [E, K, N], offs [E]) -> [S, N]`` (rows sorted by expert,
``offs`` the cumulative row count per expert). ONNX Runtime and TensorRT have no lowering for it, so export fails
on every MoE model. This pass rewrites each call as a choice on the row count, made at run time (``torch.cond``,
an ONNX ``If``)::

    group = sum(arange(S)[:, None] >= offs[None, :], -1)          # the expert of every row
    2S <= E:  out = bmm(input[:, None], weight[group])[:, 0]        # gathered: each row's own expert matrix
    2S >  E:  out = sum_e (input @ weight[e]) * (group == e)        # dense: every expert, one kept per row

Decode steps have few rows (batch x top-k), where gathering E/2 expert matrices at most moves no more memory
than reading the weights once and does S/E of the dense FLOPs; prefill has many rows, where copying a matrix per
row costs more than computing all E experts. Measured in ONNX Runtime (1 thread; bench/moe_onnx.py, figures in
bench/RESULTS.md), gathered/dense: smollm2-moe's gate-up (E=8) 0.15/0.41 ms at S=1, 0.55/0.74 at S=4,
1.33/0.97 at S=8; E=64 experts of 1024x1024 1.2/53 ms at S=2, 30/89 at S=32 (the crossover lies above E/2 there:
the rule is conservative for large experts). Both lower to standard ONNX ops (Gather, MatMul, ReduceSum, Equal) and native TensorRT
layers. Neither is a grouped GEMM, so ``tokopt export`` runs this pass on a copy of the graph for the onnx and
tensorrt targets only and the eager graph keeps the fast op. Outputs equal the custom op's to float rounding.

Example::

    gm, report = lower_grouped_mm(capture(mixtral))     # report.detail: "lowered 2 grouped_mm_fallback call(s)"
"""

from __future__ import annotations

import torch

from tokopt.passes.registry import PassReport, register_pass

NAME = "lower_grouped_mm"


def grouped_mm_nodes(gm) -> list:
    """The graph's ``transformers::grouped_mm_fallback`` calls."""
    return [n for n in gm.graph.nodes if n.op == "call_function"
            and str(getattr(n.target, "name", lambda: "")()) == "transformers::grouped_mm_fallback"]


def _row_experts(input, offs):
    """The expert of every row ``[S]`` (E for rows past ``offs[-1]``)."""
    rows = torch.arange(input.shape[0], device=input.device)
    return (rows[:, None] >= offs[None, :].to(rows.dtype)).sum(-1)


def grouped_mm_dense(input: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """``grouped_mm_fallback`` computing every expert for every row; rows past ``offs[-1]`` give zeros."""
    group = _row_experts(input, offs)
    experts = torch.arange(weight.shape[0], device=input.device)
    onehot = (group[None, :] == experts[:, None]).to(input.dtype)  # [E, S]
    return (torch.matmul(input.unsqueeze(0), weight) * onehot[..., None]).sum(0)


def grouped_mm_gathered(input: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """``grouped_mm_fallback`` with each row's own expert matrix gathered; rows past ``offs[-1]`` give zeros."""
    group = _row_experts(input, offs)
    valid = (group < weight.shape[0]).to(input.dtype)[:, None]
    own = weight[group.clamp_max(weight.shape[0] - 1)]  # [S, K, N]
    return torch.bmm(input.unsqueeze(1), own).squeeze(1) * valid


def grouped_mm_lowered(input: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """``grouped_mm_fallback`` in standard ops: gathered for at most E/2 rows, dense above (module docstring)."""
    return torch.cond(2 * input.shape[0] <= weight.shape[0], grouped_mm_gathered, grouped_mm_dense,
                      (input, weight, offs))


@register_pass(NAME, "MoE experts' transformers::grouped_mm_fallback -> standard ops (export to ONNX/TensorRT)")
def lower_grouped_mm(gm: torch.fx.GraphModule, config=None):
    nodes = grouped_mm_nodes(gm)
    if not nodes:
        return gm, PassReport(NAME, why_not="no transformers::grouped_mm_fallback call in the graph (dense model, "
                                            "or experts run another way)")
    for node in nodes:
        with gm.graph.inserting_before(node):
            lowered = gm.graph.call_function(grouped_mm_lowered, node.args, node.kwargs)
        lowered.meta = dict(node.meta)
        node.replace_all_uses_with(lowered)
        gm.graph.erase_node(node)
    gm.recompile()
    return gm, PassReport(NAME, matched=len(nodes), changed=True,
                          detail=f"lowered {len(nodes)} grouped_mm_fallback call(s) to standard ops (gathered expert "
                                 "matrices for at most E/2 rows, all experts above)")
