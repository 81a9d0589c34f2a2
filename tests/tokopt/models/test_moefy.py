"""MoEfication: the split is exact, trained routers beat untrained ones, the result saves and loads as Mixtral,
bad arguments name what is wrong."""

from __future__ import annotations

import pytest
import torch

from tokopt.errors import TokoptError
from tokopt.models.moefy import (cluster_neurons, collect_ffn_inputs, expert_outputs, moe_output, moefy, split_ffn,
                              train_router)

TEXTS = ["The river town woke slowly before the bakery opened.", "def mean(xs): return sum(xs) / len(xs)"] * 8


class _CharTokenizer:
    """Bytes mod 128 as tokens: enough for a tiny random model's calibration pass."""

    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        class _Out:
            input_ids = [b % 127 + 1 for b in text.encode()]

        return _Out()


@pytest.fixture(scope="module")
def dense():
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model("llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, vocab_size=128, intermediate_size=128, tie_word_embeddings=True)
    return AutoModelForCausalLM.from_config(cfg).eval()


def _logits(model, seed=1):
    ids = torch.randint(1, 128, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids, use_cache=False).logits


@pytest.mark.parametrize("cluster", ["weights", "activations"])
def test_all_experts_active_equals_dense(dense, cluster):
    moe = moefy(dense, _CharTokenizer(), num_experts=8, top_k=8, train=False, cluster=cluster, texts=TEXTS,
                progress=False)
    assert type(moe).__name__ == "MixtralForCausalLM"
    assert moe.lm_head.weight.data_ptr() == moe.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(_logits(moe), _logits(dense), atol=1e-5, rtol=0)


def test_split_ffn_sums_to_dense_ffn(dense):
    mlp = dense.model.layers[0].mlp
    groups = cluster_neurons(mlp, 4)
    assert sorted(groups.flatten().tolist()) == list(range(128))
    gate_up, down = split_ffn(mlp, groups)
    assert gate_up.shape == (4, 64, 64) and down.shape == (4, 64, 32)
    x = torch.randn(10, 64)
    with torch.no_grad():
        torch.testing.assert_close(expert_outputs(gate_up, down, x).sum(1), mlp(x), atol=1e-5, rtol=0)


def test_trained_router_beats_equal_logits(dense):
    rows = torch.randint(1, 128, (4, 64), generator=torch.Generator().manual_seed(0))
    x = collect_ffn_inputs(dense, rows)[1]
    mlp = dense.model.layers[1].mlp
    top_k = 2
    gate_up, down = split_ffn(mlp, cluster_neurons(mlp, 8, inputs=x), scale=top_k)
    outs = expert_outputs(gate_up, down, x)
    with torch.no_grad():
        target = mlp(x)

    def err(weight):
        return ((moe_output(x @ weight.T, outs, top_k) - target).pow(2).sum(-1).mean() / target.pow(2).sum(-1).mean()).item()

    trained = train_router(x, outs, top_k, steps=100)
    assert err(trained) < 0.8 * err(torch.zeros(8, 64))


def test_saved_model_loads_back_with_same_logits(dense, tmp_path):
    from transformers import AutoModelForCausalLM, MixtralForCausalLM

    moe = moefy(dense, _CharTokenizer(), num_experts=4, top_k=2, texts=TEXTS, steps=20, progress=False)
    moe.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(back, MixtralForCausalLM)
    assert back.config.num_local_experts == 4 and back.config.num_experts_per_tok == 2
    assert back.config.sliding_window is None and back.config.tie_word_embeddings
    torch.testing.assert_close(_logits(back), _logits(moe), atol=1e-6, rtol=0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_experts=5), "must divide the FFN width 128"),
    (dict(num_experts=4, top_k=5), "top_k=5 must be between 1 and num_experts=4"),
])
def test_bad_arguments(dense, kwargs, message):
    with pytest.raises(TokoptError, match=message):
        moefy(dense, _CharTokenizer(), texts=TEXTS, progress=False, **kwargs)


def test_non_llama_model_is_refused():
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("gpt2", n_embd=32, n_layer=1, n_head=2, vocab_size=128)
    with pytest.raises(TokoptError, match="dense Llama-family model"):
        moefy(AutoModelForCausalLM.from_config(cfg), _CharTokenizer(), progress=False)


@pytest.mark.slow
def test_full_smollm2_moe_build(tmp_path):
    """The real builder behind tokopt.load("smollm2-moe"), into a temporary directory (2-3 min)."""
    import tokopt
    from tokopt.models.moefy import build_smollm2_moe

    build_smollm2_moe(tmp_path / "smollm2-moe", progress=False)
    moe, tok = tokopt.load(str(tmp_path / "smollm2-moe"))
    assert type(moe).__name__ == "MixtralForCausalLM" and moe.config.num_hidden_layers == 30
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    out = moe.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 4
