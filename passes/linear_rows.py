"""What the passes that rewrite ``aten.linear`` share (``small_batch_linear``, ``quantize_weights``): its arguments,
and replacing it by a 2-D product over the input's rows reshaped back to the input's leading dimensions.

Example::

    x, weight, bias = linear_args(node)
    replace_linear(gm.graph, node, rank=3, out_features=576,
                   rows_product=lambda g: g.call_function(aten.mm.default, (rows_of_x, weight_t)))
"""

from __future__ import annotations

import torch

_aten = torch.ops.aten


def linear_args(node) -> tuple:
    """(x, weight, bias or None) of an ``aten.linear`` node."""
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    return node.args[0], node.args[1], bias


def replace_linear(graph, node, *, rank: int, out_features: int, rows_product) -> None:
    """Replace the linear ``node`` by ``rows_product(graph)`` (a node ``[M, out_features]`` over the input's rows,
    emitted in place) viewed as ``[*x.shape[:-1], out_features]``, plus the bias."""
    x, _, bias = linear_args(node)
    with graph.inserting_before(node):
        product = rows_product(graph)
        lead = [graph.call_function(_aten.sym_size.int, (x, d)) for d in range(rank - 1)]
        out = graph.call_function(_aten.view.default, (product, [*lead, out_features]))
        if bias is not None:
            out = graph.call_function(_aten.add.Tensor, (out, bias))
    out.meta["val"] = node.meta.get("val")
    node.replace_all_uses_with(out)
    graph.erase_node(node)
