"""passes/attention_taps: RAUQ's previous-token attention from q.k - LSE equals eager attention's entries, for
prompts (padded or not), decode steps and tree nodes; logits and cache untouched."""

from __future__ import annotations

import pytest
import torch

from tokopt.models.capture import capture
from tokopt.passes.manager import run_passes
from tokopt.passes.attention_taps import OUTPUT
from tokopt.runtime.eager_engine import EagerEngine
from tokopt.runtime.generate import decode_one_token, prefill_rows
from tokopt.models.kv_cache import KVCache
from tokopt.models.masks import step_mask, tree_structure
from tokopt.uncertainty.sequence_scores import rauq_layers
from tokopt.models.graph_meta import graph_meta


def tapped_engine(model):
    gm, reports = run_passes(capture(model), ["attention_taps"])
    meta = graph_meta(gm)
    return EagerEngine(gm, meta.spec, meta.output_names), reports[0], meta


def eager_attentions(model, ids, valid=None):
    """HF's own attention probabilities [layers][B, H, T, T] (eager implementation)."""
    model.set_attn_implementation("eager")
    try:
        with torch.inference_mode():
            out = model(ids, attention_mask=None if valid is None else valid.long(), output_attentions=True)
    finally:
        model.set_attn_implementation("sdpa")
    return out.attentions


@pytest.fixture(scope="module")
def llama3(tiny_model):
    """A tiny 3-layer Llama (GQA: 4 heads, 2 KV heads) and its tapped engine, shared by the tests below."""
    model = tiny_model("llama", num_hidden_layers=3)
    return model, tapped_engine(model)[0]


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # both grouped-query (folded queries)
def test_prompt_rows_equal_eager_attention(tiny_model, family):
    model = tiny_model(family, num_hidden_layers=6)
    engine, report, meta = tapped_engine(model)
    layers = rauq_layers(6)
    assert report.changed and meta.attention_tap_layers == layers
    torch.manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (2, 7))
    valid = torch.ones_like(ids, dtype=torch.bool)
    out, _ = prefill_rows(engine, ids, valid, torch.arange(7))
    tap = out.extras[OUTPUT]  # [B, R, layers, H]
    assert tap.shape == (2, 7, len(layers), model.config.num_attention_heads)
    att = eager_attentions(model, ids)
    for li, layer in enumerate(layers):
        want = torch.stack([att[layer][:, :, i, i - 1] for i in range(1, 7)], dim=1)  # [B, T-1, H]
        torch.testing.assert_close(tap[:, 1:, li], want, atol=1e-5, rtol=1e-4)
    assert torch.equal(tap[:, 0], torch.zeros_like(tap[:, 0]))  # the first token has no predecessor


def test_left_padded_prompt_and_decode_step(llama3):
    model, engine = llama3
    ids = torch.tensor([[0, 0, 5, 9, 17], [3, 8, 11, 2, 40]])
    valid = torch.tensor([[False, False, True, True, True], [True] * 5])
    out, cache = prefill_rows(engine, ids, valid, torch.tensor([4]))
    step, _ = decode_one_token(engine, cache, torch.tensor([21, 22]), valid.sum(-1))
    layer = rauq_layers(3)[0]
    for b in range(2):  # eager on the unpadded sequence: prompt + the decoded token
        seq = torch.cat([ids[b][valid[b]], torch.tensor([21 + b])])[None]
        att = eager_attentions(model, seq)[layer][0]
        n = seq.shape[1]
        torch.testing.assert_close(out.extras[OUTPUT][b, 0, 0], att[:, n - 2, n - 3], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(step.extras[OUTPUT][b, 0, 0], att[:, n - 1, n - 2], atol=1e-5, rtol=1e-4)


def test_tree_node_sees_its_parent_not_its_left_neighbour(llama3):
    """Nodes 1 and 2 are siblings (children of the root); node 3 is node 1's child: its previous token is node 1,
    and the tap must equal the attention of the same path decoded alone."""
    model, engine = llama3
    prompt = torch.tensor([[4, 7, 9, 12]])
    valid = torch.ones_like(prompt, dtype=torch.bool)
    _, cache = prefill_rows(engine, prompt, valid, torch.tensor([3]))
    tokens = torch.tensor([[30, 31, 32, 33]])
    parents = torch.tensor([-1, 0, 0, 1])
    depth = torch.tensor([0, 1, 1, 2])
    mask = step_mask(cache.valid, tree_structure(parents)[None], dtype=torch.float32)
    tree = engine(tokens, (4 + depth)[None], mask, torch.arange(4), cache.tensors)
    seq = torch.tensor([[4, 7, 9, 12, 30, 31, 33]])  # the path root -> 1 -> 3
    att = eager_attentions(model, seq)[rauq_layers(3)[0]][0]
    for node, row in ((0, 4), (1, 5), (3, 6)):
        torch.testing.assert_close(tree.extras[OUTPUT][0, node, 0], att[:, row, row - 1], atol=1e-5, rtol=1e-4)
    sibling = torch.tensor([[4, 7, 9, 12, 30, 32]])
    att2 = eager_attentions(model, sibling)[rauq_layers(3)[0]][0]
    torch.testing.assert_close(tree.extras[OUTPUT][0, 2, 0], att2[:, 5, 4], atol=1e-5, rtol=1e-4)


def test_logits_and_cache_bit_identical(tiny_model):
    model = tiny_model("qwen2", num_hidden_layers=3)
    plain = capture(model)
    spec = graph_meta(plain).spec
    engine, _, _ = tapped_engine(model)
    ids = torch.tensor([[5, 6, 7, 8]])
    valid = torch.ones_like(ids, dtype=torch.bool)
    a, _ = prefill_rows(EagerEngine(plain, spec), ids, valid, torch.arange(4))
    b, _ = prefill_rows(engine, ids, valid, torch.arange(4))
    assert torch.equal(a.logits, b.logits)
    assert all(torch.equal(x, y) for x, y in zip(a.present, b.present))


def test_explains_when_no_attention_is_found(tiny_model):
    gm = capture(tiny_model("llama", num_hidden_layers=2))
    for node in list(gm.graph.nodes):  # pretend a pass replaced attention with something else
        if node.target is torch.ops.aten.scaled_dot_product_attention.default:
            node.target = torch.ops.aten.clone.default
            node.args, node.kwargs = (node.args[2],), {}
    gm.recompile()
    _, reports = run_passes(gm, ["attention_taps"])
    assert not reports[0].changed and "scaled_dot_product_attention" in reports[0].why_not
    assert "found 0" in reports[0].why_not


def test_cache_of_unused_kv(llama3):
    """KVCache.empty's null slot (slot 0, masked) is never taken as a previous token."""
    model, engine = llama3
    cache = KVCache.empty(engine.spec, 1)
    mask = step_mask(cache.valid, torch.ones(1, 1, 1, dtype=torch.bool), dtype=torch.float32)
    out = engine(torch.tensor([[3]]), torch.tensor([[0]]), mask, torch.tensor([0]), cache.tensors)
    assert torch.equal(out.extras[OUTPUT], torch.zeros_like(out.extras[OUTPUT]))


def test_prev_attention_survives_onnx_export(tiny_model, tmp_path):
    import tokopt
    from tokopt.export.engine_dir import export_engine

    opt = tokopt.optimize(tiny_model("llama", num_hidden_layers=3, vocab_size=256), uncertainty=True)
    ids = torch.tensor([[5, 9, 17, 3, 8, 8, 2]])
    eager_out = opt.generate(ids, max_new_tokens=5)
    eager = opt.last_uncertainty[0]
    path = export_engine(opt, tmp_path / "engine", model_config=opt.model.config.to_dict(), model_name="tiny")
    ort = tokopt.load_engine(path, uncertainty=True)
    assert torch.equal(ort.generate(ids, max_new_tokens=5), eager_out)
    for a, b in zip(ort.last_uncertainty[0], eager):
        torch.testing.assert_close(torch.tensor(a["prev_attention"]), torch.tensor(b["prev_attention"]),
                                   atol=1e-4, rtol=1e-4)
