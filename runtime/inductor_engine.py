"""Runs a decoder graph compiled by inductor (``torch.compile``): an ``Engine`` (``runtime/engine.py``) named
"inductor", what ``tokopt.optimize(model, engine="inductor")`` returns.

The graph is compiled once with dynamic shapes (``dynamic=True``: batch, new tokens, past length and logits rows
change every step), so decode does not recompile per step; ``compiles`` counts the graphs inductor compiled (a
few at the start: specializations dynamo makes for size-1 dimensions, e.g. one-token decode vs prefill).

Example::

    engine = InductorEngine(gm, meta.spec, meta.output_names)
    out = engine(ids, pos, mask, rows, cache.tensors)
"""

from __future__ import annotations

import torch

from tokopt.models.graph_meta import GraphFacts, decoder_meta
from tokopt.runtime.eager_engine import EagerEngine


class InductorEngine(EagerEngine):
    """The decoder graph under ``torch.compile(dynamic=True)`` with inductor (CPU: C++/OpenMP kernels)."""

    def __init__(self, module, spec, output_names=None, facts: GraphFacts | None = None, mode: str | None = None):
        from torch._inductor.compile_fx import compile_fx

        meta = decoder_meta(module)
        facts = facts if facts is not None else (meta.facts if meta is not None else GraphFacts())
        self.graph_module = module
        self.compiles = 0

        def backend(gm, example_inputs):
            self.compiles += 1
            return compile_fx(gm, example_inputs)

        compiled = torch.compile(module, backend=backend, dynamic=True, mode=mode)
        super().__init__(compiled, spec, output_names, None, facts, name="inductor")

    def to(self, device):
        raise NotImplementedError("InductorEngine runs on the CPU here; compile a moved graph instead")
