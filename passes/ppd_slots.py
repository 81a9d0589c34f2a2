"""ppd_slots: token ids V..V+k-1 read k trained prompt embeddings (Parallel Prompt Decoding, arXiv 2405.18628).

The graph's token-embedding lookup ``embed[ids]`` becomes::

    where(ids >= V, prompt_table[clamp(ids - V, 0, k - 1)], embed[clamp(ids, max=V - 1)])

with ``prompt_table`` ``[k, hidden]`` held as a graph buffer (``ppd_prompt_table``). Ordinary ids take the very
same embedding rows, so logits and cache stay bit-identical; the LM head still has V outputs. Mask and positions
are the runtime's: a prompt token is an ordinary tree node (``runtime.speculative.drafters.ppd``): prompt token j
after a node sees what the node sees, the node and the node's earlier prompt tokens, at position node + 1 + j,
and its logits guess the token at node + 2 + j. Verification never accepts an id >= V, so the tree
verification stays lossless unchanged.

The table comes from the pass config (``PPDSlotsConfig(embeddings=...)``, which ``tokopt.optimize`` fills from the
artifact ``tokopt train-ppd`` saved for the model), else zeros (``DEFAULT_K`` of them; an untrained control).
The pass records the slots in the graph's facts: ``graph_meta(gm).facts.ppd = PPDFacts(k, V, trained, ...)``.

Example::

    gm = capture(model)
    gm, reports = run_passes(gm, [PPDSlotsConfig(embeddings=artifact["embeddings"])])   # ids V..V+2: prompts
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from tokopt.errors import TokoptError
from tokopt.models.graph_meta import PPDFacts, decoder_meta
from tokopt.passes.registry import NOT_DECODER, PassConfig, PassReport, register_pass

NAME = "ppd_slots"
DEFAULT_K = 3
TABLE = "ppd_prompt_table"

aten = torch.ops.aten


@dataclass(frozen=True)
class PPDSlotsConfig(PassConfig):
    """``embeddings``: trained prompt embeddings ``[k, hidden]`` (None: ``DEFAULT_K`` zero rows, the untrained
    control); ``rank_accuracy``: their measured per-position accuracies (the drafter's prior)."""

    pass_name: ClassVar[str] = NAME
    embeddings: torch.Tensor | None = None
    rank_accuracy: list | None = None


def prompt_embedding(ids: torch.Tensor, embed_weight: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """The lookup the pass builds, in eager PyTorch (training uses it, so gradients reach ``table``)."""
    vocab, k = embed_weight.shape[0], table.shape[0]
    tokens = torch.nn.functional.embedding(ids.clamp(max=vocab - 1), embed_weight)
    prompts = torch.nn.functional.embedding((ids - vocab).clamp(0, k - 1), table)
    return torch.where((ids >= vocab).unsqueeze(-1), prompts.to(tokens.dtype), tokens)


def _embedding_of_inputs(gm):
    """The ``aten.embedding`` node reading the ``input_ids`` placeholder, or None."""
    ids = next((n for n in gm.graph.nodes if n.op == "placeholder"), None)
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target == aten.embedding.default and len(node.args) > 1 \
                and node.args[1] is ids:
            return node, ids
    return None, ids


@register_pass(NAME, "token ids V..V+k-1 read k trained prompt embeddings (parallel prompt decoding; logits unchanged)",
               config=PPDSlotsConfig)
def ppd_slots(gm: torch.fx.GraphModule, config: PPDSlotsConfig = PPDSlotsConfig()):
    meta = decoder_meta(gm)
    if meta is None:
        return gm, PassReport(NAME, why_not=NOT_DECODER)
    if meta.facts.ppd is not None:
        return gm, PassReport(NAME, matched=1, detail="already has prompt slots: nothing to add")
    embed, ids = _embedding_of_inputs(gm)
    if embed is None:
        found = sorted({str(n.target) for n in gm.graph.nodes if n.op == "call_function"
                        and "embedding" in str(n.target)})
        return gm, PassReport(NAME, why_not=f"looked for aten.embedding reading the first input (input_ids); "
                                            f"embedding ops found: {found or 'none'}")
    weight = embed.args[0]
    weight_val = weight.meta.get("val") if hasattr(weight, "meta") else None
    vocab, hidden = meta.spec.vocab_size, (weight_val.shape[1] if weight_val is not None else None)
    table = config.embeddings
    trained = table is not None
    if table is None:
        table = torch.zeros(DEFAULT_K, hidden, dtype=meta.spec.torch_dtype)
    table = table.detach().to(meta.spec.torch_dtype).clone()
    if hidden is not None and table.shape[1] != hidden:
        raise TokoptError(f"prompt embeddings have width {table.shape[1]}, the model's token embedding {hidden}")
    k = table.shape[0]
    gm.register_buffer(TABLE, table)
    g = gm.graph
    with g.inserting_before(embed):
        call = g.call_function
        table_node = g.get_attr(TABLE)
        clamped = call(aten.clamp_max.default, (ids, vocab - 1))
        shifted = call(aten.clamp.default, (call(aten.sub.Tensor, (ids, vocab)), 0, k - 1))
        tokens = call(aten.embedding.default, (weight, clamped))
        prompts = call(aten.embedding.default, (table_node, shifted))
        is_prompt = call(aten.unsqueeze.default, (call(aten.ge.Scalar, (ids, vocab)), -1))
        merged = call(aten.where.self, (is_prompt, prompts, tokens))
    embed.replace_all_uses_with(merged)
    g.erase_node(embed)
    g.eliminate_dead_code()
    gm.recompile()
    meta.facts.ppd = PPDFacts(k, vocab, trained, config.rank_accuracy)
    return gm, PassReport(NAME, matched=1, changed=True,
                          detail=f"ids {vocab}..{vocab + k - 1} -> {k} {'trained' if trained else 'zero'} "
                                 f"prompt embeddings ({table.numel() * table.element_size()} bytes)")
