"""Weight-only quantization of an exported ONNX engine graph with ONNX Runtime's own tooling.

``tokopt export --quantize int8|int4`` (``export_engine(..., quantize=...)``) exports the graph as usual, then
rewrites every MatMul whose weight is a constant initializer (the attention and MLP projections, and the LM head)
into ``com.microsoft.MatMulNBits`` with ``onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer``:

- ``int4``: 4-bit blocks of ``block_size`` (32) weights along K, asymmetric (a scale and a zero point per block);
- ``int8``: the same operator with 8-bit blocks (this ORT's MatMulNBits takes bits=8), or with
  ``int8_method="dynamic"`` ``quantize_dynamic`` (MatMulInteger with per-channel int8 weights and activations
  quantized at run time). MatMulNBits is the default because it keeps every row independent: dynamic
  quantization picks ONE activation scale per tensor, over all rows of a step, so a token's logits depend on the
  other rows in the batch / verify tree, and speculative output stops equalling greedy (measured on a tiny model:
  it diverged). ``dynamic`` is kept for measurement only (bench/quantize_quality.py).

Activations stay fp32 (``accuracy_level``: ORT's MatMulNBits compute type, 0 = fp32 unpack-and-multiply; 4 = int8
activations in the kernel, faster, slightly lossier). The LM head is quantized too unless ``head=False``, at 8 bits
in both modes (``HEAD_BITS``: a 4-bit head cost SmolLM2 much more perplexity than the whole 4-bit body did, an
8-bit one nothing measurable); a head tied to the embedding (``MatMul(x, Transpose(embedding))``) gets its own
transposed weight to quantize, the Gather keeping the fp32 table. The decision is recorded in the manifest's
``quantize`` entry (``head_quantized``, ``head_bits``). The attention's activation x activation MatMuls are
left alone (their second input is not an initializer). The result is saved back in the engine's external-data
layout (``model.onnx`` + ``model.onnx.data``), so loading is unchanged. Decoding stays lossless relative to the
quantized engine: speculative verification runs the same quantized graph as plain decoding.

Example::

    info = quantize_onnx(Path("engine/model.onnx"), "int4")   # {'mode': 'int4', 'bits': 4, 'block_size': 32, ...}
"""

from __future__ import annotations

import logging
from pathlib import Path

from tokopt.errors import TokoptError

MODES = ("int8", "int4")
DEFAULT_BLOCK_SIZE = 32
DEFAULT_INT8_METHOD = "nbits"  # or "dynamic" (quantize_dynamic); measured in bench/quantize_quality.py
DEFAULT_ACCURACY_LEVEL = 0
# The LM head's width per mode. int4 keeps an 8-bit head: on SmolLM2-135M a 4-bit head raised held-out perplexity
# from 30.0 to 33.7 (fp32 24.0), an 8-bit one costs nothing measurable (bench/RESULTS.md).
HEAD_BITS = {"int8": 8, "int4": 8}


def check_quantize(mode) -> str | None:
    """``mode`` checked: None/""/"none" -> None, "int8"/"int4" as given, anything else a TokoptError (one line)."""
    if mode in (None, "", "none", "fp32"):
        return None
    if mode not in MODES:
        raise TokoptError(f"--quantize must be one of {', '.join(MODES)} (weight-only), got {mode!r}")
    return mode


def _weight_matmuls(model):
    """(node, initializer) of every MatMul whose second input is a 2-D constant initializer."""
    inits = {i.name: i for i in model.graph.initializer}
    out = []
    for node in model.graph.node:
        if node.op_type == "MatMul" and len(node.input) == 2 and node.input[1] in inits:
            init = inits[node.input[1]]
            if len(init.dims) == 2:
                out.append((node, init))
    return out


def head_node(model):
    """(name, reads a weight initializer directly) of the LM head: the MatMul with the widest constant second input
    (an initializer, or a Transpose of one for a head tied to the embedding), the last of them; (None, False)."""
    inits = {i.name: i for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    found = []
    for node in model.graph.node:
        if node.op_type != "MatMul" or len(node.input) != 2:
            continue
        b = node.input[1]
        if b in inits and len(inits[b].dims) == 2:
            found.append((int(inits[b].dims[1]), node.name, True))
        elif b in producers and producers[b].op_type == "Transpose" and producers[b].input[0] in inits:
            src = inits[producers[b].input[0]]
            if len(src.dims) == 2:
                found.append((int(src.dims[0]), node.name, False))
    if not found:
        return None, False
    widest = max(f[0] for f in found)
    return [f for f in found if f[0] == widest][-1][1:]


def _materialize_transposed_weights(model) -> int:
    """A tied LM head reads the embedding as ``MatMul(x, Transpose(embedding))`` (the embedding's Gather shares the
    initializer), which the quantizer cannot take: give such MatMuls their own transposed weight initializer (the
    fp32 embedding stays for the Gather; the head's copy is quantized). Returns how many were rewired."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    consumers: dict = {}
    for n in model.graph.node:
        for x in n.input:
            consumers.setdefault(x, []).append(n)
    done = 0
    for node in list(model.graph.node):
        if node.op_type != "MatMul" or len(node.input) != 2 or node.input[1] in inits:
            continue
        tr = producers.get(node.input[1])
        if tr is None or tr.op_type != "Transpose" or tr.input[0] not in inits:
            continue
        src = inits[tr.input[0]]
        perm = [a.ints for a in tr.attribute if a.name == "perm"]
        if len(src.dims) != 2 or (perm and list(perm[0]) != [1, 0]):
            continue
        name = f"{src.name}.transposed"
        if name not in inits:
            t = numpy_helper.from_array(numpy_helper.to_array(src).T.copy(), name)
            model.graph.initializer.append(t)
            inits[name] = t
        node.input[1] = name
        done += 1
        if all(c is node for c in consumers.get(tr.output[0], [])) and tr.output[0] not in {
                o.name for o in model.graph.output}:
            model.graph.node.remove(tr)
    return done


def quantize_onnx(path, mode: str, *, block_size: int = DEFAULT_BLOCK_SIZE, head: bool = True,
                  head_bits: int | None = None,
                  int8_method: str = DEFAULT_INT8_METHOD, accuracy_level: int = DEFAULT_ACCURACY_LEVEL) -> dict:
    """Quantize the weight MatMuls of the ONNX model at ``path`` in place (external data kept beside it as
    ``<name>.data``); returns what was done, for the manifest."""
    import onnx

    mode = check_quantize(mode)
    if mode is None:
        return {}
    path = Path(path)
    # the quantizers log INFO lines per node, through the root logger and their own (set to INFO)
    loggers = [logging.getLogger(), logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        return _quantize(path, mode, block_size, head, HEAD_BITS.get(mode) if head_bits is None else head_bits,
                         int8_method, accuracy_level)
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _quantize(path: Path, mode, block_size, head, head_bits, int8_method, accuracy_level) -> dict:
    import onnx

    model = onnx.load(str(path), load_external_data=True)
    mats = _weight_matmuls(model)
    if not mats:
        raise TokoptError(f"--quantize {mode}: the exported graph has no MatMul with a constant weight to quantize")
    for i, node in enumerate(model.graph.node):  # the quantizer selects and excludes nodes by name
        if not node.name:
            node.name = f"node_{i}_{node.op_type}"
    head_name, head_is_weight = head_node(model)
    if head and head_name is not None and not head_is_weight:
        # a tied head reads Transpose(embedding): give it its own weight so it can be quantized (the embedding's
        # Gather keeps the fp32 table)
        _materialize_transposed_weights(model)
        mats, head_is_weight = _weight_matmuls(model), True
    bits = 4 if mode == "int4" else 8
    head_bits = (head_bits or bits) if head and head_name is not None else None
    method = "nbits" if mode == "int4" else int8_method
    if method == "dynamic" and head_bits is not None:
        head_bits = 8
    # the head stays out of the main pass when it is fp32 or quantized at its own width first
    exclude = [head_name] if head_name is not None and head_is_weight and head_bits != bits else []
    if method == "nbits":
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        if head_bits is not None and head_bits != bits:  # the head first, at its own width
            others = [n.name for n, _ in _weight_matmuls(model) if n.name != head_name]
            quantizer = MatMulNBitsQuantizer(model, bits=head_bits, block_size=block_size, is_symmetric=False,
                                             accuracy_level=accuracy_level, nodes_to_exclude=others)
            quantizer.process()
            model = quantizer.model.model
        quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=False,
                                         accuracy_level=accuracy_level, nodes_to_exclude=exclude)
        quantizer.process()
        quantized = quantizer.model.model
        op = "com.microsoft.MatMulNBits"
    elif method == "dynamic":
        import tempfile

        from onnxruntime.quantization import QuantType, quantize_dynamic

        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            src = Path(tmp) / "in.onnx"
            dst = Path(tmp) / "out.onnx"
            onnx.save_model(model, str(src), save_as_external_data=True, location="in.onnx.data")
            quantize_dynamic(src, dst, op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8,
                             per_channel=True, nodes_to_exclude=exclude, use_external_data_format=True,
                             extra_options={"MatMulConstBOnly": True})
            quantized = onnx.load(str(dst), load_external_data=True)
        op = "MatMulInteger (dynamic int8)"
    else:
        raise TokoptError(f"int8_method must be 'nbits' or 'dynamic', got {int8_method!r}")
    data = path.with_name(path.name + ".data")
    path.unlink()
    if data.exists():
        data.unlink()  # onnx appends to an existing external-data file
    onnx.save_model(quantized, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)
    return {"mode": mode, "bits": bits, "method": method, "op": op,
            "block_size": block_size if method == "nbits" else None,
            "accuracy_level": accuracy_level if method == "nbits" else None,
            "symmetric": False if method == "nbits" else True, "head_quantized": head_bits is not None,
            "head_bits": head_bits, "matmuls": len(mats) - (1 if head_bits is None and head_is_weight else 0), "weights_bytes": data.stat().st_size if data.exists() else None}
