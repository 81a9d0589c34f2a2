"""Typed metadata a captured graph carries through the passes (``gm.meta["tokopt"]``), read with ``graph_meta``.

- ``GraphMeta``: a decoder graph (``capture``): its ``GraphSpec``, output names (passes add taps), capture time,
  what ran on it (``history``) and ``facts``, the part an engine directory keeps (``GraphFacts``: e.g. the
  prompt slots ``ppd_slots`` added);
- ``EPProgramMeta``: an expert-parallel step program (``ep_program.capture_program``): its spec, MoE layers, and
  the world, rank and strategy the expert-parallel passes sharded it for.

Passes receive their arguments as typed configs (``passes/registry.py``), never through this metadata.

Example::

    gm = capture(model)
    meta = graph_meta(gm)                  # GraphMeta(spec=GraphSpec(...), output_names=['logits', ...], ...)
    meta.facts.ppd                         # None until the ppd_slots pass ran
    meta.facts.to_dict()                   # what `tokopt export` writes as the manifest's "graph_meta"
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from tokopt.errors import TokoptError
from tokopt.models.decoder_graph import GraphSpec

KEY = "tokopt"


@dataclass
class PPDFacts:
    """Prompt-token slots in the graph (``ppd_slots``): ids ``vocab_size .. vocab_size + k - 1`` are prompt
    tokens; ``rank_accuracy[j][r]``: measured accuracy of prompt token j's r-th best guess (None: untrained)."""

    k: int
    vocab_size: int
    trained: bool
    rank_accuracy: list | None = None


@dataclass
class GraphFacts:
    """What the runtime needs to know about a graph beyond its spec; round-trips through an engine manifest."""

    ppd: PPDFacts | None = None

    def to_dict(self) -> dict:
        return {} if self.ppd is None else {"ppd": asdict(self.ppd)}

    @classmethod
    def from_dict(cls, d: dict | None) -> "GraphFacts":
        d = d or {}
        if not isinstance(d, dict):
            raise TokoptError(f"graph facts must be a JSON object, got {type(d).__name__}")
        ppd = d.get("ppd")
        try:
            return cls(PPDFacts(**ppd) if ppd is not None else None)
        except TypeError as exc:
            raise TokoptError(f"graph facts 'ppd' is malformed ({exc}); re-export the engine") from None


@dataclass
class GraphMeta:
    """A decoder graph's metadata (see the module docstring)."""

    spec: GraphSpec
    output_names: list
    capture_s: float = 0.0
    history: list = field(default_factory=list)
    facts: GraphFacts = field(default_factory=GraphFacts)
    attention_tap_layers: list | None = None  # layers attention_taps reads (RAUQ)

    @property
    def input_names(self) -> list:
        return self.spec.input_names


@dataclass
class EPProgramMeta:
    """An expert-parallel step program's metadata (see the module docstring)."""

    spec: GraphSpec
    moe_layers: list
    model_type: str
    world: int = 1
    rank: int = 0
    strategy: str = "single"  # then two_alltoall (expert_parallel) or context_coherent (fuse_alltoall)
    history: list = field(default_factory=list)


def graph_meta(gm) -> GraphMeta | EPProgramMeta:
    """The metadata of a graph tokopt captured, or a TokoptError saying the graph was not captured by tokopt."""
    meta = getattr(gm, "meta", {}).get(KEY)
    if not isinstance(meta, (GraphMeta, EPProgramMeta)):
        raise TokoptError("this graph carries no tokopt metadata: capture it with tokopt.models.capture.capture "
                          "(decoder graphs) or tokopt.models.ep_program.program.capture_program (expert-parallel)")
    return meta


def set_graph_meta(gm, meta: GraphMeta | EPProgramMeta) -> None:
    gm.meta[KEY] = meta


def decoder_meta(gm) -> GraphMeta | None:
    """``graph_meta(gm)`` when ``gm`` is a captured decoder graph, else None."""
    meta = getattr(gm, "meta", {}).get(KEY)
    return meta if isinstance(meta, GraphMeta) else None


def ep_meta(gm) -> EPProgramMeta | None:
    """``graph_meta(gm)`` when ``gm`` is an expert-parallel step program, else None."""
    meta = getattr(gm, "meta", {}).get(KEY)
    return meta if isinstance(meta, EPProgramMeta) else None
