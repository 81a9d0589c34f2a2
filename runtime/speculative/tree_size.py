"""Hardware-aware tree size: the tree that maximizes tokens per second on the machine at hand.

A verify step of n nodes emits E(n) tokens on average (``acceptance.expected_tokens``: from acceptance
statistics) and costs t(n) (measured here: a forward of n new tokens against a cache of ``past`` slots,
median of interleaved repeats). The best size maximizes E(n) / t(n + 1) (the root is the + 1). On a GPU t is
nearly flat for dozens of nodes, so trees grow big; on a 2-core CPU a forward of 16 tokens costs about twice
one token's, so the best tree is small.

Profiles are cached per machine, model and engine (``~/.cache/tokopt/latency/``, or ``$TOKOPT_CACHE``).

Example::

    profile = latency_profile(engine, model_key="smollm2-135m", max_nodes=32)
    size = best_size(expected_tokens(stats.rates(), 32), profile)
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tokopt.machine import machine_id
from tokopt.paths import cache_path
from tokopt.progress import progress_step
from tokopt.models.kv_cache import KVCache
from tokopt.models.masks import causal_structure, step_mask


@dataclass
class LatencyProfile:
    """Median verify-forward seconds per number of new tokens (1 = plain decode)."""

    seconds: dict  # n -> s
    past: int
    machine: str
    engine: str

    def __call__(self, n: int) -> float:
        if n in self.seconds:
            return self.seconds[n]
        sizes = sorted(self.seconds)
        if n > sizes[-1]:  # beyond the measured range: linear in n from the last two points
            a, b = sizes[-2], sizes[-1]
            return self.seconds[b] + (n - b) * (self.seconds[b] - self.seconds[a]) / (b - a)
        lo = max(s for s in sizes if s < n)
        hi = min(s for s in sizes if s > n)
        w = (n - lo) / (hi - lo)
        return (1 - w) * self.seconds[lo] + w * self.seconds[hi]

    def to_dict(self) -> dict:
        return {"seconds": {str(k): v for k, v in self.seconds.items()}, "past": self.past,
                "machine": self.machine, "engine": self.engine}

    @classmethod
    def from_dict(cls, d) -> "LatencyProfile":
        return cls({int(k): float(v) for k, v in d["seconds"].items()}, d["past"], d["machine"], d["engine"])




def measure_latency(engine, sizes, past: int = 256, repeats: int = 5, warmup: int = 1) -> dict:
    """Median seconds of one forward of n new tokens (tree-shaped inputs) for each n in ``sizes``,
    the sizes interleaved so machine noise hits them alike."""
    spec = engine.spec
    gen = torch.Generator().manual_seed(0)
    cache = KVCache([torch.randn(1, spec.num_kv_heads, past, spec.head_dim, generator=gen).to(spec.torch_dtype)
                     for _ in range(2 * spec.num_layers)], torch.ones(1, past, dtype=torch.bool))
    cache.valid[:, 0] = False
    inputs = {}
    for n in sizes:
        ids = torch.randint(0, spec.vocab_size, (1, n), generator=gen)
        pos = torch.arange(past, past + n)[None]
        mask = step_mask(cache.valid, causal_structure(n, 1), dtype=spec.torch_dtype)
        inputs[n] = (ids, pos, mask, torch.arange(n))
    times = {n: [] for n in sizes}
    for r in range(warmup + repeats):
        for n in sizes:
            ids, pos, mask, rows = inputs[n]
            start = time.perf_counter()
            engine(ids, pos, mask, rows, cache.tensors)
            if r >= warmup:
                times[n].append(time.perf_counter() - start)
    return {n: statistics.median(v) for n, v in times.items()}



def latency_profile(engine, model_key: str, max_nodes: int = 32, past: int = 256, repeats: int = 5,
                    refresh: bool = False) -> LatencyProfile:
    """The cached profile for this machine, model and engine, measured (with progress) when missing."""
    machine = machine_id()
    key = hashlib.sha1(f"{machine}|{model_key}|{engine.name}|{max_nodes}|{past}".encode()).hexdigest()[:16]
    path = cache_path("latency", f"{key}.json")
    if path.is_file() and not refresh:
        return LatencyProfile.from_dict(json.loads(path.read_text()))
    sizes = sorted(set(list(range(1, min(max_nodes, 16) + 1)) + list(range(16, max_nodes + 1, 4)) + [max_nodes]))
    with progress_step(f"measuring verify latency for {len(sizes)} tree sizes on this machine ({engine.name})"):
        seconds = measure_latency(engine, sizes, past=past, repeats=repeats)
    profile = LatencyProfile(seconds, past, machine, engine.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(profile.to_dict(), indent=1))
    return profile


def best_size(curve, profile: LatencyProfile, extra_nodes: int = 0, min_size: int = 1) -> int:
    """The number of draft nodes n (>= ``min_size``) maximizing ``curve[n] / profile(n + 1 + extra_nodes)``
    (``extra_nodes``: nodes the tree carries besides the n sized here, e.g. merged lookup guesses)."""
    rates = [(curve[n] / profile(n + 1 + extra_nodes), n) for n in range(min_size, len(curve))]
    return max(rates)[1]
