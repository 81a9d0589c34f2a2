"""expert_placement: apply an expert placement by permuting expert weights, so rank r's experts are contiguous.

A placement (``tokopt place``, ``tokopt.place``) says, per MoE layer, which rank each expert lives on. This
pass reorders each layer's experts (router rows, gate/up and down weights together) so that the experts of
rank 0 come first, then rank 1, ...; ``expert_parallel`` then shards contiguously. The model's function is
unchanged (the router picks the same experts under their new numbers); ``perm`` keeps the original ids for
traces and counters. Run it before ``expert_parallel``, with the placement ([MoE layers][experts] -> rank) and
the rank count in its config.

Example::

    gm, reports = run_passes(gm, [ExpertPlacementConfig(placement.assignment, world=4),
                                  ExpertParallelConfig(world=4, rank=1)])
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from tokopt.errors import TokoptError
from tokopt.models.graph_meta import ep_meta
from tokopt.passes.registry import PassConfig, PassReport, register_pass
from tokopt.passes.expert_parallel import NOT_EP, moe_nodes

NAME = "expert_placement"


@dataclass(frozen=True)
class ExpertPlacementConfig(PassConfig):
    """``placement``: [MoE layers, experts] -> rank (None: nothing to place); ``world``: the rank count."""

    pass_name: ClassVar[str] = NAME
    placement: object = None
    world: int = 1


def check_placement(placement, moe_layers, num_experts, world) -> np.ndarray:
    """The placement as an int array [MoE layers, experts] with E/N experts per rank, or a clear error."""
    arr = np.asarray(placement)
    if arr.ndim != 2 or arr.shape != (len(moe_layers), num_experts):
        raise TokoptError(f"placement has shape {arr.shape}; this model needs [{len(moe_layers)} MoE layers, "
                          f"{num_experts} experts] (a trace or map made for another model?)")
    if not np.issubdtype(arr.dtype, np.integer) or arr.min() < 0 or arr.max() >= world:
        raise TokoptError(f"placement entries must be rank ids 0..{world - 1}; found {arr.min()}..{arr.max()}")
    for i, row in enumerate(arr):
        counts = np.bincount(row, minlength=world)
        if (counts != num_experts // world).any():
            raise TokoptError(f"placement of MoE layer {moe_layers[i]} puts {counts.tolist()} experts on the ranks; "
                              f"each rank must hold exactly {num_experts // world}")
    return arr


def _permuted(block, order):
    """A copy of an HF MoE block whose experts come in ``order`` (the user's model is left untouched)."""
    new = copy.copy(block)
    new._modules = dict(block._modules)
    gate, experts = copy.copy(block.gate), copy.copy(block.experts)
    gate._parameters, experts._parameters = dict(block.gate._parameters), dict(block.experts._parameters)
    idx = torch.as_tensor(order)
    gate.weight = nn.Parameter(block.gate.weight.detach()[idx].clone(), requires_grad=False)
    experts.gate_up_proj = nn.Parameter(block.experts.gate_up_proj.detach()[idx].clone(), requires_grad=False)
    experts.down_proj = nn.Parameter(block.experts.down_proj.detach()[idx].clone(), requires_grad=False)
    new.gate, new.experts = gate, experts
    return new


@register_pass(NAME, "applies an expert placement: permutes expert weights so each rank's experts are contiguous",
               config=ExpertPlacementConfig)
def expert_placement(gm: torch.fx.GraphModule, config: ExpertPlacementConfig = ExpertPlacementConfig()):
    if ep_meta(gm) is None:
        return gm, PassReport(NAME, why_not=NOT_EP)
    if config.placement is None:
        return gm, PassReport(NAME, why_not="no placement given (ExpertPlacementConfig.placement is None)")
    nodes = moe_nodes(gm)
    if not nodes:
        return gm, PassReport(NAME, why_not="no unsharded MoE layer: run expert_placement before expert_parallel")
    world = config.world
    mods = [gm.get_submodule(n.target) for n in nodes]
    placement = check_placement(config.placement, [m.index for m in mods], mods[0].num_experts, world)
    moved = 0
    for moe, row in zip(mods, placement):
        order = np.argsort(row, kind="stable")  # new expert j = old expert order[j]
        moved += int((order != np.arange(len(order))).sum())
        moe.block = _permuted(moe.block, order)
        moe.perm = moe.perm[torch.as_tensor(order)]
    return gm, PassReport(NAME, matched=len(mods), changed=moved > 0,
                          detail=f"placed {len(mods)} MoE layers on {world} ranks ({moved} experts renumbered)")
