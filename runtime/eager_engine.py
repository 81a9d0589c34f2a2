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
    """A decoder graph run eagerly under ``torch.inference_mode``; ``to(device)`` runs it on another device."""

    name = "eager"

    def __init__(self, module, spec, output_names=None, device=None):
        self.module = module
        self.spec = spec
        self.output_names = list(output_names or spec.output_names)
        self._num_cache = 2 * spec.num_layers
        self.device = torch.device(device) if device is not None else None

    def to(self, device) -> "EagerEngine":
        """This graph on ``device`` (e.g. ``"cuda"``; moves the module's weights): the step inputs and the K/V
        cache go to the device and the cache stays there; logits and extras come back to the CPU, where the
        decode loop's host side (drafting, verification, bookkeeping) runs unchanged.

        Example::

            gpu = opt.engine.to("cuda"); out = gpu(ids, pos, mask, rows, cache.tensors)   # out.logits on the CPU
        """
        return EagerEngine(self.module.to(device), self.spec, self.output_names, device)

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
