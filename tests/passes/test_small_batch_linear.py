"""small_batch_linear: every aten.linear becomes mm(W, x^T)^T with the same values (to float rounding),
on tiny models of several families and on the real model's captured graph; nothing matched is explained."""

import pytest
import torch

from tokopt.models.capture import capture
from tokopt.passes.small_batch_linear import small_batch_linear
from tokopt.models.kv_cache import KVCache
from tokopt.models.masks import causal_structure, step_mask
from tokopt.models.graph_meta import graph_meta


def _run(gm, spec, n=5, past=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, spec.vocab_size, (2, n), generator=g)
    cache = KVCache.empty(spec, 2)
    mask = step_mask(cache.valid, causal_structure(n, 2))
    with torch.no_grad():
        return gm(ids, torch.arange(n).expand(2, n), mask, torch.arange(n), *cache.tensors)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mixtral", "olmoe"])
def test_rewrites_every_linear_and_keeps_outputs(tiny_model, family):
    model = tiny_model(family)
    reference = capture(model)
    gm = capture(model)
    spec = graph_meta(gm).spec
    linears = sum(1 for n in gm.graph.nodes if n.target == torch.ops.aten.linear.default)
    gm, report = small_batch_linear(gm)
    assert report.changed and report.matched == linears > 0
    assert not any(n.target == torch.ops.aten.linear.default for n in gm.graph.nodes)
    for n_new in (1, 2, 5):  # decode, a tiny tree, a prompt: the dynamic shapes still work
        for a, b in zip(_run(reference, spec, n=n_new), _run(gm, spec, n=n_new)):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_nothing_to_rewrite_is_explained():
    gm = torch.fx.symbolic_trace(torch.nn.ReLU())
    gm, report = small_batch_linear(gm)
    assert not report.changed and "no aten.linear" in report.why_not
