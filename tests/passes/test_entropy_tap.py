"""passes/entropy_tap: adds entropy and max log-probability outputs after the LM head; logits stay bit-identical."""

import math
from types import SimpleNamespace

import pytest
import torch

from tokopt.models.capture import capture, example_inputs
from tokopt.passes.manager import run_passes
from tokopt.passes.entropy_tap import TAP_OUTPUTS, entropy_tap
from tokopt.models.graph_meta import graph_meta, GraphMeta, set_graph_meta
from tokopt.models.decoder_graph import GraphSpec


@pytest.fixture(scope="module")
def tapped(real_model):
    """Capture the real model, run it on random inputs, apply the pass, run it again on the same inputs."""
    gm = capture(real_model)
    meta = graph_meta(gm)
    spec = meta.spec
    names_before = list(meta.output_names)
    torch.manual_seed(0)
    inputs = [example_inputs(spec), example_inputs(spec, batch=1, n_new=1, past=6)]
    with torch.inference_mode():
        before = [gm(*x) for x in inputs]
    gm, reports = run_passes(gm, ["entropy_tap"])
    with torch.inference_mode():
        after = [gm(*x) for x in inputs]
    return SimpleNamespace(gm=gm, spec=spec, names_before=names_before, inputs=inputs, before=before, after=after,
                           report=reports[0])


def test_logits_and_cache_are_bit_identical(tapped):
    for before, after in zip(tapped.before, tapped.after):
        assert len(after) == len(before) + 2
        assert torch.equal(before[0], after[0]), "logits changed"
        for b, a in zip(before[1:], after[1:len(before)]):
            assert torch.equal(b, a)


def test_output_names_gain_the_taps(tapped):
    names = graph_meta(tapped.gm).output_names
    assert names == tapped.names_before + list(TAP_OUTPUTS)
    assert names[-2:] == ["entropy", "max_logprob"]


def test_taps_equal_plain_torch_values(tapped):
    for x, out in zip(tapped.inputs, tapped.after):
        logits, entropy, max_logprob = out[0], out[-2], out[-1]
        batch, rows = x[0].shape[0], x[3].shape[0]
        assert logits.shape == (batch, rows, tapped.spec.vocab_size)
        assert entropy.shape == max_logprob.shape == (batch, rows)
        logprobs = torch.log_softmax(logits, dim=-1)
        torch.testing.assert_close(entropy, -(logprobs.exp() * logprobs).sum(-1), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(max_logprob, logprobs.max(-1).values, atol=1e-5, rtol=1e-5)
        # an independent formula in float64: H = logsumexp(l) - sum(p * l); max log p = max(l) - logsumexp(l)
        l64 = logits.double()
        lse = torch.logsumexp(l64, -1)
        torch.testing.assert_close(entropy.double(), lse - (l64.softmax(-1) * l64).sum(-1), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(max_logprob.double(), l64.max(-1).values - lse, atol=1e-4, rtol=1e-4)
        assert (entropy >= -1e-5).all() and (entropy <= math.log(tapped.spec.vocab_size) + 1e-4).all()
        assert (max_logprob <= 1e-6).all()


def test_report_says_matched_and_changed(tapped):
    r = tapped.report
    assert (r.name, r.matched, r.changed, r.why_not) == ("entropy_tap", 1, True, "")
    assert "entropy" in r.detail and "max_logprob" in r.detail
    history = graph_meta(tapped.gm).history
    assert [h["name"] for h in history] == ["entropy_tap"]


def test_graph_lints(tapped):
    tapped.gm.graph.lint()
    outputs = [n for n in tapped.gm.graph.nodes if n.op == "output"]
    assert len(outputs) == 1


def test_second_run_reports_already_tapped(tapped):
    gm = tapped.gm
    n_outputs = len(graph_meta(gm).output_names)
    code = gm.code
    gm, report = entropy_tap(gm)
    assert report.matched == 1 and report.changed is False
    assert "already tapped" in report.detail
    assert len(graph_meta(gm).output_names) == n_outputs
    assert gm.code == code
    with torch.inference_mode():
        again = gm(*tapped.inputs[0])
    assert len(again) == len(tapped.after[0])
    assert torch.equal(again[0], tapped.after[0][0])


# --- on toy graphs --------------------------------------------------------------------------------------------


class _Head(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 6)

    def forward(self, x):
        return (self.proj(x), x * 2)


def toy_graph(output_names):
    torch.manual_seed(0)
    gm = torch.fx.symbolic_trace(_Head())
    set_graph_meta(gm, GraphMeta(GraphSpec(0, 1, 4, 6, 16, "toy"), list(output_names)))
    return gm


def test_graph_without_logits_output_is_left_alone():
    gm = toy_graph(["hidden", "other"])
    code = gm.code
    gm, report = entropy_tap(gm)
    assert report.matched == 0 and report.changed is False
    assert report.why_not and "logits" in report.why_not
    assert gm.code == code and graph_meta(gm).output_names == ["hidden", "other"]


def test_taps_the_output_named_logits_wherever_it_is():
    gm = toy_graph(["other", "logits"])  # logits is the second output here
    x = torch.randn(3, 4)
    other, logits = gm(x)
    gm, report = entropy_tap(gm)
    assert report.matched == 1 and report.changed
    gm.graph.lint()
    out = gm(x)
    assert len(out) == 4 and torch.equal(out[0], other) and torch.equal(out[1], logits)
    logprobs = logits.log_softmax(-1)
    torch.testing.assert_close(out[2], -(logprobs.exp() * logprobs).sum(-1))
    torch.testing.assert_close(out[3], logprobs.max(-1).values)
