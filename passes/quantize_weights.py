"""quantize_weights: weight-only int8 / int4 linears for the eager CPU engine (``tokopt.optimize(model, quantize=)``).

Every ``aten.linear(x, W, b)`` whose weight is a graph constant becomes a weight-only quantized matmul of PyTorch's
CPU build, activations staying fp32:

- ``bits=8``: ``aten._weight_int8pack_mm(x, Wq, scales)``: int8 weights, one symmetric scale per output channel;
- ``bits=4``: ``aten._weight_int4pack_mm_for_cpu(x, packed, group_size, scales_and_zeros)`` with the weight packed
  by ``aten._convert_weight_to_int4pack_for_cpu``: asymmetric 4-bit groups of ``group_size`` weights along K
  (dequantized as ``(q - 8) * scale + zero``, the tinygemm convention).

Which ops exist is checked at run time (``available_bits()``), so the pass works on any torch that has them (2.11
and 2.13 CPU builds do); a missing op fails in one line naming the ONNX path (``tokopt export --quantize``). The
LM head is quantized too unless ``head=False``, at ``head_bits`` (8, in both modes). A linear whose shape the kernel cannot take (K not a multiple of
``group_size``, for int4) is left in fp32 and counted in the report. The original fp32 weights stay referenced
only where something else uses them (tied embeddings). Greedy and speculative decoding run this same graph, so
speculation stays lossless relative to the quantized model (each output row depends only on its own input row).

Example::

    gm, report = run_passes(capture(model), [QuantizeWeightsConfig(bits=4, group_size=32)])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokopt.errors import TokoptError
from tokopt.passes.linear_rows import linear_args, replace_linear
from tokopt.passes.registry import PassConfig, PassReport, register_pass

NAME = "quantize_weights"
_aten = torch.ops.aten
INT8_OP = "_weight_int8pack_mm"
INT4_OPS = ("_weight_int4pack_mm_for_cpu", "_convert_weight_to_int4pack_for_cpu")


def _has(op: str) -> bool:
    try:
        getattr(_aten, op)
        return True
    except (AttributeError, RuntimeError):
        return False


def available_bits() -> tuple:
    """The weight widths this torch build has CPU weight-only kernels for: a subset of (8, 4)."""
    return tuple(b for b, ops in ((8, (INT8_OP,)), (4, INT4_OPS)) if all(_has(o) for o in ops))


@dataclass(frozen=True)
class QuantizeWeightsConfig(PassConfig):
    """``bits``: 8 or 4. ``group_size``: int4 weights per (scale, zero) group along K (32, 64, 128 or 256; int8
    uses one scale per output channel). ``head``: quantize the LM head (the widest linear) too, at ``head_bits``
    (8 by default in both modes, as the ONNX engines: a 4-bit head costs SmolLM2 much more perplexity)."""

    pass_name = NAME
    bits: int = 8
    group_size: int = 32
    head: bool = True
    head_bits: int = 8

    def __post_init__(self):
        if self.head_bits not in (8, 4):
            raise TokoptError(f"quantize_weights: head_bits must be 8 or 4, got {self.head_bits!r}")
        if self.bits not in (8, 4):
            raise TokoptError(f"quantize_weights: bits must be 8 or 4, got {self.bits!r}")
        if self.bits == 4 and self.group_size not in (32, 64, 128, 256):
            raise TokoptError(f"quantize_weights: int4 group_size must be 32, 64, 128 or 256, got {self.group_size}")


def require_bits(bits: int) -> None:
    """A TokoptError (one line) when this torch build lacks the kernels for ``bits``."""
    if bits not in available_bits():
        ops = (INT8_OP,) if bits == 8 else INT4_OPS
        raise TokoptError(f"int{bits} weight-only quantization needs torch.ops.aten.{' and '.join(ops)}, which this "
                          f"torch {torch.__version__} lacks; export a quantized ONNX Runtime engine instead: "
                          f"`tokopt export --quantize int{bits} -o DIR`")


def quantize_int8(weight: torch.Tensor):
    """(int8 [N, K], fp32 scales [N]): symmetric per output channel."""
    w = weight.detach().float()
    scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scales.contiguous()


def dequantize_int8(q, scales):
    return q.float() * scales[:, None]


def quantize_int4(weight: torch.Tensor, group_size: int):
    """(int32 q [N, K] in 0..15, scales_and_zeros [K/group, N, 2]): asymmetric groups along K, dequantized as
    ``(q - 8) * scale + zero``."""
    w = weight.detach().float()
    n, k = w.shape
    g = w.reshape(n, k // group_size, group_size)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-6)
    q = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32).reshape(n, k)
    zero = lo + 8 * scale
    return q.contiguous(), torch.stack([scale.t(), zero.t()], dim=-1).contiguous()


def dequantize_int4(q, scales_and_zeros, group_size: int):
    n, k = q.shape
    scale = scales_and_zeros[..., 0].t()[:, :, None]  # [N, K/g, 1]
    zero = scales_and_zeros[..., 1].t()[:, :, None]
    return ((q.reshape(n, k // group_size, group_size).float() - 8) * scale + zero).reshape(n, k)


def _constant(gm, node):
    """The tensor a get_attr node names, else None."""
    if getattr(node, "op", None) != "get_attr":
        return None
    obj = gm
    for part in node.target.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj if isinstance(obj, torch.Tensor) else None


@register_pass(NAME, "weight-only int8/int4 linears (aten._weight_int8pack_mm / _weight_int4pack_mm_for_cpu; "
                     "eager CPU; optimize(quantize=))", QuantizeWeightsConfig)
def quantize_weights(gm: torch.fx.GraphModule, config: QuantizeWeightsConfig | None = None):
    config = config or QuantizeWeightsConfig()
    require_bits(config.bits)
    if config.head:
        require_bits(config.head_bits)
    graph = gm.graph
    linears = []
    for node in graph.nodes:
        if node.op == "call_function" and node.target == _aten.linear.default:
            weight = _constant(gm, node.args[1])
            if weight is not None and weight.dim() == 2 and weight.dtype == torch.float32:
                linears.append((node, weight))
    if not linears:
        return gm, PassReport(NAME, why_not="no aten.linear with a constant fp32 weight in the graph")
    widest = max(w.shape[0] for _, w in linears)
    head = [n for n, w in linears if w.shape[0] == widest][-1]
    rewritten = skipped = 0
    made = {}  # weight attribute -> its quantized attributes (a weight used twice is quantized once)
    for node, weight in linears:
        if node is head and not config.head:
            continue
        n_out, k = weight.shape
        bits = config.head_bits if node is head else config.bits
        if bits == 4 and (k % config.group_size or k % 2):
            skipped += 1
            continue
        key = (node.args[1].target, bits)
        if key not in made:
            base = f"_q{bits}_{len(made)}"
            if bits == 8:
                q, scales = quantize_int8(weight)
                tensors = (q, scales)
            else:
                q, sz = quantize_int4(weight, config.group_size)
                tensors = (_aten._convert_weight_to_int4pack_for_cpu(q, 1), sz)
            names = []
            for i, t in enumerate(tensors):
                gm.register_buffer(f"{base}_{i}", t)
                names.append(f"{base}_{i}")
            made[key] = names
        x, _, _ = linear_args(node)
        val = getattr(x, "meta", {}).get("val")

        def rows_product(g, x=x, k=k, bits=bits, names=made[key]):
            qw, extra = (g.get_attr(name) for name in names)
            rows = g.call_function(_aten.reshape.default, (x, [-1, k]))
            if bits == 8:
                return g.call_function(_aten._weight_int8pack_mm.default, (rows, qw, extra))
            return g.call_function(_aten._weight_int4pack_mm_for_cpu.default, (rows, qw, config.group_size, extra))

        replace_linear(graph, node, rank=val.dim() if isinstance(val, torch.Tensor) else 3, out_features=n_out,
                       rows_product=rows_product)
        rewritten += 1
    graph.eliminate_dead_code()
    used = {n.target for n in graph.nodes if n.op == "get_attr"}
    freed = 0
    for key, _ in made:  # fp32 weights nothing reads any more (a tied embedding still reads its weight)
        if key not in used:
            owner, _, leaf = key.rpartition(".")
            mod = gm.get_submodule(owner) if owner else gm
            if hasattr(mod, leaf):
                delattr(mod, leaf)
                freed += 1
    gm.recompile()
    if not rewritten:
        return gm, PassReport(NAME, why_not=f"{skipped} linear(s) found, none with K a multiple of the group size")
    detail = (f"int{config.bits}: rewrote {rewritten} linear(s)"
              + (f" (group {config.group_size})" if config.bits == 4 else " (per-channel scales)")
              + (f", LM head int{config.head_bits}" if config.head else ", LM head kept fp32") + (f", {skipped} left fp32 (shape)" if skipped else "")
              + f", freed {freed} fp32 weight(s)")
    return gm, PassReport(NAME, matched=rewritten, changed=True, detail=detail)
