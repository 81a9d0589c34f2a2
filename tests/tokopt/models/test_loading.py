"""tokopt.models.loading: names, local directories and loaded models; the supported-architecture check."""

import pytest
import torch

import tokopt
from tokopt import paths
from tokopt.models import loading as models
from tokopt.errors import TokoptError, UnknownModelError, UnsupportedModelError
from tokopt.models.loading import ALIASES, DEFAULT_MODEL, KNOWN_MODELS, SUPPORTED_ARCHITECTURES, check_supported


def test_unknown_name_raises_naming_the_known_models(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # "no-such-model" is not a directory here
    with pytest.raises(UnknownModelError) as info:
        tokopt.load("no-such-model")
    message = str(info.value)
    assert "no-such-model" in message
    for name in list(KNOWN_MODELS) + list(ALIASES):
        assert name in message
    assert isinstance(info.value, TokoptError)


def test_directory_without_config_raises(tmp_path):
    with pytest.raises(UnknownModelError, match="config.json"):
        tokopt.load(tmp_path)


def test_unsupported_model_type_directory_raises_listing_supported(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError) as info:
        tokopt.load(str(tmp_path))
    message = str(info.value)
    assert "gpt2" in message
    for model_type in SUPPORTED_ARCHITECTURES:
        assert model_type in message


@pytest.mark.parametrize("model_type,family", sorted(SUPPORTED_ARCHITECTURES.items()))
def test_check_supported_each_supported_config(model_type, family):
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type)
    assert config.model_type == model_type
    assert check_supported(config) == family


def test_supported_families():
    assert set(SUPPORTED_ARCHITECTURES.values()) == {"dense", "moe"}
    assert SUPPORTED_ARCHITECTURES["llama"] == "dense" and SUPPORTED_ARCHITECTURES["mixtral"] == "moe"


@pytest.mark.parametrize("model_type", ["gpt2", "bert", "t5"])
def test_check_supported_rejects_others(model_type):
    from transformers import AutoConfig

    with pytest.raises(UnsupportedModelError, match=model_type):
        check_supported(AutoConfig.for_model(model_type))


def test_check_supported_on_an_object_without_model_type():
    with pytest.raises(UnsupportedModelError, match="None"):
        check_supported(object())


def test_load_saved_tiny_qwen2_directory(tmp_path, tiny_model):
    model = tiny_model("qwen2")
    model.save_pretrained(tmp_path)
    loaded, tok = tokopt.load(str(tmp_path))
    assert tok is None  # no tokenizer files in the directory
    assert loaded.config.model_type == "qwen2"
    assert not loaded.training
    assert loaded.name_or_path == str(tmp_path)
    assert next(loaded.parameters()).dtype == torch.float32
    ref_state, state = model.state_dict(), loaded.state_dict()
    assert set(state) == set(ref_state)
    for name, value in ref_state.items():
        assert torch.equal(state[name], value), name
    ids = torch.randint(0, 128, (1, 7))
    with torch.inference_mode():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_load_with_dtype(tmp_path, tiny_model):
    tiny_model("llama").save_pretrained(tmp_path)
    loaded, _ = tokopt.load(tmp_path, dtype=torch.bfloat16)
    assert next(loaded.parameters()).dtype == torch.bfloat16


def test_load_a_loaded_model_returns_it(tiny_model):
    model = tiny_model("qwen2").train()
    loaded, tok = tokopt.load(model)
    assert loaded is model and not loaded.training and tok is None


def test_load_a_loaded_unsupported_model_raises():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        tokopt.load(model)


@pytest.mark.parametrize("name", [None, DEFAULT_MODEL] + sorted(ALIASES))
def test_default_names_and_aliases_resolve_to_the_default_model(monkeypatch, tmp_path, name):
    seen = []
    monkeypatch.setattr(models, "ensure_converted", lambda n, progress=True: seen.append(n) or tmp_path)
    monkeypatch.setattr(models, "_load_dir", lambda path, dtype: ("model", path))
    assert tokopt.load(name) == ("model", tmp_path)
    assert seen == [DEFAULT_MODEL]


def test_cache_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("TOKOPT_CACHE", str(tmp_path))
    assert paths.cache_dir() == tmp_path
    monkeypatch.delenv("TOKOPT_CACHE")
    assert paths.cache_dir().parts[-2:] == (".cache", "tokopt")


def test_ensure_converted_uses_the_cache_without_fetching(monkeypatch, tmp_path):
    target = tmp_path / "models" / DEFAULT_MODEL
    target.mkdir(parents=True)
    (target / "model.safetensors").write_bytes(b"")
    (target / "config.json").write_text("{}")
    monkeypatch.setenv("TOKOPT_CACHE", str(tmp_path))

    def no_fetch(*args, **kwargs):
        raise AssertionError("must not fetch when the cache is complete")

    monkeypatch.setattr(models, "_fetch_gguf", no_fetch)
    assert models.ensure_converted(DEFAULT_MODEL, progress=False) == target


def test_default_model_loads(real):
    model, tokenizer = real
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 30 and model.config.model_type == "llama"
    assert next(model.parameters()).dtype == torch.float32
    assert not model.training
    assert tokenizer is not None and tokenizer.chat_template
    assert tokenizer.decode(tokenizer("Hello world").input_ids) == "Hello world"
