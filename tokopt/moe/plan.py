"""Choosing an expert-parallel strategy: predicted step times of two-Alltoall EP and context-coherent EP
(ExFlow) under contiguous and affinity-aware expert placements, the fastest, and why.

Example::

    from tokopt.moe.plan import plan
    p = plan("mixtral-8x7b", "nvlink8", batch=32)
    print(p)                      # a table and a few sentences
    p.best                        # ("two_alltoall", "contiguous")
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tokopt.errors import TokoptError
from tokopt.moe.cost_model import (BUILTIN_SHAPES, PHASES, STRATEGIES, MoEShape, StepEstimate, Topology, fmt_bytes,
                                   step_time, uniform_fractions)
from tokopt.models.loading import ALIASES, ensure_converted, KNOWN_MODELS
from tokopt.moe.placement import as_trace, contiguous_placement, place, Placement


# ---------------------------------------------------------------------------------------------------------------
# inputs


def load_shape(model_or_config) -> MoEShape:
    """An MoEShape from a shape, a HF config (object or dict), a built-in name, a config.json path, a local HF
    model directory or a loaded HF model.

    Example::

        load_shape("olmoe-1b-7b").experts      # 64
    """
    if isinstance(model_or_config, MoEShape):
        return model_or_config
    if isinstance(model_or_config, dict):
        return MoEShape.from_config(model_or_config)
    if hasattr(model_or_config, "to_dict") and hasattr(model_or_config, "model_type"):
        return MoEShape.from_config(model_or_config)
    if hasattr(model_or_config, "config") and hasattr(model_or_config.config, "to_dict"):
        return MoEShape.from_config(model_or_config.config)
    name = str(model_or_config)
    if name.lower() in BUILTIN_SHAPES:
        return MoEShape.preset(name.lower())

    known = ALIASES.get(name, name)
    path = ensure_converted(known) if known in KNOWN_MODELS else Path(name)  # tokopt's own models, by name
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise TokoptError(f"{name!r} is neither a built-in shape ({', '.join(BUILTIN_SHAPES)}), a known model "
                          f"({', '.join(KNOWN_MODELS)}) nor a config.json "
                          "or a local HF model directory")
    try:
        config = json.loads(path.read_text())
    except ValueError as exc:
        raise TokoptError(f"{path} is not JSON ({exc})") from None
    return MoEShape.from_config(config, name=path.parent.name if path.name == "config.json" else path.stem)


def load_topology(topology, **overrides) -> Topology:
    """A Topology from itself or a preset name (``overrides`` as for ``Topology.preset``)."""
    if isinstance(topology, Topology):
        return topology
    return Topology.preset(str(topology), **{k: v for k, v in overrides.items() if v is not None})


# ---------------------------------------------------------------------------------------------------------------
# routing fractions from a trace and a placement


def routing_fractions(experts: np.ndarray, assignment: np.ndarray, gpus: int, *, stay_home: bool,
                      gpus_per_node: int | None = None, home: np.ndarray | None = None) -> dict:
    """Mean cross / split fractions (and the share of sent rows crossing nodes) of a trace under a placement.

    ``experts[T, L, k]`` by descending gate weight; ``assignment[L, E]`` -> rank. Tokens start on rank
    ``home[t]`` (default ``token * gpus // T``: sequences sharded in blocks). At each layer a token's destination is its current
    rank if that hosts any of its experts, else its top expert's rank; cross = destination != current rank
    (layer 0 counts the move from home, so even a perfect affinity map keeps the first layer's crossings);
    split = further distinct ranks among its experts. ``stay_home`` (two_alltoall) keeps tokens at home;
    otherwise (context_coherent) they live on at their destination.

    Example::

        e = np.array([[[0], [1]], [[1], [1]]])          # 2 tokens, 2 layers, top-1
        routing_fractions(e, np.array([[0, 1], [0, 1]]), 2, stay_home=False)["cross"]   # 0.25
    """
    experts = np.asarray(experts)
    T, L, _ = experts.shape
    a = np.asarray(assignment)
    home = (np.arange(T) * gpus) // T if home is None else np.asarray(home)
    cur = home.copy()
    node = (lambda r: r // gpus_per_node) if gpus_per_node else None
    cross, split, sent, inter = [], [], 0.0, 0.0
    for layer in range(L):
        ranks = a[layer][experts[:, layer, :]]  # [T, k]
        here = (ranks == cur[:, None]).any(axis=1)
        dest = np.where(here, cur, ranks[:, 0])
        moved = dest != cur
        others = [len(set(r) - {d}) for r, d in zip(ranks.tolist(), dest.tolist())]
        cross.append(moved.mean())
        split.append(float(np.mean(others)))
        if node is not None:
            sent += moved.sum() + sum(others)
            inter += (node(dest) != node(cur))[moved].sum()
            inter += sum(sum(node(x) != node(d) for x in set(r) - {d}) for r, d in zip(ranks.tolist(), dest.tolist()))
        if not stay_home:
            cur = dest
    out = {"cross": float(np.mean(cross)), "split": float(np.mean(split))}
    if node is not None:
        out["inter_node"] = float(inter / sent) if sent else 0.0
    return out


# ---------------------------------------------------------------------------------------------------------------
# the plan


@dataclass
class Plan:
    """Predicted steps per (strategy, placement), the fastest, and the reasons.

    ``rows``: dicts with strategy, placement, cross, split, and the StepEstimate; ``best``: (strategy, placement);
    ``explanation``: plain sentences.
    """

    shape: MoEShape
    topology: Topology
    phase: str
    batch: int
    context: int
    rows: list[dict]
    best: tuple[str, str]
    explanation: list[str] = field(default_factory=list)

    def estimate(self, strategy: str, placement: str = "contiguous") -> StepEstimate:
        for r in self.rows:
            if r["strategy"] == strategy and r["placement"] == placement:
                return r["estimate"]
        raise TokoptError(f"no row for {strategy} with {placement} placement in this plan")

    def to_dict(self) -> dict:
        return {"model": self.shape.to_dict(), "topology": self.topology.to_dict(), "phase": self.phase,
                "batch": self.batch, "context": self.context, "best": list(self.best),
                "rows": [{**{k: v for k, v in r.items() if k != "estimate"}, **r["estimate"].to_dict()}
                         for r in self.rows],
                "explanation": self.explanation}

    def __str__(self) -> str:
        t = self.topology
        head = (f"{self.shape.name} on {t.name} ({t.gpus} GPUs, {t.nodes} node{'s' * (t.nodes > 1)}), {self.phase}, "
                f"batch {self.batch}, context {self.context}")
        cols = ["strategy", "placement", "cross", "split", "compute ms", "dispatch ms", "combine ms", "kv sync ms",
                "gather ms", "total ms", "sent/rank"]
        lines = []
        for r in self.rows:
            e = r["estimate"]
            mark = " *" if (r["strategy"], r["placement"]) == self.best else ""
            lines.append([r["strategy"] + mark, r["placement"], f"{r['cross']:.3f}", f"{r['split']:.2f}",
                          *(f"{x * 1e3:.3f}" for x in (e.compute_s, e.dispatch_s, e.combine_s + e.counts_s,
                                                        e.kv_sync_s, e.gather_s, e.total_s)),
                          fmt_bytes(e.comm_bytes)])
        widths = [max(len(c), *(len(row[i]) for row in lines)) for i, c in enumerate(cols)]
        fmt = lambda row: "  ".join(x.rjust(w) if i > 1 else x.ljust(w) for i, (x, w) in enumerate(zip(row, widths)))  # noqa: E731
        table = [fmt(cols), fmt(["-" * w for w in widths]), *map(fmt, lines)]
        return "\n".join([head, *table, "(* = recommended; combine = combine Alltoall or partial exchange, plus "
                          "split counts)", "", *self.explanation])


def _fractions_from_trace(trace, shape: MoEShape, topo: Topology, placement, seed: int = 0) -> dict:
    tr = as_trace(trace)
    L, E, n = tr.num_layers, tr.num_experts, topo.gpus
    if E < n:
        raise TokoptError(f"the trace has {E} experts per layer, fewer than {n} GPUs")
    maps = {"contiguous": contiguous_placement(L, E, n)}
    if placement is None:
        maps["affinity"] = place(tr, n, nodes=topo.nodes, seed=seed).assignment
    else:
        p = placement if isinstance(placement, Placement) else Placement.from_json(placement)
        maps["affinity"] = np.asarray(p.assignment)
    gpn = topo.gpus_per_node if topo.nodes > 1 else None
    return {name: {s: routing_fractions(tr.experts, a, n, stay_home=(s == "two_alltoall"), gpus_per_node=gpn)
                   for s in STRATEGIES} for name, a in maps.items()}


def plan(model_or_config, topology="nvlink8", *, trace=None, placement=None, batch: int = 32,
         phase: str = "decode", context: int = 1024, cross_fractions: dict | None = None,
         split_fraction: float | None = None, compute_s: float | None = None, dtype_bytes: int | None = None) -> Plan:
    """Predict a step of both strategies under contiguous and affinity-aware placements and pick the fastest.

    ``trace`` (a RoutingTrace or a path): cross/split fractions are simulated on it under the contiguous
    placement and under ``placement`` (a Placement or MAP.json) or ``tokopt.moe.placement.place``'s.
    Without a trace, routing is taken as uniform (contiguous placement); ``cross_fractions`` =
    ``{"contiguous": f, "affinity": f}`` sets context-coherent cross fractions measured elsewhere (e.g.
    ExFlow's Mixtral numbers), ``split_fraction`` the further expert ranks per token. ``batch`` sequences,
    ``context`` tokens of KV (decode) or prompt length (prefill).

    Example::

        p = plan("mixtral-8x7b", Topology.preset("2node-rdma", gpus=8), batch=256,
                 cross_fractions={"contiguous": 0.875, "affinity": 0.715})
        print(p.best, p.explanation[0])
    """
    if phase not in PHASES:
        raise TokoptError(f"unknown phase {phase!r}; known: {', '.join(PHASES)}")
    if batch < 1 or context < 1:
        raise TokoptError(f"batch and context must be >= 1, got {batch}, {context}")
    shape = load_shape(model_or_config)
    if dtype_bytes:
        shape = MoEShape(**{**shape.to_dict(), "moe_layers": shape.moe_layers, "dtype_bytes": dtype_bytes})
    topo = load_topology(topology)
    if topo.gpus > shape.experts:
        raise TokoptError(f"expert parallelism over {topo.gpus} GPUs needs >= {topo.gpus} experts; {shape.name} "
                          f"has {shape.experts}: use fewer GPUs (e.g. --gpus {shape.experts})")
    tokens = batch if phase == "decode" else batch * context
    uni = uniform_fractions(shape, topo.gpus)
    inter_uni = topo.uniform_inter_fraction()
    scenarios = {}  # placement -> strategy -> (cross, split, inter-node share)
    notes = []
    if trace is not None:
        trace = as_trace(trace)
        layers = len(shape.moe_layers)
        if (trace.experts.shape[1], trace.num_experts) != (layers, shape.experts):
            raise TokoptError(f"the trace has {trace.experts.shape[1]} MoE layers x {trace.num_experts} experts, but "
                              f"{shape.name} has {layers} x {shape.experts}: record one from this model "
                              "(`tokopt trace MODEL -o T.npz`), or plan without --trace")
        if trace.top_k != shape.top_k:
            notes.append(f"The trace routes top-{trace.top_k}, not {shape.name}'s top-{shape.top_k}: its "
                         "cross/split fractions are applied as measured.")
        for name, per in _fractions_from_trace(trace, shape, topo, placement).items():
            scenarios[name] = {s: (f["cross"], f["split"], f.get("inter_node")) for s, f in per.items()}
    else:
        scenarios["contiguous"] = {s: (uni[0], uni[1], None) for s in STRATEGIES}
    for name, f in (cross_fractions or {}).items():
        split = uni[1] if split_fraction is None else split_fraction
        scenarios.setdefault(name, {"two_alltoall": (uni[0], uni[1], None)})
        scenarios[name]["context_coherent"] = (float(f), split, None)
    rows = []
    for name, per in scenarios.items():
        for strategy in STRATEGIES:
            cross, split, inter = per[strategy]
            est = step_time(shape, topo, strategy, tokens=tokens, cross_fraction=cross, split_fraction=split,
                            phase=phase, compute_s=compute_s, context=context, sequences=batch,
                            inter_node_fraction=inter)
            rows.append({"strategy": strategy, "placement": name, "cross": cross, "split": split,
                         "inter_node": inter_uni if inter is None else inter, "estimate": est})
    best_row = min(rows, key=lambda r: r["estimate"].total_s)
    p = Plan(shape, topo, phase, batch, context, rows, (best_row["strategy"], best_row["placement"]))
    p.explanation = explain(p, trace_given=trace is not None, compute_given=compute_s is not None)
    p.explanation += notes
    return p


def _best_of(rows, strategy):
    return min((r for r in rows if r["strategy"] == strategy), key=lambda r: r["estimate"].total_s)


def explain(p: Plan, *, trace_given: bool = False, compute_given: bool = False) -> list[str]:
    """A few plain sentences: what wins, by how much, and which traffic decides it."""
    base, cc = _best_of(p.rows, "two_alltoall"), _best_of(p.rows, "context_coherent")
    b, c = base["estimate"], cc["estimate"]
    winner, loser = (base, cc) if b.total_s <= c.total_s else (cc, base)
    w, lo = winner["estimate"], loser["estimate"]
    topo = p.topology
    where = (f"{topo.nodes} nodes over RDMA" if topo.nodes > 1 else f"{topo.gpus} GPUs on {topo.name}")
    a2a_b = lambda e: e.dispatch_bytes + e.combine_bytes  # noqa: E731
    a2a_s = lambda e: e.dispatch_s + e.combine_s + e.counts_s  # noqa: E731
    extra_b, extra_s = c.kv_sync_bytes + c.gather_bytes, c.kv_sync_s + c.gather_s
    saved_b, saved_s = a2a_b(b) - a2a_b(c), a2a_s(b) - a2a_s(c)
    out = [f"Use {winner['strategy']} ({winner['placement']} placement): {w.total_s * 1e3:.3f} ms per {p.phase} "
           f"step vs {lo.total_s * 1e3:.3f} ms ({lo.total_s / max(w.total_s, 1e-15):.2f}x) for {p.shape.name} on "
           f"{where}."]
    out.append(f"Per rank and step, context_coherent's Alltoalls send {fmt_bytes(a2a_b(c))} vs {fmt_bytes(a2a_b(b))} "
               f"for two_alltoall ({a2a_s(c) * 1e3:.3f} vs {a2a_s(b) * 1e3:.3f} ms, {c.collectives} vs "
               f"{b.collectives} collectives), and K/V coherence adds {fmt_bytes(extra_b)} ({extra_s * 1e3:.3f} ms).")
    if saved_s <= 0:
        out.append("Dropping the combine saves no Alltoall time here (the partial exchange and per-collective "
                   f"latency cost {-saved_s * 1e3:.3f} ms more), so K/V coherence is pure overhead.")
    elif extra_s > saved_s:
        out.append(f"K/V coherence traffic ({fmt_bytes(extra_b)}, {extra_s * 1e3:.3f} ms) exceeds the Alltoall "
                   f"traffic it saves ({fmt_bytes(saved_b)}, {saved_s * 1e3:.3f} ms): use two_alltoall.")
    else:
        out.append(f"The Alltoall time it saves ({fmt_bytes(saved_b)}, {saved_s * 1e3:.3f} ms) exceeds K/V "
                   f"coherence ({fmt_bytes(extra_b)}, {extra_s * 1e3:.3f} ms): use context_coherent.")
    if p.shape.top_k > 1 and cc["split"] > 0:
        out.append(f"Top-{p.shape.top_k} routing spreads a token over {1 + cc['split']:.2f} ranks on average, so "
                   "context-coherent still exchanges partial results for its secondary experts (one Alltoall per "
                   "layer is exact only for top-1 or co-located experts).")
    comm = w.comm_s / max(w.total_s, 1e-15)
    out.append(f"Communication is {comm:.0%} of the winning step (compute {w.compute_s * 1e3:.3f} ms, "
               f"{'measured' if compute_given else 'roofline'}); context-coherent keeps every sequence's K/V on every "
               f"rank ({fmt_bytes(c.kv_memory_bytes)} per rank vs {fmt_bytes(b.kv_memory_bytes)}).")
    if not trace_given and not any(r["placement"] != "contiguous" for r in p.rows):
        out.append("No routing trace: routing taken as uniform, affinity-aware placement not evaluated "
                   "(give --trace, or cross fractions measured elsewhere).")
    return out
