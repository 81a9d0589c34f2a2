"""The speculative decode loop: draft a tree per row, verify all trees in one forward, keep the accepted path.

Each step: ``drafter.draft`` gives every row a ``DraftTree`` rooted at its last emitted token; the trees are
padded into one batch and run through the same engine call as plain decoding (tree mask, positions = root
position + depth, logits for every node); ``verify`` accepts a path per row; the accepted nodes' K/V are
moved into contiguous cache slots (``KVCache.compact_tail``) and the rest of the tree's slots die.

What is not speculation's own is the plain loop's (``runtime.request``): the request, the prefill, the first
token, stopping rows on EOS, stop strings or the budget, padding finished rows, and the ``GenerationResult``
(HF-shaped sequences, taps from the target's rows of the accepted tokens), plus ``stats``: tokens emitted per
row per step, from which MAT is computed.

Example::

    drafter = TokenRecycling(spec.vocab_size)
    result = speculative_generate(engine, ids, drafter=drafter, max_new_tokens=128)
    print(result.stats.mat, tokenizer.decode(result.sequences[0]))
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from tokopt.errors import TokoptError
from tokopt.models.masks import step_mask
from tokopt.runtime.logprobs import entropy
from tokopt.runtime.request import (Clock, GenerationRequest, GenerationResult, Rows, choose_tokens, complete_tails,
                                    emit_step, finish, prefill_rows)
from tokopt.runtime.sampling import SamplingParams, gumbel_noise, process_logits
from tokopt.runtime.speculative.tree import DraftTree, pack_trees
from tokopt.runtime.speculative.verify import verify_greedy, verify_sampling
from tokopt.runtime.token_uncertainty import chosen_token_stats

# Dead cache slots (rejected nodes) are dropped in one copy once they are this many and this share of the cache.
DROP_DEAD_MIN, DROP_DEAD_SHARE = 64, 0.25


@dataclass
class SpeculativeStats:
    """What speculation did in one ``generate`` call."""

    accepted: list  # per row: tokens emitted by each verify step (accepted drafts + the target's next token)
    tree_sizes: list = field(default_factory=list)  # per step: nodes verified (padded width of the batch)
    draft_s: float = 0.0
    verify_s: float = 0.0  # the target forwards
    host_s: float = 0.0  # verification, cache compaction, bookkeeping

    @property
    def steps(self) -> int:
        return len(self.tree_sizes)

    @property
    def mat(self) -> float:
        """Mean accepted tokens per target verify forward, over all rows and steps."""
        counts = [c for row in self.accepted for c in row]
        return sum(counts) / len(counts) if counts else 0.0

    def to_dict(self) -> dict:
        return {"mat": self.mat, "steps": self.steps, "accepted": self.accepted, "tree_sizes": self.tree_sizes,
                "draft_s": self.draft_s, "verify_s": self.verify_s, "host_s": self.host_s}


def compact(cache, start: int, index, index_valid):
    """Keep, per row, the tail slots ``index`` (from ``start`` on) in contiguous slots; once enough slots are
    dead (``DROP_DEAD_MIN``, ``DROP_DEAD_SHARE``), drop them in one copy. Shared with CNTP's trials.

    Example::

        cache = compact(cache, old_length, torch.tensor([[0, 2]]), torch.ones(1, 2, dtype=torch.bool))
    """
    cache = cache.compact_tail(start, index, index_valid)
    if cache.dead_slots() >= max(DROP_DEAD_MIN, DROP_DEAD_SHARE * cache.length):
        cache = cache.drop_dead()
    return cache


def _entropy_of_rows(out, rows: torch.Tensor) -> list:
    """Per batch row b, the entropy at logits row ``rows[b]``: the graph's tap, else from the logits."""
    batch = torch.arange(rows.shape[0])
    if "entropy" in out.extras:
        return out.extras["entropy"][batch, rows].tolist()
    return entropy(out.logits[batch, rows]).tolist()


def _prefill(engine, request: GenerationRequest, drafter):
    """The prompt's forward, with logits at every position when the drafter learns from them."""
    n = request.input_ids.shape[1]
    logit_rows = torch.arange(n) if drafter.wants_prefill_logits else torch.tensor([n - 1])
    out, cache = prefill_rows(engine, request.input_ids, request.prompt_valid, logit_rows)
    if drafter.wants_prefill_logits:
        drafter.observe(request.input_ids, out.logits, request.prompt_valid)
    return out, cache


def _verify(tree, logits, tree_positions, b: int, sampling: SamplingParams, generator):
    """Row b's verdict on its ``tree`` from the target's ``logits`` ``[width, V]`` at its nodes."""
    if sampling.do_sample and sampling.gumbel_seed is not None:
        # Gumbel-max sampling is argmax of processed logits + keyed noise: verify it like greedy, and the tokens
        # are exactly those of plain decoding with the same seed
        size = tree.size
        noise = gumbel_noise(sampling, [b] * size, (tree_positions[:size] + 1).tolist(), logits.shape[-1])
        return verify_greedy(tree, process_logits(logits[:size], sampling) + noise)
    if sampling.do_sample:
        return verify_sampling(tree, logits, sampling, generator)
    return verify_greedy(tree, logits)


def _accept(request: GenerationRequest, rows: Rows, trees, verdicts, out, positions, stats):
    """Emit every verified row's accepted path (taps from its verify rows); advance its position; return the
    cache slots to keep (``[B, longest path]`` index into the tree's slots, and their validity)."""
    keep = max(len(v.path) if v else 1 for v in verdicts)
    index = torch.zeros(len(verdicts), keep, dtype=torch.long)
    index_valid = torch.zeros(len(verdicts), keep, dtype=torch.bool)
    for b, verdict in enumerate(verdicts):
        if verdict is None:
            continue
        path = verdict.path
        emitted = trees[b].path_tokens(path[1:]) + [verdict.next_token]
        taps = {name: value[b, path] for name, value in out.extras.items()}
        if request.token_stats:  # from the target's verify rows on the accepted path, never from a draft
            taps.update(chosen_token_stats(out.logits[b, path], torch.tensor(emitted), request.sampling))
        taken = rows.emit(b, emitted, taps)
        if taken < len(path):  # row path[j] has emitted[j - 1] as input; the bonus token is input to no row yet
            rows.set_tail(b, out.extras, path[taken])
        stats.accepted[b].append(taken)
        index[b, : len(path)] = torch.tensor(path)
        index_valid[b, : len(path)] = True
        positions[b] += len(path)
    return index, index_valid


def _speculate(engine, cache, drafter, request: GenerationRequest, rows: Rows, prompts, positions, generator,
               stats: SpeculativeStats):
    """One step: draft a tree per live row, verify every tree in one target forward, emit the accepted paths,
    compact the cache to them; return the cache."""
    t0 = time.perf_counter()
    trees = drafter.draft([prompts[b] + rows.tokens[b] for b in range(request.batch)])
    trees = [DraftTree.root_only(request.pad_token_id) if rows.finished[b] else tree for b, tree in enumerate(trees)]
    t1 = time.perf_counter()
    packed = pack_trees(trees, positions)
    width = packed.tokens.shape[1]
    mask = step_mask(cache.valid, packed.structure, packed.valid, dtype=engine.spec.torch_dtype)
    out = engine(packed.tokens, packed.positions, mask, torch.arange(width), cache.tensors)
    t2 = time.perf_counter()
    old_length = cache.length
    cache = cache.extend(out.present, packed.valid)
    drafter.observe(packed.tokens, out.logits, packed.valid)
    verdicts = [None if rows.finished[b] else
                _verify(trees[b], out.logits[b], packed.positions[b], b, request.sampling, generator)
                for b in range(request.batch)]
    index, index_valid = _accept(request, rows, trees, verdicts, out, positions, stats)
    if drafter.wants_root_entropy:  # the row that chose each next root: the accepted path's last node
        drafter.root_entropy(_entropy_of_rows(out, torch.tensor([v.path[-1] if v else 0 for v in verdicts])))
    cache = compact(cache, old_length, index, index_valid)
    drafter.feedback(trees, verdicts)
    stats.tree_sizes.append(width)
    if hasattr(drafter, "verify_timed"):  # lets the drafter check its latency profile against real steps
        drafter.verify_timed(request.batch, width, t2 - t1)
    stats.draft_s += t1 - t0
    stats.verify_s += t2 - t1
    stats.host_s += time.perf_counter() - t2
    return cache


def speculative_decode(engine, request: GenerationRequest, drafter) -> GenerationResult:
    """Decode ``request`` with ``drafter``'s trees, losslessly (see module docstring); ``result.stats`` holds
    MAT. A request with interventions is plain decoding's (``runtime.generate.decode``).

    Example::

        request = GenerationRequest.create(ids, mask, spec=engine.spec, max_new_tokens=64)
        result = speculative_decode(engine, request, PromptLookup())
    """
    if request.interventions:
        raise TokoptError("speculative decoding does not force tokens; run a request with interventions through "
                          "runtime.generate.decode")
    clock = Clock()
    prompts = request.prompts()
    generator = request.sampling.generator()
    drafter.start(prompts, request.sampling)
    out, cache = _prefill(engine, request, drafter)
    rows = Rows(request, out.extras)
    positions = request.prompt_lengths()
    emit_step(request, rows, out, choose_tokens(request, rows, out.logits[:, -1], generator, positions))
    clock.prefilled()
    if drafter.wants_root_entropy:
        drafter.root_entropy(_entropy_of_rows(out, torch.full((request.batch,), out.logits.shape[1] - 1)))
    stats = SpeculativeStats(accepted=[[] for _ in range(request.batch)])
    while not rows.done:
        cache = _speculate(engine, cache, drafter, request, rows, prompts, positions, generator, stats)
    forwards = 1 + stats.steps + complete_tails(engine, cache, rows, positions)
    if hasattr(drafter, "end"):  # e.g. Token Recycling saves what it learned
        drafter.end()
    return finish(request, rows, clock, forwards, stats=stats)


def speculative_generate(engine, input_ids, attention_mask=None, *, drafter, max_new_tokens=64,
                         sampling=SamplingParams(), eos_token_ids=(), pad_token_id=None, stop_strings=(),
                         tokenizer=None, token_stats: bool = False) -> GenerationResult:
    """Generate with ``drafter``'s trees, losslessly; the arguments are ``runtime.generate.generate``'s (see
    ``GenerationRequest.create``), and the tokens are plain decoding's. ``result.stats`` holds MAT.

    Example::

        result = speculative_generate(engine, ids, mask, drafter=PromptLookup(), max_new_tokens=64,
                                      eos_token_ids=[2])
        result.stats.mat
    """
    return speculative_decode(engine, GenerationRequest.create(
        input_ids, attention_mask, spec=engine.spec, max_new_tokens=max_new_tokens, sampling=sampling,
        eos_token_ids=eos_token_ids, pad_token_id=pad_token_id, stop_strings=stop_strings, tokenizer=tokenizer,
        token_stats=token_stats), drafter)
