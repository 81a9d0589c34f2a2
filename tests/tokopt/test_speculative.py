"""tokopt.speculative and the API: method names, config checks, clear errors, optimize(speculative=...)."""

import pytest
import torch

import tokopt
from tokopt.errors import TokoptError
from tokopt.speculative import METHODS, SpeculativeConfig


def test_method_names_are_the_documented_ones():
    assert METHODS == ("recycling", "recycling-entropy", "lookup", "draft", "dyspec", "rsd", "specdec++", "ppd",
                       "ppd+recycling")


@pytest.mark.parametrize("kw,needle", [
    (dict(method="medusa"), "unknown speculative method 'medusa'"),
    (dict(budget=0), "budget must be 'auto' or an int >= 1"),
    (dict(budget="big"), "budget must be 'auto'"),
    (dict(max_nodes=0), "max_nodes"),
])
def test_bad_configs_name_the_problem(kw, needle):
    with pytest.raises(TokoptError, match=needle):
        SpeculativeConfig(**kw)


def test_coerce_accepts_names_and_configs_only():
    assert SpeculativeConfig.coerce("lookup").method == "lookup"
    cfg = SpeculativeConfig("rsd")
    assert SpeculativeConfig.coerce(cfg) is cfg
    with pytest.raises(TokoptError, match="method name"):
        SpeculativeConfig.coerce(3)


def test_optimize_rejects_a_bad_method_before_capturing(tiny_model, monkeypatch):
    import sys

    optimize_module = sys.modules["tokopt.optimize"]  # the attribute tokopt.optimize is the function
    monkeypatch.setattr(optimize_module, "capture", lambda m: pytest.fail("captured before checking"))
    with pytest.raises(TokoptError, match="unknown speculative method"):
        tokopt.optimize(tiny_model("llama"), speculative="nope")


@pytest.fixture(scope="module")
def tiny_opt(tiny_model):
    return tokopt.optimize(tiny_model("qwen2"), tokopt.OptimizeConfig(passes=()))


def test_optimize_with_speculative_generates_losslessly_and_reports_stats(tiny_opt):
    ids = torch.tensor([[5, 6, 7, 8, 5, 6, 7, 8, 5, 6]])
    plain = tiny_opt.generate(ids, max_new_tokens=20)
    assert tiny_opt.last_stats is None
    for method, extra in [("recycling", {}), ("lookup", {}), ("draft", dict(draft_layers=(0,))),
                          ("dyspec", dict(draft_layers=(1,))), ("rsd", dict(draft_layers=(0,)))]:
        opt = tiny_opt.with_speculative(SpeculativeConfig(method, budget=4, **extra))
        assert torch.equal(opt.generate(ids, max_new_tokens=20), plain), method
        stats = opt.last_stats
        assert stats.steps >= 1 and stats.mat >= 1.0
        assert sum(stats.accepted[0]) == 19  # every token after the prefill's came from a verify step
        assert "speculative=" + method in repr(opt)


def test_budget_auto_sizes_recycling_from_measured_latency(tiny_opt, tmp_path, monkeypatch):
    monkeypatch.setenv("TOKOPT_CACHE", str(tmp_path))
    opt = tiny_opt.with_speculative(SpeculativeConfig("recycling", max_nodes=6))
    assert list((tmp_path / "latency").glob("*.json"))  # measured on this machine, cached
    assert 1 <= opt.drafter.config.budget <= 6


def test_draft_model_with_another_vocabulary_is_refused(tiny_opt, tiny_model):
    other = tiny_model("qwen2", vocab_size=96)
    with pytest.raises(TokoptError, match="vocabulary .*96.* differs"):
        tiny_opt.with_speculative(SpeculativeConfig("draft", draft_model=other))


def test_draft_tokenizer_with_other_ids_is_refused():
    from tokopt.runtime.speculative.drafters.draft_model import check_same_tokenizer

    class Tok:
        def __init__(self, vocab):
            self.vocab = vocab

        def get_vocab(self):
            return self.vocab

    check_same_tokenizer(Tok({"a": 0, "b": 1}), Tok({"a": 0, "b": 1}), 2, 2)
    with pytest.raises(TokoptError, match="maps tokens to different ids"):
        check_same_tokenizer(Tok({"a": 0, "b": 1}), Tok({"a": 1, "b": 0}), 2, 2)


def test_specdec_without_a_trained_head_says_how_to_train_one(tiny_opt, tmp_path, monkeypatch):
    monkeypatch.setenv("TOKOPT_CACHE", str(tmp_path))
    with pytest.raises(TokoptError, match="tokopt train-specdec"):
        tiny_opt.with_speculative(SpeculativeConfig("specdec++", draft_layers=(0,)))
