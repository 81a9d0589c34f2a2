"""EagerEngine.to(device): the same outputs, the K/V left on the engine's device, logits back on the host."""

import torch

from tokopt.models.decoder_graph import DecoderGraph
from tokopt.runtime.eager_engine import EagerEngine
from tokopt.models.kv_cache import KVCache
from tokopt.models.masks import causal_structure, step_mask


def _step_inputs(spec):
    cache = KVCache.empty(spec, 1)
    mask = step_mask(cache.valid, causal_structure(3, 1), dtype=spec.torch_dtype)
    return torch.tensor([[5, 6, 7]]), torch.tensor([[0, 1, 2]]), mask, torch.tensor([2]), cache.tensors


def test_engine_moved_to_a_device_gives_the_same_outputs(tiny_model):
    graph = DecoderGraph(tiny_model("llama")).eval()
    engine = EagerEngine(graph, graph.spec)
    want = engine(*_step_inputs(graph.spec))
    moved = engine.to("cpu")  # the one device every machine has; bench/gpu_check.py runs the same on CUDA
    assert moved.device == torch.device("cpu") and moved.module is graph
    got = moved(*_step_inputs(graph.spec))
    assert torch.equal(want.logits, got.logits)
    assert all(torch.equal(a, b) for a, b in zip(want.present, got.present))
    assert got.logits.device.type == "cpu" and got.present[0].device == moved.device
