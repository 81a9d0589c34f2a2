"""One config per speculative decoding method: frozen dataclasses, checked when made, written to and read from JSON.

Each config names its method (``config.method``), and ``budget`` means the same in all of them: draft nodes per
step besides the root, or "auto" (methods sized by latency: the size maximizing tokens/s from this machine's
measured verify latency; the others: their default). The same class configures the drafter
(``drafters.recycling.TokenRecycling`` takes a ``RecyclingConfig``): there is one ``RecyclingConfig``.

=====================  ==========================  ===========================================================
method                 config                      its own fields (all have defaults)
=====================  ==========================  ===========================================================
``recycling``          ``RecyclingConfig``         max_nodes, k, max_depth, lookup_nodes, update_from_prefill,
                                                   reshape_every
``recycling-entropy``  ``RecyclingEntropyConfig``  the same and edges (entropy buckets, nats)
``lookup``             ``LookupConfig``            max_ngram, min_ngram, branches
``draft``              ``DraftConfig``             draft_model, draft_layers (budget: chain length, auto 4)
``dyspec``             ``DySpecConfig``            draft_model, draft_layers, max_depth, threshold
``rsd``                ``RSDConfig``               draft_model, draft_layers, widths
``specdec++``          ``SpecDecConfig``           draft_model, draft_layers, head, threshold (budget: most
                                                   drafted tokens, auto 8)
``ppd``                ``PPDConfig``               max_nodes, chain_nodes, ranks, max_chain_nodes, chain_len,
                                                   reshape_every
``ppd+recycling``      ``PPDRecyclingConfig``      the same and recycling (a ``RecyclingConfig``)
=====================  ==========================  ===========================================================

``SpeculativeConfig`` is their common base. Called itself, it is the entry that takes a method name and the flat
keywords of earlier versions (``SpeculativeConfig("dyspec", budget=12)`` is ``DySpecConfig(budget=12)``), and
``SpeculativeConfig.coerce`` turns a name, a config or a ``to_dict()`` dict into a config. Building a drafter from
a config is ``methods.build_drafter`` (its registry: ``methods.register_method``).

Example::

    opt = tokopt.optimize(model, speculative=RecyclingConfig(budget=12))
    RecyclingConfig(budget=12).to_dict()         # {"method": "recycling", "budget": 12, "max_nodes": 32, ...}
    SpeculativeConfig.from_dict({"method": "lookup", "branches": 1}) == LookupConfig(branches=1)
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field, fields, replace
from typing import ClassVar

from tokopt.errors import TokoptError

AUTO = "auto"
DEFAULT_EDGES = (0.5, 1.5, 3.0)  # recycling-entropy: nats: confident, hedging, unsure, lost (a priori, not tuned)

_CONFIGS: dict = {}  # method name -> its config class, in definition order (filled by __init_subclass__)


def config_class(method: str) -> type:
    """The config class of the method named ``method``, or a TokoptError listing the methods there are.

    Example::

        config_class("dyspec")(budget=12)         # DySpecConfig(budget=12, ...)
    """
    cls = _CONFIGS.get(method) if isinstance(method, str) else None
    if cls is None:
        raise TokoptError(f"unknown speculative method {method!r}; choose one of: {', '.join(_CONFIGS)}")
    return cls


def _draft_model_name(model) -> str | None:
    """A draft model as JSON: its name or path (a loaded model's ``name_or_path``), or None."""
    return None if model is None else str(getattr(model, "name_or_path", model))


class _EntryPoint(type):
    """Calling ``SpeculativeConfig`` itself builds the named method's config (the entry of earlier versions)."""

    def __call__(cls, *args, **kwargs):
        if cls is SpeculativeConfig:
            return _from_flat_keywords(*args, **kwargs)
        return super().__call__(*args, **kwargs)


@dataclass(frozen=True)
class SpeculativeConfig(metaclass=_EntryPoint):
    """How to speculate: the base of the per-method configs (see the module docstring), and the entry that takes
    a method name: ``SpeculativeConfig("dyspec", budget=12)`` returns ``DySpecConfig(budget=12)``.

    Example::

        SpeculativeConfig("recycling", budget=12) == RecyclingConfig(budget=12)
        SpeculativeConfig.coerce("lookup")        # LookupConfig()
    """

    method: ClassVar[str] = ""  # the method's name (a subclass defining it becomes known by that name)
    auto_budget: ClassVar[int | None] = None  # the budget "auto" starts from (None: the method's own shape)
    sized_by_latency: ClassVar[bool] = False  # "auto": sized from this machine's measured verify latency

    budget: int | str = AUTO  # draft nodes per step besides the root, or "auto"

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("method"):
            _CONFIGS[cls.method] = cls

    def __post_init__(self):
        b = self.budget
        if b != AUTO and (not isinstance(b, int) or isinstance(b, bool) or b < 1):
            raise TokoptError(f"{self.method or 'speculative'} budget must be 'auto' or an int >= 1 (draft nodes per "
                              f"step besides the root), got {b!r}")

    def _check(self, ok: bool, message: str) -> None:
        if not ok:
            raise TokoptError(f"{type(self).__name__}: {message}")

    def _check_ints(self, **minimums) -> None:
        """Each named field is an int >= its minimum (``what`` after a colon in the message: the field's meaning)."""
        for name, (low, what) in minimums.items():
            value = getattr(self, name)
            self._check(isinstance(value, int) and not isinstance(value, bool) and value >= low,
                        f"{name} ({what}) must be an int >= {low}, got {value!r}")

    def _check_probability(self, name: str, low_open: bool = False, high_open: bool = False) -> None:
        value = getattr(self, name)
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = number and (value > 0 if low_open else value >= 0) and (value < 1 if high_open else value <= 1)
        self._check(ok, f"{name} must be a probability in {'(' if low_open else '['}0, 1{')' if high_open else ']'}, "
                        f"got {value!r}")

    def _as_tuple(self, name: str) -> None:
        value = getattr(self, name)
        if value is not None and not isinstance(value, tuple):
            if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
                raise TokoptError(f"{type(self).__name__}: {name} must be a sequence, got {value!r}")
            object.__setattr__(self, name, tuple(value))

    def resolved(self) -> "SpeculativeConfig":
        """This config with budget "auto" replaced by the size it starts from (``auto_budget``; a latency profile
        may resize the drafter later). Drafters call this on the config they are given.

        Example::

            RecyclingConfig().resolved().budget       # 8
        """
        if self.budget != AUTO or self.auto_budget is None:
            return self
        return replace(self, budget=self.auto_budget)

    def to_dict(self) -> dict:
        """The config as JSON-ready values: ``method`` and every field (tuples as lists, a nested config as its
        dict, a draft model as its name or path).

        Example::

            LookupConfig(budget=6).to_dict()  # {"method": "lookup", "budget": 6, "max_ngram": 3, "min_ngram": 1, ...}
        """
        out = {"method": self.method}
        for f in fields(self):
            value = getattr(self, f.name)
            if "to_json" in f.metadata:
                value = f.metadata["to_json"](value)
            elif isinstance(value, SpeculativeConfig):
                value = value.to_dict()
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "SpeculativeConfig":
        """The config ``to_dict`` wrote (``method`` picks the class; missing fields take their defaults; an unknown
        field is a TokoptError naming the fields there are).

        Example::

            SpeculativeConfig.from_dict(RecyclingConfig(budget=5).to_dict())   # RecyclingConfig(budget=5)
        """
        if not isinstance(data, dict):
            raise TokoptError(f"a speculative config dict is needed, got {type(data).__name__}")
        data = dict(data)
        target = config_class(data.pop("method", cls.method))
        if not issubclass(target, cls):
            raise TokoptError(f"{cls.__name__}.from_dict got a {target.method!r} config ({target.__name__})")
        names = [f.name for f in fields(target)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise TokoptError(f"{target.__name__} ({target.method!r}) has no field {', '.join(map(repr, unknown))}; "
                              f"its fields: {', '.join(names)}")
        values = {}
        for name, value in data.items():
            if isinstance(value, dict) and "method" in value:
                value = SpeculativeConfig.from_dict(value)
            elif isinstance(value, list):
                value = tuple(value)
            values[name] = value
        return target(**values)

    @classmethod
    def coerce(cls, value) -> "SpeculativeConfig | None":
        """A method name, a config or a ``to_dict()`` dict as a config (None stays None).

        Example::

            SpeculativeConfig.coerce("recycling")     # RecyclingConfig()
        """
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            return config_class(value)()
        if isinstance(value, dict):
            return SpeculativeConfig.from_dict(value)
        raise TokoptError(f"speculative must be a method name ({', '.join(_CONFIGS)}), a method config such as "
                          f"RecyclingConfig(budget=12), or its to_dict(); got {type(value).__name__}")


# -- Token Recycling ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RecyclingConfig(SpeculativeConfig):
    """Token Recycling (``drafters.recycling``): training-free; with budget "auto" the tree size is chosen from the
    measured verify latency, up to ``max_nodes``.

    Example::

        tokopt.optimize(model, speculative=RecyclingConfig(budget=12, lookup_nodes=0))
    """

    method: ClassVar[str] = "recycling"
    auto_budget: ClassVar[int] = 8
    sized_by_latency: ClassVar[bool] = True

    max_nodes: int = 32  # largest tree "auto" considers
    k: int = 8  # successors kept per token
    max_depth: int = 8
    lookup_nodes: int = 4  # extra nodes for the prompt-lookup continuation (0: recycling only)
    update_from_prefill: bool = True  # also recycle the logits of every prompt position
    reshape_every: int = 16  # steps between template updates from acceptance statistics
    persist: bool = True  # keep adj + acceptance statistics per model in the cache across processes

    def __post_init__(self):
        super().__post_init__()
        self._check_ints(max_nodes=(1, "largest tree 'auto' considers"), max_depth=(1, "deepest tree level"),
                         lookup_nodes=(0, "prompt-lookup nodes; 0: none"),
                         reshape_every=(1, "steps between template updates"))
        self._check(isinstance(self.k, int) and 1 <= self.k <= 64,
                    f"k (successors kept per token) must be in 1..64, got {self.k!r}")


@dataclass(frozen=True)
class RecyclingEntropyConfig(RecyclingConfig):
    """Token Recycling with each step's tree sized by the target's entropy at the root
    (``drafters.entropy_sized``): one tree per entropy bucket, ``edges`` in nats.

    Example::

        tokopt.optimize(model, speculative=RecyclingEntropyConfig(edges=(1.0, 3.0)))
    """

    method: ClassVar[str] = "recycling-entropy"

    edges: tuple = DEFAULT_EDGES

    def __post_init__(self):
        super().__post_init__()
        self._as_tuple("edges")
        e = self.edges
        self._check(bool(e) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in e)
                    and list(e) == sorted(set(e)) and e[0] > 0,
                    f"edges must be positive, strictly increasing entropies (nats), e.g. {DEFAULT_EDGES}; got {e}")


# -- prompt lookup -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LookupConfig(SpeculativeConfig):
    """Prompt lookup (``drafters.lookup``): continuations of the latest n-gram from the prompt and output; budget
    "auto" is 8 nodes.

    Example::

        tokopt.optimize(model, speculative=LookupConfig(budget=6, branches=1))
    """

    method: ClassVar[str] = "lookup"
    auto_budget: ClassVar[int] = 8

    max_ngram: int = 3
    min_ngram: int = 1
    branches: int = 2  # distinct earlier occurrences whose continuations enter the tree

    def __post_init__(self):
        super().__post_init__()
        self._check_ints(min_ngram=(1, "shortest n-gram matched"), max_ngram=(1, "longest n-gram matched"),
                         branches=(1, "earlier occurrences whose continuations enter the tree"))
        self._check(self.min_ngram <= self.max_ngram,
                    f"need 1 <= min_ngram <= max_ngram, got min_ngram={self.min_ngram}, max_ngram={self.max_ngram}")


# -- draft models ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DraftModelConfig(SpeculativeConfig):
    """What the draft-model methods share: the draft (``draft_model``: a model, name or path sharing the
    tokenizer; None: the target itself with ``draft_layers`` kept, self-speculative, no second model)."""

    draft_model: object = field(default=None, metadata={"to_json": _draft_model_name})
    draft_layers: tuple | None = None  # self-speculative draft's kept layers (default: calibrated once per model)

    def __post_init__(self):
        super().__post_init__()
        self._as_tuple("draft_layers")
        layers = self.draft_layers
        try:
            if layers is not None:
                object.__setattr__(self, "draft_layers", tuple(operator.index(i) for i in layers))
            ok = layers is None or (len(layers) > 0 and min(self.draft_layers) >= 0)
        except TypeError:
            ok = False
        self._check(ok, f"draft_layers must be None (calibrated once per model) or layer indices >= 0, got {layers!r}")
        self._check(layers is None or self.draft_model is None,
                    "draft_layers picks the target's own layers for the self-speculative draft; give draft_layers "
                    "or draft_model, not both")


@dataclass(frozen=True)
class DraftConfig(DraftModelConfig):
    """Classic speculative decoding: a chain of ``budget`` draft tokens ("auto": 4).

    Example::

        tokopt.optimize(model, speculative=DraftConfig(budget=5, draft_model="HuggingFaceTB/SmolLM2-135M"))
    """

    method: ClassVar[str] = "draft"
    auto_budget: ClassVar[int] = 4


@dataclass(frozen=True)
class DySpecConfig(DraftModelConfig):
    """DySpec (``drafters.dyspec``): a dynamic tree from the draft distribution under a node budget ("auto": 8).

    Example::

        tokopt.optimize(model, speculative=DySpecConfig(budget=12, max_depth=6))
    """

    method: ClassVar[str] = "dyspec"
    auto_budget: ClassVar[int] = 8

    max_depth: int = 6
    threshold: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        self._check_ints(max_depth=(1, "deepest tree level"))
        self._check_probability("threshold")  # nodes whose path probability is below it are not drafted


@dataclass(frozen=True)
class RSDConfig(DraftModelConfig):
    """RSD-C (``drafters.rsd``): ``widths[d]`` children per node at depth d; budget caps the nodes ("auto": no cap).

    Example::

        tokopt.optimize(model, speculative=RSDConfig(widths=(3, 2, 1)))
    """

    method: ClassVar[str] = "rsd"

    widths: tuple = (2, 2, 1, 1)

    def __post_init__(self):
        super().__post_init__()
        self._as_tuple("widths")
        self._check(bool(self.widths) and all(isinstance(w, int) and w >= 1 for w in self.widths),
                    f"widths must be one or more ints >= 1 (children per node at each depth), got {self.widths!r}")


@dataclass(frozen=True)
class SpecDecConfig(DraftModelConfig):
    """SpecDec++ (``drafters.specdec``): a chain stopped by a trained acceptance head (``tokopt train-specdec``)
    once P(a rejection so far) exceeds ``threshold``; budget: most drafted tokens ("auto": 8).

    Example::

        tokopt.optimize(model, speculative=SpecDecConfig(threshold=0.5))
    """

    method: ClassVar[str] = "specdec++"
    auto_budget: ClassVar[int] = 8

    head: str | None = None  # path; default: the head `tokopt train-specdec` saved for this target/draft pair
    threshold: float = 0.3

    def __post_init__(self):
        super().__post_init__()
        self._check_probability("threshold", low_open=True, high_open=True)  # P(a rejection so far) that stops
        self._check(self.head is None or isinstance(self.head, str),
                    f"head must be a path (str) or None, got {type(self.head).__name__}")


# -- Parallel Prompt Decoding ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PPDConfig(SpeculativeConfig):
    """Parallel Prompt Decoding (``drafters.ppd``; ``tokopt train-ppd`` once per model): budget is guess nodes;
    with "auto" the tree size, chain count and chain length are chosen from the measured verify latency.

    Example::

        tokopt.optimize(model, speculative=PPDConfig(chain_nodes=2, chain_len=3))
    """

    method: ClassVar[str] = "ppd"
    auto_budget: ClassVar[int] = 6
    sized_by_latency: ClassVar[bool] = True

    max_nodes: int = 32  # largest tree "auto" considers
    chain_nodes: int = 2  # nodes carrying a prompt chain, the root included (without a latency profile)
    ranks: int = 10  # candidates per depth
    max_chain_nodes: int = 8  # most chains the latency rule considers
    chain_len: int | None = None  # prompt tokens per chain (None: all k; the latency rule may use fewer)
    reshape_every: int = 16  # steps between shape updates from acceptance statistics

    def __post_init__(self):
        super().__post_init__()
        self._check_ints(max_nodes=(1, "largest tree 'auto' considers"), chain_nodes=(1, "nodes carrying a chain"),
                         ranks=(1, "candidates per depth"), max_chain_nodes=(1, "most chains 'auto' considers"),
                         reshape_every=(1, "steps between shape updates"))
        if self.chain_len is not None:
            self._check_ints(chain_len=(1, "prompt tokens per chain; None: all"))


@dataclass(frozen=True)
class PPDRecyclingConfig(PPDConfig):
    """PPD guesses and Token Recycling's candidates in one tree. ``recycling`` configures the recycled part (its
    budget "auto": sized with PPD's latency profile when PPD's budget is "auto", else 8 nodes).

    Example::

        tokopt.optimize(model, speculative=PPDRecyclingConfig(recycling=RecyclingConfig(lookup_nodes=0)))
    """

    method: ClassVar[str] = "ppd+recycling"

    recycling: RecyclingConfig = field(default_factory=RecyclingConfig)

    def __post_init__(self):
        super().__post_init__()
        self._check(type(self.recycling) is RecyclingConfig,
                    f"recycling must be a RecyclingConfig, got {type(self.recycling).__name__}")


# -- the flat keywords of earlier versions -----------------------------------------------------------------------
# SpeculativeConfig(method, budget, ...) took every method's settings as one flat list. Each keyword -> (the config
# class it applies to, the field it sets there, its old default: given elsewhere at that default, it is ignored).
_RENAMED = {
    "max_nodes": ((RecyclingConfig, PPDConfig), "max_nodes", 32),
    "draft_model": (DraftModelConfig, "draft_model", None),
    "draft_layers": (DraftModelConfig, "draft_layers", None),
    "entropy_edges": (RecyclingEntropyConfig, "edges", DEFAULT_EDGES),
    "rsd_widths": (RSDConfig, "widths", (2, 2, 1, 1)),
    "dyspec_max_depth": (DySpecConfig, "max_depth", 6),
    "dyspec_threshold": (DySpecConfig, "threshold", 0.0),
    "specdec_head": (SpecDecConfig, "head", None),
    "specdec_threshold": (SpecDecConfig, "threshold", 0.3),
    "draft_length": (DraftConfig, "budget", 4),  # the chain length when budget was "auto"
    "specdec_max_length": (SpecDecConfig, "budget", 8),  # the most drafted tokens when budget was "auto"
}
# nested configs: (the config classes whose fields they held, their class); budget and max_nodes came from the top
_NESTED = {"recycling": (RecyclingConfig, RecyclingConfig), "lookup": (LookupConfig, LookupConfig),
           "ppd": (PPDConfig, PPDConfig)}


def _from_flat_keywords(method: str = "recycling", budget=AUTO, **kwargs) -> SpeculativeConfig:
    """``SpeculativeConfig(method, budget=..., **flat keywords)``: the named method's config (see ``_RENAMED``)."""
    target = config_class(method)
    own = {f.name for f in fields(target)}
    values = {"budget": budget}
    for key, value in kwargs.items():
        if key in _NESTED and key in own:  # ppd+recycling's recycling=: a field of its own
            values[key] = value
        elif key in _NESTED:
            applies, kind = _NESTED[key]
            if not isinstance(value, kind):
                raise TokoptError(f"SpeculativeConfig {key}= takes a {kind.__name__}, got {type(value).__name__}")
            if issubclass(target, applies):
                values.update({f.name: getattr(value, f.name) for f in fields(kind)
                               if f.name not in ("budget", "max_nodes")})
            elif value != kind():
                _not_for(key, target)
        elif key in _RENAMED:
            applies, name, default = _RENAMED[key]
            if not issubclass(target, applies):
                if value != default and not (isinstance(value, list) and tuple(value) == default):
                    _not_for(key, target)
            elif name != "budget":
                values[name] = value
            elif budget == AUTO and value != default:
                values["budget"] = value
        else:
            known = sorted(set(_RENAMED) | set(_NESTED) | {"method", "budget"})
            raise TokoptError(f"SpeculativeConfig got an unknown keyword {key!r}; it takes: {', '.join(known)} "
                              f"(or use the method's own config, {target.__name__})")
    return target(**values)


def _not_for(key: str, target: type) -> None:
    own = [f.name for f in fields(target)]
    raise TokoptError(f"{key} does not apply to speculative method {target.method!r}; its config {target.__name__} "
                      f"takes: {', '.join(own)}")

