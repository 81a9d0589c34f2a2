"""UQAC: the pure parts on hand-made arrays, then the real SmolLM2-135M end to end."""

import math

import numpy as np
import pytest
import torch

from tokopt.errors import TokoptError
from tokopt.uncertainty import UQACConfig, uqac
from tokopt.uncertainty.uqac import (RECENCY_WEIGHTS, attention_chain, is_stop_token, marginal_confidence,
                                     marginal_log_confidence, reduce_attention, substitutions)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Two busy shared cores make torch's thread pool spin; one thread is 5-20x faster here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- pure parts

def test_stop_tokens():
    assert all(is_stop_token(t) for t in [" the", "The", " is", ".", ",", " ", "", "\n", " don\u2019t", "?!", " ("])
    assert not any(is_stop_token(t) for t in [" Paris", " 3", "42", " apples", "+"])


HAND_TOKENS = ["Q", ":", " Alice", " has", " three", " apples", " so", " 3"]


def _hand_attention():
    att = np.zeros((8, 8))
    att[6, :6] = [0.0, 0.1, 0.05, 0.05, 0.6, 0.2]
    att[3, :3] = [0.0, 0.3, 0.7]
    att[4, :4] = [0.0, 0.2, 0.3, 0.5]
    att[1, :1] = [1.0]
    return att


def test_backtracking_hand_case():
    # Iteration 1 (source row 6): keys by attention 4 (0.6), 5 (0.2), 1 (prompt: skipped), 2 (0.05), 3 (" has":
    # stopword); chain shorter than min_chain_len=2, so 4 and 5 are both taken (buffer 2) despite 0.2 < 0.5.
    # Iteration 2 (rows 3 and 4): key 2 collects 0.7 + 0.3 = 1.0 >= 0.5. Iteration 3 (row 1): only prompt keys.
    cfg = UQACConfig(min_chain_len=2, buffer_size=2)
    chain, scores = attention_chain(_hand_attention(), HAND_TOKENS, (7, 8), first_selectable=2, config=cfg)
    assert chain == [2, 4, 5]
    assert scores == pytest.approx([1.0, 0.6, 0.2])


def test_backtracking_threshold_and_buffer():
    # min_chain_len=0: after key 4 (0.6), key 5 (0.2 < 0.5) stops the iteration; row 3 then gives key 2 (0.7).
    cfg = UQACConfig(min_chain_len=0, buffer_size=2)
    chain, scores = attention_chain(_hand_attention(), HAND_TOKENS, (7, 8), first_selectable=2, config=cfg)
    assert chain == [2, 4] and scores == pytest.approx([0.7, 0.6])
    # buffer_size=1: key 4 only, then row 3 -> key 2.
    chain, _ = attention_chain(_hand_attention(), HAND_TOKENS, (7, 8), first_selectable=2,
                               config=UQACConfig(min_chain_len=5, buffer_size=1))
    assert chain == [2, 4]
    # prompt tokens become selectable when first_selectable=0 (": " is punctuation, "Q" is not)
    chain, _ = attention_chain(_hand_attention(), HAND_TOKENS, (7, 8), first_selectable=0,
                               config=UQACConfig(min_chain_len=0, buffer_size=3))
    assert 1 not in chain and 2 in chain


def test_backtracking_row_offset_two_answer_tokens():
    # Only the rows of positions 3..7 are given; answer = positions 6, 7, so the sources are rows 5 and 6.
    att = _hand_attention()
    att[6, 5] = 0.9
    att[5, :5] = [0.0, 0.0, 0.1, 0.0, 0.9]
    tokens = HAND_TOKENS[:6] + [" 3", " apples"]
    # row 5: key 4 gets 0.9, key 2 0.1; row 6: key 5 0.9, key 4 +0.6 = 1.5, key 2 +0.05 = 0.15.
    # Taken: 4 (1.5), 5 (0.9); 2 (0.15 < 0.5) stops the iteration. Next sources rows 3 and 4: key 2 gets 1.0.
    chain, scores = attention_chain(att[3:], tokens, (6, 8), first_selectable=2, config=UQACConfig(min_chain_len=0))
    assert chain == [2, 4, 5]
    assert scores == pytest.approx([1.0, 1.5, 0.9])


def test_reduce_attention_hand_case():
    w0, w1 = RECENCY_WEIGHTS[:2]
    att = torch.zeros(1, 2, 4, 4)  # one layer, two heads, rows = positions 0..3
    att[0, 0, 3] = torch.tensor([0.5, 0.1, 0.1, 0.3])  # after zeroing sink/self: [0, .1 w1, .1 w0, 0]
    att[0, 1, 3] = torch.tensor([0.1, 0.9, 0.0, 0.0])  # -> [0, 1, 0, 0]: entropy 0, the most focused head
    one = reduce_attention(att, config=UQACConfig(n_heads=1))
    assert one[3].tolist() == pytest.approx([0.0, 1.0, 0.0, 0.0])
    both = reduce_attention(att, config=UQACConfig(n_heads=2))
    assert both[3].tolist() == pytest.approx([0.0, 1.0, w0 / (w0 + w1), 0.0])
    mean = reduce_attention(att, config=UQACConfig(n_heads=2, head_reduction="mean"))
    assert mean[3].tolist() == pytest.approx([0.0, (1 + w1 / (w0 + w1)) / 2, w0 / (w0 + w1) / 2, 0.0])
    assert torch.all(torch.diagonal(both) == 0) and torch.all(both[:, 0] == 0)
    # rows given from position 2 on: row 0 of the input is position 2, its self key is 2
    tail = reduce_attention(att[:, :, 2:], first_row=2, config=UQACConfig(n_heads=2))
    assert tail[1].tolist() == pytest.approx(both[3].tolist())


def test_marginalisation_hand_table():
    # variants x answer tokens and variants x chain tokens
    answer = [[0.9, 0.8], [0.5, 0.6], [0.1, 0.3]]
    chain = [[0.6, 0.7], [0.2, 0.7], [0.6, 0.05]]
    hand = 0.9 * 0.8 * 0.6 * 0.7 + 0.5 * 0.6 * 0.2 * 0.7 + 0.1 * 0.3 * 0.6 * 0.05
    assert marginal_confidence(answer, chain) == pytest.approx(hand, abs=1e-15)
    assert math.exp(marginal_log_confidence(np.log(answer), np.log(chain))) == pytest.approx(hand, rel=1e-12)
    # no chain tokens: the plain answer probability
    assert marginal_confidence([[0.25, 0.5]], np.zeros((1, 0))) == pytest.approx(0.125)
    with pytest.raises(TokoptError, match="same number"):
        marginal_confidence(answer, chain[:2])
    with pytest.raises(TokoptError, match="probabilities"):
        marginal_confidence([[1.5]], [[0.5]])


def test_substitutions_hand_table():
    ids = [[10, 11, 12], [20, 21, 22]]
    probs = [[0.7, 0.2, 0.005], [0.5, 0.3, 0.15]]
    # originals 10 and 21 are excluded, 12 is below 0.01; the rest by decreasing probability
    assert substitutions(ids, probs, [10, 21]) == [(1, 20), (0, 11), (1, 22)]
    assert substitutions(ids, probs, [10, 21], UQACConfig(max_substitutions=2)) == [(1, 20), (0, 11)]
    assert substitutions(ids, probs, [10, 21], UQACConfig(min_candidate_prob=0.4)) == [(1, 20)]


def test_config_validation():
    with pytest.raises(TokoptError, match="n_heads"):
        UQACConfig(n_heads=0)
    with pytest.raises(TokoptError, match="head_reduction"):
        UQACConfig(head_reduction="sum")
    with pytest.raises(Exception):
        UQACConfig().n_heads = 3  # frozen


# ---------------------------------------------------------------- real model

@pytest.fixture(scope="module")
def lm():
    import tokopt

    return tokopt.load(progress=False)


def _ids(tok, text):
    return tok(text).input_ids


def _answer_logprob(model, ids, positions):
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
    return float(sum(logp[p - 1, ids[p]] for p in positions))


def test_correct_beats_absurd_and_matches_plain_probability(lm):
    model, tok = lm
    prompt = _ids(tok, "The capital of France is")
    good = uqac(model, tok, prompt, _ids(tok, " Paris"))
    bad_ids = _ids(tok, " a purple banana")
    bad = uqac(model, tok, prompt, bad_ids)
    assert 0 < good.confidence <= 1 and 0 < bad.confidence <= 1
    assert good.confidence > bad.confidence and good.uncertainty < bad.uncertainty
    assert bad.uncertainty == pytest.approx(-math.log(bad.confidence), rel=1e-9)
    # no response tokens before the answer: empty chain, one variant, confidence = p(answer | prompt)
    assert bad.chain == () and bad.variants == 1 and bad.answer_span == (0, 3)
    n = len(prompt)
    plain = _answer_logprob(model, prompt + bad_ids, range(n, n + 3))
    assert bad.uncertainty == pytest.approx(-plain, rel=1e-4)


def test_chain_in_a_longer_response(lm):
    model, tok = lm
    prompt = _ids(tok, "Question: What is the capital of France? Answer:")
    response = _ids(tok, " The capital of France is Paris. It is known for the Eiffel Tower.")
    words = [tok.decode([t]) for t in response]
    assert words[5] == " Paris"
    res = uqac(model, tok, prompt, response, answer_span=(5, 6))
    assert 0 < res.confidence <= 1 and res.answer_span == (5, 6)
    assert res.chain, "expected an attention chain through ' capital' / ' France'"
    assert all(0 <= p < 5 for p in res.chain)
    assert not any(is_stop_token(words[p]) for p in res.chain)
    assert set(res.kept) <= set(res.chain) and res.variants >= 1
    # brute force: every variant through a plain forward, sum of p(answer) * prod p(kept chain tokens)
    n = len(prompt)
    ids = prompt + response
    assert res.variants == 1 + len(res.substitutions) and res.variants > 1
    assert all(pos in res.kept and tok_id != response[pos] for pos, tok_id in res.substitutions)
    terms = []
    for pos, tok_id in ((None, None),) + res.substitutions:
        variant = list(ids)
        if pos is not None:
            variant[n + pos] = tok_id
        terms.append(math.exp(_answer_logprob(model, variant, [n + 5] + [n + p for p in res.kept])))
    assert res.confidence == pytest.approx(sum(terms), rel=1e-4)
    assert res.confidence > terms[0]
    # a wrong answer in the same place is less confident
    wrong = list(response)
    wrong[5] = _ids(tok, " Berlin")[0]
    assert uqac(model, tok, prompt, wrong, answer_span=(5, 6)).confidence < res.confidence


def test_default_span_drops_trailing_eos_and_whitespace(lm):
    model, tok = lm
    prompt = _ids(tok, "The capital of France is")
    response = _ids(tok, " Paris") + _ids(tok, "\n") + [tok.eos_token_id]
    res = uqac(model, tok, torch.tensor(prompt), torch.tensor(response))
    assert res.answer_span == (0, 1)


def test_bad_input(lm):
    model, tok = lm
    prompt, response = _ids(tok, "The capital of France is"), _ids(tok, " Paris")
    with pytest.raises(TokoptError, match="1-D"):
        uqac(model, tok, torch.tensor([prompt]), response)
    with pytest.raises(TokoptError, match="integer"):
        uqac(model, tok, prompt, torch.tensor([1.5, 2.0]))
    with pytest.raises(TokoptError, match="integer"):
        uqac(model, tok, "The capital", response)
    with pytest.raises(TokoptError, match="empty"):
        uqac(model, tok, [], response)
    with pytest.raises(TokoptError, match="empty or out of range"):
        uqac(model, tok, prompt, response, answer_span=(1, 1))
    with pytest.raises(TokoptError, match="empty or out of range"):
        uqac(model, tok, prompt, response, answer_span=(0, 5))
    with pytest.raises(TokoptError, match="no answer tokens"):
        uqac(model, tok, prompt, [tok.eos_token_id])
    with pytest.raises(TokoptError, match="vocabulary"):
        uqac(model, tok, prompt, [10 ** 7])
    assert model.config._attn_implementation == "sdpa"


def test_attention_implementation_restored(lm, monkeypatch):
    model, tok = lm
    before = model.config._attn_implementation
    assert before != "eager"
    uqac(model, tok, _ids(tok, "The capital of France is"), _ids(tok, " Paris"))
    assert model.config._attn_implementation == before
    # restored after a failing forward too
    def boom(*args, **kwargs):
        assert model.config._attn_implementation == "eager"
        raise RuntimeError("boom")

    monkeypatch.setattr(model.model, "forward", boom)
    with pytest.raises(RuntimeError, match="boom"):
        uqac(model, tok, _ids(tok, "The capital of France is"), _ids(tok, " Paris"))
    assert model.config._attn_implementation == before


def test_model_without_attentions(lm, monkeypatch):
    model, tok = lm
    # a model that cannot switch to eager keeps SDPA, which returns no attention weights
    monkeypatch.setattr(model, "set_attn_implementation", lambda name: None)
    with pytest.raises(TokoptError, match="no attention weights"):
        uqac(model, tok, _ids(tok, "The capital of France is"), _ids(tok, " Paris"))

    def refuse(name):
        raise ValueError("eager is not supported")

    monkeypatch.setattr(model, "set_attn_implementation", refuse)
    with pytest.raises(TokoptError, match="cannot switch to eager"):
        uqac(model, tok, _ids(tok, "The capital of France is"), _ids(tok, " Paris"))


def test_module_docstring_names_the_paper():
    import sys

    assert "2503.19168" in sys.modules["tokopt.uncertainty.uqac"].__doc__


def test_variant_forward_with_and_without_shared_prefix(lm):
    from tokopt.uncertainty.uqac import _variant_logprobs

    model, tok = lm
    ids = torch.tensor(_ids(tok, "Tom has 3 apples and buys 5 more, so he has 8 apples."))
    variants = ids.unsqueeze(0).repeat(3, 1)
    variants[1, 6], variants[2, 8] = 11, 12
    rows = [6, 9, 11]
    with torch.no_grad():
        cache = model(ids.unsqueeze(0), use_cache=True).cache
        shared = _variant_logprobs(model, variants, 6, rows, cache, "cpu")
        plain = _variant_logprobs(model, variants, 6, rows, None, "cpu")
        full = torch.log_softmax(model(variants).logits[:, rows].float(), -1)
    assert torch.allclose(shared, full, atol=1e-4) and torch.allclose(plain, full, atol=1e-4)
