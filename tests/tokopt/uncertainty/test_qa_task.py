"""tokopt.uncertainty.qa_task: questions with checkable answers, answer extraction and token spans."""

import pytest

from tokopt.errors import TokoptError
from tokopt.uncertainty.qa_task import (QAItem, answer_bounds, answer_token_span, arithmetic_items, build_items,
                                        capital_items, cloze_items, is_correct)


def test_capitals_cover_the_shipped_table_with_alternatives():
    items = capital_items()
    assert len(items) == 120
    peru = next(i for i in items if "Peru" in i.question)
    assert peru.answers == ("Lima",) and peru.prompt.endswith("Q: What is the capital of Peru?\nA:")
    assert any(len(i.answers) > 1 for i in items)


def test_arithmetic_answers_are_right():
    for item in arithmetic_items(200, seed=3):
        a, op, b = item.question.removeprefix("What is ").removesuffix("?").split()
        want = {"+": int(a) + int(b), "-": int(a) - int(b), "x": int(a) * int(b)}[op]
        assert item.answers == (str(want),) and want >= 0
    assert arithmetic_items(5, seed=1) == arithmetic_items(5, seed=1)


@pytest.mark.parametrize("kind,generated,answer,right", [
    ("capital", " The capital of Peru is Lima.\nQ: next", "Lima", True),
    ("capital", " The capital of Peru is lima", "lima", True),
    ("capital", " The capital of Peru is Cusco.", "Cusco", False),
    ("capital", " Lima", "Lima", True),  # no marker: the whole line
    ("arithmetic", " 12 + 7 = 19.", "19", True),
    ("arithmetic", " 12 + 7 = 20.", "20", False),
    ("cloze", " earth, and the", "earth,", True),
])
def test_answer_extraction_and_correctness(kind, generated, answer, right):
    item = {"capital": QAItem("capital", "", ("Lima",)), "arithmetic": QAItem("arithmetic", "", ("19",)),
            "cloze": QAItem("cloze", "", ("earth",))}[kind]
    lo, hi = answer_bounds(kind, generated)
    assert generated[lo:hi] == answer
    assert is_correct(item, generated) is right


def test_token_span_covers_the_answer_tokens(tokenizer):
    text = " The capital of Peru is Lima.\n"
    tokens = tokenizer(text, add_special_tokens=False).input_ids
    start, end = answer_token_span("capital", tokenizer, tokens)
    assert tokenizer.decode(tokens[start:end]).strip() == "Lima"
    assert tokenizer.decode(tokens[:start]) == " The capital of Peru is"


def test_cloze_from_real_lines():
    text = "Ge1:1 In the beginning God created the heaven and the earth.\nGe1:3 And God said, Let there be light: and"
    items = cloze_items(text, 5, seed=0)
    assert len(items) == 5
    for item in items:
        assert item.answers[0].isalpha() and not item.prompt.startswith("Ge1")
    with pytest.raises(TokoptError, match="no line"):
        cloze_items("too short", 3)


def test_build_items_mixes_kinds():
    items = build_items(10, seed=0, cloze_text="a b c d e f g h i j k l\n" * 3)
    assert [sum(i.kind == k for i in items) for k in ("capital", "arithmetic", "cloze")] == [10, 10, 10]
    with pytest.raises(TokoptError):
        build_items(0)
