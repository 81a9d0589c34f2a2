"""small_batch_linear: compute ``linear(x, W)`` as ``(W @ x^T)^T`` so CPU GEMM streams the weight unpacked.

A decode or verify step multiplies a handful of token rows (M = 1..32) by large weights. For M >= 2 CPU
BLAS (MKL here) takes its GEMM path, which first packs the whole weight matrix: for such small M the packing
costs more than the multiply, so on this 2-core machine a forward of 2-4 tokens took 1.5-1.6x a one-token
forward, and SmolLM2's LM head (49152 x 576) went from 18 ms at M = 1 to 34 ms at M = 2. Written as
``W @ x^T`` the weight is the streamed left operand and only the small ``x`` is packed: the LM head at
M = 2 takes 10 ms, and a 4-token forward costs about one token's (measured: bench/RESULTS.md). This is
what makes tree verification pay in the eager engine.

The result is the same product summed in a different order: logits differ from ``F.linear``'s in the last
bits (about 1e-6 relative), so this pass is not bit-identical. Greedy decoding with and without
speculation runs the same rewritten graph, so lossless speculation is unaffected.

Example::

    gm, report = small_batch_linear(capture(model))   # report.detail: "rewrote 211 linear(s)"
"""

from __future__ import annotations

import torch

from tokopt.passes.linear_rows import linear_args, replace_linear
from tokopt.passes.registry import PassReport, register_pass

NAME = "small_batch_linear"
_aten = torch.ops.aten


@register_pass(NAME, "computes linear(x, W) as (W @ x^T)^T: no weight packing for few-token steps (eager CPU)")
def small_batch_linear(gm: torch.fx.GraphModule, config=None):
    graph = gm.graph
    rewritten = skipped = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target != _aten.linear.default:
            continue
        x, weight, _ = linear_args(node)
        val = getattr(x, "meta", {}).get("val")
        if not isinstance(val, torch.Tensor) or val.dim() < 2 or not val.is_contiguous():
            skipped += 1  # views below need a contiguous input; a copy would eat the gain
            continue

        def rows_product(g, x=x, weight=weight, width=val.shape[-1]):
            rows = g.call_function(_aten.view.default, (x, [-1, width]))  # [M, in], M = leading dims
            prod = g.call_function(_aten.mm.default, (weight, g.call_function(_aten.t.default, (rows,))))
            # [out, M] -> [M, out]. Always copy (clone), never reshape: whether reshape copies depends on M == 1,
            # a guard torch.export cannot keep for a dynamic M.
            return g.call_function(_aten.clone.default, (g.call_function(_aten.t.default, (prod,)),),
                                   {"memory_format": torch.contiguous_format})

        replace_linear(graph, node, rank=val.dim(), out_features=node.meta["val"].shape[-1], rows_product=rows_product)
        rewritten += 1
    if not rewritten:
        why = (f"{skipped} linear(s) found, none with a contiguous input of known rank >= 2" if skipped
               else "no aten.linear nodes in the graph")
        return gm, PassReport(NAME, why_not=why)
    gm.recompile()
    return gm, PassReport(NAME, matched=rewritten, changed=True, detail=f"rewrote {rewritten} linear(s)")
