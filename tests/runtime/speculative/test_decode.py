"""The speculative loop on tiny models of every family: greedy output equals plain greedy for every drafter
and policy, at batch 1 and with left-padded batches (so the KV cache compaction and the per-row positions
are right: any error changes later tokens); EOS and budgets end rows like plain decoding; taps of accepted
tokens equal plain decoding's."""

import pytest
import torch

from tokopt.models.decoder_graph import DecoderGraph
from tokopt.runtime.eager_engine import EagerEngine
from tokopt.runtime.generate import generate
from tokopt.runtime.sampling import SamplingParams
from tokopt.runtime.speculative.decode import speculative_generate
from tokopt.runtime.speculative.drafters.draft_model import ChainPolicy, DraftModelDrafter, DraftRunner
from tokopt.runtime.speculative.drafters.dyspec import DySpecPolicy
from tokopt.runtime.speculative.drafters.lookup import LookupConfig, PromptLookup
from tokopt.runtime.speculative.drafters.recycling import RecyclingConfig, TokenRecycling
from tokopt.runtime.speculative.drafters.rsd import RSDPolicy

FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]


def engine_of(model):
    graph = DecoderGraph(model).eval()
    return EagerEngine(graph, graph.spec)


def drafters(model, spec):
    return {
        "recycling": TokenRecycling(spec.vocab_size, RecyclingConfig(budget=6, lookup_nodes=0)),
        "recycling+lookup": TokenRecycling(spec.vocab_size, RecyclingConfig(budget=4, lookup_nodes=3)),
        "lookup": PromptLookup(LookupConfig(budget=5)),
        "draft": DraftModelDrafter(DraftRunner.from_model(model, keep_layers=[0]), ChainPolicy(3)),
        "dyspec": DraftModelDrafter(DraftRunner.from_model(model, keep_layers=[1]), DySpecPolicy(budget=6)),
        "rsd": DraftModelDrafter(DraftRunner.from_model(model, keep_layers=[0]), RSDPolicy((2, 2, 1))),
    }


def repetitive_prompts(batch, vocab, seed=0):
    """Prompts with repeats (so lookup and recycling have something to find), left-padded to one width."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for b in range(batch):
        motif = torch.randint(3, vocab, (5,), generator=g).tolist()
        rows.append((motif * 3)[: 8 + 3 * b])
    width = max(len(r) for r in rows)
    ids = torch.zeros(batch, width, dtype=torch.long)
    mask = torch.zeros(batch, width, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, width - len(r):] = torch.tensor(r)
        mask[b, width - len(r):] = 1
    return ids, mask


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_equals_plain_for_every_drafter(tiny_model, family):
    model = tiny_model(family)
    engine = engine_of(model)
    for batch in (1, 3):
        ids, mask = repetitive_prompts(batch, engine.spec.vocab_size, seed=batch)
        plain = generate(engine, ids, mask, max_new_tokens=24)
        for name, drafter in drafters(model, engine.spec).items():
            spec = speculative_generate(engine, ids, mask, drafter=drafter, max_new_tokens=24)
            assert torch.equal(spec.sequences, plain.sequences), f"{family} {name} batch {batch}"
            assert spec.stats.steps < 24 or name != "lookup"  # speculation ran (and lookup found repeats)
            assert sum(map(sum, spec.stats.accepted)) >= int(spec.generated_counts.sum()) - batch


def test_speculation_accepts_more_than_one_token_per_step(tiny_model):
    model = tiny_model("llama")
    engine = engine_of(model)
    ids, mask = repetitive_prompts(1, engine.spec.vocab_size)
    drafter = TokenRecycling(engine.spec.vocab_size, RecyclingConfig(budget=8))
    for _ in range(2):  # the second request reuses what the first one recycled
        spec = speculative_generate(engine, ids, mask, drafter=drafter, max_new_tokens=48)
    assert spec.stats.mat > 1.5
    assert spec.stats.steps < 48


def test_eos_and_max_new_tokens_end_rows_like_plain(tiny_model):
    model = tiny_model("qwen2")
    engine = engine_of(model)
    ids, mask = repetitive_prompts(3, engine.spec.vocab_size, seed=4)
    plain = generate(engine, ids, mask, max_new_tokens=30)
    eos = int(plain.new_tokens[1, 5])  # a token that row 1 emits mid-way
    plain = generate(engine, ids, mask, max_new_tokens=30, eos_token_ids=(eos,), pad_token_id=0)
    spec = speculative_generate(engine, ids, mask, drafter=PromptLookup(LookupConfig(budget=6)), max_new_tokens=30,
                                eos_token_ids=(eos,), pad_token_id=0)
    assert torch.equal(spec.sequences, plain.sequences)
    assert torch.equal(spec.generated_counts, plain.generated_counts)


def test_taps_of_accepted_tokens_come_from_their_verify_rows(tiny_model):
    """A graph output added by a pass is reported per emitted token; under speculation it must equal plain
    decoding's value for the same token (computed at the node that predicted it)."""
    import tokopt

    model = tiny_model("llama")
    plain = tokopt.optimize(model)  # default passes include entropy_tap
    ids, mask = repetitive_prompts(2, model.config.vocab_size, seed=2)
    plain.generate(ids, mask, max_new_tokens=20)
    spec = plain.with_speculative(tokopt.SpeculativeConfig("recycling", budget=6))
    for _ in range(2):
        spec.generate(ids, mask, max_new_tokens=20)
    assert spec.last_stats.mat > 1.0
    a, b = plain.last_result.taps["entropy"], spec.last_result.taps["entropy"]
    assert a.shape == b.shape
    torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)


def test_sampling_runs_for_every_drafter_and_is_repeatable(tiny_model):
    model = tiny_model("llama")
    engine = engine_of(model)
    ids, mask = repetitive_prompts(2, engine.spec.vocab_size)
    params = SamplingParams(do_sample=True, temperature=0.8, top_k=20, seed=3)
    for name, drafter in drafters(model, engine.spec).items():
        a = speculative_generate(engine, ids, mask, drafter=drafter, max_new_tokens=12, sampling=params)
        b = speculative_generate(engine, ids, mask, drafter=drafters(model, engine.spec)[name], max_new_tokens=12,
                                 sampling=params)
        assert a.new_tokens.shape[1] == 12, name
        if name != "recycling" and name != "recycling+lookup":  # recycling's state differs between the two
            assert torch.equal(a.sequences, b.sequences), name
