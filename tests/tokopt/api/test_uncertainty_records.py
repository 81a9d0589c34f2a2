"""``tokopt.optimize(model, uncertainty=True)``: one record per generated token, raw and processed, equal to a
teacher-forced reference, and the same under speculative decoding (from the target's verify rows)."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper,
                                                    TopKLogitsWarper, TopPLogitsWarper)

import tokopt
from tokopt.models.graph_meta import graph_meta

PROMPT = torch.tensor([[5, 9, 17, 3, 5, 9, 17, 3, 5, 9]])
NEW = 10


@pytest.fixture(scope="module")
def opt(tiny_model):
    return tokopt.optimize(tiny_model("llama", vocab_size=256), uncertainty=True)


def teacher_forced(model, sequence, prompt_len):
    """Raw logits of the rows that chose each generated token of ``sequence`` ``[T]``."""
    with torch.no_grad():
        return model(sequence[None]).logits[0, prompt_len - 1: -1].double()


def test_records_greedy(opt):
    out = opt.generate(PROMPT, max_new_tokens=NEW)
    assert "logit_taps" in opt.config.passes
    records = opt.last_uncertainty
    assert len(records) == 1 and len(records[0]) == NEW
    logits = teacher_forced(opt.model, out[0], PROMPT.shape[1])
    logp = logits.log_softmax(-1)
    for t, rec in enumerate(records[0]):
        assert rec["token"] == int(out[0, PROMPT.shape[1] + t])
        assert rec["logprob"] == pytest.approx(float(logp[t, rec["token"]]), abs=1e-4)
        assert rec["entropy"] == pytest.approx(float(-(logp[t].exp() * logp[t]).sum()), abs=1e-4)
        assert rec["max_prob"] == pytest.approx(float(logp[t].exp().max()), abs=1e-5)
        # greedy applies no processing: processed = raw
        assert rec["logprob_processed"] == pytest.approx(rec["logprob"], abs=1e-6)
        assert rec["entropy_processed"] == pytest.approx(rec["entropy"], abs=1e-4)
        assert rec["topk"][0][0] == rec["token"] and len(rec["topk"]) == 20
        assert rec["typicality"] == pytest.approx(abs(-rec["logprob"] - rec["entropy"]), abs=1e-9)


def eager_prev_attention(model, sequence, layers):
    """HF eager attention of every position to the one before it: [T, layers, heads]."""
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            att = model(sequence[None], output_attentions=True).attentions
    finally:
        model.set_attn_implementation("sdpa")
    t = torch.arange(1, sequence.shape[0])
    return torch.stack([att[l][0][:, t, t - 1].T for l in layers], dim=1)  # [T-1, layers, H] for positions 1..


def test_records_prev_attention_equal_eager_attention(opt):
    """RAUQ's input: token t's attention to token t-1 in the tapped layers, for every generated token (the last
    one too: the loop's tail forward)."""
    out = opt.generate(PROMPT, max_new_tokens=NEW)
    layers = graph_meta(opt.graph_module).attention_tap_layers
    want = eager_prev_attention(opt.model, out[0], layers)
    n = PROMPT.shape[1]
    for t, rec in enumerate(opt.last_uncertainty[0]):
        torch.testing.assert_close(torch.tensor(rec["prev_attention"]), want[n + t - 1], atol=1e-5, rtol=1e-4)
    assert opt.last_result.forwards == NEW + 1  # prefill, NEW - 1 decode steps, the tail


def test_records_sampling_processed_distribution(opt):
    out = opt.generate(PROMPT, max_new_tokens=NEW, do_sample=True, temperature=0.7, top_k=10, top_p=0.9, seed=3)
    records = opt.last_uncertainty[0]
    logits = teacher_forced(opt.model, out[0], PROMPT.shape[1])
    warp = LogitsProcessorList([TemperatureLogitsWarper(0.7), TopKLogitsWarper(10), TopPLogitsWarper(0.9)])
    processed = warp(out[:, : PROMPT.shape[1]], logits.float()).double().log_softmax(-1)
    raw = logits.log_softmax(-1)
    for t, rec in enumerate(records):
        y = rec["token"]
        assert rec["logprob"] == pytest.approx(float(raw[t, y]), abs=1e-4)
        assert rec["logprob_processed"] == pytest.approx(float(processed[t, y]), abs=1e-4)
        p = processed[t].exp()
        entropy = float(-(p[p > 0] * processed[t][p > 0]).sum())
        assert rec["entropy_processed"] == pytest.approx(entropy, abs=1e-4)
        assert rec["entropy_processed"] <= rec["entropy"] + 1e-6  # sharper after temperature 0.7 and top-k 10


@pytest.mark.parametrize("method", ["lookup", "recycling"])
def test_speculative_records_equal_plain(opt, method):
    opt.generate(PROMPT, max_new_tokens=NEW)
    plain = opt.last_uncertainty
    spec = opt.with_speculative(method)
    spec.generate(PROMPT, max_new_tokens=NEW)
    assert spec.last_stats.mat > 1.0
    for a, b in zip(spec.last_uncertainty[0], plain[0]):
        assert a["token"] == b["token"] and [i for i, _ in a["topk"]] == [i for i, _ in b["topk"]]
        for key in ("entropy", "logprob", "max_prob", "margin", "self_certainty", "entropy_processed"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), key
        torch.testing.assert_close(torch.tensor(a["prev_attention"]), torch.tensor(b["prev_attention"]),
                                   atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("new", [1, 7])  # 7: the budget ends inside an accepted path
def test_speculative_prev_attention_of_the_last_token(opt, new):
    opt.generate(PROMPT, max_new_tokens=new)
    plain = opt.last_uncertainty[0]
    spec = opt.with_speculative("lookup")
    spec.generate(PROMPT, max_new_tokens=new)
    got = spec.last_uncertainty[0]
    assert len(got) == len(plain) == new
    torch.testing.assert_close(torch.tensor(got[-1]["prev_attention"]), torch.tensor(plain[-1]["prev_attention"]),
                               atol=1e-5, rtol=1e-4)


def test_speculative_sampling_records_come_from_the_target(opt):
    spec = opt.with_speculative("lookup")
    out = spec.generate(PROMPT, max_new_tokens=NEW, do_sample=True, temperature=0.8, top_k=0, seed=5)
    raw = teacher_forced(opt.model, out[0], PROMPT.shape[1]).log_softmax(-1)
    for t, rec in enumerate(spec.last_uncertainty[0]):
        assert rec["logprob"] == pytest.approx(float(raw[t, rec["token"]]), abs=1e-4)


def test_no_records_without_uncertainty(tiny_model):
    plain = tokopt.optimize(tiny_model("llama", vocab_size=256))
    plain.generate(PROMPT, max_new_tokens=2)
    assert plain.last_uncertainty is None
