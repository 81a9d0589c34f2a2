"""TokenSAR relevance from MiniLM (bi-encoder stand-in for the paper's cross-encoder) and the TokenSAR score."""

import math

import pytest

from tokopt.errors import TokoptError
from tokopt.uncertainty import relevance as rel
from tokopt.uncertainty.relevance import token_relevance, token_sar_score

PROMPT = "Q: What is the capital of France? A:"
TOKENS = [" The", " capital", " is", " Paris", "."]


def test_content_word_matters_more_than_stopword_and_punctuation():
    s = token_relevance(PROMPT, TOKENS)
    assert s.shape == (5,) and ((s >= 0) & (s <= 1)).all()
    assert s[3] < s[0] and s[3] < s[4]  # dropping "Paris" changes more than dropping "The" or "."


class Tok:
    def decode(self, ids):
        return "".join(TOKENS[i] for i in ids)


def test_token_sar_hand_case_with_injected_relevance(monkeypatch):
    monkeypatch.setattr(rel, "token_relevance", lambda prompt, strings, similarity=None: [0.9, 0.2])
    recs = [{"token": 0, "logprob": -0.1}, {"token": 3, "logprob": -2.0}]
    assert token_sar_score(recs, Tok(), PROMPT) == pytest.approx(1.7889, abs=1e-4)


def test_token_sar_score_passes_token_strings_that_rebuild_the_response(monkeypatch):
    seen = {}

    def fake(prompt, strings, similarity=None):
        seen["strings"] = strings
        return [0.5] * len(strings)

    monkeypatch.setattr(rel, "token_relevance", fake)
    recs = [{"token": i, "logprob": math.log(0.5)} for i in range(5)]
    assert token_sar_score(recs, Tok(), PROMPT) == pytest.approx(math.log(2))
    assert seen["strings"] == TOKENS


def test_bad_inputs():
    with pytest.raises(TokoptError, match="list of the response's token strings"):
        token_relevance(PROMPT, " The capital")
    with pytest.raises(TokoptError, match="empty"):
        token_relevance(PROMPT, [])
    with pytest.raises(TokoptError, match="last_uncertainty\\[0\\]"):
        token_sar_score([[{"token": 0, "logprob": -0.1}]], Tok(), PROMPT)
