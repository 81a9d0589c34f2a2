"""Capturing a decoder as an FX graph with torch.export: the IR every pass rewrites.

``capture(model)`` wraps a supported HF model in ``DecoderGraph``, exports it with dynamic batch, new-token,
past-length and logits-row dimensions, and returns a ``GraphModule`` with flat tensor inputs and outputs
(in the order of ``spec.input_names`` / ``graph_meta(gm).output_names``). The same function re-exports
a rewritten GraphModule for lowering (ONNX).

Example::

    gm = capture(model)
    logits, *present = gm(ids, pos, mask, rows, *past)
"""

from __future__ import annotations

import contextlib
import time

import torch
from torch.fx.experimental import _config as fx_config

from tokopt.models.decoder_graph import DecoderGraph
from tokopt.models.graph_meta import GraphMeta, set_graph_meta
from tokopt.models.kv_cache import KVCache
from tokopt.models.masks import causal_structure, step_mask

# Upper bounds only guard the export; they are far beyond what the runtime feeds.
MAX_BATCH, MAX_NEW, MAX_PAST = 1024, 32768, 131072


def example_inputs(spec, batch=2, n_new=3, past=4):
    """Inputs of the graph's signature; sizes >= 2 so no dimension is specialized to 0 or 1."""
    ids = torch.randint(0, spec.vocab_size, (batch, n_new))
    pos = torch.arange(past, past + n_new).expand(batch, n_new).contiguous()
    dtype = spec.torch_dtype
    mask = step_mask(torch.ones(batch, past, dtype=torch.bool), causal_structure(n_new, batch), dtype=dtype)
    rows = torch.arange(max(n_new - 2, 0), n_new)
    cache = [torch.randn(batch, spec.num_kv_heads, past, spec.head_dim, dtype=dtype)
             for _ in range(2 * spec.num_layers)]
    return (ids, pos, mask, rows, *cache)


def dynamic_shapes(spec, nested: bool = True):
    """Dynamic dims for ``example_inputs``; ``nested`` groups the cache as one varargs tuple (torch.export)."""
    Dim = torch.export.Dim
    batch = Dim("batch", min=1, max=MAX_BATCH)
    n_new = Dim("n_new", min=1, max=MAX_NEW)
    past = Dim("past", min=1, max=MAX_PAST)
    s_total = Dim("s_total", min=2, max=MAX_NEW + MAX_PAST)  # never name a Dim N or S (sympy clash)
    rows = Dim("rows", min=1, max=MAX_NEW)
    fixed = ({0: batch, 1: n_new}, {0: batch, 1: n_new}, {0: batch, 2: n_new, 3: s_total}, {0: rows})
    cache = tuple({0: batch, 2: past} for _ in range(2 * spec.num_layers))
    return (*fixed, cache) if nested else (*fixed, *cache)


def export_program(module, spec) -> torch.export.ExportedProgram:
    """torch.export ``module`` (a DecoderGraph or a flat GraphModule of the same signature)."""
    args = example_inputs(spec)
    flat = isinstance(module, torch.fx.GraphModule)
    with _size_oblivious(), torch.no_grad():
        return torch.export.export(module, args, dynamic_shapes=dynamic_shapes(spec, nested=not flat), strict=False)


@contextlib.contextmanager
def _size_oblivious():
    # Reason about sizes as >= 2 while allowing 1 at run time: decode runs N = 1, prefill P = 1.
    with fx_config.patch(backed_size_oblivious=True):
        yield


def capture(model) -> torch.fx.GraphModule:
    """Export ``model`` (a supported HF causal LM) to a flat-I/O GraphModule with tokopt metadata."""
    graph = DecoderGraph(model).eval()
    start = time.perf_counter()
    program = export_program(graph, graph.spec)
    gm = flat_module(program)
    set_graph_meta(gm, GraphMeta(graph.spec, graph.spec.output_names, capture_s=time.perf_counter() - start))
    return gm


def flat_module(program: torch.export.ExportedProgram) -> torch.fx.GraphModule:
    """The program as a GraphModule taking and returning flat tensors (no pytree, no input guards)."""
    gm = program.module()
    graph = gm.graph
    for node in list(graph.nodes):  # the unlifted module re-checks export guards on every call: drop them
        if node.op == "call_module" and node.target == "_guards_fn":
            graph.erase_node(node)
    graph._codegen = torch.fx.graph.CodeGen()
    graph.eliminate_dead_code()
    gm.recompile()
    return gm
