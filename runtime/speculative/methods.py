"""Choosing and building a speculative decoding method: one config per method, a registry, ``build_drafter``.

Methods (``tokopt.optimize(model, speculative=NAME or CONFIG)``; configs in ``configs``):

- ``recycling`` (``RecyclingConfig``): Token Recycling, training-free; tree size chosen from measured latency
  (hardware-aware).
- ``recycling-entropy`` (``RecyclingEntropyConfig``): the same, each step's tree sized by the target's current
  entropy (per-bucket acceptance statistics: big trees after confident tokens, root-only steps after uncertain ones).
- ``lookup`` (``LookupConfig``): prompt lookup (n-gram continuations from the prompt and output).
- ``draft`` (``DraftConfig``): a draft model's chain (a smaller model sharing the tokenizer, or by default the
  target itself with middle layers skipped: self-speculative, no second model).
- ``dyspec`` (``DySpecConfig``): DySpec's dynamic tree from the draft distribution, under a node budget.
- ``rsd`` (``RSDConfig``): RSD-C, Gumbel-top-k sibling trees, recursive rejection without replacement.
- ``specdec++`` (``SpecDecConfig``): adaptive draft length from a trained acceptance head (``tokopt train-specdec``).
- ``ppd`` (``PPDConfig``): Parallel Prompt Decoding, trained prompt tokens in the verify forward guess 2..k+1
  tokens ahead (``tokopt train-ppd`` once per model; ``optimize`` adds the ``ppd_slots`` pass and loads the
  embeddings).
- ``ppd+recycling`` (``PPDRecyclingConfig``): PPD guesses and Token Recycling's candidates in one tree.

Every method is lossless: greedy output equals plain greedy decoding; sampled output follows the target
distribution exactly (``runtime.speculative.verify``).

The registry maps a method's name to its config class and the function building its drafter; ``build_drafter`` is
a lookup in it. A new method is a config class (a ``SpeculativeConfig`` subclass naming its ``method``) and
``register_method(ItsConfig, build)``. ``METHODS``, ``PPD_METHODS`` and ``DRAFT_MODEL_METHODS`` are read from the
registry (module attributes computed on access, so they include methods registered later).

Example::

    opt = tokopt.optimize(model, speculative="recycling")
    opt = tokopt.optimize(model, speculative=RecyclingConfig(budget=12))
    opt = tokopt.optimize(model, speculative=SpeculativeConfig("dyspec", budget=12))    # = DySpecConfig(budget=12)
    opt.generate(ids, max_new_tokens=128); print(opt.last_stats.mat)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable

from tokopt.errors import TokoptError
from tokopt.models.graph_meta import PPDFacts, decoder_meta
from tokopt.models.loading import load, model_fingerprint
from tokopt.passes.manager import run_passes
from tokopt.passes.ppd_slots import PPDSlotsConfig
from tokopt.paths import cache_dir
from tokopt.progress import progress_step
from tokopt.runtime.artifacts import load_ppd_artifact, specdec_head_path
from tokopt.runtime.speculative.acceptance import default_prior
from tokopt.runtime.speculative.configs import (AUTO, DEFAULT_EDGES, DraftConfig, DraftModelConfig, DySpecConfig,
                                                LookupConfig, PPDConfig, PPDRecyclingConfig, RecyclingConfig,
                                                RecyclingEntropyConfig, RSDConfig, SpecDecConfig, SpeculativeConfig,
                                                config_class)
from tokopt.runtime.speculative.drafters.draft_model import (ChainPolicy, DraftModelDrafter, DraftRunner,
                                                             check_same_tokenizer, self_draft_layers)
from tokopt.runtime.speculative.drafters.dyspec import DySpecPolicy
from tokopt.runtime.speculative.drafters.entropy_sized import EntropySizedRecycling
from tokopt.runtime.speculative.drafters.lookup import PromptLookup
from tokopt.runtime.speculative.drafters.ppd import ParallelPromptDecoding
from tokopt.runtime.speculative.drafters.recycling import TokenRecycling
from tokopt.runtime.speculative.drafters.rsd import RSDPolicy
from tokopt.runtime.speculative.drafters.specdec import SpecDecPolicy, load_head
from tokopt.runtime.speculative.tree_size import latency_profile

__all__ = ["AUTO", "DEFAULT_EDGES", "DraftConfig", "DraftModelConfig", "DySpecConfig", "LookupConfig", "Method",
           "PPDConfig", "PPDRecyclingConfig", "RSDConfig", "RecyclingConfig", "RecyclingEntropyConfig", "REGISTRY",
           "SpecDecConfig", "SpeculativeConfig", "add_ppd_slots", "build_drafter", "config_class",
           "default_draft_layers", "ppd_facts", "register_method", "resolve_draft", "METHODS", "PPD_METHODS",
           "DRAFT_MODEL_METHODS"]


# -- the registry ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Method:
    """A registered method: its name, its config class and ``build(config, *, engine, target_model, tokenizer,
    model_key) -> Drafter``."""

    name: str
    config: type
    build: Callable


_REGISTRY: dict = {}
REGISTRY = MappingProxyType(_REGISTRY)  # method name -> Method, in registration order (read-only view)


def register_method(config: type, build: Callable | None = None):
    """Register ``build`` as the drafter builder for configs of class ``config`` (a ``SpeculativeConfig``
    subclass whose ``method`` names the method); returns ``build``. Without ``build``, a decorator. Registering a
    name again replaces its entry.

    Example::

        @dataclass(frozen=True)
        class EchoConfig(SpeculativeConfig):
            method: ClassVar[str] = "echo"

        @register_method(EchoConfig)
        def build_echo(config, *, engine, target_model=None, tokenizer=None, model_key=""):
            return Echo()

        tokopt.optimize(model, speculative="echo")
    """
    if not (isinstance(config, type) and issubclass(config, SpeculativeConfig) and config.__dict__.get("method")):
        raise TokoptError(f"register_method takes a SpeculativeConfig subclass that defines its method name "
                          f"(method: ClassVar[str] = 'name'), got {config!r}")

    def add(fn: Callable) -> Callable:
        if not callable(fn):
            raise TokoptError(f"the builder registered for {config.method!r} must be callable, got {fn!r}")
        _REGISTRY[config.method] = Method(config.method, config, fn)
        return fn

    return add if build is None else add(build)


def __getattr__(name: str):
    """``METHODS`` (every registered name), ``PPD_METHODS`` (those needing the graph's prompt-token slots) and
    ``DRAFT_MODEL_METHODS`` (those drafting with a model), read from the registry when asked for."""
    if name == "METHODS":
        return tuple(_REGISTRY)
    if name == "PPD_METHODS":
        return tuple(n for n, m in _REGISTRY.items() if issubclass(m.config, PPDConfig))
    if name == "DRAFT_MODEL_METHODS":
        return tuple(n for n, m in _REGISTRY.items() if issubclass(m.config, DraftModelConfig))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_drafter(config, *, engine, target_model=None, tokenizer=None, model_key: str = ""):
    """The drafter for ``config`` (a method config, or a name) over ``engine`` (the target): the registered
    builder of its method. Draft-model methods need ``target_model`` (for the self-speculative draft and
    fingerprints) or ``config.draft_model``.

    Example::

        drafter = build_drafter(RecyclingConfig(budget=8), engine=opt.engine)
        speculative_generate(opt.engine, ids, drafter=drafter, max_new_tokens=64)
    """
    config = SpeculativeConfig.coerce(config)
    if config is None:
        raise TokoptError("build_drafter needs a speculative method config or name, got None")
    entry = _REGISTRY.get(config.method)
    if entry is None:
        raise TokoptError(f"no drafter builder is registered for speculative method {config.method!r}: call "
                          f"register_method({type(config).__name__}, build); registered: {', '.join(_REGISTRY)}")
    if not isinstance(config, entry.config):
        raise TokoptError(f"speculative method {config.method!r} is registered with {entry.config.__name__}, "
                          f"got a {type(config).__name__}")
    return entry.build(config, engine=engine, target_model=target_model, tokenizer=tokenizer, model_key=model_key)


def _sized_by_latency(drafter, config, engine, model_key: str):
    """With budget "auto", size ``drafter``'s trees from this machine's measured verify latency from now on."""
    if config.budget == AUTO:
        drafter.set_profile(latency_profile(engine, model_key or engine.spec.model_type, max_nodes=config.max_nodes),
                            config.max_nodes)
    return drafter


# -- draft models ------------------------------------------------------------------------------------------------
def default_draft_layers(model, tokenizer) -> list:
    """The self-speculative draft's layers for ``model`` (calibrated once, then cached per model).

    Example::

        keep = default_draft_layers(model, tokenizer)     # e.g. [0, 1, 2, 4, 5, ...]
    """
    path = cache_dir() / "draft_layers" / f"{model_fingerprint(model)}.json"
    if path.is_file():
        return json.loads(path.read_text())["keep_layers"]
    with progress_step("choosing the self-speculative draft's layers (one ablation forward per layer, once)"):
        keep = self_draft_layers(model, tokenizer)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"keep_layers": keep}))
    return keep


def resolve_draft(config: DraftModelConfig, target_model, tokenizer, target_vocab: int):
    """(draft model, kept layers or None) for a draft-model method: ``config.draft_model`` (checked to share
    the tokenizer) or the target itself with layers skipped.

    Example::

        draft, keep = resolve_draft(SpecDecConfig(draft_layers=(0, 2)), model, tokenizer, model.config.vocab_size)
    """
    if config.draft_model is None:
        if target_model is None:
            raise TokoptError(f"{config.method!r} needs the target's PyTorch model for its self-speculative draft "
                              "(or a draft_model); this engine has none loaded")
        keep = config.draft_layers or default_draft_layers(target_model, tokenizer)
        return target_model, list(keep)
    draft, draft_tok = load(config.draft_model, progress=False)
    check_same_tokenizer(tokenizer, draft_tok, target_vocab, draft.config.vocab_size)
    return draft, None


def _draft_runner(config, engine, target_model, tokenizer, hidden: bool = False):
    """(runner over the draft, the draft model, its kept layers or None)."""
    draft, keep = resolve_draft(config, target_model, tokenizer, engine.spec.vocab_size)
    return DraftRunner.from_model(draft, keep_layers=keep, hidden=hidden), draft, keep


# -- the built-in methods ----------------------------------------------------------------------------------------
@register_method(RecyclingConfig)
def _build_recycling(config: RecyclingConfig, *, engine, model_key="", **_):
    drafter = TokenRecycling(engine.spec.vocab_size, config).persist_as(model_key)
    return _sized_by_latency(drafter, config, engine, model_key)


@register_method(RecyclingEntropyConfig)
def _build_recycling_entropy(config: RecyclingEntropyConfig, *, engine, model_key="", **_):
    drafter = EntropySizedRecycling(engine.spec.vocab_size, config, config.edges).persist_as(model_key)
    return _sized_by_latency(drafter, config, engine, model_key)


@register_method(LookupConfig)
def _build_lookup(config: LookupConfig, **_):
    return PromptLookup(config)


@register_method(DraftConfig)
def _build_draft(config: DraftConfig, *, engine, target_model=None, tokenizer=None, **_):
    runner, _, _ = _draft_runner(config, engine, target_model, tokenizer)
    return DraftModelDrafter(runner, ChainPolicy(config.resolved().budget))


@register_method(DySpecConfig)
def _build_dyspec(config: DySpecConfig, *, engine, target_model=None, tokenizer=None, **_):
    runner, _, _ = _draft_runner(config, engine, target_model, tokenizer)
    return DraftModelDrafter(runner, DySpecPolicy(config.resolved().budget, config.max_depth, config.threshold))


@register_method(RSDConfig)
def _build_rsd(config: RSDConfig, *, engine, target_model=None, tokenizer=None, **_):
    runner, _, _ = _draft_runner(config, engine, target_model, tokenizer)
    return DraftModelDrafter(runner, RSDPolicy(config.widths, None if config.budget == AUTO else config.budget))


@register_method(SpecDecConfig)
def _build_specdec(config: SpecDecConfig, *, engine, target_model=None, tokenizer=None, **_):
    runner, draft, keep = _draft_runner(config, engine, target_model, tokenizer, hidden=True)
    if target_model is None:
        raise TokoptError("specdec++ needs the target's PyTorch model to check the head was trained for it")
    target_fp = model_fingerprint(target_model)
    draft_fp = model_fingerprint(draft, keep)
    path = config.head or specdec_head_path(target_fp, draft_fp)
    head = load_head(path, target_fingerprint=target_fp, draft_fingerprint=draft_fp)
    return DraftModelDrafter(runner, SpecDecPolicy(head, config.threshold, max_length=config.resolved().budget))


@register_method(PPDRecyclingConfig)
@register_method(PPDConfig)  # applied first: registration order is METHODS' order
def _build_ppd(config: PPDConfig, *, engine, target_model=None, model_key="", **_):
    facts = ppd_facts(engine, target_model)
    vocab = engine.spec.vocab_size
    accuracy = facts.rank_accuracy or default_prior(facts.k, config.ranks)[1:].tolist()
    recycling = TokenRecycling(vocab, config.recycling) if isinstance(config, PPDRecyclingConfig) else None
    drafter = ParallelPromptDecoding(vocab, facts.k, accuracy, config, recycling)
    return _sized_by_latency(drafter, config, engine, model_key)


# -- PPD's graph -------------------------------------------------------------------------------------------------
def ppd_facts(engine, target_model=None) -> PPDFacts:
    """The engine graph's prompt-slot facts (``passes.ppd_slots``). An eager engine whose graph has no slots gets
    them here, in place, from the artifact ``tokopt train-ppd`` saved for ``target_model`` (ordinary ids stay
    bit-identical, so other methods sharing the engine are unaffected); otherwise a TokoptError says what to do."""
    module = getattr(engine, "module", None)
    if engine.facts.ppd is None and target_model is not None and decoder_meta(module) is not None:
        add_ppd_slots(module, target_model)
    if engine.facts.ppd is None:
        raise TokoptError("speculative='ppd' needs a graph with prompt-token slots and trained embeddings: build it "
                          "with tokopt.optimize(model, speculative='ppd') (adds the ppd_slots pass and loads what "
                          "`tokopt train-ppd` saved for the model), or export an engine with `tokopt export "
                          "--speculative ppd`; this engine has none")
    return engine.facts.ppd


def add_ppd_slots(gm, model, artifact=None) -> list:
    """Run the ``ppd_slots`` pass on ``gm`` (in place) with ``model``'s trained prompt embeddings
    (``load_ppd_artifact``, or ``artifact``); returns the pass reports."""
    artifact = artifact or load_ppd_artifact(model)  # none: a TokoptError naming `tokopt train-ppd`
    config = PPDSlotsConfig(artifact["embeddings"], artifact["metrics"]["rank_accuracy"])
    return run_passes(gm, [config])[1]
