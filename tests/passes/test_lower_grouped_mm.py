"""lower_grouped_mm: both standard-op forms (and the row-count switch between them, through ONNX Runtime) equal
transformers' grouped_mm_fallback (empty experts, rows past the last offset), the pass replaces every call in a captured MoE graph with outputs unchanged to rounding, and says
why when a dense graph has none."""

import pytest
import torch
import transformers.integrations.moe  # noqa: F401  (registers transformers::grouped_mm_fallback)

from tokopt.models.capture import capture, example_inputs
from tokopt.passes.lower_grouped_mm import (grouped_mm_dense, grouped_mm_gathered, grouped_mm_lowered,
                                            grouped_mm_nodes, lower_grouped_mm)
from tokopt.models.graph_meta import graph_meta

OP = torch.ops.transformers.grouped_mm_fallback.default


@pytest.mark.parametrize("counts", [[3, 0, 2, 1], [0, 0, 5, 0], [1, 1, 1, 1], [0, 0, 0, 0], [2, 0, 0, 1]])
@pytest.mark.parametrize("form", [grouped_mm_dense, grouped_mm_gathered, grouped_mm_lowered])
def test_standard_op_forms_equal_the_custom_op(counts, form):
    gen = torch.Generator().manual_seed(sum(counts))
    rows = sum(counts) + (2 if counts == [2, 0, 0, 1] else 0)  # the last case: 2 rows past offs[-1]
    x = torch.randn(rows, 6, generator=gen)
    w = torch.randn(len(counts), 6, 5, generator=gen)
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    torch.testing.assert_close(form(x, w, offs), OP(x, w, offs), atol=1e-5, rtol=1e-5)


class _Experts(torch.nn.Module):
    def __init__(self, experts=4):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(experts, 6, 5), requires_grad=False)

    def forward(self, x, offs):
        return grouped_mm_lowered(x, self.weight, offs)


def test_onnx_runs_both_branches_chosen_by_row_count(tmp_path):
    """One exported graph: ONNX Runtime takes the gathered branch for 2S <= E rows and the dense one above."""
    import onnxruntime as ort

    module = _Experts()
    rows = torch.export.Dim("rows", min=1)
    program = torch.export.export(module, (torch.randn(6, 6), torch.tensor([1, 3, 3, 6], dtype=torch.int32)),
                                  dynamic_shapes=({0: rows}, None))
    assert any("cond" in str(n.target) for n in program.graph.nodes)
    torch.onnx.export(program, (), dynamo=True, verbose=False).save(str(tmp_path / "experts.onnx"))
    session = ort.InferenceSession(str(tmp_path / "experts.onnx"), providers=["CPUExecutionProvider"])
    for counts in ([1, 0, 0, 0], [1, 0, 1, 0], [0, 2, 1, 1], [3, 0, 4, 2]):  # 1-2 rows: gathered; 4, 9: dense
        offs = torch.tensor(counts, dtype=torch.int32).cumsum(0).to(torch.int32)
        x = torch.randn(sum(counts), 6)
        got = session.run(None, {"x": x.numpy(), "offs": offs.numpy()})[0]
        torch.testing.assert_close(torch.from_numpy(got), OP(x, module.weight, offs), atol=1e-5, rtol=1e-5)


def test_pass_lowers_every_call_of_a_moe_graph(tiny_model):
    gm = capture(tiny_model("mixtral"))
    spec = graph_meta(gm).spec
    args = example_inputs(spec)
    before = gm(*args)
    calls = len(grouped_mm_nodes(gm))
    assert calls >= spec.num_layers  # gate-up and down per layer (at least one per layer)
    gm, report = lower_grouped_mm(gm)
    assert report.changed and report.matched == calls and not grouped_mm_nodes(gm)
    for a, b in zip(gm(*args), before):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_dense_graph_says_why_nothing_matched(tiny_qwen2_graph):
    gm, _ = tiny_qwen2_graph
    gm, report = lower_grouped_mm(gm)
    assert not report.changed and "grouped_mm_fallback" in report.why_not
