"""The ``tokopt`` torch.compile backend (runtime/compile_backend.py): logits equal eager on the default model and
tiny models of every family (llama and mixtral in the default suite, the rest slow: inductor on CPU takes about
a minute per model), greedy HF generate token-identical on the default model, passes that need decoder metadata
skipped with a reason."""

from __future__ import annotations

import pytest
import torch

FAMILIES_FAST = ["llama", "mixtral"]
FAMILIES_SLOW = ["mistral", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "olmoe"]


def _tiny(tiny_config, family):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(family)).eval()


def _check_logits(model, ids, **compile_kw):
    compiled = torch.compile(model, backend="tokopt", **compile_kw)
    with torch.no_grad():
        want = model(ids).logits
        got = compiled(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES_FAST + [pytest.param(f, marks=pytest.mark.slow) for f in FAMILIES_SLOW])
def test_tiny_family_logits_equal_eager(tiny_config, family):
    torch._dynamo.reset()
    _check_logits(_tiny(tiny_config, family), torch.randint(0, 128, (2, 7)))


def test_options_passes_and_skip_reason(tiny_config):
    from tokopt.runtime.compile_backend import last_reports

    torch._dynamo.reset()
    _check_logits(_tiny(tiny_config, "llama"), torch.randint(0, 128, (1, 5)),
                  options={"passes": ["remove_noop_casts", "entropy_tap"]})
    reports = {r.name: r for r in last_reports()}
    assert set(reports) == {"remove_noop_casts", "entropy_tap"}
    assert "GraphMeta" in reports["entropy_tap"].why_not
    assert reports["remove_noop_casts"].matched or reports["remove_noop_casts"].why_not


def test_unknown_pass_is_named():
    from tokopt.errors import TokoptError
    from tokopt.runtime.compile_backend import tokopt_backend

    with pytest.raises(TokoptError, match="no_such_pass"):
        tokopt_backend(None, [], options={"passes": ["no_such_pass"]})


def test_default_model_logits_and_greedy_generate(real_model, tokenizer):
    torch._dynamo.reset()
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        want_logits = real_model(ids).logits
        want = real_model.generate(ids, max_new_tokens=4, do_sample=False)
    forward = real_model.forward
    real_model.forward = torch.compile(forward, backend="tokopt", dynamic=True)
    try:
        with torch.no_grad():
            got_logits = real_model(ids).logits
            got = real_model.generate(ids, max_new_tokens=4, do_sample=False)
    finally:
        real_model.forward = forward
        torch._dynamo.reset()
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-3, atol=1e-3)
    assert torch.equal(got, want)
