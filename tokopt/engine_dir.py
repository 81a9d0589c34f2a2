"""Engine directories: what ``tokopt export`` writes and ``tokopt generate --engine`` loads.

Layout::

    DIR/manifest.json      format, versions, model config, graph spec, input/output names, passes, report
    DIR/report.md          the pass report as a table
    DIR/model.onnx(.data)  target onnx: the decoder graph with its KV cache inputs/outputs (external weights)
    DIR/program.pt2        target ep: the same graph as a torch.export program (runs in PyTorch, no model code)
    DIR/program_trt.ep     target tensorrt: the graph compiled by torch-tensorrt (``tokopt.tensorrt_target``)
    DIR/tokenizer/         the tokenizer (and chat template)

Example::

    export_engine(tokopt.optimize(model), "engine/")
    opt = load_engine("engine/")                   # no PyTorch model object needed
    opt.generate(ids, max_new_tokens=32)
"""

from __future__ import annotations

import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

import tokopt
from tokopt.errors import EngineError, TokoptError
from tokopt.kernels.graph_ops import ops_in
from tokopt.optimized_model import GenerationDefaults, OptimizedModel, Report
from tokopt.pass_manager import PassReport
from tokopt.progress import progress_step
from tokopt.runtime.decoder_graph import GraphSpec

FORMAT = "tokopt-engine"
FORMAT_VERSION = 1
TARGETS = ("onnx", "ep", "tensorrt")
GRAPH_FILES = {"onnx": "model.onnx", "ep": "program.pt2", "tensorrt": "program_trt.ep"}
GRAPH_META = ("ppd",)  # keys of gm.meta['tokopt'] an engine directory keeps
LOWERINGS = {"onnx": ("lower_grouped_mm",), "tensorrt": ("lower_grouped_mm",), "ep": ()}  # export-time passes


def _versions() -> dict:
    import onnx
    import onnxruntime
    import transformers

    return {"tokopt": tokopt.__version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def export_engine(opt: OptimizedModel, out_dir, *, target: str = "onnx", model_config: dict | None = None,
                  model_name: str = "") -> Path:
    """Lower an optimized model to an engine directory (written whole, then moved into place). ``target``: onnx
    (ONNX Runtime), ep (a torch.export program) or tensorrt (torch-tensorrt; needs it and a CUDA GPU)."""
    if target not in TARGETS:
        raise TokoptError(f"unknown export target {target!r}; this version exports: {', '.join(TARGETS)}")
    if target == "tensorrt":
        from tokopt.tensorrt_target import require_tensorrt

        require_tensorrt()  # before any work: one line saying what to install
    gm = opt.graph_module
    if gm is None:
        raise TokoptError("this model has no graph to export (it was itself loaded from an engine directory)")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / "manifest.json").is_file():
        raise TokoptError(f"{out_dir} exists and is not an engine directory; choose an empty or new directory")
    gm, lowered = _lower_for(target, gm)
    meta = gm.meta["tokopt"]
    spec: GraphSpec = meta["spec"]
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=".tokopt-export-", dir=out_dir.parent) as tmp:
        tmp = Path(tmp)
        _write_graph(target, gm, spec, meta["output_names"], tmp / GRAPH_FILES[target])
        if opt.tokenizer is not None:
            opt.tokenizer.save_pretrained(tmp / "tokenizer")
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "target": target,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "model": {"name": model_name, "config": model_config or {}},
            "spec": spec.to_dict(),
            "inputs": spec.input_names,
            "outputs": meta["output_names"],
            "dims": {"input_ids": "[batch, n_new]", "attention_mask": "[batch, 1, n_new, past + n_new] additive",
                     "logits_rows": "[rows]", "past_*": "[batch, kv_heads, past >= 1, head_dim]",
                     "logits": "[batch, rows, vocab]", "present_*": "[batch, kv_heads, past + n_new, head_dim]"},
            "passes": [r.name for r in opt.report.passes] + [r.name for r in lowered],
            # facts the runtime needs about the graph (ppd_slots: k prompt tokens and their measured accuracies)
            "graph_meta": {key: meta[key] for key in GRAPH_META if key in meta},
            # tokopt custom ops in the graph (kernels/graph_ops.py): ONNX gets their standard-op translations,
            # ep programs keep them as nodes (loading registers them), TensorRT runs them as plugins
            "tokopt_ops": ops_in(gm),
            "speculative": opt.speculative.method if opt.speculative is not None else None,
            "generation": {"eos_token_ids": list(opt.defaults.eos_token_ids), "pad_token_id": opt.defaults.pad_token_id},
            "versions": _versions(),
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


def _lower_for(target, gm):
    """The graph as ``target`` needs it: export-time lowerings (``LOWERINGS``) run on a copy when they have
    something to change, so the caller's eager graph keeps its fast ops. Returns (graph, their reports)."""
    import copy

    from tokopt.pass_manager import run_passes
    from tokopt.passes.lower_grouped_mm import grouped_mm_nodes

    if not LOWERINGS[target] or not grouped_mm_nodes(gm):
        return gm, []
    with progress_step(f"lowering ops {target} has no kernel for ({', '.join(LOWERINGS[target])})"):
        return run_passes(copy.deepcopy(gm), list(LOWERINGS[target]))


def _write_graph(target, gm, spec, output_names, path: Path) -> None:
    if target == "onnx":
        _write_onnx(gm, spec, output_names, path)
    elif target == "ep":
        from tokopt.capture import export_program

        with progress_step("exporting the optimized graph (torch.export)"):
            torch.export.save(export_program(gm, spec), str(path))
    else:
        from tokopt.tensorrt_target import compile_tensorrt

        with progress_step("compiling the optimized graph with torch-tensorrt"):
            compile_tensorrt(gm, spec, path)


def _write_onnx(gm, spec, output_names, path: Path) -> None:
    import logging
    import warnings

    from tokopt.capture import export_program
    from tokopt.kernels.graph_ops import onnx_translation_table

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


def export_failure(gm, exc, target: str) -> str:
    """One message naming what failed: the op, the graph nodes calling it and the pass that made them (or the
    model module they came from), and what to do."""
    import re

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
            f"lowering (tokopt.engine_dir.LOWERINGS), or export with --target ep")


def _load_graph(target, model_file, spec, outputs, threads):
    from tokopt.runtime.eager_engine import EagerEngine

    if target == "onnx":
        from tokopt.runtime.ort_engine import OrtEngine

        return OrtEngine(model_file, spec, outputs, threads=threads)
    if target == "ep":
        import tokopt.kernels.graph_ops  # noqa: F401  (registers the tokopt ops the program calls)

        engine = EagerEngine(torch.export.load(str(model_file)).module(), spec, outputs)
        engine.name = "torch.export"
        return engine
    from tokopt.tensorrt_target import load_tensorrt

    engine = EagerEngine(load_tensorrt(model_file), spec, outputs)
    engine.name = "tensorrt"
    return engine


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
            f"(made by tokopt {made_by}); this tokopt {tokopt.__version__} reads {FORMAT!r} v{FORMAT_VERSION}: "
            "re-export it with `tokopt export`")
    return manifest


def load_engine(path, *, threads: int | None = None, speculative=None, uncertainty: bool = False) -> OptimizedModel:
    """Load an engine directory as an OptimizedModel (no torch model needed): onnx engines run on ONNX Runtime,
    ep engines as the saved torch.export program, tensorrt engines on torch-tensorrt (CUDA).
    ``speculative`` as in ``tokopt.optimize`` (default: the method the engine was exported with, if any);
    draft-model methods load the engine's model (by the name in
    the manifest) for their self-speculative draft. ``uncertainty``: record per-token uncertainty
    (``opt.last_uncertainty``); the engine must have been exported with the ``logit_taps`` pass."""
    from tokopt.speculative import DRAFT_MODEL_METHODS, SpeculativeConfig

    path = Path(path)
    manifest = read_manifest(path)
    target = manifest["target"]
    if "expert_parallel" in manifest:
        world = manifest["expert_parallel"]["world"]
        raise EngineError(f"{path} is an expert-parallel engine for {world} ranks: run it with `tokopt generate "
                          f"--engine {path}` (starts {world} processes) or tokopt.ep_engine.load_ep_engine(path)"
                          ".generate(prompts)")
    if target not in TARGETS:
        raise EngineError(f"{path} is a {target!r} engine; this version runs {', '.join(TARGETS)} engines")
    model_file = path / GRAPH_FILES[target]
    if not model_file.is_file():
        raise EngineError(f"{path} lacks {model_file.name}; re-export the engine with `tokopt export --target {target}`")
    spec = GraphSpec(**manifest["spec"])
    if uncertainty and "lse" not in manifest["outputs"]:
        raise EngineError(f"{path} has no uncertainty taps (outputs: {', '.join(manifest['outputs'][:1])}, cache, "
                          f"{', '.join(manifest['outputs'][1 + 2 * spec.num_layers:]) or 'nothing else'}); re-export "
                          "it with the uncertainty taps: `tokopt export --uncertainty -o DIR`")
    engine = _load_graph(target, model_file, spec, manifest["outputs"], threads)
    tokenizer = None
    if (path / "tokenizer").is_dir():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer")
    gen = manifest["generation"]
    defaults = GenerationDefaults(tuple(gen["eos_token_ids"]), gen["pad_token_id"])
    report = Report([PassReport(**r) for r in manifest["report"].get("passes", [])],
                    manifest["report"].get("capture_s", 0.0))
    if speculative is None and manifest.get("speculative"):  # the method the engine was exported for
        speculative = manifest["speculative"]
    speculative = SpeculativeConfig.coerce(speculative)
    engine.graph_meta = manifest.get("graph_meta", {})
    model = None
    if speculative is not None and speculative.method in DRAFT_MODEL_METHODS and speculative.draft_model is None:
        name = manifest["model"].get("name")
        if not name:
            raise EngineError(f"{path} does not name its model, so {speculative.method!r} cannot build the "
                              "self-speculative draft; pass SpeculativeConfig(draft_model=...)")
        model, _ = tokopt.load(name, progress=False)
    key = "|".join([manifest["model"].get("name") or str(path.resolve()), *manifest.get("passes", []), target])
    opt = OptimizedModel(engine, defaults=defaults, tokenizer=tokenizer, report=report, model=model,
                         model_key=key, speculative=speculative, uncertainty=uncertainty)
    opt.manifest = manifest
    return opt
