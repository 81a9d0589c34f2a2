"""entropy_tap: per-row entropy and max log-probability computed inside the graph, after the LM head.

Adds two outputs, ``entropy`` ``[B, R]`` (nats, of softmax(logits)) and ``max_logprob`` ``[B, R]`` (the
log-probability of the argmax token, so the chosen token's under greedy decoding), for every logits row the
forward produces. They are read from the same logits the runtime samples from by one ``tokopt::logit_stats`` node
(``kernels/logit_stats.py``: one op through every export target) and change nothing: the ``logits`` output is
the very same node, bit-identical.

Example::

    gm, report = entropy_tap(capture(model))
    logits, *rest = gm(*inputs)         # rest ends with entropy, max_logprob
"""

from __future__ import annotations

import operator

import torch

from tokopt.kernels import logit_stats  # registers torch.ops.tokopt.logit_stats
from tokopt.models.graph_meta import decoder_meta
from tokopt.passes.registry import NOT_DECODER, PassReport, register_pass

NAME = "entropy_tap"
TAP_OUTPUTS = ("entropy", "max_logprob")


@register_pass(NAME, "adds per-token entropy and max log-probability outputs after the LM head (logits unchanged)")
def entropy_tap(gm: torch.fx.GraphModule, config=None):
    meta = decoder_meta(gm)
    if meta is None:
        return gm, PassReport(NAME, why_not=NOT_DECODER)
    names = list(meta.output_names)
    if "logits" not in names:
        return gm, PassReport(NAME, why_not=f"looked for a graph output named 'logits'; outputs are {names[:4]}...")
    if all(t in names for t in TAP_OUTPUTS):
        return gm, PassReport(NAME, matched=1, detail="already tapped: nothing to add")
    output = next(n for n in gm.graph.nodes if n.op == "output")
    values = list(output.args[0])
    logits = values[names.index("logits")]
    with gm.graph.inserting_before(output):
        stats = gm.graph.call_function(torch.ops.tokopt.logit_stats.default, (logits,))
        entropy = gm.graph.call_function(operator.getitem, (stats, logit_stats.OUTPUTS.index("entropy")))
        max_logprob = gm.graph.call_function(operator.getitem, (stats, logit_stats.OUTPUTS.index("max_logprob")))
    output.args = (tuple(values + [entropy, max_logprob]),)
    gm.recompile()
    meta.output_names = names + list(TAP_OUTPUTS)
    return gm, PassReport(NAME, matched=1, changed=True,
                          detail=f"tapped '{logits.name}': +outputs {', '.join(TAP_OUTPUTS)}")
