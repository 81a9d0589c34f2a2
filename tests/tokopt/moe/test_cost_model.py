"""The alpha-beta cost model: fitting, hand-checked bytes of both strategies, which one wins where, a real gloo
sweep, and MoE configs (dense ones refused)."""

from __future__ import annotations

import math

import pytest

from tokopt.errors import TokoptError
from tokopt.moe.cost_model import (AlphaBeta, MoEShape, Topology, fit_alpha_beta, step_time, this_machine_fit,
                                   uniform_fractions)


def tiny_shape(**kw) -> MoEShape:
    """N=4-friendly: 2 MoE layers, d 8, kv 2 x 4, 4 experts top-1, fp32."""
    base = dict(name="tiny", layers=2, moe_layers=(0, 1), hidden=8, heads=2, kv_heads=2, head_dim=4, experts=4,
                top_k=1, expert_intermediate=16, dtype_bytes=4, vocab=32)
    base.update(kw)
    return MoEShape(**base)


def flat(gpus, alpha=1e-3, bw=1e6) -> Topology:
    return Topology("test", gpus, 1, AlphaBeta(alpha, bw), None, 1e12, 1e12)


def test_fit_recovers_alpha_beta():
    sizes = [1e3, 1e4, 1e5, 1e6, 1e7]
    for relative in (True, False):
        fit = fit_alpha_beta(sizes, [20e-6 + s / 2e9 for s in sizes], relative=relative)
        assert fit.alpha_s == pytest.approx(20e-6, rel=1e-6)
        assert fit.bytes_per_s == pytest.approx(2e9, rel=1e-6)
    # non-negative: a falling curve gives B = inf (no size term), never a negative slope
    fit = fit_alpha_beta([1e3, 1e6], [2e-3, 1e-3])
    assert math.isinf(fit.bytes_per_s) and fit.alpha_s > 0
    assert fit_alpha_beta([1e3, 1e6], [1e-6, 1e-3]).alpha_s >= 0
    assert AlphaBeta(1e-3, 1e6).time(1000) == pytest.approx(2e-3)


def test_bytes_by_hand_both_strategies():
    shape, topo = tiny_shape(), flat(4)
    # 8 tokens over 4 ranks = 2 per rank; half of them leave their rank at each of the 2 MoE layers
    base = step_time(shape, topo, "two_alltoall", tokens=8, cross_fraction=0.5, compute_s=0.0)
    assert base.dispatch_bytes == 2 * 2 * 0.5 * 8 * 4 == 64  # layers * tokens * f * d * 4 bytes
    assert base.combine_bytes == 64 and base.kv_sync_bytes == 0 and base.collectives == 6
    assert base.dispatch_s == pytest.approx(2 * (1e-3 + 32 / 1e6))
    cc = step_time(shape, topo, "context_coherent", tokens=8, cross_fraction=0.5, compute_s=0.0)
    assert cc.dispatch_bytes == 64 and cc.combine_bytes == 0
    # K/V: per token per layer (N-1) * 2 * kv_heads * head_dim elements = 3 * 2 * 2 * 4 * 4 B = 192 B
    assert cc.kv_sync_bytes == 2 * 2 * 192 == 768  # layers * tokens per rank * 192
    assert cc.kv_sync_s == pytest.approx(1e-3 + 768 / 1e6)  # decode: one all-gather per step
    assert cc.gather_bytes == 2 * 4 * 8 * 3 / 4  # next-token ids, int64
    assert cc.collectives == 2 * 2 + 1 + 1
    pre = step_time(shape, topo, "context_coherent", tokens=8, cross_fraction=0.5, compute_s=0.0, phase="prefill",
                    context=4)
    assert pre.kv_sync_bytes == 768 and pre.kv_sync_s == pytest.approx(2 * (1e-3 + 384 / 1e6))  # per layer
    split = step_time(tiny_shape(top_k=2), topo, "context_coherent", tokens=8, cross_fraction=0.5,
                      split_fraction=0.25, compute_s=0.0)
    assert split.combine_bytes == 2 * 2 * 0.25 * 8 * 4 * 2  # copies out + partial sums back


def test_context_coherent_wins_small_kv_slow_links():
    # top-1, GQA with one small KV head, 2 ranks, slow links: the dropped combine outweighs K/V coherence
    shape = tiny_shape(hidden=4096, heads=32, kv_heads=1, head_dim=64, experts=8, dtype_bytes=2)
    topo = flat(2, alpha=0.0, bw=1e9)
    kw = dict(tokens=64, cross_fraction=0.5, compute_s=0.0)
    base, cc = (step_time(shape, topo, s, **kw) for s in ("two_alltoall", "context_coherent"))
    assert cc.total_s < base.total_s
    assert cc.kv_sync_bytes < base.combine_bytes


def test_two_alltoall_wins_when_kv_dominates():
    # MHA (kv_heads * head_dim = d) over 8 ranks: 7 * 2 d of K/V per token per layer against f * d saved
    shape = tiny_shape(hidden=2048, heads=16, kv_heads=16, head_dim=128, experts=8, dtype_bytes=2)
    topo = Topology.preset("nvlink8")
    kw = dict(tokens=256, cross_fraction=7 / 8, compute_s=0.0)
    base, cc = (step_time(shape, topo, s, **kw) for s in ("two_alltoall", "context_coherent"))
    assert base.total_s < cc.total_s
    assert cc.kv_sync_bytes > base.combine_bytes


def test_topologies_and_hierarchy():
    one, two = Topology.preset("nvlink8"), Topology.preset("2node-rdma")
    assert (one.gpus, one.nodes, two.gpus, two.gpus_per_node) == (8, 1, 16, 8)
    assert two.uniform_inter_fraction() == pytest.approx(8 / 15)
    s = 1 << 20
    assert two.alltoall_time(s) == pytest.approx(two.inter.time(s * 8 / 15) + two.intra.time(s * 7 / 15))
    assert two.alltoall_time(s) > one.alltoall_time(s)
    assert one.allgather_time(8 * s) == pytest.approx(one.intra.time(7 * s))
    slow = Topology.preset("2node-rdma", inter_gbps=10, gpus=8)
    assert (slow.gpus, slow.gpus_per_node, slow.inter.bytes_per_s) == (8, 4, 10e9)


def test_uniform_fractions():
    cross, split = uniform_fractions(MoEShape.preset("mixtral-8x7b"), 4)
    assert cross == pytest.approx(15 / 28) and split == pytest.approx(6 / 7)
    assert uniform_fractions(tiny_shape(), 4) == pytest.approx((0.75, 0.0))


def test_from_hf_configs_and_dense_refused():
    from transformers import LlamaConfig, MixtralConfig, OlmoeConfig, Qwen2MoeConfig, Qwen3MoeConfig

    m = MoEShape.from_config(MixtralConfig())
    assert (m.layers, m.experts, m.top_k, m.kv_heads, m.head_dim, m.expert_intermediate) == (32, 8, 2, 8, 128, 14336)
    q = MoEShape.from_config(Qwen2MoeConfig(decoder_sparse_step=2))
    assert q.shared_intermediate == 5632 and q.expert_intermediate == 1408 and q.moe_layers == tuple(range(1, 24, 2))
    assert MoEShape.from_config(Qwen3MoeConfig(head_dim=128)).head_dim == 128
    o = MoEShape.from_config(OlmoeConfig().to_dict())
    assert (o.experts, o.top_k, o.kv_heads) == (64, 8, 16)
    with pytest.raises(TokoptError, match="mixtral, qwen2_moe, qwen3_moe, olmoe"):
        MoEShape.from_config(LlamaConfig())


def test_too_many_gpus_named():
    with pytest.raises(TokoptError, match="--gpus 8"):
        step_time(MoEShape.preset("mixtral-8x7b"), Topology.preset("2node-rdma"), "two_alltoall", tokens=1,
                  cross_fraction=0.5)


def test_gloo_sweep_two_ranks(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKOPT_CACHE", str(tmp_path))
    r = this_machine_fit(2, sizes=(4096, 262144, 2 << 20), repeats=3, all_gather=False, progress=False)
    fit = AlphaBeta(**r["fit"])
    assert fit.alpha_s > 0 and 0 < fit.bytes_per_s < math.inf
    assert len(r["points"]) == 3 and all(p["seconds"] > 0 for p in r["points"])
    assert list((tmp_path / "cost_model").glob("gloo_*_w2.json"))
    assert this_machine_fit(2) == r  # cached: no second sweep
    topo = Topology.preset("this-machine", gpus=2)
    assert topo.gpus == 2 and topo.intra.alpha_s == fit.alpha_s and topo.flops > 0
