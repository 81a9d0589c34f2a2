"""UQAC: uncertainty quantification by attention chains (arXiv 2503.19168; reference code Yinghao-Li/UQAC).

The confidence of an answer inside a response is the probability of the answer tokens marginalised over the
tokens the answer was "reasoned from". Those tokens are found through attention:

1. One teacher-forced pass over ``[prompt; response]`` with eager attention returns every layer's attention,
   the last hidden states and the next-token distributions.
2. ``reduce_attention``: zero self-attention and attention to the sink (position 0), down-weight the
   ``len(recency_weights)`` most recent keys, renormalise each row, keep the ``n_heads`` lowest-entropy heads
   (over all layers and heads) per row and take their maximum.
3. ``attention_chain``: backtrack from the answer tokens through the strongest attention, skipping stopwords,
   punctuation and prompt tokens, up to ``buffer_size`` new tokens per iteration, stopping below
   ``score_threshold`` once the chain has ``min_chain_len`` tokens.
4. ``similarity_filter``: keep the ``sim_top_k`` chain tokens whose last hidden state is most cosine-similar
   (mean over the answer tokens) to the answer's.
5. Variants: the response itself plus single-token substitutions of a kept chain token by one of its
   ``n_candidates`` most likely alternatives with probability > ``min_candidate_prob`` (at most
   ``max_substitutions``), scored in ONE batched forward; ``marginal_confidence``:
   ``confidence = sum_v prod p_v(answer tokens) * prod p_v(chain tokens)``.

Index conventions: attention row ``s`` is the query at position ``s``; the distribution that generates the token
at position ``k`` is the one computed at row ``k - 1``. As in the reference code, a token ``k`` is added to the
chain through its predicting row, and backtracking continues from row ``k - 1``.

Only response tokens before the answer can join the chain (the prompt is given, as in the reference code). With
the default answer span (the whole response) the chain is therefore empty and the confidence is the plain
probability of the response; pass the span of the final answer inside a longer response to use the chain.

Cost: the sequence is cut after the answer; the response itself is scored by the first pass, and the
substitution variants run as one batch over the tokens after their shared prefix, on the first pass's KV cache.

Differences from the reference code (Yinghao-Li/UQAC), on purpose:

- The row that predicts the first response token (the prompt's last row) is used; the reference zeroes every
  prompt row, so an answer at the start of a response had no backtracking source there.
- Recency down-weighting is clipped at position 0 (the reference's indexing wraps around for early rows).
- Substitution candidates exclude exactly the original token; the reference removes the first column of a row
  whose original token is not among its top-5 (then a real alternative). The ``max_substitutions`` best
  non-original alternatives are taken; the reference takes the top (10 + kept chain tokens) entries of the table
  and then drops the originals, which gives the same set whenever every original is among them.
- Stopwords: the same English function-word list; punctuation is any token made only of Unicode punctuation
  (the reference lists 24 characters); tokens are decoded one by one, as in the reference.
- ``confidence`` is clipped to 1 (sums of products can round just above it).

Example::

    model, tok = tokopt.load()
    prompt = tok("The capital of France is").input_ids
    result = uqac(model, tok, prompt, tok(" Paris").input_ids)
    result.confidence, result.uncertainty, result.chain
"""

from __future__ import annotations

import inspect
import math
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from tokopt.errors import TokoptError

# Multipliers of the 10 keys just before the query, nearest first (index 0 = the previous token). These are the
# constants of the reference implementation (its CALIBRATION_RATIO, listed there farthest first).
RECENCY_WEIGHTS = (0.16644488, 0.20938152, 0.32959151, 0.46061748, 0.59304059,
                   0.67549127, 0.73914525, 0.81274293, 0.87378443, 0.93925344)

# English function words that never enter an attention chain (compared lower-cased, whitespace removed;
# straight and curly apostrophes both match).
STOPWORDS = frozenset("""
a about above after again against all am an and any are aren't as at be because been before being below
between both but by can't cannot could couldn't did didn't do does doesn't doing don't down during each few for
from further had hadn't has hasn't have haven't having he he'd he'll he's her here here's hers herself him
himself his how how's i i'd i'll i'm i've if in into is isn't it it's its itself let's me more most mustn't my
myself no nor not of off on once only or other ought our ours ourselves out over own same shan't she she'd
she'll she's should shouldn't so some such than that that's the their theirs them themselves then there
there's these they they'd they'll they're they've this those through to too under until up very was wasn't we
we'd we'll we're we've were weren't what what's when when's where where's which while who who's whom why why's
with won't would wouldn't you you'd you'll you're you've your yours yourself yourselves
""".split())


@dataclass(frozen=True)
class UQACConfig:
    """The constants of UQAC; the defaults are the paper's / reference code's.

    - ``n_heads`` (16): attention heads kept per query row, the ones with the lowest attention entropy among
      all layers x heads.
    - ``head_reduction`` ("max"): how the kept heads are combined ("max" or "mean").
    - ``recency_weights``: multipliers of the most recent keys, nearest first (10 values).
    - ``buffer_size`` (3): at most this many new chain tokens per backtracking iteration.
    - ``score_threshold`` (0.5): a candidate scoring below this stops the iteration once the chain (not
      counting the answer tokens) has ``min_chain_len`` tokens.
    - ``min_chain_len`` (5): see ``score_threshold``.
    - ``keys_per_row`` (5): keys examined per source row, by decreasing attention; past them the scan goes on
      only while nothing has been found and the chain is shorter than ``min_chain_len``.
    - ``sim_top_k`` (10), ``sim_threshold`` (0.0): chain tokens kept for marginalisation: the ``sim_top_k``
      most similar to the answer (mean cosine similarity of last hidden states) with similarity >= threshold.
    - ``n_candidates`` (5): alternatives read per kept chain token (its top-5 next-token predictions).
    - ``min_candidate_prob`` (0.01): an alternative needs probability above this.
    - ``max_substitutions`` (10): the most probable alternatives over all kept chain tokens become variants.
    """

    n_heads: int = 16
    head_reduction: str = "max"
    recency_weights: tuple = RECENCY_WEIGHTS
    buffer_size: int = 3
    score_threshold: float = 0.5
    min_chain_len: int = 5
    keys_per_row: int = 5
    sim_top_k: int = 10
    sim_threshold: float = 0.0
    n_candidates: int = 5
    min_candidate_prob: float = 0.01
    max_substitutions: int = 10

    def __post_init__(self):
        for name in ("n_heads", "buffer_size", "keys_per_row", "n_candidates"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise TokoptError(f"UQACConfig.{name} must be an integer >= 1, got {getattr(self, name)!r}")
        for name in ("min_chain_len", "sim_top_k", "max_substitutions"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise TokoptError(f"UQACConfig.{name} must be an integer >= 0, got {getattr(self, name)!r}")
        if self.head_reduction not in ("max", "mean"):
            raise TokoptError(f"UQACConfig.head_reduction must be 'max' or 'mean', got {self.head_reduction!r}")
        if not (0.0 <= self.min_candidate_prob < 1.0):
            raise TokoptError(f"UQACConfig.min_candidate_prob must be in [0, 1), got {self.min_candidate_prob!r}")


@dataclass(frozen=True)
class UQACResult:
    """What ``uqac`` found.

    - ``confidence``: the marginal probability in [0, 1]; higher = more confident.
    - ``uncertainty``: ``-log(confidence)`` (computed in log space, so finite even where ``confidence``
      underflows to 0); in [0, inf), higher = more uncertain.
    - ``chain``: response positions (indices into ``response_ids``) of the attention chain, ascending,
      without the answer tokens; ``chain_scores`` their backtracking scores.
    - ``kept``: the chain positions kept by the similarity filter (the ones marginalised over).
    - ``answer_span``: the (start, end) response indices of the answer tokens used.
    - ``variants``: sequences marginalised over (the response itself plus the substitutions).
    - ``substitutions``: ``(response position, token id)`` of each substitution variant.
    """

    confidence: float
    uncertainty: float
    chain: tuple
    chain_scores: tuple
    kept: tuple
    answer_span: tuple
    variants: int
    substitutions: tuple = ()


# ----------------------------------------------------------------------------------------------------------------
# Pure parts (no model): testable on hand-made arrays
# ----------------------------------------------------------------------------------------------------------------

def is_stop_token(token: str) -> bool:
    """Whether a decoded token may never be a chain token: empty/whitespace, a stopword or only punctuation.

    Example::

        >>> is_stop_token(" the"), is_stop_token(" Paris"), is_stop_token("."), is_stop_token(" 42")
        (True, False, True, False)
    """
    text = "".join(token.split()).lower().replace("\u2019", "'")
    if not text or text in STOPWORDS:
        return True
    return all(unicodedata.category(ch).startswith("P") for ch in text)


def _as_array(values, name: str, ndim: int) -> np.ndarray:
    if hasattr(values, "detach"):
        values = values.detach().cpu().double().numpy()
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TokoptError(f"{name} must be an array of numbers: {exc}") from None
    if arr.ndim != ndim:
        raise TokoptError(f"{name} must be {ndim}-dimensional, got shape {arr.shape}")
    if np.isnan(arr).any():
        raise TokoptError(f"{name} contains NaN")
    return arr


def reduce_attention(attentions, first_row: int = 0, config: UQACConfig = UQACConfig()) -> torch.Tensor:
    """Reduce attention ``[heads, rows, keys]`` (layers x heads flattened; row i is the query at position
    ``first_row + i``) to one ``[rows, keys]`` matrix.

    Zeroes self-attention and key 0 (the sink), multiplies the keys 1..10 before the query by
    ``config.recency_weights``, renormalises every (head, row), keeps per row the ``config.n_heads`` heads with
    the lowest entropy and combines them by ``config.head_reduction``.
    """
    att = torch.as_tensor(attentions).detach().to(torch.float64).clone()
    if att.ndim == 4:
        att = att.reshape(-1, att.shape[-2], att.shape[-1])
    if att.ndim != 3:
        raise TokoptError(f"reduce_attention: attentions must be [heads, rows, keys] or [layers, heads, rows, keys], "
                          f"got shape {tuple(att.shape)}")
    n_heads, n_rows, n_keys = att.shape
    if first_row < 0 or first_row + n_rows > n_keys:
        raise TokoptError(f"reduce_attention: rows {first_row}..{first_row + n_rows - 1} do not fit {n_keys} keys")
    rows = torch.arange(n_rows)
    pos = rows + first_row
    att[:, rows, pos] = 0.0
    att[:, :, 0] = 0.0
    weights = torch.as_tensor(config.recency_weights, dtype=torch.float64)
    for d in range(1, weights.numel() + 1):
        ok = pos - d >= 0
        att[:, rows[ok], pos[ok] - d] *= weights[d - 1]
    att /= att.sum(-1, keepdim=True) + 1e-12
    entropy = -(att * (att + 1e-12).log()).sum(-1)  # [heads, rows]
    k = min(config.n_heads, n_heads)
    keep = torch.topk(entropy, k, dim=0, largest=False).indices  # [k, rows]
    selected = att[keep, rows.unsqueeze(0)]  # [k, rows, keys]
    return selected.max(0).values if config.head_reduction == "max" else selected.mean(0)


def attention_chain(attn, tokens: Sequence[str], answer_span: tuple[int, int], *, first_selectable: int = 0,
                    config: UQACConfig = UQACConfig()) -> tuple[list[int], list[float]]:
    """Backtrack an attention chain from the answer tokens; returns (chain positions ascending, their scores).

    ``attn`` is a reduced attention matrix ``[rows, keys]`` (``reduce_attention``): ``keys`` = T positions,
    row i is the query at position ``T - rows + i`` (missing leading rows count as zero). ``tokens`` are the T
    decoded tokens; ``answer_span`` = (start, end) positions of the answer. Positions before
    ``first_selectable`` (the prompt), stopwords and punctuation (``is_stop_token``) never join the chain.

    From each source row s (initially ``a - 1`` for every answer token a) the keys k < s are scanned by
    decreasing attention (see ``UQACConfig.keys_per_row``); a key is skipped when it is a stop token or when
    ``k - 1`` was already a source (k is an answer or chain token already). Scores of a key are summed over the
    iteration's source rows; the best ``buffer_size`` become chain tokens, stopping early at a score below
    ``score_threshold`` once the chain holds ``min_chain_len`` tokens; their predicting rows ``k - 1`` are the
    next sources. The answer tokens themselves are not in the returned chain.
    """
    att = _as_array(attn, "attn", 2)
    n_rows, n_keys = att.shape
    if n_rows > n_keys:
        raise TokoptError(f"attention_chain: attn has more rows ({n_rows}) than keys ({n_keys})")
    if len(tokens) != n_keys:
        raise TokoptError(f"attention_chain: {len(tokens)} tokens for {n_keys} attention keys; give one per key")
    start, end = _check_span(answer_span, n_keys, "answer_span")
    if start < 1:
        raise TokoptError("attention_chain: the answer cannot start at position 0 (no row predicts it)")
    row_offset = n_keys - n_rows
    stop = np.array([i < first_selectable or is_stop_token(t) for i, t in enumerate(tokens)])

    sources = [a - 1 for a in range(start, end)]
    chain: list[int] = []
    scores: list[float] = []
    processed: set[int] = set()
    while sources:
        processed.update(sources)
        acc = np.zeros(n_keys)
        for s in sources:
            if s < row_offset:
                continue  # a missing (zero) row
            row = att[s - row_offset, :s]  # keys strictly before the query
            for rank, k in enumerate(np.argsort(-row, kind="stable")):
                if rank >= config.keys_per_row and ((acc > 0).any() or len(chain) >= config.min_chain_len):
                    break
                if stop[k] or (k - 1) in processed:
                    continue
                acc[k] += row[k]
        found = np.flatnonzero(acc > 0)
        found = found[np.argsort(-acc[found], kind="stable")]
        picked = []
        for k in found:
            if len(picked) >= config.buffer_size:
                break
            if acc[k] < config.score_threshold and len(chain) + len(picked) >= config.min_chain_len:
                break
            picked.append(int(k))
        chain.extend(picked)
        scores.extend(float(acc[k]) for k in picked)
        sources = [k - 1 for k in picked]
    order = np.argsort(chain, kind="stable")
    return [chain[i] for i in order], [scores[i] for i in order]


def similarity_filter(hidden, chain: Sequence[int], answer_positions: Sequence[int],
                      config: UQACConfig = UQACConfig()) -> list[int]:
    """The chain positions kept for marginalisation: the ``sim_top_k`` whose hidden state ``hidden[pos]`` has the
    highest mean cosine similarity to the answer tokens' (at least ``sim_threshold``), returned ascending."""
    if not chain or config.sim_top_k == 0:
        return []
    h = torch.as_tensor(hidden).detach().to(torch.float64)
    sims = torch.nn.functional.cosine_similarity(h[list(answer_positions)].unsqueeze(1),
                                                 h[list(chain)].unsqueeze(0), dim=-1).mean(0)
    ok = torch.nonzero(sims >= config.sim_threshold).flatten()
    best = ok[torch.argsort(sims[ok], descending=True, stable=True)][:config.sim_top_k]
    return sorted(int(chain[i]) for i in best)


def substitutions(candidate_ids, candidate_probs, original_ids, config: UQACConfig = UQACConfig()):
    """Single-token substitutions from a candidate table: ``candidate_ids/probs[j, c]`` are the top alternatives
    for kept chain token j whose actual id is ``original_ids[j]``. Returns ``[(j, token_id), ...]``: the
    ``max_substitutions`` most probable non-original alternatives with probability > ``min_candidate_prob``."""
    ids = np.asarray(candidate_ids)
    probs = _as_array(candidate_probs, "candidate_probs", 2)
    orig = np.asarray(original_ids).reshape(-1, 1)
    ok = (probs > config.min_candidate_prob) & (ids != orig)
    rows, cols = np.nonzero(ok)
    order = np.argsort(-probs[rows, cols], kind="stable")[:config.max_substitutions]
    return [(int(rows[i]), int(ids[rows[i], cols[i]])) for i in order]


def marginal_log_confidence(answer_logprobs, chain_logprobs) -> float:
    """``log sum_v prod_i p_v(answer_i) prod_j p_v(chain_j)`` from log-probabilities ``[variants, n]``."""
    a = _as_array(answer_logprobs, "answer_logprobs", 2)
    c = _as_array(chain_logprobs, "chain_logprobs", 2)
    if a.shape[0] != c.shape[0] or a.shape[0] == 0:
        raise TokoptError(f"marginal confidence: answer and chain tables need the same number (>= 1) of variants, "
                          f"got {a.shape[0]} and {c.shape[0]}")
    if (a > 1e-9).any() or (c > 1e-9).any():
        raise TokoptError("marginal confidence: log-probabilities must be <= 0")
    return float(np.logaddexp.reduce(a.sum(1) + c.sum(1)))


def marginal_confidence(answer_probs, chain_probs) -> float:
    """UQAC's marginalisation: ``sum_v prod_i answer_probs[v, i] * prod_j chain_probs[v, j]``.

    Example::

        >>> marginal_confidence([[0.9], [0.5]], [[0.6, 0.8], [0.2, 0.7]])  # 0.9*0.6*0.8 + 0.5*0.2*0.7
        0.502
    """
    a = _as_array(answer_probs, "answer_probs", 2)
    c = _as_array(chain_probs, "chain_probs", 2)
    for arr, name in ((a, "answer_probs"), (c, "chain_probs")):
        if ((arr < 0) | (arr > 1 + 1e-9)).any():
            raise TokoptError(f"marginal confidence: {name} must be probabilities in [0, 1]")
    if a.shape[0] != c.shape[0] or a.shape[0] == 0:
        raise TokoptError(f"marginal confidence: answer and chain tables need the same number (>= 1) of variants, "
                          f"got {a.shape[0]} and {c.shape[0]}")
    return float(round((a.prod(1) * c.prod(1)).sum(), 15))


# ----------------------------------------------------------------------------------------------------------------
# The model part
# ----------------------------------------------------------------------------------------------------------------

def _check_span(span, length: int, name: str) -> tuple[int, int]:
    try:
        start, end = (int(x) for x in span)
        if any(int(x) != x for x in span):
            raise ValueError
    except (TypeError, ValueError):
        raise TokoptError(f"{name} must be a pair of integers (start, end), got {span!r}") from None
    if not (0 <= start < end <= length):
        raise TokoptError(f"{name} {(start, end)} is empty or out of range: need 0 <= start < end <= {length}")
    return start, end


def _ids(values, name: str) -> torch.Tensor:
    if isinstance(values, np.ndarray):
        values = torch.from_numpy(values)
    if isinstance(values, torch.Tensor):
        t = values.detach().cpu()
        if t.dtype.is_floating_point or t.dtype == torch.bool or t.is_complex():
            raise TokoptError(f"{name} must be integer token ids, got dtype {t.dtype}")
    else:
        try:
            if any(isinstance(v, (bool, float, str)) or not hasattr(v, "__index__") for v in values):
                raise TypeError
            t = torch.tensor([int(v) for v in values], dtype=torch.long)
        except TypeError:
            raise TokoptError(f"{name} must be a 1-D sequence of integer token ids, got {type(values).__name__} "
                              f"{str(values)[:60]}") from None
    if t.ndim != 1:
        raise TokoptError(f"{name} must be 1-D token ids (one sequence, no batch dimension), "
                          f"got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise TokoptError(f"{name} is empty: need at least one token")
    if (t < 0).any():
        raise TokoptError(f"{name} contains negative token ids")
    return t.long()


def _default_span(response: torch.Tensor, tokenizer) -> tuple[int, int]:
    special = set(getattr(tokenizer, "all_special_ids", None) or [])
    for attr in ("eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, attr, None)
        special.update(value if isinstance(value, list) else [value] if value is not None else [])
    end = response.numel()
    while end > 0:
        tid = int(response[end - 1])
        if tid in special or not tokenizer.decode([tid]).strip():
            end -= 1
        else:
            break
    if end == 0:
        raise TokoptError("the response has no answer tokens: it is only EOS/special/whitespace tokens; "
                          "pass a non-empty response or an explicit answer_span")
    return 0, end


def _attention_implementation(model):
    return getattr(model.config, "_attn_implementation", None)


def _set_attention_implementation(model, name) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:
        model.config._attn_implementation = name


@torch.no_grad()
def uqac(model, tokenizer, prompt_ids, response_ids, answer_span=None, config: UQACConfig = UQACConfig()) -> UQACResult:
    """UQAC confidence of the answer tokens of ``response_ids`` given ``prompt_ids`` (see the module docstring).

    ``prompt_ids`` and ``response_ids`` are 1-D token ids (lists, tensors or arrays; the prompt already formatted,
    e.g. by a chat template). ``answer_span`` = (start, end) indices into the response; by default the whole
    response without trailing EOS / special / whitespace tokens. The model runs one eager-attention forward (its
    attention implementation is restored afterwards) and one batched forward over the variants.

    Example::

        model, tok = tokopt.load()
        r = uqac(model, tok, tok("The capital of France is").input_ids, tok(" Paris").input_ids)
        assert 0 < r.confidence <= 1 and r.uncertainty >= 0
    """
    if not isinstance(config, UQACConfig):
        raise TokoptError(f"config must be a UQACConfig, got {type(config).__name__}")
    prompt = _ids(prompt_ids, "prompt_ids")
    response = _ids(response_ids, "response_ids")
    vocab = getattr(model.config, "vocab_size", None)
    for t, name in ((prompt, "prompt_ids"), (response, "response_ids")):
        if vocab is not None and int(t.max()) >= vocab:
            raise TokoptError(f"{name} contains token id {int(t.max())}, outside the model's vocabulary ({vocab})")
    span = _default_span(response, tokenizer) if answer_span is None else _check_span(answer_span, response.numel(),
                                                                                        "answer_span")
    n_prompt = prompt.numel()
    # Nothing after the answer matters to a causal model: every row read is at most the last answer row.
    ids = torch.cat([prompt, response])[:n_prompt + span[1]]
    n_tokens = ids.numel()
    answer = list(range(n_prompt + span[0], n_tokens))
    device = next(model.parameters()).device
    first_row = n_prompt - 1  # the row that predicts the first response token

    # 1. teacher-forced pass with attentions (its KV cache is reused for the variants' shared prefix)
    old_impl = _attention_implementation(model)
    try:
        try:
            _set_attention_implementation(model, "eager")
        except Exception as exc:  # transformers raises several kinds
            raise TokoptError(f"uqac needs attention weights, but {type(model).__name__} cannot switch to eager "
                              f"attention: {exc}") from None
        out = model(ids.unsqueeze(0).to(device), output_attentions=True, output_hidden_states=True, use_cache=True,
                    logits_to_keep=torch.arange(first_row, n_tokens - 1, device=device))
    finally:
        if _attention_implementation(model) != old_impl:
            _set_attention_implementation(model, old_impl)
    attentions = getattr(out, "attentions", None)
    if not attentions or any(a is None for a in attentions):
        raise TokoptError(f"{type(model).__name__} returned no attention weights (attention implementation "
                          f"{old_impl!r}); uqac needs a model that returns attentions with eager attention")
    att = torch.stack([a[0, :, first_row:, :] for a in attentions]).float().cpu()  # [L, H, rows, T]
    hidden = out.hidden_states[-1][0].float().cpu()
    logp0 = torch.log_softmax(out.logits[0].float(), -1).cpu()  # index i: row first_row + i
    keys = set(out.keys()) if hasattr(out, "keys") else set()
    cache = out["cache"] if "cache" in keys else out["past_key_values"] if "past_key_values" in keys else None
    del out, attentions

    # 2-4. attention chain, similarity filter
    reduced = reduce_attention(att, first_row=first_row, config=config)
    tokens = [tokenizer.decode([int(t)]) for t in ids]
    chain, chain_scores = attention_chain(reduced, tokens, (answer[0], n_tokens), first_selectable=n_prompt,
                                          config=config)
    kept = similarity_filter(hidden, chain, answer, config)

    # 5. variants: the response itself (scored by the first pass) and the substitutions (one batched forward)
    subs = []
    if kept:
        top = torch.topk(logp0[[k - 1 - first_row for k in kept]].exp(), config.n_candidates, dim=-1)
        subs = substitutions(top.indices.numpy(), top.values.double().numpy(), ids[kept].numpy(), config)
    targets = answer + kept
    variants = ids.unsqueeze(0).repeat(1 + len(subs), 1)
    for v, (j, token) in enumerate(subs, start=1):
        variants[v, kept[j]] = token
    table = torch.empty(variants.shape[0], len(targets), dtype=torch.float64)
    prefix = min((kept[j] for j, _ in subs), default=n_tokens)  # tokens shared by every variant
    for i, p in enumerate(targets):
        if p - 1 < prefix:  # the row's context is shared: the first pass's distribution serves every variant
            table[:, i] = logp0[p - 1 - first_row, variants[:, p]].double()
    late = [i for i, p in enumerate(targets) if p - 1 >= prefix]
    if subs and late:
        rows = [targets[i] - 1 for i in late]
        logp = _variant_logprobs(model, variants[1:], prefix, rows, cache, device)  # [V-1, len(rows), vocab]
        table[0, late] = logp0[[r - first_row for r in rows], variants[0, [r + 1 for r in rows]]].double()
        table[1:, late] = logp.gather(-1, variants[1:, [r + 1 for r in rows]].unsqueeze(-1)).squeeze(-1).double()
    log_conf = min(marginal_log_confidence(table[:, :len(answer)], table[:, len(answer):]), 0.0)
    return UQACResult(confidence=float(math.exp(log_conf)), uncertainty=float(0.0 - log_conf),
                      chain=tuple(p - n_prompt for p in chain), chain_scores=tuple(chain_scores),
                      kept=tuple(p - n_prompt for p in kept), answer_span=span, variants=int(variants.shape[0]),
                      substitutions=tuple((kept[j] - n_prompt, token) for j, token in subs))


def _variant_logprobs(model, variants: torch.Tensor, prefix: int, rows: list[int], cache, device) -> torch.Tensor:
    """Log-distributions at ``rows`` of every variant (they agree on their first ``prefix`` tokens), in one batched
    forward: over the tokens after the shared prefix with the first pass's KV cache cut to the prefix and repeated
    per variant where the cache allows, else over the whole sequences."""
    end = max(rows) + 1
    if cache is not None and hasattr(cache, "crop") and hasattr(cache, "batch_repeat_interleave") \
            and hasattr(cache, "get_seq_length") and cache.get_seq_length() >= prefix > 0:
        cache.crop(prefix - cache.get_seq_length())  # a negative count removes that many tokens
        cache.batch_repeat_interleave(variants.shape[0])
        keep = torch.tensor([r - prefix for r in rows], device=device)
        name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        logits = model(variants[:, prefix:end].to(device), use_cache=True, logits_to_keep=keep,
                       **{name: cache}).logits
    else:
        logits = model(variants[:, :end].to(device), use_cache=False,
                       logits_to_keep=torch.tensor(rows, device=device)).logits
    return torch.log_softmax(logits.float(), -1).cpu()
