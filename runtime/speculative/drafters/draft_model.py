"""Draft-model drafting: a smaller causal LM (or the target itself with layers skipped) proposes the tree.

``DraftRunner`` keeps the draft model's KV cache of each row's committed tokens. A step opens a
``DraftSession``: it feeds the tokens the draft has not seen yet (ending with the root) and gives the draft
distribution at the root; a policy then adds nodes and asks for the draft distribution at the nodes it wants
to extend (``compute``: one batched tree forward for all of them); at the end the session's trees carry
``draft_probs`` (the distribution each node's children were drawn from) and the draft cache is cut back to
the committed tokens.

Policies (``policy(session, b) -> None`` per round, see ``ChainPolicy`` and the ``dyspec``, ``rsd``,
``specdec`` modules) decide the shape. Under greedy decoding children are the draft's most likely tokens;
under sampling they are drawn from the processed draft distribution (same temperature/top-k/top-p as the
target) with the policy's replacement rule, which verification then undoes exactly.

The self-speculative draft (``self_draft_layers``) runs the target's own layers minus a skipped subset: no
second model, no training, shared weights.

Example::

    runner = DraftRunner.from_model(model, keep_layers=self_draft_layers(model, tokenizer))
    drafter = DraftModelDrafter(runner, ChainPolicy(length=4))
    result = speculative_generate(engine, ids, drafter=drafter, max_new_tokens=128)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokopt.data import calibration_text
from tokopt.errors import TokoptError
from tokopt.models.decoder_graph import DecoderGraph
from tokopt.runtime.eager_engine import EagerEngine
from tokopt.models.kv_cache import KVCache
from tokopt.models.masks import causal_structure, step_mask
from tokopt.runtime.sampling import SamplingParams, process_logits
from tokopt.runtime.speculative.drafters.base import Drafter
from tokopt.runtime.speculative.tree import DraftTree


def self_draft_layers(model, tokenizer=None, skip_share: float = 0.2, calibration_ids=None) -> list:
    """Layers of a self-speculative draft: all but the ``skip_share`` of layers whose removal changes the
    target's greedy predictions least (one ablation forward per layer on calibration text; the text shipped
    with tokopt by default). Skipping every other middle layer instead keeps under 5% of SmolLM2-135M's top-1
    predictions; skipping the 20% least needed keeps about 60%."""

    layers = model.config.num_hidden_layers
    n_skip = int(round(skip_share * layers))
    if n_skip == 0:
        return list(range(layers))
    ids = calibration_ids if calibration_ids is not None else _calibration_ids(tokenizer)
    n = ids.shape[1]
    mask = step_mask(torch.zeros(1, 1, dtype=torch.bool), causal_structure(n, 1), dtype=torch.float32)

    def predictions(keep):
        graph = DecoderGraph(model, keep_layers=keep).eval()
        cache = KVCache.empty(graph.spec, 1)
        with torch.inference_mode():
            return graph(ids, torch.arange(n)[None], mask.to(graph.spec.torch_dtype), torch.arange(n),
                         *cache.tensors)[0][0].argmax(-1)

    full = predictions(None)
    agreement = [(float((predictions([j for j in range(layers) if j != i]) == full).float().mean()), -i)
                 for i in range(layers)]
    skipped = {-i for _, i in sorted(agreement, reverse=True)[:n_skip]}
    return [i for i in range(layers) if i not in skipped]


def _calibration_ids(tokenizer, max_tokens: int = 384):
    text = calibration_text()
    if tokenizer is None:
        raise TokoptError("the self-speculative draft needs the model's tokenizer to calibrate which layers to "
                          "skip; pass SpeculativeConfig(draft_layers=[...]) instead")
    return tokenizer(text, return_tensors="pt").input_ids[:, :max_tokens]


def check_same_tokenizer(target_tokenizer, draft_tokenizer, target_vocab: int, draft_vocab: int) -> None:
    """Refuse a draft whose token ids mean something else than the target's."""
    if target_vocab != draft_vocab:
        raise TokoptError(f"the draft model's vocabulary ({draft_vocab} tokens) differs from the target's "
                          f"({target_vocab}); a draft must share the target's tokenizer")
    if target_tokenizer is None or draft_tokenizer is None:
        return
    if target_tokenizer.get_vocab() != draft_tokenizer.get_vocab():
        raise TokoptError("the draft model's tokenizer maps tokens to different ids than the target's; "
                          "a draft must share the target's tokenizer (same vocabulary and ids)")


class DraftRunner:
    """The draft model and its cache of each row's committed tokens."""

    def __init__(self, engine, hidden: bool = False):
        self.engine = engine
        self.spec = engine.spec
        self.hidden = hidden
        self.cache = None
        self.synced = []

    @classmethod
    def from_model(cls, model, keep_layers=None, hidden: bool = False) -> "DraftRunner":
        graph = DecoderGraph(model, keep_layers=keep_layers, return_hidden=hidden).eval()
        names = graph.spec.output_names + (["hidden"] if hidden else [])
        return cls(EagerEngine(graph, graph.spec, names), hidden=hidden)

    def start(self, batch: int) -> None:
        self.cache = KVCache.empty(self.spec, batch)
        self.synced = [0] * batch

    def session(self, histories, sampling: SamplingParams, generator) -> "DraftSession":
        """Feed each row's unseen committed tokens (ending with its root); open a session at the roots."""
        batch = len(histories)
        pending = [h[s:] for h, s in zip(histories, self.synced)]
        width = max(len(p) for p in pending)
        tokens = torch.zeros(batch, width, dtype=torch.long)
        valid = torch.zeros(batch, width, dtype=torch.bool)
        positions = torch.zeros(batch, width, dtype=torch.long)
        for b, p in enumerate(pending):
            tokens[b, width - len(p):] = torch.tensor(p)
            valid[b, width - len(p):] = True
            positions[b, width - len(p):] = torch.arange(self.synced[b], len(histories[b]))
        mask = step_mask(self.cache.valid, causal_structure(width, batch), new_valid=valid,
                         dtype=self.spec.torch_dtype)
        out = self.engine(tokens, positions, mask, torch.tensor([width - 1]), self.cache.tensors)
        self.cache = self.cache.extend(out.present, valid)
        self.synced = [len(h) for h in histories]
        roots = [h[-1] for h in histories]
        return DraftSession(self, roots, torch.tensor(self.synced) - 1, out.logits[:, -1],
                            out.extras.get("hidden", [None] * batch) if self.hidden else None,
                            sampling, generator)

    def rollback(self, length: int) -> None:
        """Drop the session's tree slots (views; nothing copied)."""
        self.cache = KVCache([t[:, :, :length] for t in self.cache.tensors], self.cache.valid[:, :length])


@dataclass
class _Node:
    token: int
    parent: int
    depth: int
    slot: int = -1  # draft cache slot once computed
    probs: torch.Tensor | None = None  # draft distribution at this node (children are drawn from it)
    hidden: torch.Tensor | None = None
    value: float = 1.0  # policy bookkeeping: probability the path to here is accepted (estimate)


class DraftSession:
    """One step's draft trees under construction, one per row."""

    def __init__(self, runner, roots, root_positions, root_logits, root_hidden, sampling, generator):
        self.runner = runner
        self.sampling = sampling
        self.generator = generator
        self.base = runner.cache.length
        self.root_positions = root_positions
        self.nodes = []
        for b, root in enumerate(roots):
            node = _Node(root, -1, 0, slot=self.base - 1, probs=self.distribution(root_logits[b]))
            if root_hidden is not None:
                node.hidden = root_hidden[b, -1] if root_hidden[b].dim() > 1 else root_hidden[b]
            self.nodes.append([node])
        self.forwards = 1

    def distribution(self, logits: torch.Tensor) -> torch.Tensor:
        """The distribution children are drawn from: processed like the target's when sampling, plain
        softmax (as a confidence estimate) when greedy."""
        if self.sampling.do_sample:
            return process_logits(logits, self.sampling).softmax(-1)
        return logits.float().softmax(-1)

    def add(self, b: int, parent: int, token: int, value: float = 1.0) -> int:
        nodes = self.nodes[b]
        nodes.append(_Node(int(token), parent, nodes[parent].depth + 1, value=value))
        return len(nodes) - 1

    def compute(self, wanted: list) -> None:
        """Draft distributions at ``wanted[b]`` (node indices of row b, parents computed): one forward."""
        batch = len(self.nodes)
        width = max((len(w) for w in wanted), default=0)
        if width == 0:
            return
        runner = self.runner
        cache = runner.cache
        length = cache.length
        tokens = torch.zeros(batch, width, dtype=torch.long)
        positions = torch.zeros(batch, width, dtype=torch.long)
        allowed = torch.zeros(batch, width, length + width, dtype=torch.bool)
        allowed[:, :, : self.base] = cache.valid[:, None, : self.base]
        for b, ids in enumerate(wanted):
            for j, i in enumerate(ids):
                node = self.nodes[b][i]
                tokens[b, j] = node.token
                positions[b, j] = self.root_positions[b] + node.depth
                allowed[b, j, length + j] = True
                p = node.parent
                while p > 0:
                    allowed[b, j, self.nodes[b][p].slot] = True
                    p = self.nodes[b][p].parent
        dtype = runner.spec.torch_dtype
        mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]
        out = runner.engine(tokens, positions, mask, torch.arange(width), cache.tensors)
        new_valid = torch.zeros(batch, width, dtype=torch.bool)  # tree slots are reached only via `allowed`
        runner.cache = cache.extend(out.present, new_valid)
        hidden = out.extras.get("hidden")
        for b, ids in enumerate(wanted):
            for j, i in enumerate(ids):
                node = self.nodes[b][i]
                node.slot = length + j
                node.probs = self.distribution(out.logits[b, j])
                if hidden is not None:
                    node.hidden = hidden[b, j]
        self.forwards += 1

    def pick(self, probs: torch.Tensor) -> int:
        """One token from ``probs``: the most likely under greedy, a draw under sampling."""
        if not self.sampling.do_sample:
            return int(probs.argmax())
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def children(self, b: int, node: int, count: int, replacement: bool = False) -> list:
        """``count`` child tokens of a computed node: the most likely under greedy; under sampling drawn
        from its distribution, without replacement (Gumbel-top-k) unless ``replacement``."""
        probs = self.nodes[b][node].probs
        count = min(count, int((probs > 0).sum()))
        if not self.sampling.do_sample:
            return probs.topk(count).indices.tolist()
        if replacement:
            return torch.multinomial(probs, count, replacement=True, generator=self.generator).tolist()
        gumbel = -torch.empty_like(probs).exponential_(generator=self.generator).log()
        return (probs.log() + gumbel).topk(count).indices.tolist()

    def finish(self, replacement: bool = False) -> list:
        """The rows' ``DraftTree``s (with ``draft_probs``); cuts the draft cache back to committed tokens."""
        trees = []
        vocab = self.runner.spec.vocab_size
        for nodes in self.nodes:
            probs = torch.zeros(len(nodes), vocab)
            for i, node in enumerate(nodes):
                if node.probs is not None:
                    probs[i] = node.probs
            trees.append(DraftTree([n.token for n in nodes], [n.parent for n in nodes], draft_probs=probs,
                                   replacement=replacement))
        self.runner.rollback(self.base)
        return trees


class ChainPolicy:
    """Classic speculative decoding: a chain of ``length`` draft tokens."""

    name = "draft"
    replacement = True  # one child per node: the rule is the same either way

    def __init__(self, length: int = 4):
        if length < 1:
            raise TokoptError(f"draft length must be >= 1 token, got {length}")
        self.length = length

    def build(self, session: DraftSession) -> None:
        batch = len(session.nodes)
        tips = [0] * batch
        for depth in range(self.length):
            if depth:
                session.compute([[t] for t in tips])
            tips = [session.add(b, tips[b], session.children(b, tips[b], 1)[0]) for b in range(batch)]


class DraftModelDrafter(Drafter):
    """Any policy over a ``DraftRunner``."""

    def __init__(self, runner: DraftRunner, policy):
        self.runner = runner
        self.policy = policy
        self.name = policy.name
        self.generator = None
        self.forwards = 0

    def start(self, prompts, sampling):
        super().start(prompts, sampling)
        seed = sampling.seed
        self.generator = None if seed is None else torch.Generator().manual_seed(seed + 7919)
        self.runner.start(len(prompts))
        if hasattr(self.policy, "start"):
            self.policy.start(len(prompts))

    def draft(self, histories):
        with torch.inference_mode():
            session = self.runner.session(histories, self.sampling, self.generator)
            self.policy.build(session)
            self.forwards += session.forwards
            return session.finish(self.policy.replacement)

    def feedback(self, trees, verdicts):
        if hasattr(self.policy, "feedback"):
            self.policy.feedback(trees, verdicts)
