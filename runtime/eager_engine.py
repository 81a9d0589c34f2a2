"""Runs a decoder graph (the ``DecoderGraph`` module or an optimized ``GraphModule``) in PyTorch: an ``Engine``
(``runtime/engine.py``).

Example::

    engine = EagerEngine(DecoderGraph(model))
    out = engine(ids, pos, mask, rows, cache.tensors)
"""

from __future__ import annotations

import torch

from tokopt.models.graph_meta import GraphFacts, decoder_meta
from tokopt.runtime.engine import split_outputs


class EagerEngine:
    """A decoder graph run eagerly under ``torch.inference_mode``; ``to(device)`` runs it on another device."""

    def __init__(self, module, spec, output_names=None, device=None, facts: GraphFacts | None = None,
                 name: str = "eager"):
        self.module = module
        self.name = name  # how reports call it: eager, torch.export (a pt2 program), tensorrt
        self.spec = spec
        self.output_names = list(output_names or spec.output_names)
        meta = decoder_meta(module)  # a captured graph's facts are shared: passes run later show here too
        self.facts = facts if facts is not None else (meta.facts if meta is not None else GraphFacts())
        self._num_cache = 2 * spec.num_layers
        self.device = torch.device(device) if device is not None else None

    def to(self, device) -> "EagerEngine":
        """This graph on ``device`` (e.g. ``"cuda"``; moves the module's weights): the step inputs and the K/V
        cache go to the device and the cache stays there; logits and extras come back to the CPU, where the
        decode loop's host side (drafting, verification, bookkeeping) runs unchanged.

        Example::

            gpu = opt.engine.to("cuda"); out = gpu(ids, pos, mask, rows, cache.tensors)   # out.logits on the CPU
        """
        return EagerEngine(self.module.to(device), self.spec, self.output_names, device, self.facts, self.name)

    def __call__(self, input_ids, position_ids, attention_mask, logits_rows, past) -> StepOutput:
        on_device = self.device is not None and self.device.type != "cpu"
        if on_device:
            input_ids, position_ids, attention_mask, logits_rows = (
                t.to(self.device) for t in (input_ids, position_ids, attention_mask, logits_rows))
            past = [t.to(self.device) for t in past]
        with torch.inference_mode():
            outputs = self.module(input_ids, position_ids, attention_mask, logits_rows, *past)
        out = split_outputs(outputs, self.output_names, self._num_cache)
        if on_device:
            out.logits = out.logits.cpu()
            out.extras = {k: v.cpu() for k, v in out.extras.items()}
        return out
