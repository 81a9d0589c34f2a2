"""Engine directories: what ``tokopt export`` writes and ``tokopt generate --engine`` loads.

Layout::

    DIR/manifest.json      format, versions, model config, graph spec, input/output names, passes, report,
                           speculative (the method config the engine decodes with by default, as a JSON object)
    DIR/report.md          the pass report as a table
    DIR/model.onnx(.data)  target onnx: the decoder graph with its KV cache inputs/outputs (external weights)
    DIR/program.pt2        target pt2: the same graph as a torch.export program (runs in PyTorch, no model code)
    DIR/program_trt.ep     target tensorrt: the graph compiled by torch-tensorrt (``tokopt.export.tensorrt``)
    DIR/tokenizer/         the tokenizer (and chat template)

The targets are one table, ``TARGETS`` (a ``Target`` row each: graph file, export-time lowerings, how the graph is
written and loaded): adding a target is adding a row. ``ep`` is the old name of ``pt2`` (still accepted, with a
deprecation message; engines written with it still load). Expert-parallel engines (``tokopt export --ep N``) are a
different directory format, one weight file per rank: ``tokopt.export.ep_engine`` (``EXPERT_PARALLEL``).

Example::

    export_engine(tokopt.optimize(model), "engine/")
    opened = open_engine("engine/")                # no PyTorch model object needed; tokopt.load_engine wraps it
    opened.engine, opened.manifest["passes"]
"""

from __future__ import annotations

import copy
import json
import logging
import platform
import re
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Callable

import torch

from tokopt.errors import EngineError, TokoptError
from tokopt.export.quantize import check_quantize, quantize_onnx
from tokopt.export.tensorrt import compile_tensorrt, load_tensorrt
from tokopt.kernels.graph_ops import onnx_translation_table, ops_in, require_tensorrt
from tokopt.models.capture import export_program
from tokopt.models.decoder_graph import GraphSpec
from tokopt.models.graph_meta import GraphFacts, graph_meta
from tokopt.passes.lower_grouped_mm import grouped_mm_nodes
from tokopt.passes.manager import run_passes
from tokopt.passes.registry import PassReport
from tokopt.progress import progress_step
from tokopt.runtime.eager_engine import EagerEngine
from tokopt.runtime.ort_engine import OrtEngine
from tokopt.runtime.request import GenerationDefaults
from tokopt.version import __version__

FORMAT = "tokopt-engine"
FORMAT_VERSION = 1
# The manifest section of an expert-parallel engine directory (``tokopt.export.ep_engine``: a config and one
# safetensors file per rank, each rank's program rebuilt at load time). Not a ``Target``: ``export_ep_engine`` writes
# it from the model, ``load_ep_engine`` reads it, and ``open_engine`` refers such a directory there.
EXPERT_PARALLEL = "expert_parallel"


@dataclass(frozen=True)
class Target:
    """A single-process engine target: one row of ``TARGETS``.

    ``graph_file``: the graph's file in the engine directory. ``lowerings``: export-time passes for ops the target
    has no kernel for (run on a copy, so the eager graph keeps its fast ops). ``write(gm, spec, output_names,
    path)`` writes the graph; ``load(path, spec, outputs, threads, facts)`` returns an engine running it.
    ``check()``, if any, runs before any export work (a missing dependency fails first, in one line).

    Example::

        TARGETS["pt2"].graph_file                   # "program.pt2"
    """

    name: str
    graph_file: str
    lowerings: tuple
    write: Callable
    load: Callable
    description: str
    check: Callable | None = None


def _write_pt2(gm, spec, output_names, path: Path) -> None:
    with progress_step("exporting the optimized graph (torch.export)"):
        torch.export.save(export_program(gm, spec), str(path))


def _write_tensorrt(gm, spec, output_names, path: Path) -> None:
    with progress_step("compiling the optimized graph with torch-tensorrt"):
        compile_tensorrt(gm, spec, path)


def _write_onnx(gm, spec, output_names, path: Path) -> None:
    # The exporter warns about every torchvision op it cannot find (tokopt graphs use none), and onnx_ir once per
    # MoE layer about an empty attribute list it defaults to INTS (engines are tested equal to eager); neither is
    # for the user.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    logging.getLogger("onnx_ir").setLevel(logging.ERROR)

    with progress_step("re-exporting the optimized graph (torch.export)"):
        program = export_program(gm, spec)
    with progress_step("lowering to ONNX (torch.onnx, dynamo); about a minute for SmolLM2"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                onnx_program = torch.onnx.export(program, (), input_names=spec.input_names,
                                                 output_names=output_names, dynamo=True, external_data=True,
                                                 optimize=True, verbose=False,
                                                 custom_translation_table=onnx_translation_table())
            except Exception as exc:
                raise EngineError(export_failure(gm, exc, "onnx")) from exc
        onnx_program.save(str(path), external_data=True)


def _load_onnx(model_file, spec, outputs, threads, facts: GraphFacts):
    return OrtEngine(model_file, spec, outputs, threads=threads, facts=facts)


def _load_pt2(model_file, spec, outputs, threads, facts: GraphFacts):
    # the program calls tokopt ops: importing kernels.graph_ops registered them
    return EagerEngine(torch.export.load(str(model_file)).module(), spec, outputs, facts=facts, name="torch.export")


def _load_tensorrt(model_file, spec, outputs, threads, facts: GraphFacts):
    return EagerEngine(load_tensorrt(model_file), spec, outputs, facts=facts, name="tensorrt")


# The targets: a row each (adding a target is adding a row). GRAPH_FILES and LOWERINGS are views of it.
TARGETS = MappingProxyType({t.name: t for t in (
    Target("onnx", "model.onnx", ("lower_grouped_mm",), _write_onnx, _load_onnx, "ONNX Runtime; the default"),
    Target("pt2", "program.pt2", (), _write_pt2, _load_pt2, "a torch.export .pt2 program"),
    Target("tensorrt", "program_trt.ep", ("lower_grouped_mm",), _write_tensorrt, _load_tensorrt,
           "torch-tensorrt; needs it and an NVIDIA GPU", check=require_tensorrt),
)})
DEPRECATED_TARGETS = MappingProxyType({"ep": "pt2"})  # old name -> name ("ep" also means expert parallelism)
GRAPH_FILES = MappingProxyType({name: t.graph_file for name, t in TARGETS.items()})
LOWERINGS = MappingProxyType({name: t.lowerings for name, t in TARGETS.items()})  # export-time passes


def get_target(name: str, *, warn: bool = True) -> Target:
    """The ``Target`` row named ``name``; an old name (``ep``) gives its new one's with a DeprecationWarning
    (``warn=False``: silently, as for engines written under the old name), an unknown one a TokoptError.

    Example::

        get_target("pt2").graph_file                # "program.pt2"
    """
    if name in DEPRECATED_TARGETS:
        new = DEPRECATED_TARGETS[name]
        if warn:
            warnings.warn(deprecated_target_message(name), DeprecationWarning, stacklevel=3)
        name = new
    if name not in TARGETS:
        raise TokoptError(f"unknown export target {name!r}; this version exports: {', '.join(TARGETS)}")
    return TARGETS[name]


def deprecated_target_message(name: str) -> str:
    """One line saying the target ``name`` is now called otherwise."""
    return (f"export target {name!r} is deprecated: use {DEPRECATED_TARGETS[name]!r} "
            f"(--target {DEPRECATED_TARGETS[name]}; {name!r} also means expert parallelism, --ep)")


def versions() -> dict:
    import onnx
    import onnxruntime
    import transformers

    return {"tokopt": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def export_engine(opt, out_dir, *, target: str = "onnx", model_config: dict | None = None,
                  model_name: str = "", quantize: str | None = None, quantize_head: bool = True) -> Path:
    """Lower an optimized model to an engine directory (written whole, then moved into place). ``target``: a name
    in ``TARGETS``: onnx (ONNX Runtime), pt2 (a torch.export program) or tensorrt (torch-tensorrt; needs it and a
    CUDA GPU); "ep", the old name of pt2, still works with a DeprecationWarning. The manifest records the
    speculative method config ``opt`` decodes with (``tokopt.load_engine`` uses it by default). ``quantize``:
    "int8" or "int4" quantizes the onnx engine's weight MatMuls (weight-only, ``tokopt.export.quantize``; the LM
    head too unless ``quantize_head=False``); the manifest's ``quantize`` records it (None: fp32 weights).

    Example::

        export_engine(tokopt.optimize(model, speculative=RecyclingConfig(budget=5)), "engines/smollm2",
                      target="pt2", model_name="HuggingFaceTB/SmolLM2-135M-Instruct")
    """
    row = get_target(target)
    if row.check is not None:
        row.check()  # before any work: one line saying what to install
    quantize = check_quantize(quantize)
    if quantize is not None and row.name != "onnx":
        raise TokoptError(f"--quantize {quantize} quantizes ONNX Runtime engines (--target onnx), not {row.name}; "
                          "for PyTorch use tokopt.optimize(model, quantize=...)")
    gm = opt.graph_module
    if gm is None:
        raise TokoptError("this model has no graph to export (it was itself loaded from an engine directory)")
    if any(r.name == "quantize_weights" and r.changed for r in opt.report.passes):
        raise TokoptError("this model's graph has eager-only quantized linears (optimize(quantize=...)); export the "
                          "unquantized model with quantize='int8'/'int4' (tokopt export --quantize) instead")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / "manifest.json").is_file():
        raise TokoptError(f"{out_dir} exists and is not an engine directory; choose an empty or new directory")
    gm, lowered = _lower_for(row, gm)
    meta = graph_meta(gm)
    spec: GraphSpec = meta.spec
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=".tokopt-export-", dir=out_dir.parent) as tmp:
        tmp = Path(tmp)
        row.write(gm, spec, meta.output_names, tmp / row.graph_file)
        quantized = None
        if quantize is not None:
            with progress_step(f"quantizing the weights ({quantize}, ONNX Runtime MatMulNBits)"):
                quantized = quantize_onnx(tmp / row.graph_file, quantize, head=quantize_head)
        if opt.tokenizer is not None:
            opt.tokenizer.save_pretrained(tmp / "tokenizer")
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "target": row.name,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "model": {"name": model_name, "config": model_config or {}},
            "spec": spec.to_dict(),
            "inputs": spec.input_names,
            "outputs": meta.output_names,
            "dims": {"input_ids": "[batch, n_new]", "attention_mask": "[batch, 1, n_new, past + n_new] additive",
                     "logits_rows": "[rows]", "past_*": "[batch, kv_heads, past >= 1, head_dim]",
                     "logits": "[batch, rows, vocab]", "present_*": "[batch, kv_heads, past + n_new, head_dim]"},
            "passes": [r.name for r in opt.report.passes] + [r.name for r in lowered],
            # facts the runtime needs about the graph (ppd_slots: k prompt tokens and their measured accuracies)
            "graph_meta": meta.facts.to_dict(),
            # tokopt custom ops in the graph (kernels/graph_ops.py): ONNX gets their standard-op translations,
            # pt2 programs keep them as nodes (loading registers them), TensorRT runs them as plugins
            "tokopt_ops": ops_in(gm),
            # the method config (method + fields; a draft model as its name or path); older engines hold a name
            "speculative": opt.speculative.to_dict() if opt.speculative is not None else None,
            # weight-only quantization (tokopt.export.quantize): mode, bits, op, block size, head; None = fp32
            "quantize": quantized,
            "generation": {"eos_token_ids": list(opt.defaults.eos_token_ids), "pad_token_id": opt.defaults.pad_token_id},
            "versions": versions(),
            "report": opt.report.to_dict() | {"export_s": time.perf_counter() - start,
                                              "lowering": [r.to_dict() for r in lowered]},
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        (tmp / "report.md").write_text(f"# tokopt engine report\n\n```\n{opt.report}\n```\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
        tmp.mkdir()  # TemporaryDirectory cleans up a path that must exist
    return out_dir


def _lower_for(row: Target, gm):
    """The graph as target ``row`` needs it: its export-time lowerings run on a copy when they have something to
    change, so the caller's eager graph keeps its fast ops. Returns (graph, their reports)."""
    if not row.lowerings or not grouped_mm_nodes(gm):
        return gm, []
    with progress_step(f"lowering ops {row.name} has no kernel for ({', '.join(row.lowerings)})"):
        return run_passes(copy.deepcopy(gm), list(row.lowerings))


def export_failure(gm, exc, target: str) -> str:
    """One message naming what failed: the op, the graph nodes calling it and the pass that made them (or the
    model module they came from), and what to do."""
    text = str(exc)
    found = re.search(r"OpOverload\(op='([^']+)'", text) or re.search(r"for (\w+::\w+)", text)
    if not found:
        first = text.strip().splitlines()[0] if text.strip() else ""
        return f"{target} export failed: {type(exc).__name__}: {first[:300]}"
    op = found.group(1)
    short = op.replace("::", ".")
    nodes = [n for n in gm.graph.nodes if n.op == "call_function" and short in str(n.target)]
    where = []
    for n in nodes[:3]:
        made_by = n.meta.get("tokopt_pass")
        if made_by:
            where.append(f"node {n.name} (added by pass {made_by!r})")
        else:
            stack = list(n.meta.get("nn_module_stack", {}).values())
            module = stack[-1][0] if stack else "?"
            where.append(f"node {n.name} (from the model, module {module})")
    more = f" and {len(nodes) - 3} more" if len(nodes) > 3 else ""
    return (f"{target} export failed: op {op} has no {target} lowering; it is called at "
            f"{', '.join(where) or 'a node of the re-exported graph'}{more}. Drop the pass that adds it, add a "
            f"lowering (the target's row in tokopt.export.engine_dir.TARGETS), or export with --target pt2")


def read_manifest(path) -> dict:
    """The manifest of an engine directory, or an EngineError saying what is wrong with it."""
    path = Path(path)
    if not path.exists():
        raise EngineError(f"engine directory {path} does not exist; create one with `tokopt export -o {path}`")
    manifest_path = path / "manifest.json"
    if not path.is_dir() or not manifest_path.is_file():
        raise EngineError(f"{path} is not a tokopt engine directory (no manifest.json); "
                          f"create one with `tokopt export -o {path}`")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise EngineError(f"{manifest_path} is damaged ({exc}); re-export the engine") from None
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        made_by = manifest.get("versions", {}).get("tokopt", "unknown")
        raise EngineError(
            f"{path} holds engine format {manifest.get('format')!r} v{manifest.get('format_version')} "
            f"(made by tokopt {made_by}); this tokopt {__version__} reads {FORMAT!r} v{FORMAT_VERSION}: "
            "re-export it with `tokopt export`")
    return manifest


@dataclass
class OpenedEngine:
    """An engine directory opened for running: the engine, its manifest and what the decode loop needs."""

    path: Path
    engine: object
    manifest: dict
    tokenizer: object
    defaults: GenerationDefaults
    pass_reports: list
    capture_s: float

    @property
    def model_name(self) -> str:
        return self.manifest["model"].get("name") or ""


def open_engine(path, *, threads: int | None = None, uncertainty: bool = False) -> OpenedEngine:
    """Open an engine directory (no torch model needed): onnx engines run on ONNX Runtime, pt2 engines as the
    saved torch.export program, tensorrt engines on torch-tensorrt (CUDA). ``uncertainty``: check that the graph
    has the ``logit_taps`` outputs the uncertainty records need. ``tokopt.load_engine`` wraps this.

    Example::

        opened = open_engine("engines/smollm2"); opened.engine.name, opened.manifest["target"]
    """
    path = Path(path)
    manifest = read_manifest(path)
    if EXPERT_PARALLEL in manifest:
        world = manifest[EXPERT_PARALLEL]["world"]
        raise EngineError(f"{path} is an expert-parallel engine for {world} ranks: run it with `tokopt generate "
                          f"--engine {path}` (starts {world} processes) or tokopt.ep_generate("
                          "tokopt.export.ep_engine.load_ep_engine(path), prompts)")
    try:
        row = get_target(manifest["target"], warn=False)  # engines written as "ep" are pt2 engines
    except TokoptError:
        raise EngineError(f"{path} is a {manifest['target']!r} engine; this version runs {', '.join(TARGETS)} "
                          "engines") from None
    model_file = path / row.graph_file
    if not model_file.is_file():
        raise EngineError(f"{path} lacks {model_file.name}; re-export the engine with `tokopt export --target "
                          f"{row.name}`")
    spec = GraphSpec(**manifest["spec"])
    if uncertainty and "lse" not in manifest["outputs"]:
        raise EngineError(f"{path} has no uncertainty taps (outputs: {', '.join(manifest['outputs'][:1])}, cache, "
                          f"{', '.join(manifest['outputs'][1 + 2 * spec.num_layers:]) or 'nothing else'}); re-export "
                          "it with the uncertainty taps: `tokopt export --uncertainty -o DIR`")
    engine = row.load(model_file, spec, manifest["outputs"], threads, GraphFacts.from_dict(manifest.get("graph_meta")))
    tokenizer = None
    if (path / "tokenizer").is_dir():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer")
    gen = manifest["generation"]
    return OpenedEngine(path, engine, manifest, tokenizer, GenerationDefaults(tuple(gen["eos_token_ids"]),
                                                                             gen["pad_token_id"]),
                        [PassReport(**r) for r in manifest["report"].get("passes", [])],
                        manifest["report"].get("capture_s", 0.0))
