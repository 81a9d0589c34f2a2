"""Alpha-beta cost model of expert-parallel decoding: two-Alltoall EP against one-Alltoall context-coherent EP.

A collective that moves at most ``S`` bytes per rank takes ``T = alpha + S / B`` (alpha: fixed latency, B: bytes
per second one rank can push). An all-gather of a ``total``-byte result costs ``alpha + (N-1)/N * total / B``.
On several nodes an Alltoall is split into an intra-node (NVLink) and an inter-node (RDMA) term by the share of
bytes that cross nodes, and the two are added (sequential phases, as DeepSpeed's hierarchical Alltoall).

Per MoE layer, with ``f`` = cross fraction (tokens whose destination rank differs from the rank they are on) and
``s`` = split fraction (mean number of further ranks per token that host one of its top-k experts):
* ``two_alltoall``: dispatch ``(f + s) d`` elements per token, combine the same back home, plus a tiny
  Alltoall of split counts.
* ``context_coherent``: one Alltoall of ``f d`` (the token moves), a partial exchange ``s d`` out and ``s d``
  back (two more Alltoalls when ``s > 0``), split counts; and K/V coherence: every new token's K and V at every
  layer reach the N-1 other ranks (``(N-1) * 2 * kv_heads * head_dim`` elements per token per layer), as one
  all-gather per layer in prefill and one per step in decode; plus an all-gather of next-token ids per step.

Example::

    from tokopt.moe.cost_model import MoEShape, Topology, step_time
    shape = MoEShape.preset("mixtral-8x7b")
    topo = Topology.preset("nvlink8")
    est = step_time(shape, topo, "context_coherent", tokens=32, cross_fraction=0.715, split_fraction=1.0)
    print(est.total_s, est.kv_sync_s)
"""

from __future__ import annotations

import json
import math
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from tokopt.errors import TokoptError
from tokopt.machine import cpu_name
from tokopt.paths import cache_dir

STRATEGIES = ("two_alltoall", "context_coherent")
PHASES = ("decode", "prefill")
MOE_MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
DEFAULT_SIZES = (4096, 65536, 524288, 2097152, 8388608)  # all_to_all_single buffer bytes per rank
COUNTS_BYTES = 8  # one int64 split count per destination rank
ID_BYTES = 8  # one int64 token id


# ---------------------------------------------------------------------------------------------------------------
# alpha-beta


@dataclass(frozen=True)
class AlphaBeta:
    """One link class: ``time(S) = alpha_s + S / bytes_per_s`` for a collective moving ``S`` bytes per rank.

    Example::

        AlphaBeta(5e-6, 450e9).time(1 << 20)     # 5 us + 1 MiB / 450 GB/s = 7.3 us
    """

    alpha_s: float
    bytes_per_s: float

    def time(self, bytes_max_per_rank: float) -> float:
        """Seconds of one collective whose busiest rank sends (or receives) ``bytes_max_per_rank`` bytes."""
        beta = 0.0 if math.isinf(self.bytes_per_s) else float(bytes_max_per_rank) / self.bytes_per_s
        return self.alpha_s + beta

    def to_dict(self) -> dict:
        return {"alpha_s": self.alpha_s, "bytes_per_s": self.bytes_per_s}


def fit_alpha_beta(sizes_bytes, seconds, *, relative: bool = True) -> AlphaBeta:
    """Least-squares ``seconds = alpha + sizes / B`` with ``alpha >= 0`` and ``1/B >= 0``.

    ``relative=True`` weights each point by ``1/seconds`` (relative error), so small messages still pin alpha
    down next to megabyte ones; ``False`` is plain least squares.

    Example::

        fit_alpha_beta([1e3, 1e6], [1e-5 + 1e3 / 1e9, 1e-5 + 1e6 / 1e9])    # AlphaBeta(1e-05, 1e9)
    """
    x = np.asarray(sizes_bytes, dtype=np.float64)
    y = np.asarray(seconds, dtype=np.float64)
    if x.shape != y.shape or x.size < 2:
        raise TokoptError(f"fit_alpha_beta needs >= 2 (size, seconds) pairs of equal length, got {x.size}, {y.size}")
    w = 1.0 / np.maximum(y, 1e-12) if relative else np.ones_like(y)
    a = np.stack([np.ones_like(x), x], axis=1) * w[:, None]
    alpha, slope = np.linalg.lstsq(a, y * w, rcond=None)[0]
    if slope < 0:  # constrained optimum on the slope = 0 face: weighted mean
        alpha, slope = float(np.sum(w * w * y) / np.sum(w * w)), 0.0
    elif alpha < 0:  # constrained optimum on the alpha = 0 face: through the origin
        alpha, slope = 0.0, max(0.0, float(np.sum(w * w * x * y) / np.sum(w * w * x * x)))
    return AlphaBeta(float(alpha), math.inf if slope <= 0 else 1.0 / float(slope))


# ---------------------------------------------------------------------------------------------------------------
# measuring this machine (gloo)


def _sweep_rank(rank: int, world: int, sizes, repeats: int, kinds) -> dict:
    """One rank's timings: {kind: {size: [seconds per repeat]}} for all_to_all_single and all_gather."""
    import torch
    import torch.distributed as dist

    out = {}
    for kind in kinds:
        out[kind] = {}
        for size in sizes:
            n = max(world, size // 4 // world * world)  # fp32 elements, divisible by the world size
            if kind == "all_to_all":
                send, recv = torch.ones(n), torch.empty(n)
                op = lambda: dist.all_to_all_single(recv, send)  # noqa: E731
            else:  # all_gather: each rank contributes n / world elements
                part = torch.ones(n // world)
                recv = torch.empty(n)
                gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
                op = lambda: gather(recv, part)  # noqa: E731
            for _ in range(3):  # warm-up: first calls set up gloo buffers
                op()
            inner = max(1, min(16, (1 << 20) // size))  # back-to-back calls amortize wake-up noise
            times = []
            for _ in range(repeats):
                dist.barrier()
                t0 = time.perf_counter()
                for _ in range(inner):
                    op()
                times.append((time.perf_counter() - t0) / inner)
            out[kind][size] = times
    return out


def _median_of_max(per_rank: list[dict], kind: str, size: int) -> float:
    """The collective ends when its slowest rank does: max over ranks per repeat, then the median."""
    reps = zip(*(r[kind][size] for r in per_rank))
    return statistics.median(max(t) for t in reps)


def measure_alltoall(world_size: int = 4, sizes=DEFAULT_SIZES, repeats: int = 5, *, all_gather: bool = True,
                     timeout_s: float = 120.0, progress: bool = True) -> dict:
    """Time gloo ``all_to_all_single`` (and ``all_gather``) over ``world_size`` local ranks; fit alpha-beta.

    ``sizes`` are buffer bytes per rank (fp32); an Alltoall sends ``(N-1)/N`` of its buffer to other ranks and
    the fit uses those bytes; an all-gather's fit uses ``(N-1)/N`` of the gathered size. Returns a dict with the
    points (median over repeats of the max over ranks) and ``fit`` / ``fit_all_gather`` as AlphaBeta dicts.

    Example::

        r = measure_alltoall(2, sizes=(4096, 1 << 20), repeats=3)
        AlphaBeta(**r["fit"]).time(1 << 20)
    """

    kinds = ("all_to_all", "all_gather") if all_gather else ("all_to_all",)
    sizes = tuple(int(s) for s in sizes)
    if progress:
        print(f"tokopt: gloo sweep over {world_size} ranks, {len(sizes)} sizes x {repeats} repeats "
              f"({', '.join(_fmt_bytes(s) for s in sizes)}) ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    from tokopt.runtime.distributed.launch import run_ranks  # torch: only the measured sweep needs it

    per_rank = run_ranks(_sweep_rank, world_size, sizes, repeats, kinds, timeout_s=timeout_s, threads_per_rank=1)
    result = {"world_size": world_size, "backend": "gloo", "repeats": repeats, "machine": machine_name()}
    share = (world_size - 1) / world_size
    for kind in kinds:
        pts = [{"buffer_bytes": s, "bytes_per_rank": s * share, "seconds": _median_of_max(per_rank, kind, s)}
               for s in sizes]
        fit = fit_alpha_beta([p["bytes_per_rank"] for p in pts], [p["seconds"] for p in pts])
        key = "" if kind == "all_to_all" else "_all_gather"
        result["points" + key] = pts
        result["fit" + key] = fit.to_dict()
        if progress:
            print(f"tokopt:   {kind}: alpha {fit.alpha_s * 1e6:.1f} us, {fit.bytes_per_s / 1e9:.2f} GB/s",
                  file=sys.stderr, flush=True)
    result["seconds"] = time.perf_counter() - start
    return result


def machine_name() -> str:
    """CPU model and core count (what gloo over loopback depends on)."""
    import os

    return f"{cpu_name()} x{os.cpu_count()}"


def _cache_path(world_size: int) -> Path:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", machine_name()).strip("-").lower()
    return cache_dir() / "cost_model" / f"gloo_{slug}_w{world_size}.json"


def this_machine_fit(world_size: int = 4, *, refresh: bool = False, **sweep) -> dict:
    """The cached gloo sweep for this CPU and world size, measured (and cached) if missing or ``refresh``.

    Example::

        AlphaBeta(**this_machine_fit(4)["fit"])
    """
    path = _cache_path(world_size)
    if path.exists() and not refresh:
        return json.loads(path.read_text())
    result = measure_alltoall(world_size, **sweep)
    result["compute"] = list(measure_compute())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    return result


def measure_compute(seconds: float = 0.3) -> tuple[float, float]:
    """(FLOP/s of an fp32 512x512 matmul, bytes/s of a 64 MiB copy) on this CPU: a quick roofline.

    Example::

        flops, mem_bw = measure_compute()
    """
    import torch

    a, b = torch.randn(512, 512), torch.randn(512, 512)
    src, dst = torch.empty(16 << 20), torch.empty(16 << 20)

    def rate(fn, work):
        fn()
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / 2:
            fn()
            n += 1
        return work * n / (time.perf_counter() - t0)

    return rate(lambda: a @ b, 2 * 512 ** 3), rate(lambda: dst.copy_(src), 2 * src.numel() * 4)


# ---------------------------------------------------------------------------------------------------------------
# topologies


@dataclass(frozen=True)
class Topology:
    """GPUs (ranks), how they group into nodes, the two link classes and each device's roofline.

    ``inter`` is unused on one node. ``flops`` / ``mem_bytes_per_s`` are per device (peak; compute time is the
    same for both strategies, so they change the predicted speedup, never the winner).

    Example::

        Topology.preset("2node-rdma").gpus_per_node     # 8
        Topology.preset("nvlink8", gpus=4)              # 4 GPUs of the same kind
    """

    name: str
    gpus: int
    nodes: int
    intra: AlphaBeta
    inter: AlphaBeta | None
    flops: float
    mem_bytes_per_s: float
    notes: str = ""

    def __post_init__(self):
        if self.gpus < 1 or self.nodes < 1 or self.gpus % self.nodes:
            raise TokoptError(f"topology {self.name}: {self.gpus} GPUs do not split evenly over {self.nodes} nodes")
        if self.nodes > 1 and self.inter is None:
            raise TokoptError(f"topology {self.name}: {self.nodes} nodes need an inter-node AlphaBeta")

    @property
    def gpus_per_node(self) -> int:
        return self.gpus // self.nodes

    def uniform_inter_fraction(self) -> float:
        """Share of one rank's off-rank bytes that leave its node when destinations are uniform."""
        if self.nodes == 1 or self.gpus == 1:
            return 0.0
        return (self.gpus - self.gpus_per_node) / (self.gpus - 1)

    def alltoall_time(self, bytes_per_rank: float, inter_fraction: float | None = None) -> float:
        """Hierarchical Alltoall: intra-node term + inter-node term, split by the share of bytes crossing nodes."""
        if self.gpus == 1:
            return 0.0
        q = self.uniform_inter_fraction() if inter_fraction is None else inter_fraction
        if self.nodes == 1 or q <= 0:
            return self.intra.time(bytes_per_rank)
        t = self.inter.time(bytes_per_rank * q)
        return t + (self.intra.time(bytes_per_rank * (1 - q)) if q < 1 else 0.0)

    def allgather_time(self, total_bytes: float) -> float:
        """All-gather of a ``total_bytes`` result: each rank receives ``(N-1)/N`` of it (ring/direct)."""
        if self.gpus == 1:
            return 0.0
        return self.alltoall_time(total_bytes * (self.gpus - 1) / self.gpus)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["gpus_per_node"] = self.gpus_per_node
        return d

    @classmethod
    def preset(cls, name: str, *, gpus: int | None = None, nodes: int | None = None, intra_gbps: float | None = None,
               inter_gbps: float | None = None, **kw) -> "Topology":
        """A named topology (``this-machine``, ``nvlink8``, ``2node-rdma``), optionally resized or re-linked.

        ``intra_gbps`` / ``inter_gbps`` are GB/s (bytes) per GPU per direction. ``this-machine`` takes
        ``world_size``-style ``gpus`` (default 4 ranks) and ``measure=False`` to refuse a sweep.
        """
        if name not in PRESETS:
            raise TokoptError(f"unknown topology {name!r}; known: {', '.join(PRESETS)}")
        topo = PRESETS[name](gpus=gpus, **kw) if name == "this-machine" else PRESETS[name]()
        if nodes is not None or (gpus is not None and name != "this-machine"):
            n_nodes = nodes if nodes is not None else topo.nodes
            n_gpus = gpus if gpus is not None else topo.gpus_per_node * n_nodes
            inter = topo.inter or (PRESETS["2node-rdma"]().inter if n_nodes > 1 else None)
            topo = replace(topo, gpus=n_gpus, nodes=n_nodes, inter=inter)
        if intra_gbps is not None:
            topo = replace(topo, intra=AlphaBeta(topo.intra.alpha_s, intra_gbps * 1e9))
        if inter_gbps is not None:
            base = topo.inter or PRESETS["2node-rdma"]().inter
            topo = replace(topo, inter=AlphaBeta(base.alpha_s, inter_gbps * 1e9))
        return topo


# H100 SXM (NVIDIA datasheet): BF16 dense 989 TFLOP/s, HBM3 3.35 TB/s, NVLink 4 900 GB/s total = 450 GB/s per
# direction per GPU. NCCL small-message Alltoall latency on one NVLink node is a few us; 5 us assumed.
H100_FLOPS = 989e12
H100_HBM = 3.35e12
NVLINK_H100 = AlphaBeta(5e-6, 450e9)
# One ConnectX-7 NDR 400 Gb/s NIC per GPU (DGX H100 layout) = 50 GB/s per GPU per direction; RDMA Alltoall
# latency across nodes 5-10 us in NCCL tests: 8 us assumed.
IB_NDR400 = AlphaBeta(8e-6, 50e9)


def nvlink8() -> Topology:
    """8 x H100 SXM on one node, NVLink 4 (450 GB/s per direction, alpha 5 us; datasheet peaks)."""
    return Topology("nvlink8", 8, 1, NVLINK_H100, None, H100_FLOPS, H100_HBM,
                    "8x H100 SXM, NVLink 4 450 GB/s/direction, alpha 5 us (assumed); 989 TFLOP/s, 3.35 TB/s")


def two_node_rdma() -> Topology:
    """2 nodes x 8 H100: NVLink inside (as nvlink8), 400 Gb/s InfiniBand per GPU = 50 GB/s between nodes, 8 us."""
    return Topology("2node-rdma", 16, 2, NVLINK_H100, IB_NDR400, H100_FLOPS, H100_HBM,
                    "2x8 H100; NVLink 450 GB/s inside, NDR 400 Gb/s (50 GB/s) per GPU between nodes, alpha 8 us")


def this_machine(gpus: int | None = None, *, measure: bool = True, flops: float | None = None,
                 mem_bytes_per_s: float | None = None) -> Topology:
    """This CPU as ``gpus`` gloo ranks over loopback (default 4): alpha-beta from the cached sweep (measured
    on first use unless ``measure=False``), roofline from a quick matmul / copy unless given."""
    world = gpus or 4
    path = _cache_path(world)
    if not path.exists() and not measure:
        raise TokoptError(f"no gloo sweep cached for {world} ranks at {path}; run `tokopt plan --topology "
                          "this-machine` once (it measures, ~20 s) or give another topology")
    fit = this_machine_fit(world)
    if flops is None or mem_bytes_per_s is None:
        f, m = fit.get("compute") or measure_compute()
        flops, mem_bytes_per_s = flops or f, mem_bytes_per_s or m
    return Topology("this-machine", world, 1, AlphaBeta(**fit["fit"]), None, flops, mem_bytes_per_s,
                    f"{fit['machine']}, gloo over loopback, {world} ranks on shared cores")


PRESETS = {"this-machine": this_machine, "nvlink8": nvlink8, "2node-rdma": two_node_rdma}


# ---------------------------------------------------------------------------------------------------------------
# model shapes


@dataclass(frozen=True)
class MoEShape:
    """What the cost model needs of an MoE decoder (sizes in elements; ``dtype_bytes`` per element).

    ``moe_layers`` lists the decoder layers with a sparse MoE block (the others run a dense FFN of
    ``dense_intermediate``); ``shared_intermediate`` is a shared expert every token runs locally (Qwen2-MoE).

    Example::

        MoEShape.preset("olmoe-1b-7b").kv_bytes_per_token_layer     # 2 * 16 * 128 * 2 = 8192
    """

    name: str
    layers: int
    moe_layers: tuple[int, ...]
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    experts: int
    top_k: int
    expert_intermediate: int
    dtype_bytes: int = 2
    vocab: int = 32000
    dense_intermediate: int = 0
    shared_intermediate: int = 0

    @property
    def kv_bytes_per_token_layer(self) -> int:
        """Bytes of one token's K and V at one layer."""
        return 2 * self.kv_heads * self.head_dim * self.dtype_bytes

    @property
    def hidden_bytes(self) -> int:
        return self.hidden * self.dtype_bytes

    def to_dict(self) -> dict:
        d = asdict(self)
        d["moe_layers"] = list(self.moe_layers)
        return d

    @classmethod
    def from_config(cls, config, *, name: str | None = None) -> "MoEShape":
        """From a HF config (object or dict) of Mixtral, Qwen2-MoE, Qwen3-MoE or OLMoE.

        Example::

            from transformers import MixtralConfig
            MoEShape.from_config(MixtralConfig())      # 32 layers, 8 experts top-2
        """
        c = config if isinstance(config, dict) else config.to_dict()
        mtype = c.get("model_type", "")
        if mtype not in MOE_MODEL_TYPES:
            raise TokoptError(f"model type {mtype or '(none)'!r} is not a supported MoE model; the cost model "
                              f"takes {', '.join(MOE_MODEL_TYPES)} configs (or a built-in shape: "
                              f"{', '.join(BUILTIN_SHAPES)})")
        layers = int(c["num_hidden_layers"])
        experts = int(c.get("num_local_experts") or c.get("num_experts"))
        step = int(c.get("decoder_sparse_step") or 1)
        dense_only = set(c.get("mlp_only_layers") or [])
        moe = tuple(i for i in range(layers) if i not in dense_only and (i + 1) % step == 0)
        heads = int(c["num_attention_heads"])
        head_dim = int(c.get("head_dim") or c["hidden_size"] // heads)
        dtype = str(c.get("dtype") or c.get("torch_dtype") or "bfloat16")
        ffn = int(c.get("moe_intermediate_size") or c["intermediate_size"])
        return cls(name=name or c.get("_name_or_path") or mtype, layers=layers, moe_layers=moe,
                   hidden=int(c["hidden_size"]), heads=heads, kv_heads=int(c.get("num_key_value_heads") or heads),
                   head_dim=head_dim, experts=experts, top_k=int(c["num_experts_per_tok"]),
                   expert_intermediate=ffn, dtype_bytes=4 if "float32" in dtype else 2,
                   vocab=int(c.get("vocab_size") or 32000), dense_intermediate=int(c.get("intermediate_size") or 0),
                   shared_intermediate=int(c.get("shared_expert_intermediate_size") or 0))

    @classmethod
    def preset(cls, name: str) -> "MoEShape":
        """A built-in shape of a public checkpoint (see BUILTIN_SHAPES), bf16."""
        if name not in BUILTIN_SHAPES:
            raise TokoptError(f"unknown built-in MoE shape {name!r}; known: {', '.join(BUILTIN_SHAPES)}")
        return BUILTIN_SHAPES[name]


def _all_moe(name, layers, hidden, heads, kv_heads, experts, top_k, ffn, vocab, shared=0) -> MoEShape:
    return MoEShape(name, layers, tuple(range(layers)), hidden, heads, kv_heads, hidden // heads, experts, top_k,
                    ffn, 2, vocab, 0, shared)


# From the checkpoints' config.json files (bf16):
# Mixtral-8x7B-v0.1: 32 layers, d 4096, 32 q heads / 8 kv heads x 128, 8 experts top-2, FFN 14336, vocab 32000.
# OLMoE-1B-7B-0924: 16 layers, d 2048, 16 heads (MHA, kv 16) x 128, 64 experts top-8, FFN 1024, vocab 50304.
# Qwen1.5-MoE-A2.7B: 24 layers, d 2048, 16 heads (MHA) x 128, 60 experts top-4, FFN 1408, shared expert 5632,
#   vocab 151936.
BUILTIN_SHAPES = {
    "mixtral-8x7b": _all_moe("mixtral-8x7b", 32, 4096, 32, 8, 8, 2, 14336, 32000),
    "olmoe-1b-7b": _all_moe("olmoe-1b-7b", 16, 2048, 16, 16, 64, 8, 1024, 50304),
    "qwen1.5-moe-a2.7b": _all_moe("qwen1.5-moe-a2.7b", 24, 2048, 16, 16, 60, 4, 1408, 151936, shared=5632),
}


# ---------------------------------------------------------------------------------------------------------------
# step time


@dataclass
class StepEstimate:
    """Predicted seconds of one forward step (all layers) and the bytes the busiest rank sends per step.

    ``combine_s`` is the combine Alltoall for ``two_alltoall`` and the partial exchange (out + back) for
    ``context_coherent``; ``counts_s`` the split-count Alltoalls; ``gather_s`` the end-of-step id/logit
    all-gathers. ``collectives`` counts the collectives per step; ``kv_memory_bytes`` is the KV cache per rank.
    """

    strategy: str
    phase: str
    tokens: int
    compute_s: float
    dispatch_s: float
    combine_s: float
    counts_s: float
    kv_sync_s: float
    gather_s: float
    dispatch_bytes: float
    combine_bytes: float
    kv_sync_bytes: float
    gather_bytes: float
    collectives: int
    kv_memory_bytes: float
    notes: list[str] = field(default_factory=list)

    @property
    def comm_s(self) -> float:
        return self.dispatch_s + self.combine_s + self.counts_s + self.kv_sync_s + self.gather_s

    @property
    def total_s(self) -> float:
        return self.compute_s + self.comm_s

    @property
    def comm_bytes(self) -> float:
        return self.dispatch_bytes + self.combine_bytes + self.kv_sync_bytes + self.gather_bytes

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(comm_s=self.comm_s, total_s=self.total_s, comm_bytes=self.comm_bytes)
        return d


def _roofline(flops: float, nbytes: float, topo: Topology) -> float:
    return max(flops / topo.flops, nbytes / topo.mem_bytes_per_s)


def compute_time(shape: MoEShape, topo: Topology, *, tokens: int, sequences: int, context: int,
                 phase: str = "decode") -> float:
    """Roofline seconds of one step on the busiest rank, layer by layer: attention (weights replicated, KV of
    its sequences), local experts (E/N of them, tokens*k/N arrivals), dense or shared FFN, LM head.

    Example::

        compute_time(MoEShape.preset("mixtral-8x7b"), Topology.preset("nvlink8"), tokens=32, sequences=32,
                     context=1024)
    """
    n, b, d = topo.gpus, shape.dtype_bytes, shape.hidden
    t = math.ceil(tokens / n)
    seqs = math.ceil(sequences / n)
    attn_params = d * shape.heads * shape.head_dim * 2 + 2 * d * shape.kv_heads * shape.head_dim
    span = context if phase == "decode" else context / 2  # causal prefill attends half the prompt on average
    attn_flops = 2 * attn_params * t + 4 * shape.heads * shape.head_dim * span * t
    attn_bytes = attn_params * b + seqs * context * shape.kv_bytes_per_token_layer
    total = 0.0
    per_rank_experts = max(1, shape.experts // n)
    arrivals = t * shape.top_k  # balanced routing: each rank receives its share of all token-expert pairs
    active = per_rank_experts * (1 - (1 - shape.top_k / shape.experts) ** tokens)  # distinct experts hit
    expert_params = 3 * d * shape.expert_intermediate
    for layer in range(shape.layers):
        ffn_flops = ffn_bytes = 0.0
        if layer in shape.moe_layers:
            ffn_flops += 2 * expert_params * arrivals + 2 * d * shape.experts * t
            ffn_bytes += expert_params * b * active
            if shape.shared_intermediate:
                ffn_flops += 2 * 3 * d * shape.shared_intermediate * t
                ffn_bytes += 3 * d * shape.shared_intermediate * b
        else:
            ffn_flops += 2 * 3 * d * shape.dense_intermediate * t
            ffn_bytes += 3 * d * shape.dense_intermediate * b
        total += _roofline(attn_flops + ffn_flops, attn_bytes + ffn_bytes, topo)
    head_rows = seqs if phase == "prefill" else t  # prefill needs logits of the last position only
    return total + _roofline(2 * shape.vocab * d * head_rows, shape.vocab * d * b, topo)


def step_time(shape: MoEShape, topology: Topology, strategy: str, *, tokens: int, cross_fraction: float,
              split_fraction: float = 0.0, phase: str = "decode", compute_s: float | None = None,
              context: int = 1024, sequences: int | None = None, inter_node_fraction: float | None = None,
              imbalance: float = 1.0, gather_logits: bool = False, partial_collectives: int = 1) -> StepEstimate:
    """Predicted time of one step of ``tokens`` tokens (all ranks together) under ``strategy``.

    ``partial_collectives``: 1 (tokopt's runtime: copies for secondary experts ride the moving Alltoall, partial
    sums come back in one more) or 2 (a separate exchange out and back).

    ``cross_fraction`` f: fraction of tokens whose destination rank at a MoE layer differs from the rank they
    are on (``two_alltoall``: their home; ``context_coherent``: where the previous layer left them; the
    destination is the current rank if it hosts any of the token's experts, else the top expert's rank).
    ``split_fraction`` s: mean number of further ranks per token hosting its other experts (0 for top-1).
    ``context``: KV length per sequence (decode) or prompt length (prefill; ``sequences`` then defaults to
    ``tokens // context``). ``inter_node_fraction``: share of moved bytes that cross nodes (default: uniform
    destinations). ``imbalance``: max/mean bytes over ranks. ``compute_s``: measured compute per step, else
    the roofline of ``compute_time``.

    Example::

        est = step_time(MoEShape.preset("olmoe-1b-7b"), Topology.preset("nvlink8"), "two_alltoall",
                        tokens=32, cross_fraction=0.34, split_fraction=4.25)
        est.total_s, est.dispatch_bytes
    """
    if strategy not in STRATEGIES:
        raise TokoptError(f"unknown strategy {strategy!r}; known: {', '.join(STRATEGIES)}")
    if phase not in PHASES:
        raise TokoptError(f"unknown phase {phase!r}; known: {', '.join(PHASES)}")
    if not (0.0 <= cross_fraction <= 1.0) or split_fraction < 0:
        raise TokoptError(f"cross_fraction must lie in [0, 1] and split_fraction be >= 0, got {cross_fraction}, "
                          f"{split_fraction}")
    n = topology.gpus
    if n > shape.experts:
        raise TokoptError(f"expert parallelism over {n} ranks needs >= {n} experts; {shape.name} has "
                          f"{shape.experts}: use fewer GPUs (e.g. --gpus {shape.experts})")
    if sequences is None:
        sequences = tokens if phase == "decode" else max(1, tokens // max(1, context))
    t = math.ceil(tokens / n)  # tokens on the busiest rank
    hb = shape.hidden_bytes * imbalance
    a2a = lambda nbytes: topology.alltoall_time(nbytes, inter_node_fraction)  # noqa: E731
    n_moe = len(shape.moe_layers)
    if compute_s is None:
        compute_s = compute_time(shape, topology, tokens=tokens, sequences=sequences, context=context, phase=phase)
    counts_s = n_moe * a2a(COUNTS_BYTES * n) if n > 1 else 0.0
    notes = []
    kv_total = sequences * context * shape.layers * shape.kv_bytes_per_token_layer
    if strategy == "two_alltoall":
        per_layer = t * (cross_fraction + split_fraction) * hb
        dispatch_b = combine_b = n_moe * per_layer
        dispatch_s = combine_s = n_moe * a2a(per_layer) if n > 1 else 0.0
        kv_s = kv_b = gather_s = gather_b = 0.0
        collectives = 3 * n_moe if n > 1 else 0
        kv_mem = kv_total / n
    else:
        move = t * cross_fraction * hb
        part = t * split_fraction * hb
        dispatch_b, combine_b = n_moe * move, n_moe * 2 * part
        dispatch_s = n_moe * a2a(move) if n > 1 else 0.0
        partial = split_fraction > 0 and n > 1
        combine_s = 0.0
        if partial and partial_collectives >= 2:
            combine_s = n_moe * 2 * a2a(part)
        elif partial:  # copies share the moving Alltoall; partial sums come back in one more
            dispatch_s = n_moe * a2a(move + part)
            combine_s = n_moe * a2a(part)
        if partial:
            notes.append(f"top-{shape.top_k}: {split_fraction:.2f} further expert ranks per token need a "
                         "partial exchange (x out, partial sum back)")
        kv_token = t * shape.kv_bytes_per_token_layer * n  # all-gather result per layer (padded to the max)
        if phase == "prefill":
            kv_s = shape.layers * topology.allgather_time(kv_token)
            kv_collectives = shape.layers
        else:
            kv_s = topology.allgather_time(kv_token * shape.layers)
            kv_collectives = 1
        kv_b = shape.layers * kv_token * (n - 1) / n
        gather_row = ID_BYTES + (shape.vocab * 4 if gather_logits else 0)
        gather_b = t * n * gather_row * (n - 1) / n
        gather_s = topology.allgather_time(t * n * gather_row)
        collectives = (n_moe * (2 + partial * min(2, partial_collectives)) + kv_collectives + 1) if n > 1 else 0
        if n == 1:
            kv_s = gather_s = kv_b = gather_b = 0.0
        kv_mem = kv_total
    return StepEstimate(strategy, phase, tokens, compute_s, dispatch_s, combine_s, counts_s, kv_s, gather_s,
                        dispatch_b, combine_b, kv_b, gather_b, collectives, kv_mem, notes)


def uniform_fractions(shape: MoEShape, gpus: int) -> tuple[float, float]:
    """(cross, split) fractions for routing independent of where the token is (uniform top-k over experts laid
    out contiguously, E/N per rank): the two_alltoall baseline, or context_coherent without affinity.

    Example::

        uniform_fractions(MoEShape.preset("mixtral-8x7b"), 4)   # (15/28, 6/7) = (0.536, 0.857)
    """
    e, k, n = shape.experts, shape.top_k, gpus
    if n <= 1:
        return 0.0, 0.0
    per = e / n
    # P(a given rank hosts none of the token's k experts) = C(E - E/N, k) / C(E, k)
    miss = math.comb(e - int(per), k) / math.comb(e, k) if per == int(per) else (1 - per / e) ** k
    distinct = n * (1 - miss)  # expected distinct ranks among the k experts
    cross = miss  # the current rank hosts none of them: the token must move
    copies = distinct - (1 - miss)  # ranks other than the current one that host an expert
    return cross, max(0.0, copies - cross)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def fmt_bytes(n: float) -> str:
    """Human bytes: ``fmt_bytes(3.1e6) == '3.0 MiB'``."""
    return _fmt_bytes(n)
