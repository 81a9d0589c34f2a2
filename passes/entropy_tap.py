"""entropy_tap: per-row entropy and max log-probability computed inside the graph, after the LM head.

Adds two outputs, ``entropy`` ``[B, R]`` (nats, of softmax(logits)) and ``max_logprob`` ``[B, R]`` (the
log-probability of the argmax token, so the chosen token's under greedy decoding), for every logits row the
forward produces. They are read from the same logits the runtime samples from, so they cost one
log-softmax and change nothing: the ``logits`` output is the very same node, bit-identical.

Example::

    gm, report = entropy_tap(capture(model))
    logits, *rest = gm(*inputs)         # rest ends with entropy, max_logprob
"""

from __future__ import annotations

import torch

from tokopt.pass_manager import PassReport, register_pass

NAME = "entropy_tap"
TAP_OUTPUTS = ("entropy", "max_logprob")


@register_pass(NAME, "adds per-token entropy and max log-probability outputs after the LM head (logits unchanged)")
def entropy_tap(gm: torch.fx.GraphModule):
    meta = gm.meta["tokopt"]
    names = list(meta["output_names"])
    if "logits" not in names:
        return gm, PassReport(NAME, why_not=f"looked for a graph output named 'logits'; outputs are {names[:4]}...")
    if all(t in names for t in TAP_OUTPUTS):
        return gm, PassReport(NAME, matched=1, detail="already tapped: nothing to add")
    output = next(n for n in gm.graph.nodes if n.op == "output")
    values = list(output.args[0])
    logits = values[names.index("logits")]
    with gm.graph.inserting_before(output):
        logprobs = gm.graph.call_function(torch.ops.aten._log_softmax.default, (logits, -1, False))
        probs = gm.graph.call_function(torch.ops.aten.exp.default, (logprobs,))
        weighted = gm.graph.call_function(torch.ops.aten.mul.Tensor, (probs, logprobs))
        neg_entropy = gm.graph.call_function(torch.ops.aten.sum.dim_IntList, (weighted, [-1]))
        entropy = gm.graph.call_function(torch.ops.aten.neg.default, (neg_entropy,))
        max_logprob = gm.graph.call_function(torch.ops.aten.amax.default, (logprobs, [-1]))
    output.args = (tuple(values + [entropy, max_logprob]),)
    gm.recompile()
    meta["output_names"] = names + list(TAP_OUTPUTS)
    return gm, PassReport(NAME, matched=1, changed=True,
                          detail=f"tapped '{logits.name}': +outputs {', '.join(TAP_OUTPUTS)}")
