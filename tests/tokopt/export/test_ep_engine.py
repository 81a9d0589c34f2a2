"""Expert-parallel engine directories: each rank's file holds only its experts, the ranks rebuilt from them
(after a move, without the model) decode exactly as the model's ranks do, and bad use is refused clearly."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tokopt.api.engines import load_engine
from tokopt.export.ep_engine import export_ep_engine, load_ep_engine
from tokopt.runtime.distributed.run import ep_generate
from tokopt.errors import EngineError, TokoptError, UnsupportedModelError

PROMPTS = [[5, 7, 9, 11, 3, 4, 2], [1, 2, 3], [8, 8, 4, 2, 1, 7]]
NEW = 5
EXPERTS = 8


@pytest.fixture(scope="module")
def moe(tiny_model):
    return tiny_model("mixtral", num_local_experts=EXPERTS, num_experts=EXPERTS)


def exported(moe, root, **kwargs):
    export_ep_engine(moe, root / "a", **kwargs)
    shutil.move(root / "a", root / "b")  # the directory is self-contained
    return load_ep_engine(root / "b")


@pytest.mark.parametrize("strategy, placed", [("context_coherent", True), ("two_alltoall", False)])
def test_engine_ranks_decode_exactly_as_the_models_ranks(moe, tmp_path, strategy, placed):
    rng = np.random.default_rng(3)
    placement = np.stack([rng.permutation(np.repeat([0, 1], EXPERTS // 2)) for _ in range(2)]) if placed else None
    engine = exported(moe, tmp_path, ranks=2, strategy=strategy, placement=placement)
    got = ep_generate(engine, PROMPTS, max_new_tokens=NEW, keep_logits=True, timeout_s=120)
    want = ep_generate(moe, PROMPTS, ranks=2, strategy=strategy, placement=placement, max_new_tokens=NEW,
                       keep_logits=True, timeout_s=120)
    assert got.tokens == want.tokens
    for a, b in zip(got.ranks[0]["logits"], want.ranks[0]["logits"]):
        assert torch.equal(a, b)
    assert got.summary()["alltoalls_per_layer"] == want.summary()["alltoalls_per_layer"]


def test_each_rank_file_holds_only_its_experts(moe, tmp_path):
    engine = exported(moe, tmp_path, ranks=2)
    info = engine.manifest["expert_parallel"]
    full_experts = sum(getattr(layer.mlp.experts, n).numel() * 4 for layer in moe.model.layers
                       for n in ("gate_up_proj", "down_proj"))
    for r, entry in enumerate(info["ranks"]):
        tensors = load_file(str(engine.path / entry["file"]))
        expert_tensors = {k: t for k, t in tensors.items() if k.endswith(("gate_up_proj", "down_proj"))}
        assert expert_tensors and all(t.shape[0] == EXPERTS // 2 for t in expert_tensors.values())
        assert entry["bytes"] == sum(t.numel() * t.element_size() for t in tensors.values())
        assert entry["bytes"] == pytest.approx(info["model_bytes"] - full_experts / 2, rel=0.01)
        gm, _ = engine.rank_program(r)  # rebuilt from the meta skeleton: only the shard is real memory
        real = [t for t in list(gm.parameters()) + list(gm.buffers()) if t.device.type != "meta"]
        assert all(t.shape[0] != EXPERTS or t.dim() < 3 for t in real)


def test_refusals_name_what_is_wrong(moe, tiny_model, tmp_path):
    engine = exported(moe, tmp_path, ranks=2)
    with pytest.raises(EngineError, match="expert-parallel engine for 2 ranks"):
        load_engine(engine.path)
    with pytest.raises(TokoptError, match="exported for 2 ranks"):
        ep_generate(engine, PROMPTS, ranks=4)
    (engine.path / "rank1.safetensors").unlink()
    with pytest.raises(EngineError, match="lacks rank1.safetensors"):
        engine.rank_program(1)
    with pytest.raises(TokoptError, match="do not divide over 3 ranks"):
        export_ep_engine(moe, tmp_path / "c", ranks=3)
    with pytest.raises(UnsupportedModelError, match="no Mixture-of-Experts layers"):
        export_ep_engine(tiny_model("llama"), tmp_path / "d", ranks=2)
