"""PPD and PPD + Token Recycling: greedy output identical to plain greedy on real Spec-Bench questions, sampling
runs, the tree carries prompt chains, and the shape follows measured latency."""

import pytest
import torch

import tokopt
from tokopt.errors import TokoptError
from tokopt.models.graph_meta import GraphFacts
from tokopt.models.loading import model_fingerprint
from tokopt.runtime.prompts import encode_prompts
from tokopt.runtime.sampling import SamplingParams
from tokopt.runtime.speculative.drafters.ppd import PPDConfig, ParallelPromptDecoding
from tokopt.runtime.speculative.tree_size import LatencyProfile
from tokopt.runtime.speculative.verify import Verdict
from tokopt.runtime.speculative.methods import SpeculativeConfig, build_drafter
from tokopt.runtime.artifacts import save_ppd_artifact

ACCURACY = [[0.3, 0.1, 0.05], [0.2, 0.08, 0.04], [0.15, 0.06, 0.03]]


@pytest.fixture(scope="module")
def ppd_opt(real_model, tokenizer, tmp_path_factory):
    """``optimize(speculative="ppd")`` with an artifact in a private cache (mean-embedding prompt tokens)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("TOKOPT_CACHE", str(tmp_path_factory.mktemp("ppd_cache")))
    embed = real_model.model.embed_tokens.weight
    table = embed.mean(0, keepdim=True).repeat(3, 1).detach() + 0.01 * torch.randn(3, embed.shape[1])
    save_ppd_artifact(table, model_fingerprint(real_model), {"rank_accuracy": ACCURACY})
    try:
        opt = tokopt.optimize(real_model, speculative=SpeculativeConfig("ppd", budget=4), tokenizer=tokenizer)
        yield opt
    finally:
        mp.undo()


def test_missing_artifact_names_train_ppd(real_model, tmp_path, monkeypatch):
    monkeypatch.setenv("TOKOPT_CACHE", str(tmp_path))
    with pytest.raises(TokoptError, match="tokopt train-ppd"):
        tokopt.optimize(real_model, speculative="ppd")


def test_graph_without_slots_refused(opt, tmp_path, monkeypatch):
    monkeypatch.setenv("TOKOPT_CACHE", str(tmp_path))  # no artifact: the shared graph is left untouched
    with pytest.raises(TokoptError, match="tokopt train-ppd"):
        opt.with_speculative("ppd")
    assert opt.engine.facts.ppd is None

    class NoGraph:  # an engine whose graph has no prompt slots
        spec = opt.engine.spec
        facts = GraphFacts()
    with pytest.raises(TokoptError, match="ppd_slots"):
        build_drafter(SpeculativeConfig("ppd"), engine=NoGraph())


@pytest.mark.parametrize("method", ["ppd", "ppd+recycling"])
def test_greedy_equals_plain(ppd_opt, opt, method, spec_bench_questions, pick_questions):
    spec = ppd_opt.with_speculative(SpeculativeConfig(method, budget=4))
    for q in pick_questions(spec_bench_questions, 2):
        ids, mask = encode_prompts(ppd_opt.tokenizer, [q["turns"][0]])
        plain = opt.generate(ids, mask, max_new_tokens=24)
        got = spec.generate(ids, mask, max_new_tokens=24)
        assert torch.equal(got, plain), f"{method} differs from plain greedy on {q['turns'][0][:80]!r}"
        stats = spec.last_stats
        assert max(stats.tree_sizes) >= 1 + 3  # the root and its prompt chain at least
        assert stats.mat >= 1.0


def test_sampling_runs(ppd_opt, tokenizer):
    spec = ppd_opt.with_speculative(SpeculativeConfig("ppd+recycling", budget=4))
    ids, mask = encode_prompts(tokenizer, ["Write a haiku about the sea."])
    out = spec.generate(ids, mask, max_new_tokens=12, do_sample=True, temperature=0.8, seed=3)
    new = out[0, ids.shape[1]:]
    assert 1 <= len(new) <= 12 and int(new.max()) < ppd_opt.engine.spec.vocab_size


def test_tree_has_chains_and_guesses_follow_last_node():
    vocab = 100
    d = ParallelPromptDecoding(vocab, 3, ACCURACY, PPDConfig(budget=4, chain_nodes=2, ranks=3))
    d.start([[1, 2]], SamplingParams())
    tree = d.draft([[1, 2]])[0]  # no guesses yet: root + its chain
    assert tree.tokens == [2, vocab, vocab + 1, vocab + 2] and tree.parents == [-1, 0, 1, 2]
    logits = torch.zeros(1, 4, vocab)
    for j, row in enumerate((1, 2, 3)):
        logits[0, row, 10 * (j + 1)] = 5  # prompt token j's best guess: 10, 20, 30
        logits[0, row, 10 * (j + 1) + 1] = 4
    d.observe(torch.tensor([tree.tokens]), logits, torch.ones(1, 4, dtype=torch.bool))
    d.feedback([tree], [Verdict([0], 7)])
    assert d._guesses[0][0][:2] == [10, 11] and d._guesses[0][2][0] == 30
    tree = d.draft([[1, 2, 7]])[0]
    guesses = [t for t in tree.tokens if t < vocab][1:]
    assert 10 in guesses and sum(t >= vocab for t in tree.tokens) == 3 * 2  # two chains


def test_shape_follows_latency():
    flat = LatencyProfile({1: 0.05, 64: 0.051, 128: 0.052}, 256, "test", "eager")  # a GPU-like profile
    steep = LatencyProfile({1: 0.05, 2: 0.1, 128: 6.4}, 256, "test", "eager")  # every row costs a full forward
    big, small = (ParallelPromptDecoding(100, 3, ACCURACY, PPDConfig(ranks=3)) for _ in range(2))
    big.set_profile(flat, 24)
    small.set_profile(steep, 24)
    assert big.budget > small.budget and big.chain_nodes >= small.chain_nodes and big.chain_len >= small.chain_len


@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("method", ["ppd", "ppd+recycling"])
def test_fifty_questions_128_tokens(ppd_opt, opt, method, batch, spec_bench_questions, pick_questions):
    spec = ppd_opt.with_speculative(method)  # tree size from this machine's measured latency
    questions = pick_questions(spec_bench_questions, 50)
    prompts = [q["turns"][0] for q in questions]
    for start in range(0, len(prompts), batch):
        ids, mask = encode_prompts(ppd_opt.tokenizer, prompts[start:start + batch])
        plain = opt.generate(ids, mask, max_new_tokens=128)
        got = spec.generate(ids, mask, max_new_tokens=128)
        for row in range(ids.shape[0]):
            assert torch.equal(got[row], plain[row]), f"{method} differs on {prompts[start + row][:80]!r}"
