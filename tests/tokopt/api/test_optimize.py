"""tokopt.optimize: capture + passes + an OptimizedModel that generates; its report; on tiny and real models."""

import pytest
import torch

import tokopt
from tokopt.errors import TokoptError, UnsupportedModelError
from tokopt.api.optimize import DEFAULT_PASSES, OptimizeConfig
from tokopt.api.optimized_model import GenerationDefaults, OptimizedModel
from tokopt.models.graph_meta import graph_meta


@pytest.fixture(scope="module")
def tiny_qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         vocab_size=128, intermediate_size=128)
    return Qwen2ForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tiny_opt(tiny_qwen2):
    return tokopt.optimize(tiny_qwen2)


def _report_lines(report):
    return str(report).splitlines()


def test_optimize_tiny_qwen2_report_prints_as_a_table(tiny_opt):
    assert isinstance(tiny_opt, OptimizedModel)
    lines = _report_lines(tiny_opt.report)
    assert lines[0].startswith("capture: torch.export in ")
    assert lines[1].split() == ["pass", "matched", "changed", "time", "detail"]
    assert set(lines[2].replace(" ", "")) == {"-"}
    rows = {line.split()[0]: line for line in lines[3:]}
    assert list(rows) == list(DEFAULT_PASSES)
    assert rows["entropy_tap"].split()[1:3] == ["1", "yes"]
    for r in tiny_opt.report.passes:  # every row shows the detail, or why nothing matched
        assert (r.detail if r.matched else f"nothing matched: {r.why_not}") in rows[r.name]
    d = tiny_opt.report.to_dict()
    assert d["capture_s"] > 0 and [p["name"] for p in d["passes"]] == list(DEFAULT_PASSES)
    assert tiny_opt.config == OptimizeConfig()
    assert tiny_opt.spec.model_type == "qwen2" and tiny_opt.spec.num_layers == 2
    assert "qwen2" in repr(tiny_opt) and "eager" in repr(tiny_opt)


def test_optimize_tiny_qwen2_generates_like_hf(tiny_opt, tiny_qwen2):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128, (2, 6), generator=gen)
    am = torch.ones_like(ids)
    am[0, :2] = 0
    with torch.inference_mode():
        ref = tiny_qwen2.generate(ids, attention_mask=am, max_new_tokens=8, do_sample=False, pad_token_id=0)
    out = tiny_opt.generate(ids, am, max_new_tokens=8, pad_token_id=0)
    assert torch.equal(out, ref)
    taps = tiny_opt.last_result.taps
    assert set(taps) == {"entropy", "max_logprob"} and taps["entropy"].shape == (2, 8)


def test_optimize_without_passes_has_no_taps(tiny_qwen2):
    opt = tokopt.optimize(tiny_qwen2, OptimizeConfig(passes=()))
    assert opt.report.passes == []
    assert len(_report_lines(opt.report)) == 3  # capture line, header, rule
    assert graph_meta(opt.graph_module).history == []
    opt.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3)
    assert opt.last_result.taps == {}
    assert opt.last_result.new_tokens.shape == (1, 3)


def test_optimize_with_unknown_pass_raises(tiny_qwen2):
    with pytest.raises(TokoptError, match="no_such_pass"):
        tokopt.optimize(tiny_qwen2, OptimizeConfig(passes=("no_such_pass",)))


def test_optimize_refuses_unsupported_models():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).eval()
    with pytest.raises(UnsupportedModelError):
        tokopt.optimize(model)


def test_optimize_config_to_dict():
    assert OptimizeConfig().to_dict() == {"passes": DEFAULT_PASSES}
    assert OptimizeConfig(passes=["entropy_tap"]).to_dict() == {"passes": ("entropy_tap",)}


def test_optimize_config_validates_pass_names():
    with pytest.raises(TokoptError, match="no_such_pass"):
        OptimizeConfig(passes=("entropy_tap", "no_such_pass"))
    with pytest.raises(TokoptError, match="string"):
        OptimizeConfig(passes="entropy_tap")


def test_generation_defaults_from_model_configs(tiny_qwen2):
    class Gen:
        eos_token_id = [2, 7]
        pad_token_id = 0

    class Model:
        generation_config = Gen()
        config = None

    assert GenerationDefaults.from_model(Model()) == GenerationDefaults((2, 7), 0)
    Gen.eos_token_id, Gen.pad_token_id = 5, None
    assert GenerationDefaults.from_model(Model()) == GenerationDefaults((5,), None)
    assert GenerationDefaults.from_model(tiny_qwen2) == GenerationDefaults((), None)


def test_optimize_real_model(opt, real_model, tokenizer):
    """The shared ``tokopt.optimize(model)`` of SmolLM2: report, graph metadata, tokenizer found beside it."""
    rows = {line.split()[0]: line for line in _report_lines(opt.report)[3:]}
    assert list(rows) == list(DEFAULT_PASSES)
    assert rows["entropy_tap"].split()[1:3] == ["1", "yes"]
    meta = graph_meta(opt.graph_module)
    assert [h["name"] for h in meta.history] == list(DEFAULT_PASSES)
    assert meta.output_names[-2:] == ["entropy", "max_logprob"]
    assert opt.spec.num_layers == real_model.config.num_hidden_layers
    assert opt.defaults == GenerationDefaults((real_model.generation_config.eos_token_id,),
                                              real_model.generation_config.pad_token_id)
    assert opt.tokenizer is not None
    assert opt.tokenizer("Hello").input_ids == tokenizer("Hello").input_ids
    assert opt.engine.name == "eager"
