"""Runs a decoder graph (the ``DecoderGraph`` module or an optimized ``GraphModule``) in PyTorch.

Every engine has the same call: ``engine(input_ids, position_ids, attention_mask, logits_rows, past) ->
StepOutput(logits, present, extras)``; ``extras`` holds any outputs passes added (uncertainty taps).

Example::

    engine = EagerEngine(DecoderGraph(model))
    out = engine(ids, pos, mask, rows, cache.tensors)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class StepOutput:
    logits: torch.Tensor  # [B, R, V], R = len(logits_rows)
    present: list  # per-layer K/V, [B, kv_heads, P + N, head_dim]
    extras: dict = field(default_factory=dict)  # name -> [B, R, ...]


def split_outputs(outputs, output_names, num_cache: int) -> StepOutput:
    """Flat graph outputs (logits, present..., extras...) -> StepOutput, by the graph's output names."""
    extras = dict(zip(output_names[1 + num_cache:], outputs[1 + num_cache:]))
    return StepOutput(outputs[0], list(outputs[1:1 + num_cache]), extras)


class EagerEngine:
    """A decoder graph run eagerly under ``torch.inference_mode``."""

    name = "eager"

    def __init__(self, module, spec, output_names=None):
        self.module = module
        self.spec = spec
        self.output_names = list(output_names or spec.output_names)
        self._num_cache = 2 * spec.num_layers

    def __call__(self, input_ids, position_ids, attention_mask, logits_rows, past) -> StepOutput:
        with torch.inference_mode():
            outputs = self.module(input_ids, position_ids, attention_mask, logits_rows, *past)
        return split_outputs(outputs, self.output_names, self._num_cache)
