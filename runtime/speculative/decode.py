"""The speculative decode loop: draft a tree per row, verify all trees in one forward, keep the accepted path.

Each step: ``drafter.draft`` gives every row a ``DraftTree`` rooted at its last emitted token; the trees are
padded into one batch and run through the same engine call as plain decoding (tree mask, positions = root
position + depth, logits for every node); ``verify`` accepts a path per row; the accepted nodes' K/V are
moved into contiguous cache slots (``KVCache.compact_tail``) and the rest of the tree's slots die.

The returned ``GenerationResult`` is the plain loop's (HF-shaped sequences, taps from the target's rows of
the accepted tokens), plus ``stats``: tokens emitted per row per step, from which MAT is computed.

Example::

    drafter = TokenRecycling(spec.vocab_size)
    result = speculative_generate(engine, ids, drafter=drafter, max_new_tokens=128)
    print(result.stats.mat, tokenizer.decode(result.sequences[0]))
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from tokopt.runtime.generate import GenerationResult, StopStrings, decode_one_token, prefill_rows, prompt_inputs
from tokopt.runtime.masks import step_mask
from tokopt.runtime.sampling import SamplingParams, gumbel_noise, next_token, process_logits
from tokopt.runtime.speculative.tree import DraftTree, pack_trees
from tokopt.runtime.speculative.verify import verify_greedy, verify_sampling
from tokopt.runtime.token_uncertainty import INPUT_TOKEN_TAPS, chosen_token_stats

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


def _entropy_of_rows(out, rows: torch.Tensor) -> list:
    """Per batch row b, the entropy at logits row ``rows[b]``: the graph's tap, else from the logits."""
    batch = torch.arange(rows.shape[0])
    if "entropy" in out.extras:
        return out.extras["entropy"][batch, rows].tolist()
    from tokopt.uncertainty.logit_stats import entropy

    return entropy(out.logits[batch, rows]).tolist()


class _Rows:
    """Per-row emitted tokens, taps and stop state."""

    def __init__(self, batch, max_new_tokens, eos, stopper):
        self.tokens = [[] for _ in range(batch)]
        self.taps = [dict() for _ in range(batch)]
        self.finished = [False] * batch
        self.max_new = max_new_tokens
        self.eos = eos
        self.stopper = stopper

    def emit(self, b, tokens, taps: dict) -> int:
        """Append ``tokens`` to row b until it stops; return how many were taken."""
        taken = 0
        for j, tok in enumerate(tokens):
            self.tokens[b].append(tok)
            for name, values in taps.items():
                self.taps[b].setdefault(name, []).append(values[j])
            taken += 1
            if tok in self.eos or len(self.tokens[b]) >= self.max_new or (
                    self.stopper.strings and self.stopper.hit(self.tokens[b])):
                self.finished[b] = True
                break
        return taken


def speculative_generate(engine, input_ids, attention_mask=None, *, drafter, max_new_tokens=64,
                         sampling=SamplingParams(), eos_token_ids=(), pad_token_id=None, stop_strings=(),
                         tokenizer=None, token_stats: bool = False) -> GenerationResult:
    """Generate with ``drafter``'s trees, losslessly (see module docstring); ``result.stats`` holds MAT."""
    input_ids, prompt_valid = prompt_inputs(input_ids, attention_mask, max_new_tokens, engine.spec.max_positions)
    eos = set(int(e) for e in eos_token_ids)
    pad = pad_token_id if pad_token_id is not None else (min(eos) if eos else 0)
    generator = sampling.generator()
    batch = input_ids.shape[0]
    rows = _Rows(batch, max_new_tokens, eos, StopStrings(stop_strings, tokenizer))
    prompts = [input_ids[b][prompt_valid[b]].tolist() for b in range(batch)]
    stats = SpeculativeStats(accepted=[[] for _ in range(batch)])
    dtype = engine.spec.torch_dtype

    start = time.perf_counter()
    drafter.start(prompts, sampling)
    n = input_ids.shape[1]
    logit_rows = torch.arange(n) if drafter.wants_prefill_logits else torch.tensor([n - 1])
    out, cache = prefill_rows(engine, input_ids, prompt_valid, logit_rows)
    if drafter.wants_prefill_logits:
        drafter.observe(input_ids, out.logits, prompt_valid)
    first = next_token(out.logits[:, -1], sampling, generator, positions=prompt_valid.sum(-1)).tolist()
    first_stats = chosen_token_stats(out.logits[:, -1], torch.tensor(first), sampling) if token_stats else {}
    for b in range(batch):
        taps = {k: v[b, -1:].tolist() for k, v in out.extras.items()}
        rows.emit(b, [first[b]], {**taps, **{k: v[b: b + 1].tolist() for k, v in first_stats.items()}})
    prefill_s = time.perf_counter() - start
    positions = prompt_valid.sum(-1)

    if drafter.wants_root_entropy:
        drafter.root_entropy(_entropy_of_rows(out, torch.full((batch,), out.logits.shape[1] - 1)))
    input_taps = [name for name in INPUT_TOKEN_TAPS if name in out.extras]
    tail = [None] * batch  # per row: input-token taps of its last emitted token, once a verify row computed them
    while not all(rows.finished):
        t0 = time.perf_counter()
        histories = [prompts[b] + rows.tokens[b] for b in range(batch)]
        trees = drafter.draft(histories)
        trees = [DraftTree.root_only(pad) if rows.finished[b] else trees[b] for b in range(batch)]
        t1 = time.perf_counter()
        packed = pack_trees(trees, positions)
        width = packed.tokens.shape[1]
        mask = step_mask(cache.valid, packed.structure, packed.valid, dtype=dtype)
        out = engine(packed.tokens, packed.positions, mask, torch.arange(width), cache.tensors)
        t2 = time.perf_counter()
        old_length = cache.length
        cache = cache.extend(out.present, packed.valid)
        drafter.observe(packed.tokens, out.logits, packed.valid)
        verdicts = [None] * batch
        for b in range(batch):
            if rows.finished[b]:
                continue
            if sampling.do_sample and sampling.gumbel_seed is not None:
                # Gumbel-max sampling is argmax of processed logits + keyed noise: verify it like greedy, and
                # the tokens are exactly those of plain decoding with the same seed
                size = trees[b].size
                noise = gumbel_noise(sampling, [b] * size, (packed.positions[b, :size] + 1).tolist(),
                                     out.logits.shape[-1])
                verdicts[b] = verify_greedy(trees[b], process_logits(out.logits[b, :size], sampling) + noise)
            elif sampling.do_sample:
                verdicts[b] = verify_sampling(trees[b], out.logits[b], sampling, generator)
            else:
                verdicts[b] = verify_greedy(trees[b], out.logits[b])
        keep = max(len(v.path) if v else 1 for v in verdicts)
        index = torch.zeros(batch, keep, dtype=torch.long)
        index_valid = torch.zeros(batch, keep, dtype=torch.bool)
        for b, verdict in enumerate(verdicts):
            if verdict is None:
                continue
            path = verdict.path
            emitted = trees[b].path_tokens(path[1:]) + [verdict.next_token]
            tap_rows = {k: v[b, path].tolist() for k, v in out.extras.items()}
            if token_stats:  # from the target's verify rows on the accepted path, never from a draft
                chosen = chosen_token_stats(out.logits[b, path], torch.tensor(emitted), sampling)
                tap_rows.update({k: v.tolist() for k, v in chosen.items()})
            taken = rows.emit(b, emitted, tap_rows)
            # row path[j] has emitted[j - 1] as input; the bonus token (j = len(path)) is input to no row yet
            tail[b] = {k: out.extras[k][b, path[taken]] for k in input_taps} if taken < len(path) else None
            stats.accepted[b].append(taken)
            index[b, : len(path)] = torch.tensor(path)
            index_valid[b, : len(path)] = True
            positions[b] += len(path)
        if drafter.wants_root_entropy:  # the row that chose each next root: the accepted path's last node
            drafter.root_entropy(_entropy_of_rows(out, torch.tensor([v.path[-1] if v else 0 for v in verdicts])))
        cache = cache.compact_tail(old_length, index, index_valid)
        if cache.dead_slots() >= max(DROP_DEAD_MIN, DROP_DEAD_SHARE * cache.length):
            cache = cache.drop_dead()
        drafter.feedback(trees, verdicts)
        t3 = time.perf_counter()
        stats.tree_sizes.append(width)
        stats.draft_s += t1 - t0
        stats.verify_s += t2 - t1
        stats.host_s += t3 - t2
    forwards = 1 + stats.steps
    if input_taps:  # rows whose last token is a bonus token: one more forward, feeding it (cache holds the rest)
        if any(t is None for t in tail):
            last = torch.tensor([row[-1] for row in rows.tokens])
            extra, _ = decode_one_token(engine, cache, last, positions)
            forwards += 1
            tail = [t if t is not None else {k: extra.extras[k][b, -1] for k in input_taps}
                    for b, t in enumerate(tail)]
    decode_s = time.perf_counter() - start - prefill_s

    width = max(len(t) for t in rows.tokens)
    new = torch.full((batch, width), pad, dtype=torch.long)
    taps = {}
    for b in range(batch):
        new[b, : len(rows.tokens[b])] = torch.tensor(rows.tokens[b], dtype=torch.long)
        for name, values in rows.taps[b].items():
            values = torch.tensor(values)  # [tokens, ...]: scalar taps, or per-token vectors (top-k ids/logprobs)
            if name not in taps:  # rows shorter than the longest are padded: NaN, or -1 for integer taps
                fill = float("nan") if values.dtype.is_floating_point else -1
                taps[name] = torch.full((batch, width, *values.shape[1:]), fill, dtype=values.dtype)
            taps[name][b, : len(values)] = values
    return GenerationResult(
        sequences=torch.cat([input_ids, new], dim=1),
        num_prompt_tokens=input_ids.shape[1],
        new_tokens=new,
        taps=taps,
        prefill_s=prefill_s,
        decode_s=decode_s,
        forwards=forwards,
        generated_counts=torch.tensor([len(t) for t in rows.tokens]),
        stats=stats,
        tail_taps={k: torch.stack([t[k] for t in tail]) for k in input_taps},
    )
