"""tokopt.runtime.speculative.methods and the API: method names, config checks, clear errors, optimize(speculative=...)."""

import pytest
import torch

import json
from dataclasses import dataclass
from typing import ClassVar

import tokopt
from tokopt.errors import TokoptError
from tokopt.runtime.speculative import configs, methods
from tokopt.runtime.speculative.methods import (DRAFT_MODEL_METHODS, METHODS, PPD_METHODS, REGISTRY, DraftConfig,
                                                DySpecConfig, LookupConfig, PPDConfig, PPDRecyclingConfig,
                                                RecyclingConfig, RecyclingEntropyConfig, RSDConfig, SpecDecConfig,
                                                SpeculativeConfig, build_drafter, register_method)


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
    import importlib

    optimize_module = importlib.import_module("tokopt.api.optimize")  # tokopt.api.optimize is the function
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


# -- per-method configs and the registry ---------------------------------------------------------------------------
CONFIGS = {"recycling": RecyclingConfig, "recycling-entropy": RecyclingEntropyConfig, "lookup": LookupConfig,
           "draft": DraftConfig, "dyspec": DySpecConfig, "rsd": RSDConfig, "specdec++": SpecDecConfig,
           "ppd": PPDConfig, "ppd+recycling": PPDRecyclingConfig}

# a config of every method with fields away from their defaults
NON_DEFAULT = [
    RecyclingConfig(budget=5, max_nodes=12, k=4, max_depth=5, lookup_nodes=0, update_from_prefill=False,
                    reshape_every=3),
    RecyclingEntropyConfig(budget="auto", max_nodes=9, edges=(1.0, 2.5)),
    LookupConfig(budget=6, max_ngram=4, min_ngram=2, branches=1),
    DraftConfig(budget=3, draft_layers=(0, 2, 3)),
    DraftConfig(draft_model="HuggingFaceTB/SmolLM2-135M-Instruct"),
    DySpecConfig(budget=12, max_depth=4, threshold=0.01),
    RSDConfig(budget=7, widths=(3, 2, 1), draft_layers=(1,)),
    SpecDecConfig(budget=6, head="/tmp/head.pt", threshold=0.5, draft_layers=(0,)),
    PPDConfig(budget=4, max_nodes=16, chain_nodes=3, ranks=5, max_chain_nodes=4, chain_len=2, reshape_every=8),
    PPDRecyclingConfig(budget=4, recycling=RecyclingConfig(budget=3, lookup_nodes=1)),
]


def test_registry_maps_every_method_to_its_config_and_a_builder():
    assert {name: m.config for name, m in REGISTRY.items()} == CONFIGS
    assert all(callable(m.build) and m.config.method == name for name, m in REGISTRY.items())
    assert PPD_METHODS == ("ppd", "ppd+recycling")
    assert DRAFT_MODEL_METHODS == ("draft", "dyspec", "rsd", "specdec++")


@pytest.mark.parametrize("method", list(CONFIGS))
def test_every_registered_config_round_trips_through_json(method):
    cls = REGISTRY[method].config
    for config in [cls(), cls(budget=3), *(c for c in NON_DEFAULT if type(c) is cls)]:
        data = json.loads(json.dumps(config.to_dict()))  # what a manifest holds
        assert data["method"] == method
        assert SpeculativeConfig.from_dict(data) == config
        assert cls.from_dict(data) == config
        assert SpeculativeConfig.coerce(data) == config


def test_a_draft_model_object_is_written_as_its_name(tiny_model):
    model = tiny_model("llama")
    model.name_or_path = "org/tiny-draft"
    assert DraftConfig(draft_model=model).to_dict()["draft_model"] == "org/tiny-draft"
    assert DySpecConfig().to_dict()["draft_model"] is None


def test_one_recycling_config_for_the_method_and_the_drafter():
    from tokopt.runtime.speculative.drafters.lookup import LookupConfig as DrafterLookup
    from tokopt.runtime.speculative.drafters.ppd import PPDConfig as DrafterPPD
    from tokopt.runtime.speculative.drafters.recycling import RecyclingConfig as DrafterRecycling, TokenRecycling

    assert tokopt.RecyclingConfig is RecyclingConfig is DrafterRecycling
    assert LookupConfig is DrafterLookup and PPDConfig is DrafterPPD
    assert TokenRecycling(50, RecyclingConfig()).config.budget == 8  # "auto" starts from 8 nodes
    assert TokenRecycling(50, RecyclingConfig(budget=3)).config.budget == 3


def test_top_package_exports_every_method_config():
    for cls in CONFIGS.values():
        assert getattr(tokopt, cls.__name__) is cls
    assert tokopt.register_method is register_method


def test_names_and_the_compatible_entry_give_the_method_configs():
    assert SpeculativeConfig("dyspec", budget=12) == DySpecConfig(budget=12)
    assert SpeculativeConfig() == RecyclingConfig()
    for name, cls in CONFIGS.items():
        config = SpeculativeConfig.coerce(name)
        assert type(config) is cls and config.method == name and isinstance(config, SpeculativeConfig)
        assert SpeculativeConfig(name) == cls()
    config = RecyclingConfig(budget=12)
    assert SpeculativeConfig.coerce(config) is config


def test_the_flat_keywords_of_earlier_versions_still_work():
    pure = RecyclingConfig(lookup_nodes=0)
    assert SpeculativeConfig("recycling", budget=80, max_nodes=80, recycling=pure) == \
        RecyclingConfig(budget=80, max_nodes=80, lookup_nodes=0)
    assert SpeculativeConfig("ppd", budget=6, ppd=PPDConfig(chain_nodes=2, chain_len=3)) == \
        PPDConfig(budget=6, chain_nodes=2, chain_len=3)
    assert SpeculativeConfig("ppd+recycling", recycling=pure) == PPDRecyclingConfig(recycling=pure)
    assert SpeculativeConfig("lookup", lookup=LookupConfig(branches=1)) == LookupConfig(branches=1)
    assert SpeculativeConfig("recycling-entropy", entropy_edges=(1.0,)) == RecyclingEntropyConfig(edges=(1.0,))
    assert SpeculativeConfig("rsd", rsd_widths=(3, 1), draft_layers=[0]) == RSDConfig(widths=(3, 1), draft_layers=(0,))
    assert SpeculativeConfig("dyspec", dyspec_max_depth=3, dyspec_threshold=0.1) == \
        DySpecConfig(max_depth=3, threshold=0.1)
    assert SpeculativeConfig("specdec++", draft_layers=(0,), specdec_head="h.pt", specdec_threshold=0.4,
                             specdec_max_length=5) == SpecDecConfig(budget=5, draft_layers=(0,), head="h.pt",
                                                                    threshold=0.4)
    assert SpeculativeConfig("draft", draft_length=6) == DraftConfig(budget=6)
    assert SpeculativeConfig("draft", budget=2, draft_length=6) == DraftConfig(budget=2)  # budget wins, as before
    assert SpeculativeConfig("lookup", draft_model=None, max_nodes=32) == LookupConfig()  # defaults: ignored


@pytest.mark.parametrize("make,needle", [
    (lambda: SpeculativeConfig("lookup", rsd_widths=(1,)), "rsd_widths does not apply to speculative method 'lookup'"),
    (lambda: SpeculativeConfig("recycling", nodes=3), "unknown keyword 'nodes'"),
    (lambda: RecyclingConfig(budget=0), "recycling budget must be 'auto' or an int >= 1"),
    (lambda: RecyclingConfig(budget=True), "budget must be 'auto'"),
    (lambda: RecyclingConfig(k=65), r"k \(successors kept per token\) must be in 1..64, got 65"),
    (lambda: RecyclingConfig(max_nodes=0), "max_nodes"),
    (lambda: RecyclingEntropyConfig(edges=(2.0, 1.0)), "edges must be positive, strictly increasing"),
    (lambda: LookupConfig(min_ngram=3, max_ngram=2), "need 1 <= min_ngram <= max_ngram"),
    (lambda: DraftConfig(draft_layers=()), "draft_layers must be None"),
    (lambda: DraftConfig(draft_layers=(0,), draft_model="m"), "give draft_layers or draft_model, not both"),
    (lambda: DySpecConfig(max_depth=0), r"max_depth \(deepest tree level\) must be an int >= 1"),
    (lambda: RSDConfig(widths=(2, 0)), "widths must be one or more ints >= 1"),
    (lambda: SpecDecConfig(threshold=1.0), r"threshold must be a probability in \(0, 1\), got 1.0"),
    (lambda: DySpecConfig(threshold="low"), r"threshold must be a probability in \[0, 1\]"),
    (lambda: PPDConfig(chain_len=0), r"chain_len \(prompt tokens per chain; None: all\) must be an int >= 1, got 0"),
    (lambda: LookupConfig(branches="2"), "branches .* must be an int >= 1, got '2'"),
    (lambda: PPDRecyclingConfig(recycling=LookupConfig()), "recycling must be a RecyclingConfig"),
    (lambda: SpeculativeConfig.from_dict({"method": "lookup", "width": 2}), "LookupConfig .* has no field 'width'"),
    (lambda: SpeculativeConfig.from_dict({"method": "medusa"}), "unknown speculative method 'medusa'"),
    (lambda: RecyclingConfig.from_dict({"method": "lookup"}), "got a 'lookup' config"),
])
def test_bad_method_configs_name_what_is_wrong(make, needle):
    with pytest.raises(TokoptError, match=needle):
        make()


def test_configs_are_frozen_and_hashable():
    config = RSDConfig(widths=[2, 1])
    assert config.widths == (2, 1) and hash(config) == hash(RSDConfig(widths=(2, 1)))
    with pytest.raises(AttributeError):
        config.budget = 3


def test_optimize_takes_a_method_config(tiny_opt):
    ids = torch.tensor([[5, 6, 7, 8, 5, 6, 7, 8, 5, 6]])
    plain = tiny_opt.generate(ids, max_new_tokens=16)
    opt = tiny_opt.with_speculative(tokopt.RecyclingConfig(budget=4, lookup_nodes=0))
    assert opt.speculative == RecyclingConfig(budget=4, lookup_nodes=0) and opt.speculative.method == "recycling"
    assert opt.drafter.config.budget == 4 and opt.drafter.config.lookup_nodes == 0
    assert torch.equal(opt.generate(ids, max_new_tokens=16), plain)
    entropy = tiny_opt.with_speculative(RecyclingEntropyConfig(budget=3, edges=(1.0,)))
    assert entropy.drafter.edges == (1.0,) and entropy.drafter.bucket_budgets == [3, 3]
    assert torch.equal(entropy.generate(ids, max_new_tokens=16), plain)


def test_build_drafter_is_a_registry_lookup_and_new_methods_register(tiny_opt, monkeypatch):
    from tokopt.runtime.speculative.drafters.lookup import PromptLookup

    monkeypatch.setattr(configs, "_CONFIGS", dict(configs._CONFIGS))  # the test's method leaves no trace
    monkeypatch.setattr(methods, "_REGISTRY", dict(methods._REGISTRY))

    @dataclass(frozen=True)
    class EchoConfig(SpeculativeConfig):
        method: ClassVar[str] = "echo-lookup"
        branches: int = 1

    built = []

    @register_method(EchoConfig)
    def build_echo(config, *, engine, target_model=None, tokenizer=None, model_key=""):
        built.append(config)
        return PromptLookup(LookupConfig(branches=config.branches))

    assert "echo-lookup" in methods.METHODS and "echo-lookup" not in METHODS  # read when asked for
    opt = tiny_opt.with_speculative("echo-lookup")
    assert built == [EchoConfig()] and opt.speculative.method == "echo-lookup"
    ids = torch.tensor([[5, 6, 7, 8, 5, 6, 7, 8, 5, 6]])
    assert torch.equal(opt.generate(ids, max_new_tokens=12), tiny_opt.generate(ids, max_new_tokens=12))
    assert SpeculativeConfig.from_dict(EchoConfig(budget=2).to_dict()) == EchoConfig(budget=2)
    assert isinstance(build_drafter(LookupConfig(budget=2), engine=tiny_opt.engine), PromptLookup)
    with pytest.raises(TokoptError, match="SpeculativeConfig subclass"):
        register_method(SpeculativeConfig)  # names no method


def test_a_config_without_a_registered_builder_says_how_to_register_one(tiny_opt, monkeypatch):
    monkeypatch.setattr(configs, "_CONFIGS", dict(configs._CONFIGS))

    @dataclass(frozen=True)
    class Unbuilt(SpeculativeConfig):
        method: ClassVar[str] = "unbuilt"

    with pytest.raises(TokoptError, match=r"register_method\(Unbuilt, build\)"):
        build_drafter(Unbuilt(), engine=tiny_opt.engine)
