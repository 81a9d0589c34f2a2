"""logit_taps: per-row uncertainty of the raw next-token distribution, computed in the graph after the LM head.

For every logits row the forward produces (the decode row, the last prompt row, every node of a verify tree)
it adds outputs, all from one ``tokopt::logit_stats`` node and one top-k of the same logits node (the ``logits``
output stays bit-identical; no ``[rows, V]`` log-softmax is materialised in the graph):

- ``entropy`` ``[B, R]`` (nats) and ``max_logprob`` ``[B, R]`` (as ``entropy_tap``; reused if already there),
- ``lse`` ``[B, R]``: log-normalizer, so the runtime gets any chosen token's log-probability as ``z[y] - lse``,
- ``max_prob``, ``margin`` (p1 - p2), ``self_certainty`` (lse - mean(z) - log V) ``[B, R]``,
- ``topk_ids`` ``[B, R, K]`` (int64) and ``topk_logprobs`` ``[B, R, K]``, K = ``TOP_K`` (20, the most any
  client asks for; vLLM and HF cap logprobs there too).

The taps flow through every engine as extra outputs: ``opt.last_result.taps[name]`` holds one value per
generated token, and under speculative decoding the values of accepted tokens come from the target's verify
rows. Not in the default pipeline (the default ``entropy_tap`` is the cheap pair).

Example::

    opt = tokopt.optimize(model, tokopt.OptimizeConfig(passes=("remove_noop_casts", "logit_taps")))
    opt.generate(ids, max_new_tokens=8); opt.last_result.taps["margin"]      # [B, 8]
"""

from __future__ import annotations

import math
import operator

import torch

from tokopt.kernels import logit_stats  # registers torch.ops.tokopt.logit_stats
from tokopt.models.graph_meta import decoder_meta
from tokopt.passes.registry import NOT_DECODER, PassReport, register_pass

NAME = "logit_taps"
TOP_K = 20
TAP_OUTPUTS = ("entropy", "max_logprob", "lse", "max_prob", "margin", "self_certainty", "topk_ids",
               "topk_logprobs")

aten = torch.ops.aten


@register_pass(NAME, "adds entropy, max prob, margin, self-certainty, log-normalizer and top-20 logprobs per row")
def logit_taps(gm: torch.fx.GraphModule, config=None):
    meta = decoder_meta(gm)
    if meta is None:
        return gm, PassReport(NAME, why_not=NOT_DECODER)
    names = list(meta.output_names)
    if "logits" not in names:
        return gm, PassReport(NAME, why_not=f"looked for a graph output named 'logits'; outputs are {names[:4]}")
    missing = [t for t in TAP_OUTPUTS if t not in names]
    if not missing:
        return gm, PassReport(NAME, matched=1, detail="already tapped: nothing to add")
    output = next(n for n in gm.graph.nodes if n.op == "output")
    values = list(output.args[0])
    logits = values[names.index("logits")]
    vocab = meta.spec.vocab_size
    k = min(TOP_K, vocab)
    g = gm.graph
    with g.inserting_before(output):
        call = g.call_function
        stats = next((n for n in logits.users if n.target is torch.ops.tokopt.logit_stats.default), None) or \
            call(torch.ops.tokopt.logit_stats.default, (logits,))  # entropy_tap's node, if there is one
        entropy, max_logprob, lse = (call(operator.getitem, (stats, i)) for i in range(len(logit_stats.OUTPUTS)))
        top = call(aten.topk.default, (logits, k, -1))
        top_logprobs = call(aten.sub.Tensor, (call(operator.getitem, (top, 0)), call(aten.unsqueeze.default, (lse, -1))))
        top_ids = call(operator.getitem, (top, 1))
        max_prob = call(aten.exp.default, (max_logprob,))
        second = call(aten.exp.default, (call(aten.select.int, (top_logprobs, -1, 1)),)) if k > 1 else None
        margin = call(aten.sub.Tensor, (max_prob, second)) if second is not None else max_prob
        mean_logit = call(aten.mean.dim, (logits, [-1]))
        self_certainty = call(aten.sub.Tensor, (call(aten.sub.Tensor, (lse, mean_logit)), math.log(vocab)))
    made = {"entropy": entropy, "max_logprob": max_logprob, "lse": lse, "max_prob": max_prob, "margin": margin,
            "self_certainty": self_certainty, "topk_ids": top_ids, "topk_logprobs": top_logprobs}
    output.args = (tuple(values + [made[t] for t in missing]),)
    g.eliminate_dead_code()
    gm.recompile()
    meta.output_names = names + missing
    return gm, PassReport(NAME, matched=1, changed=True,
                          detail=f"tapped '{logits.name}': +outputs {', '.join(missing)} (top-{k})")
