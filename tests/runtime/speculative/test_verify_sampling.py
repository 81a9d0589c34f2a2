"""tokopt.runtime.speculative.verify: greedy verification on hand-built trees, and a statistical proof that
sampling verification is lossless, each rule with a negative control.

Statistical method. The target is a toy bigram model over ``V`` tokens: its logits after token t are
``TARGET[t]`` whatever came before, so the processed target distribution p[t] is known exactly, and the first
tokens plain sampling emits after a fixed ``ROOT`` r follow the Markov joint p[r, x1] p[x1, x2] p[x2, x3]. One
draw runs draft -> verify -> emit steps: a tree rooted at the last emitted token is built by the drafting rule
under test (deterministic top-k guesses, or children drawn from a different bigram draft q with or without
replacement), verified with the target's logits at its nodes, and the tokens the step emits are appended,
until ``LENGTH`` = 3 tokens are out. Over ``DRAWS`` draws, the counts of the first token, of the first two and
of the first three are each compared with the exact joint by Pearson's chi-square goodness-of-fit test:

- cells (token sequences) are taken in ascending order of expected count and pooled while the pool's expected
  count is below 5; a last pool still under 5 joins the group before it;
- an observed sequence of probability 0 gives p-value 0;
- the p-value is the chi-square survival function with (groups - 1) degrees of freedom, which is the
  regularized upper incomplete gamma function Q(df/2, stat/2): ``torch.special.gammaincc`` in float64 (scipy is
  not a dependency of tokopt).

A correct rule must pass all three comparisons (every p-value > ``PASS_P``). Each rule has a negative control:
a deliberately wrong rule, drafted and drawn the same way, which the same test must reject (smallest p-value <
``REJECT_P``). The toy distributions make every wrong rule's bias large at this sample size: each control's
smallest p-value is below 1e-100, so it fails by a wide margin, not by luck. Everything is seeded.
"""

import dataclasses
import math
import random
from collections import Counter
from functools import cache
from itertools import product

import pytest
import torch

from tokopt.runtime.sampling import SamplingParams, next_token
from tokopt.runtime.speculative import verify
from tokopt.runtime.speculative.tree import DraftTree
from tokopt.runtime.speculative.verify import (Verdict, _rejection_round, target_probs, verify_greedy,
                                               verify_sampling)

V = 10
ROOT = 3
LENGTH = 3  # tokens per draw: the first 1, 2 and 3 are each tested
DRAWS = 20_000
PASS_P = 1e-4
REJECT_P = 1e-6
PLAIN = SamplingParams(do_sample=True, top_k=0)  # temperature 1, nothing filtered
PROCESSED = SamplingParams(do_sample=True, temperature=0.7, top_k=5, top_p=0.9)


def _bigram(seed: int, scale: float) -> torch.Tensor:
    return torch.randn(V, V, generator=torch.Generator().manual_seed(seed)) * scale


TARGET = _bigram(0, 1.5)  # TARGET[t]: the target's logits after token t
DRAFT = 1.5 * TARGET + _bigram(1, 1.0)  # close enough to be accepted often, sharper and noisy
GUESS = TARGET + _bigram(2, 1.0)  # deterministic guesses (recycling/lookup-like): top-k of a noisy target
GUESS_ORDER = GUESS.argsort(dim=-1, descending=True).tolist()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tensors here are tiny: intra-op threads only add synchronisation, which dominates on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- drafting ----------------------------------------------------------------------------------------------


def grow(root: int, widths, children) -> tuple:
    """Tokens and parents of a tree grown depth by depth, ``widths[d]`` children per node at depth d;
    ``children(token, width)`` gives the child tokens of a node holding ``token``."""
    tokens, parents, frontier = [root], [-1], [0]
    for width in widths:
        nxt = []
        for node in frontier:
            for y in children(tokens[node], width):
                tokens.append(y)
                parents.append(node)
                nxt.append(len(tokens) - 1)
        frontier = nxt
    return tokens, parents


def deterministic(widths):
    """Trees of deterministic guesses (``draft_probs`` None): the top tokens of ``GUESS`` after each node."""
    return lambda root, params, rng: DraftTree(*grow(root, widths, lambda t, width: GUESS_ORDER[t][:width]))


def draw_children(q: list, count: int, replacement: bool, rng: random.Random) -> list:
    """Distributed as ``DraftSession.children`` under sampling: ``count`` (at most q's support) i.i.d. draws
    from q, or Gumbel-top-k (without replacement). Plain Python: torch calls on rows this small would
    dominate the run time."""
    support = [t for t in range(V) if q[t] > 0]
    count = min(count, len(support))
    if replacement:
        return rng.choices(range(V), weights=q, k=count)
    key = {t: math.log(q[t]) - math.log(rng.expovariate(1.0)) for t in support}  # log q + Gumbel noise
    return sorted(support, key=key.__getitem__, reverse=True)[:count]


@cache
def processed_draft(params: SamplingParams) -> tuple:
    """q[t], the draft's distribution after token t processed like the target's: as a tensor and as lists."""
    q = target_probs(DRAFT, params)
    return q, q.tolist()


def drafted(widths, replacement: bool, recorded: torch.Tensor | None = None):
    """Trees whose children are drawn from the processed draft q[parent token]. The tree's ``draft_probs``
    (what verification believes the children were drawn from) are rows of ``recorded``, q by default."""
    def make_tree(root, params, rng):
        q, rows = processed_draft(params)
        tokens, parents = grow(root, widths, lambda t, width: draw_children(rows[t], width, replacement, rng))
        draft_probs = (q if recorded is None else recorded)[tokens]
        return DraftTree(tokens, parents, draft_probs=draft_probs, replacement=replacement)

    return make_tree


# --- wrong rules (negative controls) -----------------------------------------------------------------------


def verify_argmax_first(tree, logits, params, generator=None) -> Verdict:
    """Wrong for deterministic children: descend into the child that is the target argmax without drawing;
    draw y ~ p only when the argmax is not a child."""
    probs = target_probs(logits[: tree.size], params)
    node, path = 0, [0]
    while True:
        kids = tree.children[node]
        best = int(probs[node].argmax())
        child = next((c for c in kids if tree.tokens[c] == best), None)
        if child is None:
            y = int(torch.multinomial(probs[node], 1, generator=generator))
            child = next((c for c in kids if tree.tokens[c] == y), None)
            if child is None:
                return Verdict(path, y)
        node = child
        path.append(node)


def rejection_round_resample_from_p(kids, tree, p, q, generator):
    """Wrong: accept each child with probability min(1, p/q) but never form the residual: later siblings are
    tested against p, and when all are rejected the next token is drawn from p."""
    for child in kids:
        y = tree.tokens[child]
        if float(torch.rand((), generator=generator)) * float(q[y]) < float(p[y]):
            return child, p
    return None, p


def rejection_round_ignoring_replacement(kids, tree, p, q, generator):
    """Wrong for siblings drawn without replacement: verify them as if drawn with replacement (D[y] never
    zeroed after a rejection)."""
    return _rejection_round(kids, dataclasses.replace(tree, replacement=True), p, q, generator)


# --- draws and the chi-square test -------------------------------------------------------------------------


def emitted_sequences(make_tree, params, verifier=verify_sampling, seed=0) -> Counter:
    """Counts of the first ``LENGTH`` tokens emitted after ``ROOT`` over ``DRAWS`` draws; each step's tree is
    rooted at the last emitted token (the toy target's logits at a node are ``TARGET[its token]``)."""
    generator = torch.Generator().manual_seed(seed)  # verification
    rng = random.Random(seed)  # drafting
    counts = Counter()
    for _ in range(DRAWS):
        seq = []
        while len(seq) < LENGTH:
            tree = make_tree(seq[-1] if seq else ROOT, params, rng)
            verdict = verifier(tree, TARGET[tree.tokens], params, generator)
            seq += tree.path_tokens(verdict.path[1:]) + [verdict.next_token]
        counts[tuple(seq[:LENGTH])] += 1
    return counts


def markov_joint(probs: torch.Tensor, length: int) -> dict:
    """Exact probability of every token sequence of ``length`` after ``ROOT`` (sequences of probability 0
    left out)."""
    p = probs.double().tolist()
    joint = {}
    for seq in product(range(V), repeat=length):
        prob, prev = 1.0, ROOT
        for x in seq:
            prob *= p[prev][x]
            prev = x
        if prob > 0:
            joint[seq] = prob
    return joint


def chi_square_sf(stat: float, df: int) -> float:
    """P(X >= stat) for X ~ chi-square(df): the regularized upper incomplete gamma Q(df/2, stat/2)."""
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def chi_square_p(observed: Counter, probs: dict) -> float:
    """Pearson goodness-of-fit p-value of ``observed`` counts against ``probs``, small cells pooled (see the
    module docstring)."""
    if any(seq not in probs for seq in observed):
        return 0.0  # an impossible sequence was emitted
    total = sum(observed.values())
    groups = []  # [expected, observed]
    for expected, seq in sorted((total * prob, seq) for seq, prob in probs.items()):
        if groups and groups[-1][0] < 5:
            groups[-1][0] += expected
            groups[-1][1] += observed[seq]
        else:
            groups.append([expected, observed[seq]])
    if len(groups) > 1 and groups[-1][0] < 5:
        expected, count = groups.pop()
        groups[-1][0] += expected
        groups[-1][1] += count
    stat = sum((o - e) ** 2 / e for e, o in groups)
    return chi_square_sf(stat, len(groups) - 1)


def p_values(counts: Counter, params) -> list:
    """Chi-square p-values of the first 1, 2, ..., ``LENGTH`` emitted tokens against the target's joint."""
    probs = target_probs(TARGET, params)
    values = []
    for m in range(1, LENGTH + 1):
        prefixes = Counter()
        for seq, n in counts.items():
            prefixes[seq[:m]] += n
        values.append(chi_square_p(prefixes, markov_joint(probs, m)))
    return values


def assert_lossless(make_tree, params):
    ps = p_values(emitted_sequences(make_tree, params), params)
    assert min(ps) > PASS_P, f"emitted tokens do not follow the target (p-values of 1, 2, 3 tokens: {ps})"


def assert_rejected(make_tree, params, verifier=verify_sampling):
    ps = p_values(emitted_sequences(make_tree, params, verifier), params)
    assert min(ps) < REJECT_P, f"the test does not reject a wrong rule (p-values of 1, 2, 3 tokens: {ps})"


# --- the test's own tools ----------------------------------------------------------------------------------


@pytest.mark.parametrize("stat, df, p", [(3.841459, 1, 0.05), (21.665994, 9, 0.01), (124.342113, 100, 0.05)])
def test_chi_square_sf_matches_known_quantiles(stat, df, p):
    assert chi_square_sf(stat, df) == pytest.approx(p, rel=1e-5)


def test_chi_square_p_pools_small_cells_and_rejects_impossible_ones():
    probs = {(0,): 0.5, (1,): 0.4994, (2,): 0.0002, (3,): 0.0002, (4,): 0.0002}
    observed = Counter({(0,): 5000, (1,): 4988, (2,): 6, (3,): 4, (4,): 2})
    # Cells 2, 3, 4 expect 2 each: pooled into one group expecting 6, observing 12.
    stat = (4988 - 4994) ** 2 / 4994 + (12 - 6) ** 2 / 6
    assert chi_square_p(observed, probs) == pytest.approx(chi_square_sf(stat, 2))
    assert chi_square_p(Counter({(0,): 5, (9,): 1}), {(0,): 1.0}) == 0.0


# --- sampling verification is lossless ---------------------------------------------------------------------


def test_deterministic_children_are_lossless():
    assert_lossless(deterministic((3, 2)), PLAIN)


def test_deterministic_children_negative_control_argmax_first():
    assert_rejected(deterministic((3, 2)), PLAIN, verifier=verify_argmax_first)


@pytest.mark.parametrize("widths", [(3, 2), (1, 1, 1)], ids=["tree", "chain"])
def test_children_drawn_with_replacement_are_lossless(widths):
    assert_lossless(drafted(widths, replacement=True), PLAIN)


@pytest.mark.parametrize("widths", [(3, 2), (1, 1, 1)], ids=["tree", "chain"])
def test_with_replacement_negative_control_resample_from_p(widths, monkeypatch):
    monkeypatch.setattr(verify, "_rejection_round", rejection_round_resample_from_p)
    assert_rejected(drafted(widths, replacement=True), PLAIN)


def test_children_drawn_without_replacement_are_lossless():
    assert_lossless(drafted((4, 2), replacement=False), PLAIN)


def test_without_replacement_negative_control_verified_as_with_replacement(monkeypatch):
    monkeypatch.setattr(verify, "_rejection_round", rejection_round_ignoring_replacement)
    assert_rejected(drafted((4, 2), replacement=False), PLAIN)


def test_processed_distributions_are_lossless():
    assert_lossless(drafted((3, 2), replacement=False), PROCESSED)


def test_processed_negative_control_unprocessed_draft_distribution():
    # Children drawn from the processed q, but verified against the draft's plain softmax.
    assert_rejected(drafted((3, 2), replacement=False, recorded=DRAFT.softmax(-1)), PROCESSED)


# --- PPD: trees with prompt chains, guesses from the previous step's chains ---------------------------------
#
# The real drafter (drafters.ppd, alone and merged with Token Recycling) builds every step's tree; prompt-chain
# nodes hold ids V..V+K-1; prompt token j below a node holding t guesses the token j + 2 steps after t with the
# log of the target's (j + 2)-step transition probabilities plus noise (a fixed function of t and j). Verification is the shared lossless rule. Negative control: the
# "typical acceptance" of PPD's released sampling mode (accept the likeliest child whose target probability
# clears min(epsilon, delta * exp(-entropy))), which is not lossless.

PPD_K = 2


AHEAD = [(torch.linalg.matrix_power(TARGET.softmax(-1).double(), j + 2).log().float() + _bigram(3 + j, 0.5))
         for j in range(PPD_K)]


def ppd_logits(tree) -> torch.Tensor:
    """Target logits at every node: ``TARGET[token]`` for real tokens; a prompt-chain node at chain depth j
    below anchor token t guesses with ``AHEAD[j][t]``."""
    rows = []
    for node, tok in enumerate(tree.tokens):
        if tok < V:
            rows.append(TARGET[tok])
            continue
        anchor = node
        while tree.tokens[anchor] >= V:
            anchor = tree.parents[anchor]
        rows.append(AHEAD[tok - V][tree.tokens[anchor]])
    return torch.stack(rows)


def ppd_sequences(params, recycling: bool, verifier=verify_sampling, seed=0) -> tuple:
    """Like ``emitted_sequences``, each step's tree drafted by a PPD drafter that sees every verify's logits
    and verdict (its guesses, acceptance statistics and, with recycling, adjacency carry across draws).
    Returns (counts, tokens emitted per step)."""
    from tokopt.runtime.speculative.drafters.ppd import PPDConfig, ParallelPromptDecoding
    from tokopt.runtime.speculative.drafters.recycling import RecyclingConfig, TokenRecycling

    rec = TokenRecycling(V, RecyclingConfig(budget=3, k=3, lookup_nodes=2)) if recycling else None
    accuracy = [[0.4, 0.2, 0.1]] * PPD_K
    drafter = ParallelPromptDecoding(V, PPD_K, accuracy, PPDConfig(budget=4, chain_nodes=2, ranks=3), rec)
    generator = torch.Generator().manual_seed(seed)
    counts, steps = Counter(), 0
    for _ in range(DRAWS):
        drafter.start([[ROOT]], params)
        seq = []
        while len(seq) < LENGTH:
            tree = drafter.draft([[ROOT] + seq])[0]
            logits = ppd_logits(tree)
            verdict = verifier(tree, logits, params, generator)
            drafter.observe(torch.tensor([tree.tokens]), logits[None], torch.ones(1, tree.size, dtype=torch.bool))
            drafter.feedback([tree], [verdict])
            seq += tree.path_tokens(verdict.path[1:]) + [verdict.next_token]
            steps += 1
        counts[tuple(seq[:LENGTH])] += 1
    return counts, sum(counts.values()) * LENGTH / steps


def verify_typical_acceptance(tree, logits, params, generator=None, epsilon=0.3, delta=0.09) -> Verdict:
    """Wrong (lossy): PPD's / Medusa's typical acceptance."""
    probs = target_probs(logits[: tree.size], params)
    node, path = 0, [0]
    while True:
        p = probs[node]
        entropy = float(-(p * p.clamp_min(1e-30).log()).sum())
        threshold = min(epsilon, delta * math.exp(-entropy))
        ok = [c for c in tree.children[node] if tree.tokens[c] < V and float(p[tree.tokens[c]]) > threshold]
        if not ok:
            return Verdict(path, int(torch.multinomial(p, 1, generator=generator)))
        node = max(ok, key=lambda c: float(p[tree.tokens[c]]))
        path.append(node)


@pytest.mark.parametrize("recycling", [False, True], ids=["ppd", "ppd+recycling"])
def test_ppd_trees_are_lossless(recycling):
    counts, per_step = ppd_sequences(PROCESSED, recycling)
    assert per_step > 1.1  # guesses are accepted (plain decoding: 1.0; each draw starts without guesses)
    ps = p_values(counts, PROCESSED)
    assert min(ps) > PASS_P, f"emitted tokens do not follow the target (p-values of 1, 2, 3 tokens: {ps})"


def test_ppd_negative_control_typical_acceptance():
    ps = p_values(ppd_sequences(PLAIN, False, verifier=verify_typical_acceptance)[0], PLAIN)
    assert min(ps) < REJECT_P, f"the test does not reject a wrong rule (p-values of 1, 2, 3 tokens: {ps})"


# --- exact checks ------------------------------------------------------------------------------------------


def test_verify_greedy_takes_the_longest_path_of_target_argmaxes():
    # root 5; children 7 (node 1), 9 (node 2); after 7: 11 (node 3), 3 (node 4); after 3: 2 (node 5)
    tree = DraftTree.from_parents([5, 7, 9, 11, 3, 2], [-1, 0, 0, 1, 1, 4])
    logits = torch.zeros(tree.size, 12)
    for node, best in {0: 7, 1: 3, 2: 9, 3: 0, 4: 2, 5: 8}.items():
        logits[node, best] = 1.0
    verdict = verify_greedy(tree, logits)
    assert (verdict.path, verdict.next_token) == ([0, 1, 4, 5], 8)
    logits[1] = 0.0
    logits[1, 6] = 1.0  # neither child of node 1
    verdict = verify_greedy(tree, logits)
    assert (verdict.path, verdict.next_token) == ([0, 1], 6)


@pytest.mark.parametrize("child", [4, 6])
def test_verify_greedy_breaks_ties_as_argmax(child):
    tree = DraftTree.from_parents([5, child], [-1, 0])
    logits = torch.zeros(tree.size, 8)
    logits[:, [4, 6]] = 2.0  # an exact tie at every node
    plain = int(next_token(logits[:1], SamplingParams())[0])  # what plain greedy decoding emits
    assert plain == int(logits[0].argmax())
    verdict = verify_greedy(tree, logits)
    if child == plain:
        assert (verdict.path, verdict.next_token) == ([0, 1], int(logits[1].argmax()))
    else:
        assert (verdict.path, verdict.next_token) == ([0], plain)


def test_sampling_with_top_k_1_equals_greedy():
    # top_k=1 leaves one-hot distributions: every rule must then accept exactly the greedy path.
    greedy_like = SamplingParams(do_sample=True, top_k=1)
    rng, generator = random.Random(0), torch.Generator().manual_seed(0)
    for i in range(200):
        make_tree = [deterministic((3, 2)), drafted((3, 2), replacement=True),
                     drafted((3, 2, 1), replacement=False)][i % 3]
        tree = make_tree(i % V, PLAIN, rng)
        logits = torch.randn(tree.size, V, generator=generator)
        sampled = verify_sampling(tree, logits, greedy_like, generator)
        greedy = verify_greedy(tree, logits)
        assert (sampled.path, sampled.next_token) == (greedy.path, greedy.next_token)


def test_verdict_accepted_counts_emitted_tokens():
    assert Verdict([0], 4).accepted == 1
    assert Verdict([0, 2, 5], 1).accepted == 3
