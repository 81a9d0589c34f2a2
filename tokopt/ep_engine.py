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
    result = engine.generate([[1, 2, 3]], max_new_tokens=8)     # an EPResult, as tokopt.ep_generate
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
from tokopt.progress import progress_bar

FILE = "rank{rank}.safetensors"


def _tensor_groups(gm) -> list[tuple[list[str], torch.Tensor]]:
    """Every distinct parameter/buffer reachable from ``gm``, with all the names it is reachable by."""
    groups: dict[int, tuple[list[str], torch.Tensor]] = {}
    for name, t in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False)):
        groups.setdefault(id(t), ([], t))[0].append(name)
    return list(groups.values())


def _full_experts(model) -> set[int]:
    """ids of the unsharded expert weights of ``model`` (every rank drops them; it keeps its shard)."""
    from tokopt.runtime.distributed.run import full_expert_weights

    return {id(w) for w in full_expert_weights(model)}


def rank_tensors(gm, model) -> dict[str, torch.Tensor]:
    """The tensors rank ``gm`` computes with, each under its first name (its shard, not the full experts)."""
    dropped = _full_experts(model)
    return {names[0]: t.detach().contiguous() for names, t in _tensor_groups(gm) if id(t) not in dropped}


def export_ep_engine(model, out_dir, *, ranks: int, strategy: str = "context_coherent", placement=None,
                     tokenizer=None, model_name: str = "") -> Path:
    """Write an expert-parallel engine directory for ``model`` over ``ranks`` ranks (see module docstring)."""
    from safetensors.torch import save_file

    from tokopt.engine_dir import FORMAT, FORMAT_VERSION, _versions
    from tokopt.passes.expert_placement import check_placement
    from tokopt.runtime.distributed.program import check_moe
    from tokopt.runtime.distributed.run import build_rank_program, strategy_passes

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
            "format": FORMAT, "format_version": FORMAT_VERSION, "target": "ep",
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "model": {"name": model_name, "config": model.config.to_dict()},
            "expert_parallel": {
                "world": ranks, "strategy": strategy, "moe_layers": moe_layers, "experts_per_layer": experts,
                "placement": None if placement is None else np.asarray(placement).tolist(),
                "attn_implementation": getattr(model.config, "_attn_implementation", None),
                "ranks": files, "model_bytes": full},
            "passes": strategy_passes(strategy, placement),
            "generation": {"eos_token_ids": [tokenizer.eos_token_id] if tokenizer is not None
                           and tokenizer.eos_token_id is not None else []},
            "versions": _versions(),
            "report": {"passes": reports, "export_s": time.perf_counter() - start},
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
        tmp.mkdir()  # TemporaryDirectory cleans up a path that must exist
    return out_dir


@dataclass
class EPEngine:
    """An expert-parallel engine directory, read; ``rank_program(r)`` builds rank r's program from its file."""

    path: Path
    manifest: dict = field(repr=False)

    @property
    def world(self) -> int:
        return int(self.manifest["expert_parallel"]["world"])

    @property
    def strategy(self) -> str:
        return self.manifest["expert_parallel"]["strategy"]

    @property
    def placement(self):
        placement = self.manifest["expert_parallel"]["placement"]
        return None if placement is None else np.asarray(placement)

    def skeleton(self):
        """The model's architecture on the meta device: modules and shapes, no weights."""
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(self.path / "config")
        attn = self.manifest["expert_parallel"].get("attn_implementation") or "sdpa"
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()

    def rank_program(self, rank: int):
        """Rank ``rank``'s step program with its own tensors (never another rank's experts); (gm, reports)."""
        from safetensors.torch import load_file

        from tokopt.runtime.distributed.run import build_rank_program

        if not 0 <= rank < self.world:
            raise EngineError(f"{self.path} has ranks 0..{self.world - 1}, not {rank}")
        path = self.path / FILE.format(rank=rank)
        if not path.is_file():
            raise EngineError(f"{self.path} lacks {path.name}; re-export the engine with `tokopt export --ep "
                              f"{self.world}`")
        skeleton = self.skeleton()
        gm, reports = build_rank_program(skeleton, rank, self.world, self.strategy, self.placement)
        _assign(gm, load_file(str(path)), skip=_full_experts(skeleton), where=path)
        return gm, reports

    def generate(self, prompts, *, max_new_tokens: int = 32, eos_token_id=None, keep_logits: bool = False,
                 timeout_s: float = 300.0, backend: str = "gloo"):
        """Greedy-decode ``prompts`` (token id lists) over the engine's ranks; an EPResult (tokopt.ep_generate)."""
        from tokopt.runtime.distributed.run import ep_generate

        return ep_generate(self, prompts, ranks=self.world, strategy=self.strategy, max_new_tokens=max_new_tokens,
                           eos_token_id=eos_token_id, keep_logits=keep_logits, timeout_s=timeout_s, backend=backend)


def _assign(gm, tensors: dict, *, skip: set, where) -> None:
    """Put the file's tensors into ``gm`` under every name they are reachable by (``skip``: the skeleton's
    unsharded experts, left on the meta device); a tensor the file lacks is an error naming it."""
    for names, old in _tensor_groups(gm):
        if id(old) in skip:
            continue
        key = next((n for n in names if n in tensors), None)
        if key is None:
            raise EngineError(f"{where} lacks {names[0]} (shape {tuple(old.shape)}); the file was written for another "
                              "model or tokopt version: re-export the engine")
        new = tensors[key]
        if tuple(new.shape) != tuple(old.shape):
            raise EngineError(f"{where}: {key} has shape {tuple(new.shape)}, the program needs {tuple(old.shape)}; "
                              "re-export the engine")
        value = torch.nn.Parameter(new, requires_grad=False) if isinstance(old, torch.nn.Parameter) else new
        for name in names:
            owner, _, leaf = name.rpartition(".")
            module = gm.get_submodule(owner) if owner else gm
            (module._parameters if leaf in module._parameters else module._buffers)[leaf] = value
    for names, t in _tensor_groups(gm):  # the skeleton's unsharded experts stay on meta: never computed with
        if t.device.type == "meta" and id(t) not in skip:
            raise EngineError(f"{where}: {names[0]} was not filled; re-export the engine")


def load_ep_engine(path) -> EPEngine:
    """Read an expert-parallel engine directory (``tokopt export --ep N``), or an EngineError saying why not."""
    from tokopt.engine_dir import read_manifest

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
