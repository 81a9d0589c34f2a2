"""remove_noop_casts: drop dtype casts to the dtype a tensor already has, and export's metadata asserts.

HF modules cast to float32 and back around every norm (``hidden.to(torch.float32)``), and torch.export
records a ``_assert_tensor_metadata`` check beside each cast. In a float32 model all of them are identities,
yet each costs a Python-level op call on every decode step (about 250 per SmolLM2 forward). This pass
removes a ``to``/``_to_copy`` whose input already has the target dtype (and same device/layout, per the
export's recorded metadata) and every ``_assert_tensor_metadata``; outputs are bit-identical.

Example::

    gm, report = remove_noop_casts(capture(model))   # report.detail: "removed 125 casts, 126 asserts"
"""

from __future__ import annotations

import torch

from tokopt.passes.registry import PassReport, register_pass

NAME = "remove_noop_casts"
_CASTS = {torch.ops.aten.to.dtype, torch.ops.aten._to_copy.default, torch.ops.aten.to.dtype_layout}
_ASSERTS = {torch.ops.aten._assert_tensor_metadata.default}


def _is_noop_cast(node) -> bool:
    if node.op != "call_function" or node.target not in _CASTS:
        return False
    source, result = node.args[0], node.meta.get("val")
    before = getattr(source, "meta", {}).get("val")
    if not isinstance(before, torch.Tensor) or not isinstance(result, torch.Tensor):
        return False
    if node.kwargs.get("memory_format") not in (None, torch.preserve_format):
        return False
    if len(node.args) > 2 and node.args[2]:  # non_blocking / copy=True asks for a real copy
        return False
    if node.kwargs.get("copy"):
        return False
    return (before.dtype, before.device, before.layout) == (result.dtype, result.device, result.layout)


@register_pass(NAME, "removes dtype casts that change nothing and export's metadata asserts (bit-identical)")
def remove_noop_casts(gm: torch.fx.GraphModule, config=None):
    graph = gm.graph
    casts = asserts = seen_casts = 0
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target in _ASSERTS and not node.users:
            graph.erase_node(node)
            asserts += 1
        elif node.op == "call_function" and node.target in _CASTS:
            seen_casts += 1
            if _is_noop_cast(node):
                node.replace_all_uses_with(node.args[0])
                graph.erase_node(node)
                casts += 1
    if not casts and not asserts:
        why = (f"{seen_casts} cast(s) found, each changes dtype, device or layout" if seen_casts
               else "no aten.to/_to_copy casts and no _assert_tensor_metadata nodes in the graph")
        return gm, PassReport(NAME, why_not=why)
    gm.recompile()
    return gm, PassReport(NAME, matched=casts + asserts, changed=True,
                          detail=f"removed {casts} no-op cast(s) and {asserts} metadata assert(s)")
