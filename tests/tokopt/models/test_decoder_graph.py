"""tokopt.models.decoder_graph: logits equal the HF model's for prompts, tree verification and compacted caches,
on the real model and on tiny models of every supported family."""

import pytest
import torch

from tokopt.errors import UnsupportedModelError
from tokopt.models.loading import SUPPORTED_ARCHITECTURES
from tokopt.models.decoder_graph import DecoderGraph, cache_names, graph_spec
from tokopt.models.kv_cache import KVCache
from tokopt.models.masks import causal_structure, prompt_positions, step_mask, tree_structure

ATOL = 1e-4
RTOL = 1e-5  # fp32 logits reach ~30: allow a few ulps of relative error on top


@pytest.fixture(scope="module")
def graph(real_model):
    return DecoderGraph(real_model).eval()


@pytest.fixture(scope="module")
def prompt_ids(tokenizer):
    ids = tokenizer("The quick brown fox jumps over", return_tensors="pt").input_ids
    assert ids.shape[1] >= 4
    return ids


def run_graph(graph, ids, positions, mask, rows, cache):
    with torch.inference_mode():
        logits, *present = graph(ids, positions, mask, rows, *cache.tensors)
    return logits, present


def prefill(graph, ids, rows=None):
    batch, n = ids.shape
    cache = KVCache.empty(graph.spec, batch)
    valid = torch.ones(batch, n, dtype=torch.bool)
    mask = step_mask(cache.valid, causal_structure(n, batch), new_valid=valid)
    rows = torch.arange(n) if rows is None else rows
    logits, present = run_graph(graph, ids, prompt_positions(valid), mask, rows, cache)
    return logits, cache.extend(present, valid)


def test_spec_of_real_model(graph, real_model):
    cfg = real_model.config
    spec = graph.spec
    assert spec == graph_spec(real_model)
    assert (spec.num_layers, spec.num_kv_heads, spec.vocab_size, spec.model_type) == (
        cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.vocab_size, cfg.model_type)
    assert spec.head_dim == cfg.hidden_size // cfg.num_attention_heads
    assert spec.input_names[:4] == ["input_ids", "position_ids", "attention_mask", "logits_rows"]
    assert spec.input_names[4:] == cache_names("past", spec.num_layers)
    assert spec.output_names == ["logits"] + cache_names("present", spec.num_layers)
    assert cache_names("past", 2) == ["past_key.0", "past_value.0", "past_key.1", "past_value.1"]


def test_prompt_logits_equal_hf(graph, real_model, prompt_ids):
    n = prompt_ids.shape[1]
    logits, cache = prefill(graph, prompt_ids)
    with torch.inference_mode():
        ref = real_model(prompt_ids).logits
    assert logits.shape == ref.shape == (1, n, graph.spec.vocab_size)
    torch.testing.assert_close(logits, ref, atol=ATOL, rtol=RTOL)
    # present = past (the null slot) followed by the prompt's keys/values
    assert cache.length == n + 1 and cache.valid[0].tolist() == [False] + [True] * n
    assert len(cache.tensors) == 2 * graph.spec.num_layers
    for t in cache.tensors:
        assert t.shape == (1, graph.spec.num_kv_heads, n + 1, graph.spec.head_dim)
        assert not t[:, :, 0].any()  # the null slot is carried through unchanged
    # logits_rows picks rows: only the last one
    last, _ = prefill(graph, prompt_ids, rows=torch.tensor([n - 1]))
    assert last.shape == (1, 1, graph.spec.vocab_size)
    torch.testing.assert_close(last[0, 0], ref[0, -1], atol=ATOL, rtol=RTOL)


PARENTS = [-1, 0, 0, 1, 1, 2, 4]  # 0 -> {1, 2}; 1 -> {3, 4}; 2 -> 5; 4 -> 6


def _path(parents, node):
    path = []
    while node >= 0:
        path.append(node)
        node = parents[node]
    return path[::-1]


def test_tree_verify_then_compact_then_decode(graph, real_model, prompt_ids):
    """Feed a prompt, then a draft tree in one step; each node's logits equal running its root-to-node path as a
    plain sequence. Compacting the cache to an accepted path (per row) then decodes like the plain sequence."""
    batch = 2
    prompt = prompt_ids.expand(batch, -1).contiguous()
    p = prompt.shape[1]
    _, cache = prefill(graph, prompt, rows=torch.tensor([p - 1]))

    gen = torch.Generator().manual_seed(0)
    n = len(PARENTS)
    tree_tokens = torch.randint(100, graph.spec.vocab_size, (n + 1,), generator=gen)
    extra_token = int(tree_tokens[n])  # decoded after row 1's accepted path
    tree_tokens = tree_tokens[:n]
    parents = torch.tensor(PARENTS)
    depth = torch.tensor([len(_path(PARENTS, i)) - 1 for i in range(n)])
    ids = tree_tokens.expand(batch, n).contiguous()
    positions = (p + depth).expand(batch, n).contiguous()
    mask = step_mask(cache.valid, tree_structure(parents))
    logits, present = run_graph(graph, ids, positions, mask, torch.arange(n), cache)
    assert logits.shape == (batch, n, graph.spec.vocab_size)
    assert torch.equal(logits[0], logits[1])

    # references: plain sequences whose prefixes are the root-to-node paths of every node
    # (row 0 will accept [0, 1, 4] and decode node 6's token; row 1 accepts [0, 2, 5] and decodes extra_token)
    prompt_list = prompt_ids[0].tolist()
    plain = {
        "013": prompt_list + tree_tokens[[0, 1, 3]].tolist(),
        "0146": prompt_list + tree_tokens[[0, 1, 4, 6]].tolist(),
        "025x": prompt_list + tree_tokens[[0, 2, 5]].tolist() + [extra_token],
    }
    with torch.inference_mode():
        ref = {k: real_model(torch.tensor([v])).logits[0] for k, v in plain.items()}
    where = {0: ("013", p), 1: ("013", p + 1), 3: ("013", p + 2), 4: ("0146", p + 2), 6: ("0146", p + 3),
             2: ("025x", p + 1), 5: ("025x", p + 2)}
    assert sorted(where) == list(range(n))
    for node, (key, row) in where.items():
        assert plain[key][:row + 1] == prompt_list + tree_tokens[_path(PARENTS, node)].tolist()
        torch.testing.assert_close(logits[0, node], ref[key][row], atol=ATOL, rtol=RTOL,
                                   msg=lambda m, node=node: f"tree node {node}: {m}")

    # accept a different root-to-node path in each row (per-row keep indices need equal lengths)
    accepted = [[0, 1, 4], [0, 2, 5]]
    assert accepted == [_path(PARENTS, 4), _path(PARENTS, 5)]
    grown = cache.extend(present, torch.ones(batch, n, dtype=torch.bool))
    base = torch.arange(p + 1)
    keep = torch.stack([torch.cat([base, p + 1 + torch.tensor(a)]) for a in accepted])
    compacted = grown.compact(keep)
    assert compacted.length == p + 1 + 3

    next_ids = torch.tensor([[int(tree_tokens[6])], [extra_token]])
    step = step_mask(compacted.valid, causal_structure(1, batch))
    next_logits, next_present = run_graph(graph, next_ids, torch.full((batch, 1), p + 3), step,
                                          torch.tensor([0]), compacted)
    assert next_present[0].shape[2] == compacted.length + 1
    torch.testing.assert_close(next_logits[0, 0], ref["0146"][p + 3], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(next_logits[1, 0], ref["025x"][p + 3], atol=ATOL, rtol=RTOL)


# --- tiny models of each family -------------------------------------------------------------------------------


def _padded_batch(vocab, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2, 10), generator=gen)
    am = torch.ones(2, 10, dtype=torch.long)
    am[1, :4] = 0  # row 1 is left-padded
    ids[1, :4] = 0
    return ids, am


def assert_graph_matches_hf(model):
    graph = DecoderGraph(model).eval()
    ids, am = _padded_batch(model.config.vocab_size)
    valid = am.bool()
    cache = KVCache.empty(graph.spec, 2)
    mask = step_mask(cache.valid, causal_structure(10, 2), new_valid=valid)
    logits, _ = run_graph(graph, ids, prompt_positions(valid), mask, torch.arange(10), cache)
    with torch.inference_mode():
        ref = model(ids, attention_mask=am).logits
    assert logits.shape == ref.shape
    torch.testing.assert_close(logits[valid], ref[valid], atol=ATOL, rtol=RTOL)
    # the padded row's real tokens equal the same tokens run alone, unpadded
    with torch.inference_mode():
        alone = model(ids[1:, 4:]).logits
    torch.testing.assert_close(logits[1, 4:], alone[0], atol=ATOL, rtol=RTOL)


def test_tiny_qwen2_left_padded_batch_equals_hf():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         vocab_size=128, intermediate_size=128)
    assert_graph_matches_hf(Qwen2ForCausalLM(config).eval())


def test_tiny_mixtral_left_padded_batch_equals_hf():
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           vocab_size=128, intermediate_size=128, num_local_experts=4, num_experts_per_tok=2)
    model = MixtralForCausalLM(config).eval()
    try:
        with torch.inference_mode():
            model(torch.zeros(1, 2, dtype=torch.long))
    except Exception:
        if not hasattr(model, "set_experts_implementation"):
            raise
        model.set_experts_implementation("batched_mm")
    assert_graph_matches_hf(model)


@pytest.mark.parametrize("model_type", sorted(SUPPORTED_ARCHITECTURES))
def test_every_supported_family_matches_hf(tiny_model, model_type):
    assert_graph_matches_hf(tiny_model(model_type))


def test_sliding_window_qwen2_is_refused(tiny_model):
    model = tiny_model("qwen2", use_sliding_window=True, sliding_window=4)
    with pytest.raises(UnsupportedModelError, match="sliding"):
        DecoderGraph(model)


def test_mistral_sliding_window_is_refused_not_silently_ignored(tiny_model):
    model = tiny_model("mistral", sliding_window=4)  # shorter than the context: attention would differ from HF
    with pytest.raises(UnsupportedModelError, match="sliding-window attention"):
        DecoderGraph(model)


def test_unsupported_model_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).eval()
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        DecoderGraph(model)


def test_olmoe_with_clip_qkv_matches_hf(tiny_model):
    assert_graph_matches_hf(tiny_model("olmoe", clip_qkv=0.5))
