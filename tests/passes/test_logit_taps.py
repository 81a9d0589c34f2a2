"""passes/logit_taps: per-row uncertainty taps after the LM head; logits bit-identical; the same values in every
engine and under speculative decoding."""

from __future__ import annotations

import math

import pytest
import torch

import tokopt
from tokopt.models.capture import capture, example_inputs
from tokopt.passes.manager import run_passes
from tokopt.passes.logit_taps import TAP_OUTPUTS, TOP_K
from tokopt.models.graph_meta import graph_meta

PASSES = ("remove_noop_casts", "logit_taps")


def reference(logits: torch.Tensor) -> dict:
    """Every tap, in float64, from the definitions."""
    z = logits.double()
    lse = torch.logsumexp(z, -1)
    logp = z - lse[..., None]
    p = logp.exp()
    top = logp.topk(TOP_K, dim=-1)
    return {"entropy": -(p * logp).sum(-1), "max_logprob": top.values[..., 0], "lse": lse,
            "max_prob": top.values[..., 0].exp(), "margin": top.values[..., 0].exp() - top.values[..., 1].exp(),
            "self_certainty": lse - z.mean(-1) - math.log(z.shape[-1]), "topk_logprobs": top.values}


@pytest.mark.parametrize("family", ["llama", "mixtral"])
def test_logits_bit_identical_and_taps_equal_float64(tiny_model, family):
    gm = capture(tiny_model(family, vocab_size=256))
    spec = graph_meta(gm).spec
    torch.manual_seed(0)
    inputs = [example_inputs(spec), example_inputs(spec, batch=1, n_new=1, past=5)]
    with torch.inference_mode():
        before = [gm(*x) for x in inputs]
    gm, reports = run_passes(gm, ["logit_taps"])
    assert reports[0].changed and "top-20" in reports[0].detail
    names = graph_meta(gm).output_names
    assert names[-len(TAP_OUTPUTS):] == list(TAP_OUTPUTS)
    with torch.inference_mode():
        after = [gm(*x) for x in inputs]
    for b, a in zip(before, after):
        for x, y in zip(b, a[: len(b)]):
            assert torch.equal(x, y), "logits or cache changed"
        taps = dict(zip(names, a))
        want = reference(taps["logits"])
        for name, value in want.items():
            torch.testing.assert_close(taps[name].double(), value, atol=2e-5, rtol=1e-5, msg=name)
        ids = taps["logits"].double().topk(TOP_K, dim=-1).indices
        assert torch.equal(torch.gather(taps["logits"], -1, taps["topk_ids"]),
                           torch.gather(taps["logits"], -1, ids))  # same token set (ties may reorder)


def test_reuses_entropy_tap_outputs(tiny_model):
    gm, reports = run_passes(capture(tiny_model("llama")), ["entropy_tap", "logit_taps"])
    names = graph_meta(gm).output_names
    assert names.count("entropy") == 1 and names.count("max_logprob") == 1
    assert set(TAP_OUTPUTS) <= set(names)
    assert "+outputs lse" in reports[1].detail
    stats = [n for n in gm.graph.nodes if n.target is torch.ops.tokopt.logit_stats.default]
    assert len(stats) == 1  # one pass over the logits feeds both passes' outputs


def test_why_not_without_logits(tiny_model):
    gm = capture(tiny_model("llama"))
    graph_meta(gm).output_names = ["scores", *graph_meta(gm).output_names[1:]]
    _, reports = run_passes(gm, ["logit_taps"])
    assert reports[0].matched == 0 and "named 'logits'" in reports[0].why_not


@pytest.fixture(scope="module")
def tapped_opt(tiny_model):
    return tokopt.optimize(tiny_model("llama", vocab_size=256), tokopt.OptimizeConfig(passes=PASSES))


def test_generate_records_taps_per_token(tapped_opt):
    ids = torch.tensor([[5, 9, 17, 3, 8, 8, 2]])
    out = tapped_opt.generate(ids, max_new_tokens=6)
    taps = tapped_opt.last_result.taps
    new = out[0, ids.shape[1]:]
    assert taps["topk_ids"].shape == (1, len(new), TOP_K) and taps["entropy"].shape == (1, len(new))
    # greedy: the chosen token is the top-1 id, and its log-probability (z[y] - lse) is max_logprob
    assert torch.equal(taps["topk_ids"][0, :, 0], new)
    model = tapped_opt.model
    with torch.no_grad():
        logits = model(out).logits[0, ids.shape[1] - 1: -1]
    chosen = logits.double().log_softmax(-1).gather(-1, new[:, None])[:, 0]
    torch.testing.assert_close(taps["max_logprob"][0].double(), chosen, atol=1e-4, rtol=0)


@pytest.mark.parametrize("method", ["lookup", "recycling"])
def test_taps_under_speculation_equal_plain_decoding(tapped_opt, method):
    ids = torch.tensor([[5, 9, 17, 3, 5, 9, 17, 3, 5, 9]])  # repetitive, so guesses get accepted
    plain_out = tapped_opt.generate(ids, max_new_tokens=12)
    plain = tapped_opt.last_result.taps
    spec = tapped_opt.with_speculative(method)
    spec_out = spec.generate(ids, max_new_tokens=12)
    assert torch.equal(spec_out, plain_out)
    assert spec.last_stats.mat > 1.0, "nothing was accepted: the test would not exercise verify rows"
    for name in TAP_OUTPUTS:
        got = spec.last_result.taps[name]
        if name == "topk_ids":
            assert torch.equal(got, plain[name])
        else:
            torch.testing.assert_close(got, plain[name], atol=1e-5, rtol=1e-5, msg=name)


def test_taps_survive_onnx_export(tapped_opt, tmp_path):
    from tokopt.export.engine_dir import export_engine

    ids = torch.tensor([[5, 9, 17, 3, 8, 8, 2]])
    eager_out = tapped_opt.generate(ids, max_new_tokens=5)
    eager = tapped_opt.last_result.taps
    path = export_engine(tapped_opt, tmp_path / "engine", model_config=tapped_opt.model.config.to_dict(),
                         model_name="tiny-llama")
    ort = tokopt.load_engine(path, uncertainty=True)
    assert torch.equal(ort.generate(ids, max_new_tokens=5), eager_out)
    assert [r["token"] for r in ort.last_uncertainty[0]] == eager_out[0, ids.shape[1]:].tolist()
    for name in TAP_OUTPUTS:
        got = ort.last_result.taps[name]
        if name == "topk_ids":
            assert torch.equal(got.long(), eager[name])
        else:
            torch.testing.assert_close(got, eager[name], atol=1e-4, rtol=1e-4, msg=name)


def test_engine_without_taps_refuses_uncertainty(tiny_model, tmp_path):
    from tokopt.export.engine_dir import export_engine
    from tokopt.errors import EngineError

    plain = tokopt.optimize(tiny_model("llama", vocab_size=256), tokopt.OptimizeConfig(passes=()))
    path = export_engine(plain, tmp_path / "engine", model_config=plain.model.config.to_dict(), model_name="tiny")
    with pytest.raises(EngineError, match="no uncertainty taps.*--uncertainty"):
        tokopt.load_engine(path, uncertainty=True)
