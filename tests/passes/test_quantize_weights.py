"""quantize_weights: weight-only int8 / int4 linears for the eager CPU engine (optimize(quantize=)).

Tolerance: the quantized graph's logits differ from fp32 by at most 5% (int8) / 25% (int4) of the fp32 logits'
largest magnitude on a tiny random llama (measured: about 1% and 14-16%).
"""

from __future__ import annotations

import pytest
import torch

import tokopt
from tokopt.errors import TokoptError
from tokopt.passes.manager import run_passes
from tokopt.passes.quantize_weights import (QuantizeWeightsConfig, available_bits, dequantize_int4, dequantize_int8,
                                            quantize_int4, quantize_int8)
from tokopt.runtime.request import prefill_rows

PROMPTS = torch.tensor([[5, 9, 17, 3, 5, 9, 17, 3], [1, 2, 3, 4, 1, 2, 3, 4]])
TOL = {8: 0.05, 4: 0.25}
needs = {b: pytest.mark.skipif(b not in available_bits(), reason=f"this torch has no int{b} CPU kernels")
         for b in (8, 4)}


def _linears(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target == torch.ops.aten.linear.default]


def _logits(opt):
    n = PROMPTS.shape[1]
    out, _ = prefill_rows(opt.engine, PROMPTS, torch.ones_like(PROMPTS, dtype=torch.bool), torch.arange(n))
    return out.logits


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model("llama", vocab_size=256)


@pytest.fixture(scope="module")
def fp32(model):
    return tokopt.optimize(model)


@pytest.mark.parametrize("bits", [pytest.param(8, marks=needs[8]), pytest.param(4, marks=needs[4])])
def test_kernels_match_the_dequantized_weight(bits):
    torch.manual_seed(0)
    w, x = torch.randn(48, 128), torch.randn(5, 128)
    if bits == 8:
        q, s = quantize_int8(w)
        got, ref = torch.ops.aten._weight_int8pack_mm(x, q, s), x @ dequantize_int8(q, s).t()
    else:
        q, sz = quantize_int4(w, 32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        got, ref = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 32, sz), x @ dequantize_int4(q, sz, 32).t()
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode, bits", [pytest.param("int8", 8, marks=needs[8]),
                                        pytest.param("int4", 4, marks=needs[4])])
def test_optimize_quantize_replaces_linears_and_stays_close(model, fp32, mode, bits):
    opt = tokopt.optimize(model, quantize=mode)
    report = opt.report.passes[-1]
    assert report.name == "quantize_weights" and report.changed and report.matched == 15
    assert "LM head int8" in report.detail  # the head is 8-bit in both modes (QuantizeWeightsConfig.head_bits)
    assert not _linears(opt.graph_module) and _linears(fp32.graph_module)
    ref, got = _logits(fp32), _logits(opt)
    err = (got - ref).abs().max() / ref.abs().max()
    assert 0 < err < TOL[bits], f"{mode}: relative error {err:.3f}"
    greedy = opt.generate(PROMPTS, max_new_tokens=16)
    for method in ("lookup", "recycling"):  # lossless relative to the quantized model
        assert torch.equal(opt.with_speculative(method).generate(PROMPTS, max_new_tokens=16), greedy)
    with pytest.raises(TokoptError, match="eager-only quantized linears"):
        from tokopt.export.engine_dir import export_engine

        export_engine(opt, "unused-dir")


@needs[8]
def test_head_kept_fp32_and_config_checks(model):
    from tokopt.models.capture import capture

    gm, reports = run_passes(capture(model), [QuantizeWeightsConfig(bits=8, head=False)])
    assert reports[0].matched == 14 and len(_linears(gm)) == 1 and "LM head kept fp32" in reports[0].detail
    with pytest.raises(TokoptError, match="bits must be 8 or 4"):
        QuantizeWeightsConfig(bits=3)
    with pytest.raises(TokoptError, match="group_size"):
        QuantizeWeightsConfig(bits=4, group_size=48)
    with pytest.raises(TokoptError, match="quantize must be one of int8, int4"):
        tokopt.optimize(model, quantize="int3")


def test_missing_kernels_name_the_onnx_path(monkeypatch):
    import tokopt.passes.quantize_weights as qw

    monkeypatch.setattr(qw, "available_bits", lambda: (8,))
    with pytest.raises(TokoptError, match="tokopt export --quantize int4"):
        qw.require_bits(4)
