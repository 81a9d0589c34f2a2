"""Runs an exported decoder graph (``model.onnx``) in ONNX Runtime, with the same call as every engine.

The KV cache goes in and out of the ONNX graph as tensors (``past_*`` -> ``present_*``), so prefill and
each decode step run in ORT without re-running the prefix. Tensors cross between torch and numpy without
copies (``Tensor.numpy`` / ``torch.from_numpy`` share memory).

Example::

    engine = OrtEngine("engine/model.onnx", spec, output_names)
    out = engine(ids, pos, mask, rows, cache.tensors)
"""

from __future__ import annotations

import os

import torch

from tokopt.models.graph_meta import GraphFacts
from tokopt.runtime.engine import split_outputs


def session_options(threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    # Spinning threads fight torch's for 2 cores when both live in one process.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return options


class OrtEngine:
    """An ONNX Runtime session over a tokopt decoder graph."""

    name = "onnxruntime"

    def __init__(self, model_path, spec, output_names, providers=None, threads: int | None = None,
                 facts: GraphFacts | None = None):
        import onnxruntime as ort

        self.spec = spec
        self.output_names = list(output_names)
        self.facts = facts or GraphFacts()
        self.input_names = spec.input_names
        self.providers = providers or ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(os.fspath(model_path), session_options(threads),
                                            providers=self.providers)
        self._num_cache = 2 * spec.num_layers

    def __call__(self, input_ids, position_ids, attention_mask, logits_rows, past):
        tensors = (input_ids, position_ids, attention_mask, logits_rows, *past)
        feed = {name: t.contiguous().numpy() for name, t in zip(self.input_names, tensors)}
        outputs = self.session.run(self.output_names, feed)
        return split_outputs([torch.from_numpy(o) for o in outputs], self.output_names, self._num_cache)
