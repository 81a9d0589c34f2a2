"""The inductor engine (runtime/inductor_engine.py) behind ``tokopt.optimize(model, engine="inductor")``: greedy
tokens equal the eager engine's on the default model (2 prompts x 16 tokens, plain and Token Recycling), with a
bounded number of compiles (dynamic shapes: no recompile per step)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def inductor_opt(real_model, tokenizer):
    import tokopt

    torch._dynamo.reset()
    return tokopt.optimize(real_model, tokenizer=tokenizer, engine="inductor")


def test_unknown_engine_is_refused(real_model):
    import tokopt
    from tokopt.errors import TokoptError

    with pytest.raises(TokoptError, match="engine must be one of"):
        tokopt.optimize(real_model, engine="tvm")


@pytest.mark.parametrize("speculative", [None, "recycling"])
def test_greedy_tokens_equal_eager(opt, inductor_opt, tokenizer, speculative):
    assert inductor_opt.engine.name == "inductor"
    prompts = ["The capital of France is", "def fibonacci(n):"]
    eager, compiled = opt.with_speculative(speculative), inductor_opt.with_speculative(speculative)
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        want = eager.generate(ids, max_new_tokens=16)
        got = compiled.generate(ids, max_new_tokens=16)
        assert torch.equal(got, want), (prompt, speculative)
    # dynamic shapes: a handful of graphs (prefill / decode / tree specializations), not one per step
    assert inductor_opt.engine.compiles <= 8, inductor_opt.engine.compiles
