"""tokopt::logit_stats: the reference equals the textbook definitions, the Numba CPU version equals the
reference, the custom op passes torch's checks and stays one node through torch.export, and its ONNX translation
runs on plain ONNX Runtime with the reference's numbers. (CUDA versions: tests/kernels/test_cuda_sim.py.)"""

import numpy as np
import onnxruntime as ort
import pytest
import torch

from tokopt.kernels import graph_ops
from tokopt.kernels import logit_stats as K

SHAPES = [(1, 1), (1, 2), (5, 7), (3, 4, 300), (2, 1, 49152)]


def textbook(logits):
    z = logits.double()
    logprobs = torch.log_softmax(z, -1)
    probs = logprobs.exp()
    entropy = -torch.where(probs > 0, probs * logprobs, torch.zeros_like(z)).sum(-1)
    return entropy, logprobs.amax(-1), torch.logsumexp(z, -1)


@pytest.mark.parametrize("shape", SHAPES)
def test_reference_equals_the_definitions(shape):
    logits = 4 * torch.randn(*shape, generator=torch.Generator().manual_seed(len(shape)))
    for got, want in zip(K.logit_stats_reference(logits), textbook(logits)):
        assert got.shape == shape[:-1] and got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=2e-5)


def test_uniform_rows_are_log_v_and_masked_entries_give_nan_everywhere():
    logits = torch.zeros(2, 8)
    logits[1, 4:] = 3.0  # row 1: uniform over its top 4 entries, the rest e^-3 times less likely
    entropy, max_logprob, lse = K.logit_stats_reference(logits)
    assert entropy[0].item() == pytest.approx(np.log(8)) and max_logprob[0].item() == pytest.approx(-np.log(8))
    assert lse[1].item() == pytest.approx(3 + np.log(4 + 4 * np.exp(-3)))
    masked = logits.clone()
    masked[0, :2] = -float("inf")  # finite logits are the contract; -inf is nan in every version alike
    for version in (K.logit_stats_reference, K.logit_stats_cpu):
        entropy, max_logprob, lse = version(masked)
        assert entropy[0].isnan() and not entropy[1].isnan()
        assert max_logprob[0].item() == pytest.approx(-np.log(6)) and lse[0].item() == pytest.approx(np.log(6))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_numba_cpu_equals_reference(shape, dtype):
    logits = (5 * torch.randn(*shape, generator=torch.Generator().manual_seed(7))).to(dtype)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    for got, want in zip(K.logit_stats_cpu(logits), K.logit_stats_reference(logits)):
        assert got.dtype == dtype
        torch.testing.assert_close(got, want, **tol)


def test_bfloat16_runs_the_reference_and_keeps_its_dtype(monkeypatch):
    monkeypatch.setenv("TOKOPT_KERNELS", "numba")
    logits = torch.randn(2, 3, 50).bfloat16()
    assert K.LOGIT_STATS.pick(logits) is K.logit_stats_reference
    out = torch.ops.tokopt.logit_stats(logits)
    assert all(o.dtype == torch.bfloat16 and o.shape == (2, 3) for o in out)


@pytest.mark.parametrize("backend", ["reference", "numba"])
def test_op_uses_the_dispatch_and_passes_opcheck(backend, monkeypatch):
    monkeypatch.setenv("TOKOPT_KERNELS", backend)
    logits = torch.randn(2, 3, 64)
    want = K.logit_stats_reference(logits)
    for got, w in zip(torch.ops.tokopt.logit_stats(logits), want):
        torch.testing.assert_close(got, w, rtol=1e-5, atol=1e-5)
    torch.library.opcheck(torch.ops.tokopt.logit_stats.default, (logits,))


@pytest.mark.parametrize("bad, why", [(torch.zeros(2, 0), "non-empty last"), (torch.ones(2, 3, dtype=torch.long),
                                                                               "floating point")])
def test_bad_logits_name_the_problem(bad, why):
    with pytest.raises(ValueError, match=why):
        torch.ops.tokopt.logit_stats(bad)


class _Taps(torch.nn.Module):
    def forward(self, logits):
        entropy, max_logprob, lse = torch.ops.tokopt.logit_stats(logits)
        return logits * 2, entropy, max_logprob, lse


def _exported():
    batch, rows = torch.export.Dim("batch"), torch.export.Dim("rows")
    return torch.export.export(_Taps(), (torch.randn(2, 3, 40),), dynamic_shapes=({0: batch, 1: rows},))


def test_torch_export_keeps_one_node_with_dynamic_shapes():
    program = _exported()
    calls = [n.target for n in program.graph.nodes if n.op == "call_function"]
    assert calls.count(torch.ops.tokopt.logit_stats.default) == 1
    x = torch.randn(5, 2, 40)
    for got, want in zip(program.module()(x), _Taps()(x)):
        torch.testing.assert_close(got, want)


def test_onnx_translation_runs_on_plain_onnx_runtime(tmp_path):
    onnx_program = torch.onnx.export(_exported(), (), dynamo=True, verbose=False,
                                     custom_translation_table=graph_ops.onnx_translation_table())
    path = tmp_path / "taps.onnx"
    onnx_program.save(str(path))
    ops = {n.op_type for n in onnx_program.model_proto.graph.node}
    assert all(not n.domain or n.domain == "ai.onnx" for n in onnx_program.model_proto.graph.node)
    assert {"LogSoftmax", "ReduceSum", "Exp", "ReduceMax"} <= ops
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = 3 * torch.randn(4, 5, 40)
    x[0, 0, :3] = -float("inf")
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    for g, w in zip(got, _Taps()(x)):
        np.testing.assert_allclose(g, w.numpy(), rtol=1e-5, atol=1e-5)
