"""Routing traces: loading every accepted format, rejecting bad input, recording from a HF MoE model."""


import numpy as np
import pytest

from tokopt.errors import TokoptError
from tokopt.moe.traces import RoutingTrace, load_trace, record_trace, save_trace


def _write_layer_csv(path, layer, token_ids, gates):
    E = gates.shape[1]
    lines = ["layer_id,token_id," + ",".join(f"expert_{e}" for e in range(E))]
    for t, row in zip(token_ids, gates):
        lines.append(f"{layer},{t}," + ",".join(f"{v:g}" for v in row))
    path.write_text("\n".join(lines) + "\n")


def test_npy_npz_roundtrip(tmp_path):
    experts = np.array([[[1, 0], [2, 3]], [[0, 3], [1, 2]]])
    np.save(tmp_path / "t.npy", experts)
    t = load_trace(tmp_path / "t.npy")
    assert t.experts.shape == (2, 2, 2) and t.num_experts == 4 and t.weights is None
    w = np.array([[[0.2, 0.8], [0.6, 0.4]], [[0.5, 0.5], [0.9, 0.1]]], dtype=np.float32)
    np.savez(tmp_path / "t.npz", experts=experts, weights=w)
    t = load_trace(tmp_path / "t.npz")
    assert t.experts[0, 0].tolist() == [0, 1]  # re-sorted by descending weight
    assert t.weights[0, 0].tolist() == pytest.approx([0.8, 0.2])
    save_trace(t, tmp_path / "back.npz")
    t2 = load_trace(tmp_path / "back.npz")
    assert np.array_equal(t2.experts, t.experts) and np.allclose(t2.weights, t.weights) and t2.num_experts == 4


def test_csv_folder_aligns_tokens_and_sorts_layers(tmp_path):
    rng = np.random.default_rng(0)
    tokens = [3, 1, 2, 0]
    gates = {}
    for layer in (11, 2, 5):  # file order and layer numbers differ on purpose
        g = np.zeros((4, 6), dtype=np.float32)
        for r in range(4):
            g[r, rng.choice(6, 2, replace=False)] = rng.dirichlet([1, 1]).astype(np.float32) + 0.01
        gates[layer] = g
        order = rng.permutation(4)
        _write_layer_csv(tmp_path / f"m_layer{layer}_x.csv", layer, [tokens[i] for i in order], g[order])
    t = load_trace(tmp_path)
    assert t.experts.shape == (4, 3, 2) and t.moe_layers == [2, 5, 11] and t.num_experts == 6
    for li, layer in enumerate((2, 5, 11)):
        for r, tok in enumerate(tokens):
            row = gates[layer][r]
            assert t.experts[tok, li, 0] == int(np.argmax(row))
            assert set(t.experts[tok, li].tolist()) == set(np.flatnonzero(row).tolist())
    # a folder of such folders concatenates their tokens
    parent = tmp_path / "parent"
    for sub in ("1st", "2nd"):
        (parent / sub).mkdir(parents=True)
        for p in tmp_path.glob("*.csv"):
            (parent / sub / p.name).write_text(p.read_text())
    assert load_trace(parent).experts.shape == (8, 3, 2)


def test_bad_inputs_name_the_problem(tmp_path):
    with pytest.raises(TokoptError, match="does not exist"):
        load_trace(tmp_path / "missing.npz")
    np.save(tmp_path / "flat.npy", np.zeros((4, 2), dtype=np.int64))
    with pytest.raises(TokoptError, match=r"3 dims \[tokens, layers, top_k\]"):
        load_trace(tmp_path / "flat.npy")
    with pytest.raises(TokoptError, match="must lie in 0..3"):
        RoutingTrace(np.array([[[-1], [2]]]), None, num_experts=4)
    with pytest.raises(TokoptError, match="weights shape"):
        RoutingTrace(np.zeros((2, 2, 2), dtype=np.int64) + np.array([0, 1]), np.ones((2, 2, 1)), num_experts=2)
    np.savez(tmp_path / "nokey.npz", ids=np.zeros((2, 2, 1), dtype=np.int64))
    with pytest.raises(TokoptError, match="no key 'experts'"):
        load_trace(tmp_path / "nokey.npz")
    (tmp_path / "t.txt").write_text("x")
    with pytest.raises(TokoptError, match="accepted"):
        load_trace(tmp_path / "t.txt")
    d = tmp_path / "csv"
    d.mkdir()
    g = np.array([[0.7, 0.3, 0], [0, 0.6, 0.4]], dtype=np.float32)
    _write_layer_csv(d / "layer1.csv", 1, [0, 1], g)
    _write_layer_csv(d / "layer2.csv", 2, [0, 5], g)
    with pytest.raises(TokoptError, match="different set of token_ids"):
        load_trace(d)
    _write_layer_csv(d / "layer2.csv", 2, [0, 1], np.array([[0.7, 0.3, 0], [0, 0.6, 0]], dtype=np.float32))
    with pytest.raises(TokoptError, match="exactly top_k"):
        load_trace(d)


def test_flame_prefill_and_firstpos(flame_dir):
    t = load_trace(flame_dir("prefill"))
    assert t.experts.shape == (2048, 8, 6) and t.num_experts == 64 and t.moe_layers == list(range(2, 10))
    assert np.all(np.diff(t.weights, axis=2) <= 0)
    first = load_trace(flame_dir("firstpos"))
    assert first.experts.shape == (640, 8, 6)


def test_record_trace_tiny_mixtral():
    torch = pytest.importorskip("torch")
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    cfg = MixtralConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, vocab_size=128,
                        max_position_embeddings=64)
    model = MixtralForCausalLM(cfg).eval()
    ids = torch.randint(0, 128, (3, 5))
    seen = []
    handle = model.model.layers[1].mlp.gate.register_forward_hook(lambda m, a, o: seen.append(o[2].clone()))
    trace = record_trace(model, [ids])
    handle.remove()
    assert trace.experts.shape == (15, 2, 2) and trace.num_experts == 4 and trace.moe_layers == [0, 1]
    assert np.all(np.diff(trace.weights, axis=2) <= 0)
    ref = seen[0].reshape(15, 2).numpy()
    assert [set(r) for r in trace.experts[:, 1].tolist()] == [set(r) for r in ref.tolist()]


def test_record_trace_rejects_dense_model():
    torch = pytest.importorskip("torch")
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, vocab_size=64))
    with pytest.raises(TokoptError, match="no MoE layers"):
        record_trace(model, [torch.zeros((1, 3), dtype=torch.long)])


def test_record_trace_skips_dense_layers_and_masked_tokens():
    torch = pytest.importorskip("torch")
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2MoeConfig(hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                         shared_expert_intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, vocab_size=128,
                         mlp_only_layers=[1])
    model = Qwen2MoeForCausalLM(cfg)
    batch = {"input_ids": torch.randint(0, 128, (2, 4)), "attention_mask": torch.tensor([[0, 1, 1, 1], [1] * 4])}
    trace = record_trace(model, [batch])
    assert trace.moe_layers == [0, 2] and trace.experts.shape == (7, 2, 2) and trace.num_experts == 8
