"""attention_taps: RAUQ's previous-token attention, per head of the middle layers, computed in the graph.

RAUQ (arXiv 2505.20045) reads, for every generated token, how much each head of the middle layers
(``rauq_layers``: ``[L // 3, ceil(2L / 3)]``) attends to the token just before it. SDPA does not return
attention weights, and materializing them would cost a full ``[N, S]`` matrix per head. This pass reads the
inputs of the layer's existing ``scaled_dot_product_attention`` node and computes only what is needed, for the
``logits_rows`` query rows only (one row per decode step, all nodes of a verify tree, the last prompt token):

    a_prev = exp(q . k_prev * scale - logsumexp_j(q . k_j * scale + mask_j))

where ``k_prev`` is the key of the row's previous token. "Previous" is read from the attention mask, so it is
right for padded prompts, compacted caches and trees alike: a row always attends to itself as its last key, so
its previous token is its second-to-last attended key (the parent of a tree node; ``a_prev = 0`` when there is
none, e.g. the first prompt token).

Adds one output, ``prev_attention`` ``[B, R, layers, heads]`` (float32), the attention of each logits row's
*input* token to its predecessor. The runtime pairs it with the tokens (``token_records``: the value for
generated token t comes from the row whose input is t). ``logits`` and the cache are unchanged (new nodes
only read existing ones).

Example::

    gm, report = attention_taps(capture(model))   # + output prev_attention
    report.detail   # 'tapped 11 of 30 layers (10..20) x 9 heads: +output prev_attention'
"""

from __future__ import annotations

import math
import operator

import torch

from tokopt.models.graph_meta import decoder_meta
from tokopt.passes.registry import NOT_DECODER, PassReport, register_pass
from tokopt.errors import TokoptError

NAME = "attention_taps"
OUTPUT = "prev_attention"

aten = torch.ops.aten


def rauq_layers(num_layers: int) -> list[int]:
    """The middle layers RAUQ reads, ``[L // 3, ceil(2L / 3)]`` inclusive, as in lm-polygraph.

    Example::

        >>> rauq_layers(30)
        [10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]
    """
    if num_layers < 1:
        raise TokoptError(f"rauq_layers: num_layers must be >= 1, got {num_layers}")
    return list(range(num_layers // 3, min(num_layers, math.ceil(num_layers / 3 * 2) + 1)))


def _sdpa_nodes(graph) -> list:
    return [n for n in graph.nodes if n.op == "call_function" and n.target is aten.scaled_dot_product_attention.default]


def _placeholder(graph, name):
    return next((n for n in graph.nodes if n.op == "placeholder" and n.name == name), None)


@register_pass(NAME, "adds RAUQ's previous-token attention of the middle layers' heads per row (q.k - LSE, no "
                     "attention matrix)")
def attention_taps(gm: torch.fx.GraphModule, config=None):
    meta = decoder_meta(gm)
    if meta is None:
        return gm, PassReport(NAME, why_not=NOT_DECODER)
    names = list(meta.output_names)
    if OUTPUT in names:
        return gm, PassReport(NAME, matched=1, detail="already tapped: nothing to add")
    g = gm.graph
    sdpa = _sdpa_nodes(g)
    spec = meta.spec
    mask, rows = _placeholder(g, "attention_mask"), _placeholder(g, "logits_rows")
    if spec is None or mask is None or rows is None:
        return gm, PassReport(NAME, why_not="looked for a captured decoder graph (inputs attention_mask and "
                                            "logits_rows); this graph has neither")
    if len(sdpa) != spec.num_layers:
        return gm, PassReport(NAME, why_not=f"looked for one scaled_dot_product_attention per layer "
                                            f"({spec.num_layers}); found {len(sdpa)} (a pass replaced attention?)")
    layers = rauq_layers(spec.num_layers)
    output = next(n for n in g.nodes if n.op == "output")
    call = g.call_function
    with g.inserting_before(output):
        key_index, prev, has_prev = _previous_key(call, mask, rows, spec.torch_dtype)
        mask_rows = call(aten.unsqueeze.default, (call(aten.index_select.default, (mask, 2, rows)), 2))  # [B,1,1,R,S]
        n_new = call(aten.sym_size.int, (mask, 2))
        per_layer = [_layer_prev_attention(call, sdpa[i], rows, n_new, key_index, prev, mask_rows) for i in layers]
        stacked = call(aten.stack.default, (per_layer, 1))  # [B, layers, H, R]
        tap = call(aten.permute.default, (stacked, [0, 3, 1, 2]))  # [B, R, layers, H]
        tap = call(aten.mul.Tensor, (tap, call(aten.unsqueeze.default, (call(aten.unsqueeze.default, (has_prev, -1)), -1))))
    output.args = (tuple(list(output.args[0]) + [tap]),)
    gm.recompile()
    meta.output_names = names + [OUTPUT]
    meta.attention_tap_layers = layers
    return gm, PassReport(NAME, matched=len(layers), changed=True,
                          detail=f"tapped {len(layers)} of {spec.num_layers} layers ({layers[0]}..{layers[-1]}) x "
                                 f"all heads: +output {OUTPUT}")


def _previous_key(call, mask, rows, dtype):
    """Key indices ``[B, 1, 1, R, S]``; per (batch, logits row) the index of the previous token's key
    (``[B, 1, 1, R, 1]``: the second-largest attended key index, the largest being the row itself); and 1.0/0.0
    whether there is one (``[B, R]``)."""
    visible = call(aten.gt.Scalar, (call(aten.index_select.default, (mask, 2, rows)), torch.finfo(dtype).min / 2))
    ones = call(aten.ones_like.default, (visible,), {"dtype": torch.float32})
    index = call(aten.sub.Tensor, (call(aten.cumsum.default, (ones, -1)), 1.0))  # key index j, [B, 1, R, S]
    scored = call(aten.where.ScalarOther, (visible, index, -1.0))
    top2 = call(operator.getitem, (call(aten.topk.default, (scored, 2, -1)), 0))
    second = call(aten.select.int, (top2, -1, 1))  # [B, 1, R]
    has_prev = call(aten.squeeze.dim, (call(aten.ge.Scalar, (second, 0.0)), 1))  # [B, R]
    prev = call(aten.clamp_min.default, (second, 0.0))
    prev = call(aten._to_copy.default, (prev,), {"dtype": torch.int64})
    prev = call(aten.unsqueeze.default, (call(aten.unsqueeze.default, (prev, 2)), -1))  # [B, 1, 1, R, 1]
    index = call(aten._to_copy.default, (call(aten.unsqueeze.default, (index, 2)),), {"dtype": torch.int64})
    return index, prev, call(aten._to_copy.default, (has_prev,), {"dtype": torch.float32})


def _layer_prev_attention(call, sdpa, rows, n_new, key_index, prev, mask_rows):
    """``[B, H, R]`` previous-token attention of one layer's heads, from its SDPA node's inputs."""
    folded_q, keys = sdpa.args[0], sdpa.args[1]
    scale = sdpa.kwargs.get("scale")
    # the folded query has groups * N rows (row j*N + i: group member j, query row i); N from the mask
    q = call(aten.unflatten.int, (folded_q, 2, [-1, n_new]))  # [B, kvH, g, N, D]
    q = call(aten.index_select.default, (q, 3, rows))  # [B, kvH, g, R, D]
    k = call(aten.unsqueeze.default, (call(aten.transpose.int, (keys, 2, 3)), 2))  # [B, kvH, 1, D, S]
    scores = call(aten.matmul.default, (q, k))  # [B, kvH, g, R, S]
    if scale is None:  # SDPA's default
        scale = folded_q.meta["val"].shape[-1] ** -0.5
    scores = call(aten.add.Tensor, (call(aten.mul.Tensor, (scores, float(scale))), mask_rows))
    lse = call(aten.logsumexp.default, (scores, [-1], True))  # [B, kvH, g, R, 1]
    is_prev = call(aten.eq.Tensor, (key_index, prev))  # [B, 1, 1, R, S], one key per row
    prev_score = call(aten.sum.dim_IntList, (call(aten.where.ScalarOther, (is_prev, scores, 0.0)), [-1], True))
    att = call(aten.exp.default, (call(aten.sub.Tensor, (prev_score, lse)),))
    att = call(aten.squeeze.dim, (att, -1))  # [B, kvH, g, R]
    return call(aten.flatten.using_ints, (att, 1, 2))  # [B, H, R], head h = kv_head * g + j
