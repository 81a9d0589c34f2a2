"""ppd_slots: ordinary ids give bit-identical outputs; a prompt id row equals the HF model fed that embedding."""

import pytest
import torch

from tokopt.models.capture import capture, example_inputs
from tokopt.passes.manager import run_passes
from tokopt.models.kv_cache import KVCache
from tokopt.models.masks import step_mask
from tokopt.runtime.speculative.tree import DraftTree, pack_trees
from tokopt.models.graph_meta import PPDFacts, graph_meta
from tokopt.passes.ppd_slots import PPDSlotsConfig


@pytest.fixture(scope="module")
def llama(tiny_model):
    return tiny_model("llama", num_hidden_layers=2)


def _tapped(model, table):
    gm = capture(model)
    gm, reports = run_passes(gm, [PPDSlotsConfig(embeddings=table)])
    return gm, reports[0]


def test_ordinary_ids_bit_identical(llama):
    plain = capture(llama)
    table = torch.randn(3, llama.config.hidden_size)
    gm, report = _tapped(llama, table)
    assert report.changed and graph_meta(gm).facts.ppd == PPDFacts(k=3, vocab_size=llama.config.vocab_size,
                                                                          trained=True)
    args = example_inputs(graph_meta(plain).spec, batch=2, n_new=5, past=4)
    for a, b in zip(plain(*args), gm(*args)):
        assert torch.equal(a, b)
    _, again = run_passes(gm, ["ppd_slots"])
    assert not again[0].changed


def test_prompt_rows_equal_hf_with_inputs_embeds(llama):
    vocab, hidden = llama.config.vocab_size, llama.config.hidden_size
    torch.manual_seed(1)
    table = torch.randn(3, hidden) * 0.05
    gm, _ = _tapped(llama, table)
    spec = graph_meta(gm).spec
    text = [5, 17, 3, 99, 42]
    # a tree: text as a chain, then prompt tokens 0, 1 after the last text token (a chain: each sees the earlier)
    tree = DraftTree.from_parents(text + [vocab, vocab + 1], [-1, 0, 1, 2, 3, 4, 5])
    packed = pack_trees([tree], torch.tensor([0]))
    cache = KVCache.empty(spec, 1)
    mask = step_mask(cache.valid, packed.structure, packed.valid)
    logits = gm(packed.tokens, packed.positions, mask, torch.arange(7), *cache.tensors)[0][0]
    embeds = llama.model.embed_tokens(torch.tensor([text]))
    embeds = torch.cat([embeds, table[None, :2]], dim=1)
    with torch.no_grad():
        ref = llama(inputs_embeds=embeds).logits[0]
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=1e-4)
