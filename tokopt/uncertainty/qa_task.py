"""A question-answering task with automatically checkable answers, to measure how well uncertainty scores
separate right answers from wrong ones (PRR, ROC-AUC).

Three kinds of question, all short-answer, few-shot prompted for base models:

- ``capital``: "What is the capital of {country}?" over 120 countries (``tokopt/data/capitals.tsv``, accepted
  spellings separated by ``|``);
- ``arithmetic``: "What is {a} {op} {b}?" with one- to three-digit operands, + - x, seeded;
- ``cloze``: the next word of a real sentence (a text the caller gives, e.g. the KJV Bible of the offline
  corpus), the sentence's first words as the prompt.

Answers are sentences ("The capital of Peru is Lima.", "12 + 7 = 19."): the answer is the first line's text
after the last " is " / "= " (``answer_bounds``); it is right when its normalized form (case, spaces, trailing
punctuation; accents kept) equals an accepted answer — for cloze, when the first generated word is the
sentence's next word.

Example::

    items = build_items(per_kind=50, seed=0)
    items[0].prompt, items[0].answers          # ('Q: What is the capital of France?\\nA: Paris ...', ('Kabul',))
    is_correct(items[0], " The capital of Afghanistan is Kabul.\\n")           # True
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from tokopt.data import capitals_tsv
from tokopt.errors import TokoptError

KINDS = ("capital", "arithmetic", "cloze")
# Answers are whole sentences ending in the answer, so that the answer has context inside the response (what
# UQAC's attention chains follow); ``MARKERS`` say where the answer starts.
CAPITAL_SHOTS = ("Q: What is the capital of France?\nA: The capital of France is Paris.\n\n"
                 "Q: What is the capital of Japan?\nA: The capital of Japan is Tokyo.\n\n")
ARITHMETIC_SHOTS = ("Q: What is 12 + 7?\nA: 12 + 7 = 19.\n\n"
                    "Q: What is 30 - 4?\nA: 30 - 4 = 26.\n\n"
                    "Q: What is 6 x 8?\nA: 6 x 8 = 48.\n\n")
MARKERS = {"capital": " is ", "arithmetic": "= "}


@dataclass(frozen=True)
class QAItem:
    kind: str
    prompt: str
    answers: tuple  # accepted answers (normalized on comparison)
    question: str = ""


def normalize(text: str) -> str:
    """Lower case, collapsed spaces, no surrounding punctuation or quotes."""
    text = re.sub(r"\s+", " ", text.strip().lower())
    return text.strip(" .,:;!?\"'()")


def answer_bounds(kind: str, generated: str) -> tuple[int, int]:
    """Character bounds of the answer in a generation: in its first line, after the kind's marker (the last
    " is " / "= "; the whole line without one) up to the final period; for cloze, the first word."""
    line = generated.split("\n", 1)[0]
    if kind == "cloze":
        start = len(line) - len(line.lstrip())
        end = start + len(line[start:].split(" ", 1)[0])
        return start, end
    marker = MARKERS[kind]
    at = line.rfind(marker)
    start = 0 if at < 0 else at + len(marker)
    start += len(line[start:]) - len(line[start:].lstrip())
    end = len(line.rstrip().rstrip("."))
    return start, max(end, start)


def answer_text(kind: str, generated: str) -> str:
    start, end = answer_bounds(kind, generated)
    return generated[start:end]


def is_correct(item: QAItem, generated: str) -> bool:
    """Whether ``generated`` (the model's continuation of ``item.prompt``) answers ``item`` right."""
    answer = normalize(answer_text(item.kind, generated))
    return answer in {normalize(a) for a in item.answers}


def answer_token_span(kind: str, tokenizer, tokens: list) -> tuple[int, int]:
    """(start, end) indices into ``tokens`` (a generation) of the tokens that overlap the answer's characters;
    at least one token."""
    pieces = [tokenizer.decode(tokens[: i + 1]) for i in range(len(tokens))]
    text = pieces[-1] if pieces else ""
    lo, hi = answer_bounds(kind, text)
    start = next((i for i, p in enumerate(pieces) if len(p) > lo), max(len(tokens) - 1, 0))
    end = next((i + 1 for i, p in enumerate(pieces) if len(p) >= hi), len(tokens))
    return start, max(end, start + 1)


def capital_items() -> list[QAItem]:
    text = capitals_tsv()
    items = []
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        country, capitals = line.split("\t")
        question = f"What is the capital of {country}?"
        items.append(QAItem("capital", f"{CAPITAL_SHOTS}Q: {question}\nA:", tuple(capitals.split("|")), question))
    return items


def arithmetic_items(n: int, seed: int = 0) -> list[QAItem]:
    rng = random.Random(seed)
    items = []
    for _ in range(n):
        op = rng.choice("+-x")
        digits = rng.choice((1, 2, 2, 3)) if op != "x" else rng.choice((1, 1, 2))
        a, b = (rng.randint(10 ** (digits - 1) if digits > 1 else 0, 10 ** digits - 1) for _ in range(2))
        if op == "-" and b > a:
            a, b = b, a
        value = a + b if op == "+" else a - b if op == "-" else a * b
        question = f"What is {a} {op} {b}?"
        items.append(QAItem("arithmetic", f"{ARITHMETIC_SHOTS}Q: {question}\nA:", (str(value),), question))
    return items


def cloze_items(text: str, n: int, seed: int = 0, min_prefix_words: int = 6) -> list[QAItem]:
    """``n`` next-word questions from the sentences of ``text`` (one per line, e.g. "Ge1:1 In the beginning ..."):
    the prompt is a random number (>= ``min_prefix_words``) of a sentence's first words; the answer, the next
    word (alphabetic words only, so the answer is checkable)."""
    lines = [re.sub(r"^\S+:\S+\s+", "", ln).strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if len(ln.split()) >= min_prefix_words + 2]
    if not lines:
        raise TokoptError(f"cloze_items: no line of the text has {min_prefix_words + 2} words or more")
    rng = random.Random(seed)
    items, tries = [], 0
    while len(items) < n and tries < 50 * n:
        tries += 1
        words = rng.choice(lines).split()
        cut = rng.randint(min_prefix_words, len(words) - 1)
        nxt = words[cut].strip(".,:;!?\"'()")
        if not nxt.isalpha():
            continue
        items.append(QAItem("cloze", " ".join(words[:cut]), (nxt,), " ".join(words[:cut]) + " ___"))
    return items


def build_items(per_kind: int = 60, seed: int = 0, cloze_text: str | None = None) -> list[QAItem]:
    """``per_kind`` questions of each kind (capitals: at most the 120 countries; cloze only with ``cloze_text``),
    shuffled with ``seed``."""
    if per_kind < 1:
        raise TokoptError(f"per_kind must be >= 1, got {per_kind}")
    rng = random.Random(seed)
    capitals = capital_items()
    rng.shuffle(capitals)
    items = capitals[:per_kind] + arithmetic_items(per_kind, seed)
    if cloze_text is not None:
        items += cloze_items(cloze_text, per_kind, seed)
    return items
