"""The one engine protocol the decode loops run: a decoder graph's step, whatever executes it.

Every engine (``EagerEngine``: a GraphModule in PyTorch; ``OrtEngine``: an ONNX Runtime session; pt2 and
TensorRT programs run as ``EagerEngine`` over the loaded module) has the same call::

    engine(input_ids, position_ids, attention_mask, logits_rows, past) -> StepOutput(logits, present, extras)

and describes itself with ``name``, ``spec`` (``GraphSpec``), ``output_names`` and ``facts`` (``GraphFacts``:
e.g. PPD prompt slots). ``extras`` holds any outputs passes added (uncertainty taps), by name.

Example::

    def step(engine: Engine, ids, pos, mask, rows, cache) -> StepOutput:
        return engine(ids, pos, mask, rows, cache.tensors)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

from tokopt.models.decoder_graph import GraphSpec
from tokopt.models.graph_meta import GraphFacts


@dataclass
class StepOutput:
    logits: torch.Tensor  # [B, R, V], R = len(logits_rows)
    present: list  # per-layer K/V, [B, kv_heads, P + N, head_dim]
    extras: dict = field(default_factory=dict)  # name -> [B, R, ...]


@runtime_checkable
class Engine(Protocol):
    name: str
    spec: GraphSpec
    output_names: list
    facts: GraphFacts

    def __call__(self, input_ids, position_ids, attention_mask, logits_rows, past) -> StepOutput: ...


def split_outputs(outputs, output_names, num_cache: int) -> StepOutput:
    """Flat graph outputs (logits, present..., extras...) -> StepOutput, by the graph's output names."""
    extras = dict(zip(output_names[1 + num_cache:], outputs[1 + num_cache:]))
    return StepOutput(outputs[0], list(outputs[1:1 + num_cache]), extras)
