"""Expert parallelism over gloo ranks: equal to one process, tokens conserved, replicas coherent, traffic as predicted."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tokopt.errors import TokoptError
from tokopt.moe.plan import routing_fractions
from tokopt.runtime.distributed.generate import generate_on_rank
from tokopt.models.ep_program.program import StepContext, alltoalls_per_layer, capture_program
from tokopt.runtime.distributed.run import build_rank_program, ep_generate
from tokopt.runtime.distributed.stats import trace_of_run

PROMPTS = [[5, 7, 9, 11, 3, 4, 2], [1, 2, 3], [8, 8, 4, 2, 1, 7], [3, 30, 31, 32, 40]]
NEW = 5


def reference(model):
    gm = capture_program(model)
    with torch.no_grad():
        return generate_on_rank(gm, PROMPTS, StepContext.single(gm, len(PROMPTS)), max_new_tokens=NEW,
                                keep_logits=True)


def hf_greedy(model, prompt, new):
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False, pad_token_id=0,
                             eos_token_id=None)
    return out[0, len(prompt):].tolist()


def moe_model(tiny_model, experts, top_k=2):
    model = tiny_model("mixtral", num_local_experts=experts, num_experts=experts, num_experts_per_tok=top_k)
    assert model.model.layers[0].mlp.experts.num_experts == experts
    return model


def shuffled_placement(num_layers, num_experts, world, seed):
    rng = np.random.default_rng(seed)
    return np.stack([rng.permutation(np.repeat(np.arange(world), num_experts // world)) for _ in range(num_layers)])


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"])
def test_unsharded_program_equals_hf(tiny_model, family):
    model = tiny_model(family)
    ref = reference(model)
    for s, prompt in enumerate(PROMPTS):
        full = torch.tensor([prompt + ref["tokens"][s]])
        with torch.no_grad():
            hf = model(full).logits[0, len(prompt) - 1: len(prompt) - 1 + NEW]
        torch.testing.assert_close(ref["logits"][s], hf, atol=1e-5, rtol=0)
        assert ref["tokens"][s] == hf.argmax(-1).tolist()


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("strategy", ["two_alltoall", "context_coherent"])
@pytest.mark.parametrize("placed", [False, True])
def test_ep_equals_single_process(tiny_model, world, strategy, placed):
    model = moe_model(tiny_model, 8)
    placement = shuffled_placement(2, 8, world, seed=world) if placed else None
    ref = reference(model)
    res = ep_generate(model, PROMPTS, ranks=world, strategy=strategy, placement=placement, max_new_tokens=NEW,
                      keep_logits=True, timeout_s=60)
    for r in range(world):  # every rank saw the same tokens and logits
        assert res.ranks[r]["tokens"] == ref["tokens"]
        for got, want in zip(res.ranks[r]["logits"], ref["logits"]):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert res.tokens[0] == hf_greedy(model, PROMPTS[0], NEW)

    # token conservation: at every step and MoE layer, every token of the step is routed on exactly one rank
    seen = {}
    for rank_result in res.ranks:
        for step, layer, idx, _, _ in rank_result["routes"]:
            seen.setdefault((step, layer), []).extend(idx.tolist())
    for (step, layer), idx in seen.items():
        n = sum(len(p) for p in PROMPTS) if step == 0 else len(PROMPTS)
        assert sorted(idx) == list(range(n)), (step, layer)


@pytest.mark.parametrize("strategy", ["two_alltoall", "context_coherent"])
def test_more_ranks_than_sequences(tiny_model, strategy):
    model = moe_model(tiny_model, 4)
    res = ep_generate(model, PROMPTS[:1], ranks=4, strategy=strategy, max_new_tokens=3, timeout_s=60)
    assert res.tokens[0] == hf_greedy(model, PROMPTS[0], 3)


def test_kv_replicas_identical_across_ranks(tiny_model):
    model = moe_model(tiny_model, 8)
    res = ep_generate(model, PROMPTS, ranks=4, strategy="context_coherent", max_new_tokens=NEW, keep_logits=True,
                      timeout_s=60)
    first = res.ranks[0]["kv_replica"]
    for other in res.ranks[1:]:
        for (k0, v0), (k1, v1) in zip(first, other["kv_replica"]):
            assert torch.equal(k0, k1) and torch.equal(v0, v1)
    # and every rank holds every sequence's K/V (N times the memory of the two-Alltoall layout)
    assert len(set(r["kv_bytes"] for r in res.ranks)) == 1


@pytest.mark.parametrize("strategy", ["two_alltoall", "context_coherent"])
def test_measured_cross_fraction_equals_prediction(tiny_model, strategy):
    world = 4
    model = moe_model(tiny_model, 8)
    placement = shuffled_placement(2, 8, world, seed=7)
    res = ep_generate(model, PROMPTS, ranks=world, strategy=strategy, placement=placement, max_new_tokens=NEW,
                      timeout_s=60)
    experts, routed_on, keys = trace_of_run(res)
    home = np.array([int(torch.arange(len(PROMPTS))[seq_of(key, PROMPTS)] % world) for key in keys])
    predicted = routing_fractions(experts, placement, world, stay_home=strategy == "two_alltoall", home=home)
    summary = res.summary()
    kind = "migrate" if strategy == "context_coherent" else "dispatch"
    rows = sum(r["rows"] for rr in res.ranks for r in rr["counters"] if r["kind"] == kind)
    token_layers = experts[:, :, 0].size
    if strategy == "context_coherent":
        assert summary["cross_fraction"] == pytest.approx(predicted["cross"], abs=1e-12)
    # rows leaving a rank = moves (context-coherent) + one copy per other rank hosting one of a token's experts
    assert rows / token_layers == pytest.approx(predicted["cross"] + predicted["split"], abs=1e-12)
    # bytes = those rows x (hidden + metadata columns) x 4 bytes
    d, k = model.config.hidden_size, 2
    width = (6 + 2 * k + d) if strategy == "context_coherent" else (1 + 2 * k + d)
    sent = sum(r["bytes"] for rr in res.ranks for r in rr["counters"] if r["kind"] == kind)
    assert sent == round((predicted["cross"] + predicted["split"]) * token_layers) * width * 4


def seq_of(key, prompts):
    """The sequence of a (step, token index) key: prefill indexes every prompt token, decode one per sequence."""
    step, i = key
    if step > 0:
        return i
    lengths = np.cumsum([len(p) for p in prompts])
    return int(np.searchsorted(lengths, i, side="right"))


def test_alltoalls_per_layer_two_then_one(tiny_model):
    model = moe_model(tiny_model, 4, top_k=1)
    gm, reports = build_rank_program(model, 0, 2, "two_alltoall")
    assert set(alltoalls_per_layer(gm).values()) == {2}
    assert "2 Alltoalls per MoE layer" in reports[-1].detail
    gm, reports = build_rank_program(model, 0, 2, "context_coherent")
    assert set(alltoalls_per_layer(gm).values()) == {1}
    assert "2 -> 1" in reports[-1].detail
    # top-1: a token's experts never span ranks, so no partial exchange ever runs
    res = ep_generate(model, PROMPTS, ranks=2, strategy="context_coherent", max_new_tokens=3, timeout_s=60)
    kinds = {r["kind"] for rr in res.ranks for r in rr["counters"]}
    assert "partial" not in kinds and "combine" not in kinds and "migrate" in kinds


def test_dense_model_refused(tiny_model):
    with pytest.raises(TokoptError, match="no Mixture-of-Experts layers"):
        ep_generate(tiny_model("llama"), PROMPTS, ranks=2)


def test_dense_program_refused_by_the_pass(tiny_model):
    from tokopt.passes.manager import run_passes

    from tokopt.passes.expert_parallel import ExpertParallelConfig

    gm = capture_program(tiny_model("qwen3"))
    with pytest.raises(TokoptError, match="qwen3.*no Mixture-of-Experts layers"):
        run_passes(gm, [ExpertParallelConfig(world=2, rank=0)])


def test_experts_not_divisible_by_ranks(tiny_model):
    model = moe_model(tiny_model, 6)
    with pytest.raises(TokoptError, match="do not divide over 4 ranks"):
        build_rank_program(model, 0, 4, "two_alltoall")


def test_placement_for_another_model_refused(tiny_model):
    model = moe_model(tiny_model, 8)
    with pytest.raises(TokoptError, match=r"this model needs \[2 MoE layers, 8 experts\]"):
        build_rank_program(model, 0, 2, "two_alltoall", placement=np.zeros((3, 8), dtype=int))
    with pytest.raises(TokoptError, match="each rank must hold exactly 4"):
        build_rank_program(model, 0, 2, "two_alltoall", placement=np.zeros((2, 8), dtype=int))


def test_unknown_strategy(tiny_model):
    with pytest.raises(TokoptError, match="two_alltoall, context_coherent"):
        ep_generate(tiny_model("mixtral"), PROMPTS, ranks=2, strategy="three_alltoall")


def test_passes_say_why_on_a_decoder_graph(tiny_model):
    from tokopt.models.capture import capture
    from tokopt.passes.manager import run_passes

    gm, reports = run_passes(capture(tiny_model("mixtral")), ["expert_parallel", "fuse_alltoall"])
    assert all(r.matched == 0 and "expert-parallel program" in r.why_not for r in reports)
