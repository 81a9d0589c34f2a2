"""Greedy speculative decoding on the real model and real Spec-Bench questions is token-for-token identical
to plain greedy decoding, for every method, in the eager and the ONNX Runtime engine, at batch 1 and 4.

The default suite checks a few questions (every method, both engines); ``-m slow`` runs 50 questions over all
categories x 128 new tokens for every (engine, method, batch) combination.
"""

import pytest
import torch

import tokopt
from tokopt.runtime.prompts import encode_prompts
from tokopt.runtime.speculative.methods import SpeculativeConfig

DRAFT_METHODS = ("draft", "dyspec", "rsd")


def _check(opt, method, questions, max_new_tokens, batch, budget="auto"):
    spec = opt.with_speculative(SpeculativeConfig(method, budget=budget))
    prompts = [q["turns"][0] for q in questions]
    mats = []
    for start in range(0, len(prompts), batch):
        ids, mask = encode_prompts(opt.tokenizer, prompts[start:start + batch])
        plain = opt.generate(ids, mask, max_new_tokens=max_new_tokens)
        got = spec.generate(ids, mask, max_new_tokens=max_new_tokens)
        for row in range(ids.shape[0]):
            assert torch.equal(got[row], plain[row]), (
                f"{method} ({opt.engine.name}, batch {batch}) differs from plain greedy on question "
                f"{start + row}: {prompts[start + row][:80]!r}")
        mats.append(spec.last_stats.mat)
    return mats


@pytest.fixture(scope="module")
def eager(opt, tokenizer):
    return opt


@pytest.fixture(scope="module")
def ort(onnx_engine_dir, real_model):
    opt = tokopt.load_engine(onnx_engine_dir, model=real_model)  # draft-model methods draft with the torch model
    return opt


@pytest.mark.parametrize("engine", ["eager", "ort"])
def test_recycling_and_lookup_equal_plain_greedy(request, engine, spec_bench_questions, pick_questions):
    opt = request.getfixturevalue(engine)
    questions = pick_questions(spec_bench_questions, 3)
    for method in ("recycling", "lookup"):
        mats = _check(opt, method, questions, 32, batch=1, budget=6)
        assert max(mats) > 1.0, method  # it speculated, and something was accepted
    _check(opt, "recycling", questions[:2], 24, batch=2, budget=6)


@pytest.mark.parametrize("method", DRAFT_METHODS)
def test_draft_model_methods_equal_plain_greedy(eager, method, spec_bench_questions, pick_questions):
    _check(eager, method, pick_questions(spec_bench_questions, 1), 16, batch=1, budget=4)


def test_draft_model_method_on_the_ort_engine(ort, spec_bench_questions, pick_questions):
    _check(ort, "dyspec", pick_questions(spec_bench_questions, 2), 16, batch=2, budget=4)


@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("method", ["recycling", "lookup", *DRAFT_METHODS])
@pytest.mark.parametrize("engine", ["ort", "eager"])
def test_fifty_questions_128_tokens(request, engine, method, batch, spec_bench_questions, pick_questions):
    opt = request.getfixturevalue(engine)
    questions = pick_questions(spec_bench_questions, 50)
    assert len({q["category"] for q in questions}) == len({q["category"] for q in spec_bench_questions})
    _check(opt, method, questions, 128, batch=batch)
