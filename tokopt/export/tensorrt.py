"""The TensorRT target of ``tokopt export``: the optimized graph, re-exported with torch.export, compiled by
torch-tensorrt's dynamo frontend with dynamic shapes, saved as an ExportedProgram holding the TensorRT engines.

What has run where: TensorRT cannot be installed in the workplace this was built in (no NVIDIA GPU, no
torch-tensorrt wheel), so ``compile_tensorrt`` and ``load_tensorrt`` are written against torch-tensorrt's
documented API (``torch_tensorrt.Input``, ``torch_tensorrt.dynamo.compile``, ``torch_tensorrt.save`` /
``torch_tensorrt.load``) and have not run; what they are handed (``tensorrt_inputs``: one ``Input`` per graph
input with min/opt/max shapes from the graph's dynamic dimensions) and the clear message when torch-tensorrt is
missing are tested. tokopt's own graph ops (``tokopt::logit_stats``, from the uncertainty taps) become TensorRT
Quickly Deployable Plugins whose kernels are their Numba CUDA versions (``kernels/graph_ops.py``; the plugin
functions and their registration are tested against the op's fake kernel, not inside TensorRT); every other
node is a standard aten op. The runtime kernels (``tokopt.kernels``) run beside the engine, not inside it.

Example::

    tokopt export --target tensorrt -o engines/smollm2-trt      # on a CUDA machine with torch-tensorrt
    opt = tokopt.load_engine("engines/smollm2-trt")              # runs the decode loop on the TRT engine
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokopt.errors import TokoptError
from tokopt.kernels.graph_ops import register_tensorrt_plugins, require_tensorrt
from tokopt.models.capture import export_program

@dataclass(frozen=True)
class ShapeRange:
    """Sizes the engine is built for: most rows per batch, new tokens per step and KV cache length."""

    max_batch: int = 8
    max_new: int = 128  # prefill chunk / widest verify tree
    max_past: int = 4096
    opt_batch: int = 1
    opt_new: int = 16
    opt_past: int = 512

    def __post_init__(self):
        if not (1 <= self.opt_batch <= self.max_batch and 1 <= self.opt_new <= self.max_new
                and 1 <= self.opt_past <= self.max_past):
            raise TokoptError(f"TensorRT shape range needs 1 <= opt <= max for batch, new tokens and past: {self}")


def input_shapes(spec, shapes: ShapeRange = ShapeRange()) -> list:
    """Per graph input (``spec.input_names`` order): (min, opt, max) shapes and dtype, from the same dynamic
    dimensions the capture declares (batch, new tokens, past length, logits rows)."""
    heads, dim, dtype = spec.num_kv_heads, spec.head_dim, spec.torch_dtype
    s = shapes
    dims = {"batch": (1, s.opt_batch, s.max_batch), "new": (1, s.opt_new, s.max_new),
            "past": (1, s.opt_past, s.max_past), "rows": (1, s.opt_new, s.max_new)}
    total = tuple(p + n for p, n in zip(dims["past"], dims["new"]))
    out = [
        ("input_ids", [(b, n) for b, n in zip(dims["batch"], dims["new"])], torch.int64),
        ("position_ids", [(b, n) for b, n in zip(dims["batch"], dims["new"])], torch.int64),
        ("attention_mask", [(b, 1, n, t) for b, n, t in zip(dims["batch"], dims["new"], total)], dtype),
        ("logits_rows", [(r,) for r in dims["rows"]], torch.int64),
    ]
    for name in spec.input_names[4:]:
        out.append((name, [(b, heads, p, dim) for b, p in zip(dims["batch"], dims["past"])], dtype))
    return out


def tensorrt_inputs(spec, shapes: ShapeRange = ShapeRange(), torch_tensorrt=None) -> list:
    """``torch_tensorrt.Input`` objects for ``torch_tensorrt.dynamo.compile`` (one per graph input)."""
    trt = torch_tensorrt or require_tensorrt()
    return [trt.Input(min_shape=lo, opt_shape=mid, max_shape=hi, dtype=dtype, name=name)
            for name, (lo, mid, hi), dtype in input_shapes(spec, shapes)]


def compile_tensorrt(gm, spec, path, shapes: ShapeRange = ShapeRange()) -> None:
    """Compile the optimized graph ``gm`` to TensorRT engines and save them (an ExportedProgram) at ``path``."""
    trt = require_tensorrt()
    register_tensorrt_plugins()  # tokopt ops become TensorRT plugins with Numba CUDA kernels, not graph breaks
    program = export_program(gm.to("cuda"), spec)
    inputs = tensorrt_inputs(spec, shapes, trt)
    compiled = trt.dynamo.compile(program, arg_inputs=inputs, min_block_size=1, use_explicit_typing=True,
                                  device=torch.device("cuda"))
    example = [torch.zeros(mid, dtype=dtype, device="cuda") for _, (_, mid, _), dtype in input_shapes(spec, shapes)]
    trt.save(compiled, str(path), output_format="exported_program", arg_inputs=example)


def load_tensorrt(path):
    """The saved TensorRT program as a callable module (on the GPU)."""

    trt = require_tensorrt()
    register_tensorrt_plugins()  # a deserialised engine needs its plugins' register/impl definitions
    return trt.load(str(path)).module()
