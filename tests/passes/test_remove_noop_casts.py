"""remove_noop_casts: identity casts and metadata asserts go, real casts stay, outputs are bit-identical."""

import torch

from tokopt.models.capture import example_inputs
from tokopt.passes.remove_noop_casts import remove_noop_casts


def _ops(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


class _Casts(torch.nn.Module):
    def forward(self, x):
        same = x.to(torch.float32) * 2  # identity on a float32 input
        half = x.to(torch.float16)  # a real conversion
        return same, half.float() + 1


def _export(module, *args):
    return torch.export.export(module, args, strict=False).module()


def test_removes_identity_casts_and_keeps_real_ones():
    gm = _export(_Casts(), torch.randn(4, 3))
    x = torch.randn(4, 3)
    before = gm(x)
    real_casts_before = sum(1 for n in gm.graph.nodes if n.op == "call_function"
                            and n.target == torch.ops.aten.to.dtype and n.meta["val"].dtype != n.args[0].meta["val"].dtype)
    gm, report = remove_noop_casts(gm)
    gm.graph.lint()
    after = gm(x)
    assert report.changed and report.matched >= 1
    assert torch.ops.aten._assert_tensor_metadata.default not in _ops(gm)
    remaining = [n for n in gm.graph.nodes if n.op == "call_function" and n.target == torch.ops.aten.to.dtype]
    assert len(remaining) == real_casts_before == 2  # to(float16) and .float() stay
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_explains_when_nothing_matched():
    gm = _export(_Casts(), torch.randn(4, 3))
    gm, _ = remove_noop_casts(gm)
    gm, report = remove_noop_casts(gm)
    assert report.matched == 0 and not report.changed
    assert "changes dtype" in report.why_not


def test_real_model_graph_is_bit_identical(tiny_qwen2_graph):
    gm, spec = tiny_qwen2_graph
    args = example_inputs(spec, batch=2, n_new=3, past=5)
    with torch.inference_mode():
        before = gm(*args)
    gm, report = remove_noop_casts(gm)
    gm.graph.lint()
    with torch.inference_mode():
        after = gm(*args)
    assert report.matched > 0
    assert all(torch.equal(a, b) for a, b in zip(before, after))
