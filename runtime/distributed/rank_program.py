"""One rank's step program of an expert-parallel MoE model: built from the model (capture + the strategy's passes)
or from an expert-parallel engine directory's own rank file, so a rank never holds another rank's experts.

Example::

    gm, reports = build_rank_program(model, rank=0, world=2, strategy="context_coherent")
    engine = EPEngine(path, manifest); gm, reports = engine.rank_program(1)   # from rank1.safetensors
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from tokopt.errors import EngineError, TokoptError
from tokopt.models.ep_program.program import capture_program, check_moe, is_moe_block
from tokopt.passes.expert_parallel import ExpertParallelConfig
from tokopt.passes.expert_placement import ExpertPlacementConfig
from tokopt.passes.manager import run_passes

FILE = "rank{rank}.safetensors"
STRATEGIES = ("two_alltoall", "context_coherent")


def strategy_passes(strategy: str, placement, rank: int = 0, world: int = 1) -> list:
    """The passes (typed configs) that turn a step program into ``strategy`` for rank ``rank`` of ``world``."""
    if strategy not in STRATEGIES:
        raise TokoptError(f"unknown expert-parallel strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    steps = [ExpertPlacementConfig(np.asarray(placement), world)] if placement is not None else []
    steps.append(ExpertParallelConfig(world, rank))
    if strategy == "context_coherent":
        steps.append("fuse_alltoall")
    return steps


def build_rank_program(model, rank: int, world: int, strategy: str, placement=None):
    """The step program of ``model`` for one rank, with the strategy's passes applied; returns (gm, reports)."""
    check_moe(model)
    return run_passes(capture_program(model), strategy_passes(strategy, placement, rank, world))


def full_expert_weights(model) -> list:
    """The unsharded expert weight parameters of every MoE layer of ``model`` (gate-up and down)."""
    return [getattr(layer.mlp.experts, name) for layer in model.model.layers if is_moe_block(layer.mlp)
            for name in ("gate_up_proj", "down_proj")]


def drop_full_experts(model) -> None:
    """Free the unsharded expert weights of this rank's model copy: after the passes, each rank computes with
    its own shard (copied out), so keeping all experts would forfeit expert parallelism's memory saving."""
    for weight in full_expert_weights(model):
        weight.data = torch.empty(0)


def _tensor_groups(gm) -> list[tuple[list[str], torch.Tensor]]:
    """Every distinct parameter/buffer reachable from ``gm``, with all the names it is reachable by."""
    groups: dict[int, tuple[list[str], torch.Tensor]] = {}
    for name, t in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False)):
        groups.setdefault(id(t), ([], t))[0].append(name)
    return list(groups.values())


def full_expert_ids(model) -> set[int]:
    """ids of the unsharded expert weights of ``model`` (every rank drops them; it keeps its shard)."""
    return {id(w) for w in full_expert_weights(model)}


def rank_tensors(gm, model) -> dict[str, torch.Tensor]:
    """The tensors rank ``gm`` computes with, each under its first name (its shard, not the full experts)."""
    dropped = full_expert_ids(model)
    return {names[0]: t.detach().contiguous() for names, t in _tensor_groups(gm) if id(t) not in dropped}


@dataclass
class EPEngine:
    """An expert-parallel engine directory, read (``tokopt.export.ep_engine.load_ep_engine``); ``rank_program(r)``
    builds rank r's program from its own file. Run it with ``tokopt.ep_generate(engine, prompts)``."""

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
        if not 0 <= rank < self.world:
            raise EngineError(f"{self.path} has ranks 0..{self.world - 1}, not {rank}")
        path = self.path / FILE.format(rank=rank)
        if not path.is_file():
            raise EngineError(f"{self.path} lacks {path.name}; re-export the engine with `tokopt export --ep "
                              f"{self.world}`")
        skeleton = self.skeleton()
        gm, reports = build_rank_program(skeleton, rank, self.world, self.strategy, self.placement)
        _assign(gm, load_file(str(path)), skip=full_expert_ids(skeleton), where=path)
        return gm, reports


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
