"""Cautious Next Token Prediction (CNTP, arXiv 2507.03038): sample several short continuations where the model
is unsure, keep the most confident one.

At each step the entropy H (nats) of the processed next-token distribution sets the number of trials::

    N = round(1 + (n_max - 1) * clamp((H - 0.01) / (1.5 - 0.01), 0, 1))   (rounded half up)

N == 1: the step takes the sampled (or, with ``do_sample=False``, the greedy) token, exactly as ``generate``
does. N > 1: N trials each sample a continuation up to and including the first punctuation token (or EOS, or
``max_trial_tokens``, or the token budget); the trial with the lowest perplexity (under the processed
distribution it was drawn from) is kept and all its tokens are emitted.

The trials share one prefix KV cache: the prefix is stored once and the N chains are appended as disjoint
branches, one forward per trial depth holding every live chain's next token (positions = prefix length +
depth; each token sees the prefix and its own chain only, ``shared_prefix_mask``). A chain's last token is fed
too, so the chosen chain leaves the logits for the step after it; the cache is then compacted to the prefix
plus the chosen chain (``KVCache.compact_tail``, as the speculative path does after verification).

Example::

    opt = tokopt.optimize(tokopt.load()[0]); tok = opt.tokenizer
    ids = tok("Question: why is the sky blue?\\nAnswer:", return_tensors="pt").input_ids
    result = cautious_generate(opt.engine, ids, max_new_tokens=48, tokenizer=tok,
                               sampling=SamplingParams(do_sample=True, seed=0), eos_token_ids=[tok.eos_token_id])
    print(tok.decode(result.new_tokens[0]), result.stats.trials)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from tokopt.errors import TokoptError
from tokopt.models.masks import step_mask
from tokopt.runtime.logprobs import entropy
from tokopt.runtime.request import (Clock, GenerationRequest, GenerationResult, Rows, decode_one_token, finish,
                                    prefill)
from tokopt.runtime.sampling import SamplingParams, next_token, process_logits
from tokopt.runtime.speculative.decode import compact

ENTROPY_LOW, ENTROPY_HIGH = 0.01, 1.5  # nats: below, one trial; above, n_max trials
PUNCTUATION = set(".,!?;:") | set("。，！？；：…")


def num_trials(entropy_nats: float, n_max: int = 40) -> int:
    """CNTP's trial count for a step whose processed distribution has entropy ``entropy_nats``.

    Example::

        >>> num_trials(0.0), num_trials(1.0, 40), num_trials(9.0, 40)
        (1, 27, 40)
    """
    if n_max < 1:
        raise TokoptError(f"n_max must be >= 1, got {n_max}")
    if math.isnan(entropy_nats):
        raise TokoptError("the entropy of the next-token distribution is NaN; the logits are not finite")
    scale = min(max((entropy_nats - ENTROPY_LOW) / (ENTROPY_HIGH - ENTROPY_LOW), 0.0), 1.0)
    return int(math.floor(1 + (n_max - 1) * scale + 0.5))  # rounded half up


def punctuation_token_ids(tokenizer) -> set:
    """Ids of the tokens that end a trial: those whose text, without surrounding whitespace, is made only of
    sentence/clause punctuation (``. , ! ? ; :``, their CJK forms and ``…``), e.g. ``.``, `` ,``, ``...`` or
    ``.\\n``; the whole vocabulary is decoded once (about a second for 49k tokens).

    Example::

        punct = punctuation_token_ids(tokenizer)
        assert tokenizer.convert_tokens_to_ids(".") in punct
    """
    if tokenizer is None or not hasattr(tokenizer, "decode"):
        raise TokoptError("punctuation_token_ids needs a Hugging Face tokenizer (with .decode)")
    size = len(tokenizer)
    texts = tokenizer.batch_decode([[i] for i in range(size)], skip_special_tokens=False)
    return {i for i, text in enumerate(texts) if (s := text.strip()) and all(c in PUNCTUATION for c in s)}


def shared_prefix_mask(past_visible: torch.Tensor, structure: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """Additive mask ``[1, 1, N, P + N]`` for N new tokens (batch 1) where each new token has its own view of
    the cache: ``past_visible`` ``[N, P]`` bool (the shared prefix and its own branch's earlier slots) and
    ``structure`` ``[N, N]`` bool among the new tokens. Branches of a tree over one stored prefix.

    Example::

        # two branches of one token each over a 5-slot cache whose slot 0 is the null slot
        visible = torch.tensor([[0, 1, 1, 1, 1]], dtype=torch.bool).expand(2, 5)
        mask = shared_prefix_mask(visible, torch.eye(2, dtype=torch.bool))
    """
    n, p = past_visible.shape
    mask = step_mask(torch.ones(1, p, dtype=torch.bool), structure, dtype=dtype)  # [1, 1, N, P + N]
    mask[0, 0, :, :p].masked_fill_(~past_visible, torch.finfo(dtype).min)
    return mask


@dataclass
class TrialSet:
    """What one CNTP step's trials did."""

    chains: list  # per trial: its tokens
    logprobs: list  # per trial: log-probability of each token under the processed distribution
    perplexities: list  # per trial: exp(-mean logprob)
    chosen: int  # index of the lowest-perplexity trial (first on ties)
    forwards: int  # batched trial forwards (one per depth)
    logits: list | None = None  # keep_logits: per trial, [fed tokens, V] logits after each fed token


@dataclass
class CautiousStats:
    """Per step of ``cautious_generate``: the entropy, the number of trials and the tokens emitted."""

    entropies: list = field(default_factory=list)
    trials: list = field(default_factory=list)
    emitted: list = field(default_factory=list)
    trial_sets: list = field(default_factory=list)  # TrialSet of each step with N > 1
    forwards: int = 0

    @property
    def steps(self) -> int:
        return len(self.trials)

    def to_dict(self) -> dict:
        return {"steps": self.steps, "entropies": self.entropies, "trials": self.trials, "emitted": self.emitted,
                "forwards": self.forwards}


def run_trials(engine, cache, logits, position: int, n: int, *, sampling: SamplingParams, generator=None,
               max_tokens: int = 16, stop_ids=frozenset(), final_ids=frozenset(), horizon: int | None = None,
               keep_logits: bool = False):
    """Run ``n`` trials from the pending distribution ``logits`` ``[V]`` (the token at ``position``, not yet in
    ``cache``) as branches over the shared prefix ``cache`` (batch 1). A trial ends after a token in
    ``stop_ids`` (punctuation, EOS) or ``final_ids`` (EOS) or at ``max_tokens`` tokens. Every chain's tokens are
    fed, so a chosen chain that goes on leaves its next logits, except a last token that ends the generation
    anyway: one in ``final_ids`` or the ``horizon``-th token of a chain (the token budget left).

    Returns ``(TrialSet, cache, next_logits)``: the cache compacted to the prefix + the chosen chain's fed
    tokens, and the logits ``[V]`` after the chosen chain's last token (None when it was not fed).
    """
    dtype = engine.spec.torch_dtype
    start = cache.length
    prefix_visible = cache.valid[0]
    processed = process_logits(logits[None], sampling)
    first = torch.multinomial(processed.softmax(-1), n, replacement=True, generator=generator)[0]
    logp = torch.log_softmax(processed.double(), dim=-1)[0]
    chains = [[t] for t in first.tolist()]
    logprobs = [[float(logp[t])] for t in first.tolist()]
    done = [t in stop_ids or t in final_ids or max_tokens <= 1 for t in first.tolist()]
    fed = [0] * n
    owner = []  # tail slot -> trial
    kept = [[] for _ in range(n)] if keep_logits else None
    last_logits = [None] * n
    forwards = 0
    while True:
        feed = [i for i in range(n) if fed[i] < len(chains[i]) and not (
            done[i] and fed[i] == len(chains[i]) - 1 and (chains[i][-1] in final_ids or len(chains[i]) == horizon))]
        if not feed:
            break
        m = len(feed)
        tokens = torch.tensor([[chains[i][fed[i]] for i in feed]])
        positions = torch.tensor([[position + fed[i] for i in feed]])
        tail = torch.tensor(owner, dtype=torch.long)[None, :] == torch.tensor(feed)[:, None]  # [m, tail]
        visible = torch.cat([prefix_visible[None, :start].expand(m, start), tail], dim=1)
        mask = shared_prefix_mask(visible, torch.eye(m, dtype=torch.bool), dtype)
        out = engine(tokens, positions, mask, torch.arange(m), cache.tensors)
        cache = cache.extend(out.present, torch.ones(1, m, dtype=torch.bool))
        owner += feed
        forwards += 1
        rows = out.logits[0]
        live = []
        for row, i in enumerate(feed):
            fed[i] += 1
            if keep_logits:
                kept[i].append(rows[row])
            if done[i]:
                last_logits[i] = rows[row]
            else:
                live.append((row, i))
        if live:
            scores = process_logits(rows[[r for r, _ in live]], sampling)
            drawn = torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(-1).tolist()
            lp = torch.log_softmax(scores.double(), dim=-1)
            for k, ((_, i), t) in enumerate(zip(live, drawn)):
                chains[i].append(t)
                logprobs[i].append(float(lp[k, t]))
                done[i] = t in stop_ids or t in final_ids or len(chains[i]) >= max_tokens
    perplexities = [math.exp(-sum(lp) / len(lp)) for lp in logprobs]
    chosen = min(range(n), key=lambda i: (perplexities[i], i))
    slots = [s for s, i in enumerate(owner) if i == chosen]
    index = torch.tensor([slots], dtype=torch.long)
    cache = compact(cache, start, index, torch.ones_like(index, dtype=torch.bool))
    trial_set = TrialSet(chains, logprobs, perplexities, chosen, forwards,
                         [torch.stack(k) if k else None for k in kept] if keep_logits else None)
    return trial_set, cache, last_logits[chosen]


def _check_settings(request: GenerationRequest, n_max: int, max_trial_tokens: int) -> None:
    if max_trial_tokens < 1:
        raise TokoptError(f"max_trial_tokens must be >= 1, got {max_trial_tokens}")
    num_trials(0.0, n_max)  # checks n_max
    if request.sampling.gumbel_seed is not None:
        raise TokoptError("cautious_generate draws its trials with a torch generator; gumbel_seed is not supported")
    if request.batch != 1:
        raise TokoptError(f"cautious_generate decodes one prompt at a time (batch 1), got a batch of "
                          f"{request.batch}; call it once per prompt")


def _trial_enders(punctuation_ids, tokenizer, n_max: int) -> frozenset:
    """The punctuation ids that end a trial: given, else the tokenizer's (``punctuation_token_ids``)."""
    if punctuation_ids is None:
        if tokenizer is None and n_max > 1:
            raise TokoptError("CNTP trials end at punctuation: pass punctuation_ids=... or tokenizer=... "
                              "(punctuation_ids=() lets trials run to max_trial_tokens)")
        punctuation_ids = punctuation_token_ids(tokenizer) if tokenizer is not None else set()
    return frozenset(int(t) for t in punctuation_ids)


def _cautious_step(engine, cache, logits, position: int, budget: int, request: GenerationRequest, *, n_max: int,
                   max_trial_tokens: int, punct: frozenset, generator, stats: CautiousStats):
    """One CNTP step from the pending distribution ``logits`` ``[V]`` of the token at ``position``: the entropy
    sets the trials; one trial takes the next token, more keep the most confident chain. Returns (tokens to emit,
    cache, the logits after them or None when they end the generation, forwards run)."""
    sampling, eos = request.sampling, frozenset(request.eos_token_ids)
    h = float(entropy(process_logits(logits[None], sampling))[0])
    n = num_trials(h, n_max)
    stats.entropies.append(h)
    stats.trials.append(n)
    if n > 1:
        trial_set, cache, next_logits = run_trials(
            engine, cache, logits, position, n, sampling=sampling, generator=generator,
            max_tokens=min(max_trial_tokens, budget), stop_ids=punct | eos, final_ids=eos, horizon=budget)
        stats.trial_sets.append(trial_set)
        return trial_set.chains[trial_set.chosen], cache, next_logits, trial_set.forwards
    token = int(next_token(logits[None], sampling, generator, positions=torch.tensor([position]))[0])
    if token in eos or budget <= 1:
        return [token], cache, None, 0
    out, cache = decode_one_token(engine, cache, torch.tensor([token]), torch.tensor([position]))
    return [token], cache, out.logits[0, -1], 1


def cautious_decode(engine, request: GenerationRequest, *, n_max: int = 40, max_trial_tokens: int = 16,
                    punctuation_ids=None, seed: int | None = None) -> GenerationResult:
    """CNTP decoding (module docstring) of a one-prompt ``request``; its sampling parameters process the
    distribution (see ``cautious_generate``), its tokenizer gives the punctuation ids unless ``punctuation_ids``.

    Example::

        request = GenerationRequest.create(ids, spec=engine.spec, max_new_tokens=32, tokenizer=tok,
                                           sampling=SamplingParams(do_sample=True), eos_token_ids=[2])
        result = cautious_decode(engine, request, n_max=8, seed=0)
    """
    _check_settings(request, n_max, max_trial_tokens)
    punct = _trial_enders(punctuation_ids, request.tokenizer, n_max)
    generator = (torch.Generator().manual_seed(seed) if seed is not None else request.sampling.generator())
    stats = CautiousStats()
    clock = Clock()
    out, cache = prefill(engine, request.input_ids, request.prompt_valid)
    clock.prefilled()
    rows = Rows(request)
    logits, position, forwards = out.logits[0, -1], int(request.prompt_lengths()[0]), 1
    while True:
        emitted, cache, logits, used = _cautious_step(
            engine, cache, logits, position, request.max_new_tokens - len(rows.tokens[0]), request, n_max=n_max,
            max_trial_tokens=max_trial_tokens, punct=punct, generator=generator, stats=stats)
        forwards += used
        taken = rows.emit(0, emitted)
        stats.emitted.append(taken)
        position += taken
        if rows.done or logits is None:
            break
    stats.forwards = forwards
    return finish(request, rows, clock, forwards, stats=stats)


def cautious_generate(engine, input_ids, *, max_new_tokens: int,
                      sampling: SamplingParams = SamplingParams(do_sample=True), n_max: int = 40,
                      max_trial_tokens: int = 16, punctuation_ids=None, tokenizer=None, eos_token_ids=(),
                      seed: int | None = None) -> GenerationResult:
    """Generate with CNTP (module docstring) for one prompt (``[T]`` or ``[1, T]`` ids).

    ``sampling`` processes the distribution (temperature, top-k, top-p) for the entropy, single-trial steps
    and the trials; with ``do_sample=False`` single-trial steps take the argmax and trials still sample.
    ``punctuation_ids`` end trials (default ``punctuation_token_ids(tokenizer)``); ``seed`` overrides
    ``sampling.seed`` for the draws. ``result.stats`` is a ``CautiousStats`` (entropy, trials, tokens per step).

    Example::

        result = cautious_generate(opt.engine, ids, max_new_tokens=32, tokenizer=tok, seed=0)
    """
    request = GenerationRequest.create(input_ids, spec=engine.spec, max_new_tokens=max_new_tokens,
                                       sampling=sampling, eos_token_ids=eos_token_ids, tokenizer=tokenizer)
    return cautious_decode(engine, request, n_max=n_max, max_trial_tokens=max_trial_tokens,
                           punctuation_ids=punctuation_ids, seed=seed)
