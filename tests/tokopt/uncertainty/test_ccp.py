"""CCP through the labelling path: the design note's hand case with fake and with the real auxiliary models."""

import math

import numpy as np
import pytest

from tokopt.errors import TokoptError
from tokopt.uncertainty.ccp import alternatives, sequence_ccp, token_ccp

CONTEXT = "The capital of France is"


class Tok:
    """A tokenizer stand-in: ids -> strings, decode = concatenation."""

    def __init__(self, vocab):
        self.vocab = vocab

    def decode(self, ids):
        return "".join(self.vocab[i] for i in ids)


TOK = Tok({0: " Paris", 1: " paris", 2: " Lyon", 3: " the", 4: ".", 5: " Marseille"})
LP = {i: math.log(p) for i, p in {0: 0.6, 1: 0.1, 2: 0.25, 3: 0.05}.items()}


def paris_record(order=(2, 0, 1, 3)):
    return {"token": 0, "logprob": LP[0], "topk": [(i, LP[i]) for i in order]}


class FakeSimilarity:
    def __init__(self):
        self.calls = []

    def cosine(self, a, b):
        self.calls.append((list(a), list(b)))
        return np.zeros(len(a))


class FakeNLI:
    """Contradiction iff the hypothesis names Lyon or Marseille; records every pair it is asked."""

    def __init__(self):
        self.pairs = []

    def contradiction_probs(self, premises, hypotheses):
        self.pairs += list(zip(premises, hypotheses))
        return np.array([0.99 if ("Lyon" in p + h or "Marseille" in p + h) else 0.1
                         for p, h in zip(premises, hypotheses)])


def test_hand_case_with_fake_labeller_and_context():
    nli, sim = FakeNLI(), FakeSimilarity()
    ccps = token_ccp([paris_record()], TOK, prefix_text=CONTEXT, nli=nli, similarity=sim)
    assert ccps == [pytest.approx(0.7368, abs=1e-4)]
    # only Lyon reached the models ("paris" matched exactly, "the" is a stopword), both directions, in context
    assert set(nli.pairs) == {(CONTEXT + " Paris", CONTEXT + " Lyon"), (CONTEXT + " Lyon", CONTEXT + " Paris")}
    assert sim.calls == [([" Paris".strip()], ["Lyon"])]


def test_hand_case_with_real_models():
    recs = [paris_record(), {"token": 4, "logprob": -0.01, "topk": [(4, -0.01), (5, -6.0)]}]
    assert token_ccp(recs, TOK, prefix_text=CONTEXT) == [pytest.approx(0.7368, abs=1e-4), 1.0]
    assert sequence_ccp(recs, TOK, prefix_text=CONTEXT) == pytest.approx(-0.7368, abs=1e-4)


def test_real_models_label_marseille_contra_and_case_variant_entail():
    vocab = Tok({0: " Paris", 1: " PARIS", 5: " Marseille"})
    rec = {"token": 0, "logprob": math.log(0.5), "topk": [(0, math.log(0.5)), (1, math.log(0.3)),
                                                           (5, math.log(0.2))]}
    assert token_ccp([rec], vocab, prefix_text=CONTEXT) == [pytest.approx(0.8 / 1.0)]


def test_generated_token_absent_from_topk_under_sampling():
    # sampled "Paris" (p 0.01) is not among the top-k; it still comes first, with its own logprob
    rec = {"token": 0, "logprob": math.log(0.01), "topk": [(2, math.log(0.7)), (1, math.log(0.2))]}
    assert alternatives(rec)[0] == (0, math.log(0.01))
    ccps = token_ccp([rec], TOK, prefix_text=CONTEXT, nli=FakeNLI(), similarity=FakeSimilarity())
    assert ccps == [pytest.approx((0.01 + 0.2) / (0.01 + 0.2 + 0.7))]


def test_generated_token_not_first_in_topk_is_put_first():
    alts = alternatives(paris_record(order=(2, 0, 1, 3)))
    assert [i for i, _ in alts] == [0, 2, 1, 3]


def test_stopwords_and_negligible_alternatives_skip_the_models():
    nli, sim = FakeNLI(), FakeSimilarity()
    recs = [{"token": 3, "logprob": math.log(0.5), "topk": [(3, math.log(0.5)), (2, math.log(0.5))]},
            {"token": 0, "logprob": math.log(0.999), "topk": [(0, math.log(0.999)), (2, math.log(0.001))]}]
    assert token_ccp(recs, TOK, nli=nli, similarity=sim) == [1.0, 1.0]
    assert nli.pairs == [] and sim.calls == []
    assert sequence_ccp(recs, TOK, nli=nli, similarity=sim) == -1.0


def test_labels_are_cached():
    from tokopt.uncertainty.ccp import CCPLabeller

    nli, sim = FakeNLI(), FakeSimilarity()
    lab = CCPLabeller(nli, sim)
    item = (CONTEXT + " Paris", CONTEXT + " Lyon", " Paris", " Lyon")
    assert lab.label_many([item]) == ["contra"]
    n = len(nli.pairs)
    assert lab.label_many([item, item]) == ["contra", "contra"] and len(nli.pairs) == n


def test_bad_records():
    with pytest.raises(TokoptError, match="last_uncertainty\\[0\\]"):
        token_ccp([[paris_record()]], TOK)
    with pytest.raises(TokoptError, match="topk"):
        token_ccp([{"token": 0, "logprob": -0.1}], TOK)
    with pytest.raises(TokoptError, match="empty"):
        token_ccp([], TOK)
