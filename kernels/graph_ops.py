"""The ``tokopt::`` ops that passes put into graphs, and their lowering to every export target.

Each graph op lives in its own kernel module with the whole contract: a torch reference, Numba CPU and CUDA
versions behind the dispatch, a ``torch.library`` custom op with a fake kernel (so ``torch.export`` keeps it as
one node and ``.pt2`` engines carry it), an ONNX translation into standard ONNX ops, and a TensorRT Quickly
Deployable Plugin whose kernel is the Numba CUDA version. This registry is what the exporters read:

- ``onnx_translation_table()``: ``{op overload: translation}`` for ``torch.onnx.export(custom_translation_table=)``;
- ``register_tensorrt_plugins()``: registers every op as a TensorRT plugin and a torch-tensorrt converter (needs
  TensorRT >= 10.7 and torch-tensorrt; a one-line TokoptError names what to install otherwise);
- ``ops_in(gm)``: the tokopt ops a graph calls (the engine manifest lists them).

Importing this module registers the ops with torch (each exactly once: a second ``torch.library`` registration of
the same name would replace the first kernel).

Example::

    from tokopt.kernels import graph_ops
    torch.onnx.export(program, dynamo=True, custom_translation_table=graph_ops.onnx_translation_table())
"""

import torch

from tokopt.errors import TokoptError
from tokopt.kernels import logit_stats

MODULES = {logit_stats.OP_NAME: logit_stats}  # op name -> kernel module (OP_NAME, logit_stats op, ...)


def op_overload(name: str):
    """``torch.ops.tokopt.<op>.default`` for a registered op name such as ``"tokopt::logit_stats"``."""
    namespace, op = name.split("::")
    return getattr(getattr(torch.ops, namespace), op).default


def onnx_translation_table() -> dict:
    """Every tokopt op's translation into standard ONNX ops, keyed by its op overload."""
    return {op_overload(name): module.onnx_translation for name, module in MODULES.items()}


def ops_in(gm: torch.fx.GraphModule) -> list:
    """Names of the tokopt ops that ``gm`` calls, sorted."""
    found = {getattr(n.target, "_qualified_op_name", None) or getattr(n.target, "_name", None)
             for n in gm.graph.nodes if n.op == "call_function"}  # OpOverloadPacket / OpOverload
    return sorted(name for name in found if name in MODULES)


def register_tensorrt_plugins(trtp=None, plugins=None) -> list:
    """Register every tokopt op as a TensorRT Quickly Deployable Plugin (``trtp.register`` + ``trtp.impl``,
    kernel: the op's Numba CUDA version) and generate the torch-tensorrt converter that maps the graph node onto
    it. Idempotent per process. ``trtp`` / ``plugins``: ``tensorrt.plugin`` and
    ``torch_tensorrt.dynamo.conversion.plugins`` (imported when not given). Returns the registered names."""
    if trtp is None or plugins is None:
        require_tensorrt()
        import tensorrt.plugin as trtp  # noqa: F811  (TensorRT >= 10.7)
        from torch_tensorrt.dynamo.conversion import plugins
    done = []
    for name, module in MODULES.items():
        if name not in _REGISTERED:
            describe, run = module.tensorrt_plugin(trtp)
            trtp.register(name)(describe)
            trtp.impl(name)(run)
            plugins.generate_plugin_converter(name, supports_dynamic_shapes=True)
            _REGISTERED.add(name)
        done.append(name)
    return done


_REGISTERED: set = set()

INSTALL = ("TensorRT export needs torch-tensorrt (matching torch {torch}) and an NVIDIA GPU: on a CUDA machine run "
           "`pip install 'tokopt[tensorrt]'`; on this machine use --target onnx (ONNX Runtime) or --target pt2")


def require_tensorrt():
    """``torch_tensorrt``, or a TokoptError with one line saying what to install."""
    try:
        import torch_tensorrt
    except Exception:  # ImportError, or a broken CUDA/TensorRT install raising at import
        raise TokoptError(INSTALL.format(torch=torch.__version__.split("+")[0])) from None
    if not torch.cuda.is_available():
        raise TokoptError("TensorRT export needs an NVIDIA GPU: torch sees no CUDA device here; use --target onnx")
    return torch_tensorrt

