"""Affinity-aware expert placement: which GPU holds each expert of each MoE layer.

A placement is ``assignment[L, E]`` (int64 GPU ids). Its cross-GPU fraction on a trace is the fraction of
(token, layer l -> l+1) transitions whose experts sit on different GPUs. Two variants:
- ``top1=True``: the top-1 expert at l and at l+1 (the one-Alltoall runtime moves a token to its top-1 expert);
- ``top1=False``: all k x k expert pairs of a token, weighted by normalized gate weight products.

``place`` optimizes transition counts C (see tokopt.moe.affinity) of the chosen variant and reports the
top-1 fraction, the convention of MAP.json and ``tokopt place``.

Example::

    import tokopt
    p = tokopt.place("shared/data/moe_traces/flame_moe_290m/prefill", gpus=4)
    p.cross_fraction(trace)          # top-1 cross-GPU fraction of this placement on a trace
    open("MAP.json", "w").write(p.to_json())
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tokopt.errors import TokoptError
from tokopt.moe.affinity import affinity, expert_load, transition_counts
from tokopt.moe.traces import RoutingTrace, load_trace
from tokopt.moe.place_graph import solve_graph
from tokopt.moe.place_heuristic import rebalance_load, solve_heuristic
from tokopt.moe.place_ilp import solve_ilp
from tokopt.moe.replicas import add_replicas

METHODS = ("heuristic", "ilp", "graph")


@dataclass
class Placement:
    """Experts' GPUs per layer, how they were found, and what they are expected to cost.

    ``assignment[l, e]``: GPU of expert e at layer l (the primary copy when ``replicas`` is set);
    ``replicas[l][e]``: every GPU holding a copy of expert e at layer l; ``objective``: the optimized expected
    cross fraction on the profiling trace; ``info``: anything else reported (solver, baselines, node split).
    """

    assignment: np.ndarray
    gpus: int
    nodes: int = 1
    method: str = "heuristic"
    objective: float = float("nan")
    solve_s: float = 0.0
    replicas: list | None = None
    info: dict = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return self.assignment.shape[0]

    @property
    def num_experts(self) -> int:
        return self.assignment.shape[1]

    def node_of(self) -> np.ndarray:
        """``[L, E]`` node of each expert (GPUs are numbered node-major: node = gpu // gpus_per_node)."""
        return self.assignment // (self.gpus // self.nodes)

    def cross_fraction(self, trace, top1: bool = True) -> float:
        """Fraction of a trace's layer transitions that cross GPUs under this placement."""
        return cross_fraction(self.assignment, trace, top1=top1)

    def to_dict(self) -> dict:
        d = {"placement": self.assignment.tolist(), "gpus": self.gpus, "nodes": self.nodes,
             "num_experts": self.num_experts, "num_layers": self.num_layers, "method": self.method,
             "objective": self.objective, "solve_s": round(self.solve_s, 4)}
        d.update(self.info)
        if self.replicas is not None:
            d["replicas"] = self.replicas
        return d

    def to_json(self) -> str:
        """MAP.json text: ``placement`` [[gpu per expert] per layer], gpus, nodes, cross fractions, method...

        One line per layer, so the file stays readable and diffable.
        """
        d = self.to_dict()
        lines = []
        for key, value in d.items():
            if key in ("placement", "replicas"):
                rows = ",\n  ".join(json.dumps(r, separators=(",", ":")) for r in value)
                lines.append(f' "{key}": [\n  {rows}\n ]')
            else:
                lines.append(f" {json.dumps(key)}: {json.dumps(_plain(value))}")
        return "{\n" + ",\n".join(lines) + "\n}\n"

    @classmethod
    def from_json(cls, text_or_path) -> "Placement":
        """Read MAP.json (a path or its text) back."""
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            p = Path(text_or_path)
            if not p.exists():
                raise TokoptError(f"placement map {p} does not exist; write one with `tokopt place`")
            text = p.read_text()
        try:
            d = json.loads(text)
            a = np.asarray(d["placement"], dtype=np.int64)
            gpus, nodes = int(d["gpus"]), int(d.get("nodes", 1))
        except (ValueError, KeyError, TypeError) as exc:
            raise TokoptError(f"not a placement map ({exc}); expected JSON with 'placement' [[gpu per expert] "
                              "per layer] and 'gpus'") from None
        if a.ndim != 2 or a.size == 0 or a.min() < 0 or a.max() >= gpus:
            raise TokoptError(f"placement must be [layers][experts] GPU ids in 0..{gpus - 1}; got shape {a.shape}")
        info = {k: v for k, v in d.items() if k not in ("placement", "gpus", "nodes", "num_experts", "num_layers",
                                                        "method", "objective", "solve_s", "replicas")}
        return cls(a, gpus, nodes, d.get("method", "?"), float(d.get("objective", float("nan"))),
                   float(d.get("solve_s", 0.0)), d.get("replicas"), info)


def _plain(v):
    """numpy scalars and arrays as plain JSON values."""
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, (list, tuple)):
        return [_plain(u) for u in v]
    return v


def as_trace(trace_or_experts, num_experts: int | None = None) -> RoutingTrace:
    """A RoutingTrace from a trace, an int array [T, L, k] (or [T, L]) or a path to one."""
    if isinstance(trace_or_experts, RoutingTrace):
        return trace_or_experts
    if isinstance(trace_or_experts, (str, Path)):
        return load_trace(trace_or_experts, num_experts=num_experts)
    a = np.asarray(trace_or_experts)
    if a.dtype == object or not np.issubdtype(a.dtype, np.integer):
        raise TokoptError(f"expected a RoutingTrace, a path or an int array [tokens, layers, top_k]; got "
                          f"{type(trace_or_experts).__name__} of dtype {a.dtype}")
    if a.size and a.min() < 0:
        raise TokoptError(f"expert ids must be >= 0; found {int(a.min())}")
    return RoutingTrace(a, None, num_experts or (int(a.max()) + 1 if a.size else 1))


def _check_assignment(assignment, trace):
    a = np.asarray(assignment)
    if a.shape != (trace.num_layers, trace.num_experts):
        raise TokoptError(f"placement shape {a.shape} does not match the trace ({trace.num_layers} layers x "
                          f"{trace.num_experts} experts)")
    return a


def cross_fraction(placement, trace, top1: bool = True) -> float:
    """Fraction of (token, layer l -> l+1) transitions whose experts sit on different GPUs.

    ``top1=True`` compares top-1 experts; ``top1=False`` weights all k x k pairs by gate weight products.

    Example::

        cross_fraction(contiguous_placement(8, 64, 4), trace)     # about 0.75 without affinity
    """
    a = placement.assignment if isinstance(placement, Placement) else placement
    trace = as_trace(trace)
    a = _check_assignment(a, trace)
    C = transition_counts(trace, top1=top1)
    return 1.0 - kept_fraction(C, a)


def kept_fraction(C: np.ndarray, a: np.ndarray) -> float:
    total = C.sum()
    if total <= 0:
        return 0.0
    return float(sum((C[l] * (a[l][:, None] == a[l + 1][None, :])).sum() for l in range(len(C))) / total)


def node_cross_fractions(C: np.ndarray, a: np.ndarray, gpus: int, nodes: int) -> dict:
    """Split crossings into intra-node (other GPU, same node) and inter-node, as fractions of all transitions."""
    per_node = gpus // nodes
    n = a // per_node
    total = max(C.sum(), 1e-300)
    same_gpu = sum((C[l] * (a[l][:, None] == a[l + 1][None, :])).sum() for l in range(len(C)))
    same_node = sum((C[l] * (n[l][:, None] == n[l + 1][None, :])).sum() for l in range(len(C)))
    return {"intra_node_cross_fraction": float((same_node - same_gpu) / total),
            "inter_node_cross_fraction": float(1 - same_node / total),
            "hop_cost": float((same_node - same_gpu + 2 * (total - same_node)) / total)}


def capacities(E: int, gpus: int) -> np.ndarray:
    """Experts per GPU: E/G each, or as even as possible (only with replicas)."""
    c = np.full(gpus, E // gpus, dtype=np.int64)
    c[: E % gpus] += 1
    return c


def contiguous_placement(num_layers: int, num_experts: int, gpus: int) -> np.ndarray:
    """Experts 0..E/G-1 on GPU 0, the next E/G on GPU 1, ... at every layer (plain expert parallelism)."""
    return np.tile(np.repeat(np.arange(gpus), capacities(num_experts, gpus)), (num_layers, 1))


def random_placement(num_layers: int, num_experts: int, gpus: int, seed: int = 0) -> np.ndarray:
    """A balanced random placement, independent per layer."""
    rng = np.random.default_rng(seed)
    base = np.repeat(np.arange(gpus), capacities(num_experts, gpus))
    return np.stack([rng.permutation(base) for _ in range(num_layers)])


def random_cross_fraction(num_experts: int, gpus: int) -> float:
    """Expected cross fraction of a random balanced placement: 1 - sum_g (c_g / E)^2 (= 1 - 1/G)."""
    c = capacities(num_experts, gpus) / num_experts
    return float(1 - (c ** 2).sum())


def _validate(trace, gpus, nodes, method, replicas, balance):
    E = trace.num_experts
    if not isinstance(gpus, (int, np.integer)) or gpus < 1:
        raise TokoptError(f"gpus must be a positive integer, got {gpus!r}")
    if not isinstance(nodes, (int, np.integer)) or nodes < 1 or gpus % nodes:
        raise TokoptError(f"nodes must divide gpus (gpus % nodes == 0); got gpus={gpus}, nodes={nodes}")
    if method not in METHODS:
        raise TokoptError(f"unknown placement method {method!r}; choose one of {', '.join(METHODS)}")
    if replicas < 0:
        raise TokoptError(f"replicas must be >= 0, got {replicas}")
    if gpus > E + replicas:
        raise TokoptError(f"{gpus} GPUs but only {E} experts (+{replicas} replicas) per layer; use at most "
                          f"{E + replicas} GPUs")
    if replicas == 0 and E % gpus:
        raise TokoptError(f"gpus must divide the number of experts ({E} experts, {gpus} GPUs); pick a divisor "
                          f"of {E} or ask for --replicas so that experts + replicas is a multiple of gpus")
    if replicas and (E + replicas) % gpus:
        raise TokoptError(f"experts + replicas must be a multiple of gpus: {E} + {replicas} is not divisible by "
                          f"{gpus}")
    if nodes > 1 and (E % nodes):
        raise TokoptError(f"nodes must divide the number of experts ({E} experts, {nodes} nodes)")
    if balance is not None and balance < 0:
        raise TokoptError(f"balance (allowed load excess over the mean) must be >= 0, got {balance}")
    if trace.num_layers < 2:
        raise TokoptError(f"placement needs a trace with >= 2 MoE layers; this one has {trace.num_layers}")


def _solve(method, C, gpus, cap, load, *, balance, time_limit, seed):
    info = {}
    if method == "heuristic":
        x = solve_heuristic(C, gpus, cap, seed=seed)
        if balance is not None:
            x = rebalance_load(C, x, load, gpus, balance)
    elif method == "ilp":
        x, info = solve_ilp(C, gpus, cap, load=load, balance=balance, time_limit=time_limit, seed=seed)
    else:
        x = solve_graph(C, gpus, cap, seed=seed)
        if balance is not None:
            x = rebalance_load(C, x, load, gpus, balance)
    return x, info


def _hierarchical(method, C, gpus, nodes, cap, load, *, balance, time_limit, seed):
    """Nodes first (E/N experts per node), then GPUs inside each node on the counts between its own experts."""
    L, E = C.shape[0] + 1, C.shape[1]
    per_node = gpus // nodes
    node_cap = np.array([cap[n * per_node:(n + 1) * per_node].sum() for n in range(nodes)])
    xn, info = _solve(method, C, nodes, node_cap, load, balance=balance, time_limit=time_limit, seed=seed)
    x = np.zeros((L, E), dtype=np.int64)
    for n in range(nodes):
        members = [np.flatnonzero(xn[l] == n) for l in range(L)]
        sub = np.stack([C[l][np.ix_(members[l], members[l + 1])] for l in range(L - 1)])
        sub_load = np.stack([load[l][members[l]] for l in range(L)])
        xs, _ = _solve(method, sub, per_node, cap[n * per_node:(n + 1) * per_node], sub_load, balance=balance,
                       time_limit=time_limit, seed=seed)
        for l in range(L):
            x[l, members[l]] = n * per_node + xs[l]
    return x, info


def place(trace_or_experts, gpus: int, *, nodes: int = 1, method: str = "heuristic", time_limit: float = 30.0,
          balance: float | None = None, replicas: int = 0, seed: int = 0, smoothing: float = 0.0,
          top1: bool = False, num_experts: int | None = None) -> Placement:
    """Place every layer's experts on ``gpus`` GPUs so that tokens change GPU between layers as rarely as possible.

    - ``method``: "heuristic" (exact per layer + coordinate descent, < 1 s), "ilp" (pulp/CBC time-boxed to
      ``time_limit`` s, warm-started from the heuristic; the better of the two is kept) or "graph" (networkx
      Kernighan-Lin bisection of the layered affinity graph, repaired to exact capacities).
    - ``top1``: optimize top-1 transitions (True) or all k x k pairs weighted by gate weights (False, default:
      on FLAME-MoE it estimates affinity from k^2 times more pairs and lowers held-out top-1 crossings; see
      bench/RESULTS.md). The reported ``expected_cross_fraction`` is always top-1.
    - ``smoothing``: additive smoothing alpha of each affinity row, re-weighted by the row's count:
      C'[i] = n_i (C[i] + alpha) / (n_i + E alpha): rarely seen experts count less (a uniform row adds a
      placement-independent constant, so only the shrinkage of sparse rows matters).
    - ``nodes``: hierarchical: split experts between nodes first, then between GPUs inside each node.
    - ``balance``: allow each GPU a token load of at most (1 + balance) x mean (expert counts stay E/G).
    - ``replicas``: extra expert copies per layer, EPLB-style (see tokopt.moe.replicas).

    Example::

        p = place(trace, gpus=8, nodes=2, method="ilp", time_limit=20)
        print(p.info["expected_cross_fraction"], p.info["contiguous_cross_fraction"])
    """
    trace = as_trace(trace_or_experts, num_experts)
    _validate(trace, gpus, nodes, method, replicas, balance)
    E, L = trace.num_experts, trace.num_layers
    t0 = time.perf_counter()
    C = transition_counts(trace, top1=top1)
    if smoothing > 0:  # smooth the conditional P(j | i) and weight rows back by how often i is seen
        C = affinity(C, smoothing=smoothing) * C.sum(axis=-1, keepdims=True)
    load = expert_load(trace)
    cap = capacities(E, gpus)
    if nodes > 1:
        x, info = _hierarchical(method, C, gpus, nodes, cap, load, balance=balance, time_limit=time_limit,
                                seed=seed)
    else:
        x, info = _solve(method, C, gpus, cap, load, balance=balance, time_limit=time_limit, seed=seed)
    solve_s = time.perf_counter() - t0
    C1 = transition_counts(trace, top1=True)
    info.update({
        "objective_variant": "top1" if top1 or trace.top_k == 1 else "topk_weighted",
        "expected_cross_fraction": 1 - kept_fraction(C1, x),
        "contiguous_cross_fraction": 1 - kept_fraction(C1, contiguous_placement(L, E, gpus)),
        "random_cross_fraction": random_cross_fraction(E, gpus),
        "expected_cross_fraction_topk": 1 - kept_fraction(transition_counts(trace, top1=False), x),
        "profiling_tokens": trace.num_tokens, "top_k": trace.top_k,
        "max_load_imbalance": float(max(np.bincount(x[l], weights=load[l], minlength=gpus).max()
                                        / max(load[l].sum() / gpus, 1e-12) for l in range(L))),
    })
    if trace.moe_layers is not None:
        info["moe_layers"] = list(map(int, trace.moe_layers))
    if nodes > 1:
        info.update(node_cross_fractions(C1, x, gpus, nodes))
    p = Placement(x, gpus, nodes, method, 1 - kept_fraction(C, x), solve_s, None, info)
    if replicas:
        p = add_replicas(p, load, replicas)
    return p


def stability(trace_a, trace_b, *, gpus: int | None = None, top1: bool = True, smoothing: float = 0.0) -> dict:
    """How alike the affinities estimated from two traces are.

    ``tv``: mean total-variation distance between affinity rows of a and b, weighted by b's load of each row
    (0 = identical, 1 = disjoint). With ``gpus``: the cross-GPU fraction on b of a placement fitted on a
    (``cross_a_on_b``) vs fitted on b itself (``cross_b_on_b``) and contiguous.

    Example::

        stability(trace.subset(slice(0, 1000)), trace.subset(slice(1000, None)), gpus=4)
    """
    Ca, Cb = transition_counts(trace_a, top1), transition_counts(trace_b, top1)
    Aa, Ab = affinity(Ca, smoothing), affinity(Cb, smoothing)
    rows = Cb.sum(axis=-1)
    tv = 0.5 * np.abs(Aa - Ab).sum(axis=-1)
    out = {"tv": float((tv * rows).sum() / max(rows.sum(), 1e-12)),
           "tv_per_layer": [float((tv[l] * rows[l]).sum() / max(rows[l].sum(), 1e-12)) for l in range(len(tv))]}
    if gpus is not None:
        pa = place(trace_a, gpus, smoothing=smoothing, top1=top1)
        pb = place(trace_b, gpus, smoothing=smoothing, top1=top1)
        out["cross_a_on_b"] = cross_fraction(pa.assignment, trace_b, top1=top1)
        out["cross_b_on_b"] = cross_fraction(pb.assignment, trace_b, top1=top1)
        out["cross_contiguous"] = cross_fraction(
            contiguous_placement(trace_b.num_layers, trace_b.num_experts, gpus), trace_b, top1=top1)
    return out
