"""Conditional entropy reduction: two forwards over a shared prefix cache give each probe the entropies of a
separate plain forward of prompt + steps[:k] + answer."""

import pytest
import torch

from tokopt.errors import TokoptError
from tokopt.runtime.generate import prefill_rows
from tokopt.uncertainty.entropy_reduction import EntropyCurve, _slope, entropy_curve, split_steps
from tokopt.runtime.logprobs import entropy


class Counting:
    """Delegates to an engine and counts its forwards."""

    def __init__(self, engine):
        self.engine, self.spec, self.calls = engine, engine.spec, 0

    def __call__(self, *args):
        self.calls += 1
        return self.engine(*args)


@pytest.fixture(scope="module")
def case(tokenizer):
    prompt = tokenizer("Q: What is 6 times 7?\nA:", add_special_tokens=False).input_ids
    steps = split_steps(tokenizer, " Six times seven means six sevens. Seven, fourteen, twenty-one.\nSo it is 42.")
    answer = tokenizer("\nAnswer: 42", add_special_tokens=False).input_ids
    return prompt, steps, answer


def test_split_steps(tokenizer, case):
    _, steps, _ = case
    assert [tokenizer.decode(s) for s in steps] == [
        " Six times seven means six sevens.", " Seven, fourteen, twenty-one.\n", "So it is 42."]
    assert split_steps(tokenizer, "  \n") == []
    with pytest.raises(TokoptError, match="str"):
        split_steps(tokenizer, [1, 2])


def test_probes_equal_separate_forwards_in_two_forwards(opt, case):
    prompt, steps, answer = case
    engine = Counting(opt.engine)
    curve = entropy_curve(engine, prompt, steps, answer)
    assert engine.calls == 2 and curve.forwards == 2
    assert isinstance(curve, EntropyCurve) and len(curve.entropies) == len(steps) + 1
    for k in range(len(steps) + 1):
        ids = prompt + [t for s in steps[:k] for t in s] + answer
        start = len(ids) - len(answer) - 1  # the row predicting a_0
        x = torch.tensor([ids])
        out, _ = prefill_rows(opt.engine, x, torch.ones_like(x, dtype=torch.bool),
                              torch.arange(start, len(ids) - 1))
        expected = entropy(out.logits[0])
        got = torch.tensor(curve.token_entropies[k], dtype=torch.float64)
        assert torch.allclose(got, expected, atol=1e-4), (k, (got - expected).abs().max())
        assert curve.entropies[k] == pytest.approx(float(expected.mean()), abs=1e-4)
    assert curve.reduction == pytest.approx(curve.entropies[0] - curve.entropies[-1])
    assert curve.slope == pytest.approx(_slope(curve.entropies))


def test_one_token_answer_needs_one_forward(opt, case):
    prompt, steps, _ = case
    engine = Counting(opt.engine)
    curve = entropy_curve(engine, prompt, steps[:1], [28])
    assert engine.calls == 1 and len(curve.entropies) == 2 and len(curve.token_entropies[0]) == 1


def test_slope():
    assert _slope([3.0]) == 0.0
    assert _slope([3.0, 2.0, 1.0]) == pytest.approx(-1.0)
    assert _slope([1.0, 1.0, 4.0]) == pytest.approx(1.5)


@pytest.mark.parametrize("prompt, steps, answer, match", [
    ([1, 2], [[3]], [], "answer_ids is empty"),
    ([1, 2], [[3]], "42", "answer_ids must be a list of int"),
    ([1, 2], [3, 4], [5], r"steps\[0\] must be a list of int"),
    ([1, 2], [["a"]], [5], r"steps\[0\] must be a list of int"),
    ([1, 2], "3 4", [5], "steps must be a list"),
    ([1, 2], [[3.0]], [5], r"steps\[0\] must be a list of int"),
    ([], [[3]], [5], "prompt_ids is empty"),
    ([1, 2], [[3]], [10 ** 9], "outside the vocabulary"),
])
def test_bad_input(opt, prompt, steps, answer, match):
    with pytest.raises(TokoptError, match=match):
        entropy_curve(opt.engine, prompt, steps, answer)
