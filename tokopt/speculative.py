"""Choosing and building a speculative decoding method: ``SpeculativeConfig`` and ``build_drafter``.

Methods (``tokopt.optimize(model, speculative=NAME)``):

- ``recycling``: Token Recycling, training-free; tree size chosen from measured latency (hardware-aware).
- ``recycling-entropy``: the same, each step's tree sized by the target's current entropy (per-bucket acceptance
  statistics: big trees after confident tokens, root-only steps after uncertain ones).
- ``lookup``: prompt lookup (n-gram continuations from the prompt and output).
- ``draft``: a draft model's chain (a smaller model sharing the tokenizer, or by default the target itself
  with middle layers skipped: self-speculative, no second model).
- ``dyspec``: DySpec's dynamic tree from the draft distribution, under a node budget.
- ``rsd``: RSD-C, Gumbel-top-k sibling trees, recursive rejection without replacement.
- ``specdec++``: adaptive draft length from a trained acceptance head (``tokopt train-specdec``).
- ``ppd``: Parallel Prompt Decoding, trained prompt tokens in the verify forward guess 2..k+1 tokens ahead
  (``tokopt train-ppd`` once per model; ``optimize`` adds the ``ppd_slots`` pass and loads the embeddings).
- ``ppd+recycling``: PPD guesses and Token Recycling's candidates in one tree.

Every method is lossless: greedy output equals plain greedy decoding; sampled output follows the target
distribution exactly (``runtime.speculative.verify``).

Example::

    opt = tokopt.optimize(model, speculative="recycling")
    opt = tokopt.optimize(model, speculative=SpeculativeConfig("dyspec", budget=12))
    opt.generate(ids, max_new_tokens=128); print(opt.last_stats.mat)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tokopt.errors import TokoptError
from tokopt.models import cache_dir, model_fingerprint
from tokopt.runtime.speculative.drafters.lookup import LookupConfig, PromptLookup
from tokopt.runtime.speculative.drafters.ppd import PPDConfig
from tokopt.runtime.speculative.drafters.entropy_sized import DEFAULT_EDGES
from tokopt.runtime.speculative.drafters.recycling import RecyclingConfig, TokenRecycling

METHODS = ("recycling", "recycling-entropy", "lookup", "draft", "dyspec", "rsd", "specdec++", "ppd", "ppd+recycling")
PPD_METHODS = ("ppd", "ppd+recycling")
DRAFT_MODEL_METHODS = ("draft", "dyspec", "rsd", "specdec++")


@dataclass(frozen=True)
class SpeculativeConfig:
    """How to speculate. ``budget``: draft nodes per step besides the root, or "auto" (recycling: the size
    maximizing tokens/s from this machine's measured verify latency; others: their defaults)."""

    method: str = "recycling"
    budget: int | str = "auto"
    max_nodes: int = 32  # largest tree "auto" considers
    recycling: RecyclingConfig = field(default_factory=RecyclingConfig)
    entropy_edges: tuple = DEFAULT_EDGES  # recycling-entropy: entropy buckets (nats)
    lookup: LookupConfig = field(default_factory=LookupConfig)
    draft_model: object = None  # a model, name or path sharing the tokenizer; None: self-speculative draft
    draft_layers: tuple | None = None  # self-speculative draft's kept layers (default: self_draft_layers)
    draft_length: int = 4  # draft: chain length
    rsd_widths: tuple = (2, 2, 1, 1)
    dyspec_max_depth: int = 6
    dyspec_threshold: float = 0.0
    specdec_head: str | None = None  # path; default: the head `tokopt train-specdec` saved for this pair
    specdec_threshold: float = 0.3
    specdec_max_length: int = 8
    ppd: PPDConfig = field(default_factory=PPDConfig)  # ppd, ppd+recycling (budget: guess nodes)

    def __post_init__(self):
        if self.method not in METHODS:
            raise TokoptError(f"unknown speculative method {self.method!r}; choose one of: {', '.join(METHODS)}")
        if self.budget != "auto" and (not isinstance(self.budget, int) or isinstance(self.budget, bool)
                                      or self.budget < 1):
            raise TokoptError(f"speculative budget must be 'auto' or an int >= 1 (draft nodes per step), "
                              f"got {self.budget!r}")
        if self.max_nodes < 1:
            raise TokoptError(f"max_nodes must be >= 1, got {self.max_nodes}")

    @classmethod
    def coerce(cls, value) -> "SpeculativeConfig | None":
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            return cls(method=value)
        raise TokoptError(f"speculative must be a method name ({', '.join(METHODS)}) or a SpeculativeConfig, "
                          f"got {type(value).__name__}")

    def to_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "draft_model"}
        d["recycling"], d["lookup"] = dict(self.recycling.__dict__), dict(self.lookup.__dict__)
        d["ppd"] = dict(self.ppd.__dict__)
        d["draft_model"] = None if self.draft_model is None else str(getattr(self.draft_model, "name_or_path",
                                                                              self.draft_model))
        return d


def specdec_head_path(target_fp: str, draft_fp: str):
    """Where ``tokopt train-specdec`` saves (and ``specdec++`` looks for) the head of a target/draft pair."""
    return cache_dir() / "specdec" / f"{target_fp}-{draft_fp}.pt"


def default_draft_layers(model, tokenizer) -> list:
    """The self-speculative draft's layers for ``model`` (calibrated once, then cached per model)."""
    import json

    from tokopt.progress import progress_step
    from tokopt.runtime.speculative.drafters.draft_model import self_draft_layers

    path = cache_dir() / "draft_layers" / f"{model_fingerprint(model)}.json"
    if path.is_file():
        return json.loads(path.read_text())["keep_layers"]
    with progress_step("choosing the self-speculative draft's layers (one ablation forward per layer, once)"):
        keep = self_draft_layers(model, tokenizer)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"keep_layers": keep}))
    return keep


def resolve_draft(config: SpeculativeConfig, target_model, tokenizer, target_vocab: int):
    """(draft model, kept layers or None) for a draft-model method: ``config.draft_model`` (checked to share
    the tokenizer) or the target itself with layers skipped."""
    from tokopt.models import load
    from tokopt.runtime.speculative.drafters.draft_model import check_same_tokenizer

    if config.draft_model is None:
        if target_model is None:
            raise TokoptError(f"{config.method!r} needs the target's PyTorch model for its self-speculative draft "
                              "(or a draft_model); this engine has none loaded")
        keep = config.draft_layers or default_draft_layers(target_model, tokenizer)
        return target_model, list(keep)
    draft, draft_tok = load(config.draft_model, progress=False)
    check_same_tokenizer(tokenizer, draft_tok, target_vocab, draft.config.vocab_size)
    return draft, None


def build_drafter(config: SpeculativeConfig, *, engine, target_model=None, tokenizer=None, model_key: str = ""):
    """The drafter for ``config`` over ``engine`` (the target). Draft-model methods need ``target_model``
    (for the self-speculative draft and fingerprints) or ``config.draft_model``."""
    method = config.method
    budget = None if config.budget == "auto" else config.budget
    if method in ("recycling", "recycling-entropy"):
        rc = config.recycling if budget is None else RecyclingConfig(**{**config.recycling.__dict__, "budget": budget})
        if method == "recycling":
            drafter = TokenRecycling(engine.spec.vocab_size, rc)
        else:
            from tokopt.runtime.speculative.drafters.entropy_sized import EntropySizedRecycling
            drafter = EntropySizedRecycling(engine.spec.vocab_size, rc, config.entropy_edges)
        if budget is None:
            from tokopt.runtime.speculative.tree_size import latency_profile

            drafter.set_profile(latency_profile(engine, model_key or engine.spec.model_type,
                                                max_nodes=config.max_nodes), config.max_nodes)
        return drafter
    if method in PPD_METHODS:
        return _ppd_drafter(config, budget, engine, target_model, model_key)
    if method == "lookup":
        lc = config.lookup if budget is None else LookupConfig(**{**config.lookup.__dict__, "budget": budget})
        return PromptLookup(lc)
    return _draft_model_drafter(config, budget, engine, target_model, tokenizer)


def ppd_graph_meta(engine, target_model=None) -> dict:
    """The engine graph's prompt-slot facts (``passes.ppd_slots``). An eager engine whose graph has no slots gets
    them here, in place, from the artifact ``tokopt train-ppd`` saved for ``target_model`` (ordinary ids stay
    bit-identical, so other methods sharing the engine are unaffected); otherwise a TokoptError says what to do."""
    module = getattr(engine, "module", None)
    meta = getattr(module, "meta", {}).get("tokopt") if module is not None else None
    if meta is not None and "ppd" not in meta and target_model is not None and "spec" in meta:
        add_ppd_slots(module, target_model)
    if meta is None:  # an engine loaded from a directory: what its manifest says about the graph
        meta = getattr(engine, "graph_meta", None)
    if not meta or "ppd" not in meta:
        raise TokoptError("speculative='ppd' needs a graph with prompt-token slots and trained embeddings: build it "
                          "with tokopt.optimize(model, speculative='ppd') (adds the ppd_slots pass and loads what "
                          "`tokopt train-ppd` saved for the model), or export an engine with `tokopt export "
                          "--speculative ppd`; this engine has none")
    return meta["ppd"]


def add_ppd_slots(gm, model, artifact=None) -> list:
    """Run the ``ppd_slots`` pass on ``gm`` (in place) with ``model``'s trained prompt embeddings
    (``load_ppd_artifact``, or ``artifact``); returns the pass reports."""
    from tokopt.pass_manager import run_passes
    from tokopt.train_ppd import load_ppd_artifact

    artifact = artifact or load_ppd_artifact(model)  # none: a TokoptError naming `tokopt train-ppd`
    gm.meta["tokopt"]["ppd_prompt_embeddings"] = artifact["embeddings"]
    gm, reports = run_passes(gm, ["ppd_slots"])
    gm.meta["tokopt"].pop("ppd_prompt_embeddings", None)
    gm.meta["tokopt"]["ppd"].setdefault("rank_accuracy", artifact["metrics"]["rank_accuracy"])
    return reports


def _ppd_drafter(config, budget, engine, target_model, model_key):
    from tokopt.runtime.speculative.acceptance import default_prior
    from tokopt.runtime.speculative.drafters.ppd import ParallelPromptDecoding

    meta = ppd_graph_meta(engine, target_model)
    vocab = engine.spec.vocab_size
    pc = config.ppd if budget is None else PPDConfig(**{**config.ppd.__dict__, "budget": budget})
    accuracy = meta.get("rank_accuracy") or default_prior(meta["k"], pc.ranks)[1:].tolist()
    recycling = TokenRecycling(vocab, config.recycling) if config.method == "ppd+recycling" else None
    drafter = ParallelPromptDecoding(vocab, meta["k"], accuracy, pc, recycling)
    if budget is None:
        from tokopt.runtime.speculative.tree_size import latency_profile

        drafter.set_profile(latency_profile(engine, model_key or engine.spec.model_type,
                                            max_nodes=config.max_nodes), config.max_nodes)
    return drafter


def _draft_model_drafter(config, budget, engine, target_model, tokenizer):
    from tokopt.runtime.speculative.drafters.draft_model import ChainPolicy, DraftModelDrafter, DraftRunner

    draft, keep = resolve_draft(config, target_model, tokenizer, engine.spec.vocab_size)
    method = config.method
    runner = DraftRunner.from_model(draft, keep_layers=keep, hidden=method == "specdec++")
    if method == "draft":
        policy = ChainPolicy(budget or config.draft_length)
    elif method == "dyspec":
        from tokopt.runtime.speculative.drafters.dyspec import DySpecPolicy

        policy = DySpecPolicy(budget or 8, config.dyspec_max_depth, config.dyspec_threshold)
    elif method == "rsd":
        from tokopt.runtime.speculative.drafters.rsd import RSDPolicy

        policy = RSDPolicy(config.rsd_widths, budget)
    else:
        from tokopt.runtime.speculative.drafters.specdec import SpecDecPolicy, load_head

        if target_model is None:
            raise TokoptError("specdec++ needs the target's PyTorch model to check the head was trained for it")
        target_fp = model_fingerprint(target_model)
        draft_fp = model_fingerprint(draft, keep)
        path = config.specdec_head or specdec_head_path(target_fp, draft_fp)
        head = load_head(path, target_fingerprint=target_fp, draft_fingerprint=draft_fp)
        policy = SpecDecPolicy(head, config.specdec_threshold, max_length=budget or config.specdec_max_length)
    return DraftModelDrafter(runner, policy)
