"""Expert-parallel engine directories: one weight file per rank, holding only what that rank computes with.

``tokopt export MOE_MODEL --ep N -o DIR`` builds every rank's step program (``runtime/distributed``: placement,
sharding, and for ``context_coherent`` the fused Alltoall) and writes::

    DIR/manifest.json        format tokopt-engine, target "ep", expert_parallel: world, strategy, placement,
                             per-rank files and bytes, the passes' reports
    DIR/config/              the model's config (architecture and sizes; no weights)
    DIR/rank{r}.safetensors  rank r's tensors: its E/N experts of every MoE layer, its routers' expert
                             numbering, and the replicated dense weights (attention, norms, embeddings, head)
    DIR/tokenizer/

``tokopt generate --engine DIR`` starts the N ranks; each builds its program from the config on the meta device
(no weights in memory), then takes its own file's tensors, so no process ever holds another rank's experts and
the original model is not needed. The step program's collectives (Alltoalls, K/V all-gathers) run in
torch.distributed between its ops, which is why this is a torch program per rank and not an ONNX graph.

Example::

    export_ep_engine(model, "engines/moe-ep2", ranks=2, tokenizer=tokenizer)
    engine = load_ep_engine("engines/moe-ep2")
    result = tokopt.ep_generate(engine, [[1, 2, 3]], max_new_tokens=8)     # an EPResult
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from tokopt.errors import EngineError, TokoptError
from tokopt.export.engine_dir import EXPERT_PARALLEL, FORMAT, FORMAT_VERSION, read_manifest, versions
from tokopt.models.ep_program.program import check_moe
from tokopt.passes.expert_placement import check_placement
from tokopt.passes.manager import step_name
from tokopt.progress import progress_bar
from tokopt.runtime.distributed.rank_program import FILE, EPEngine, build_rank_program, rank_tensors, strategy_passes



def export_ep_engine(model, out_dir, *, ranks: int, strategy: str = "context_coherent", placement=None,
                     tokenizer=None, model_name: str = "") -> Path:
    """Write an expert-parallel engine directory for ``model`` over ``ranks`` ranks (see module docstring)."""
    from safetensors.torch import save_file


    strategy_passes(strategy, placement)
    moe_layers = check_moe(model)
    experts = model.model.layers[moe_layers[0]].mlp.experts.num_experts
    if ranks < 1 or experts % ranks:
        raise TokoptError(f"the model has {experts} experts per MoE layer, which do not divide over {ranks} ranks; "
                          f"use a rank count dividing {experts}")
    if placement is not None:
        placement = check_placement(placement, moe_layers, experts, ranks)
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / "manifest.json").is_file():
        raise TokoptError(f"{out_dir} exists and is not an engine directory; choose an empty or new directory")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    files, reports = [], []
    with tempfile.TemporaryDirectory(prefix=".tokopt-export-", dir=out_dir.parent) as tmp:
        tmp = Path(tmp)
        for rank in progress_bar(range(ranks), desc=f"writing {ranks} rank programs", unit="rank"):
            gm, rank_reports = build_rank_program(model, rank, ranks, strategy, placement)
            tensors = rank_tensors(gm, model)
            save_file(tensors, str(tmp / FILE.format(rank=rank)))
            files.append({"file": FILE.format(rank=rank), "tensors": len(tensors),
                          "bytes": sum(t.numel() * t.element_size() for t in tensors.values())})
            reports = [r.to_dict() for r in rank_reports] if rank == 0 else reports
        model.config.save_pretrained(tmp / "config")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp / "tokenizer")
        full = sum(p.numel() * p.element_size() for p in model.parameters())
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "target": EXPERT_PARALLEL,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "model": {"name": model_name, "config": model.config.to_dict()},
            "expert_parallel": {
                "world": ranks, "strategy": strategy, "moe_layers": moe_layers, "experts_per_layer": experts,
                "placement": None if placement is None else np.asarray(placement).tolist(),
                "attn_implementation": getattr(model.config, "_attn_implementation", None),
                "ranks": files, "model_bytes": full},
            "passes": [step_name(s) for s in strategy_passes(strategy, placement)],
            "generation": {"eos_token_ids": [tokenizer.eos_token_id] if tokenizer is not None
                           and tokenizer.eos_token_id is not None else []},
            "versions": versions(),
            "report": {"passes": reports, "export_s": time.perf_counter() - start},
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
        tmp.mkdir()  # TemporaryDirectory cleans up a path that must exist
    return out_dir


def load_ep_engine(path) -> EPEngine:
    """Read an expert-parallel engine directory (``tokopt export --ep N``), or an EngineError saying why not."""
    path = Path(path)
    manifest = read_manifest(path)
    if "expert_parallel" not in manifest:
        raise EngineError(f"{path} is a single-process {manifest.get('target')!r} engine; load it with "
                          "tokopt.load_engine or `tokopt generate --engine` without --ep")
    return EPEngine(path, manifest)


def is_ep_engine(path) -> bool:
    manifest = Path(path) / "manifest.json"
    try:
        return manifest.is_file() and "expert_parallel" in json.loads(manifest.read_text())
    except json.JSONDecodeError:
        return False
