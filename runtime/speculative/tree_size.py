"""Hardware-aware tree size: the tree that maximizes tokens per second on the machine at hand.

A verify step of n nodes emits E(n) tokens on average (``acceptance.expected_tokens``: from acceptance
statistics) and costs t(n) (measured here: a forward of n new tokens against a cache of ``past`` slots,
median of interleaved repeats). The best size maximizes E(n) / t(n + 1) (the root is the + 1). On a GPU t is
nearly flat for dozens of nodes, so trees grow big; on a 2-core CPU a forward of 16 tokens costs about twice
one token's, so the best tree is small.

Profiles are cached per machine, model and engine (``~/.cache/tokopt/latency/``, or ``$TOKOPT_CACHE``). A
profile measured on a busy machine would size trees wrongly for ever, so the decode loop checks it for free:
``LatencyWatch`` compares the verify forwards' real times with the profile's t(n) (median ratio per size bucket
over the last steps) and, when they disagree beyond a factor of 2, the profile is measured again (once per
process per profile, with a progress line saying why) and the cached file replaced (``remeasure``).
``forget_profiles`` deletes cached profiles (``tokopt bench --remeasure``).

Example::

    profile = latency_profile(engine, model_key="smollm2-135m", max_nodes=32)
    size = best_size(expected_tokens(stats.rates(), 32), profile)
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tokopt.machine import machine_id
from tokopt.paths import cache_path
from tokopt.progress import progress_step
from tokopt.models.kv_cache import KVCache
from tokopt.models.masks import causal_structure, step_mask
from tokopt.runtime.speculative.persist import atomic_write


@dataclass
class LatencyProfile:
    """Median verify-forward seconds per number of new tokens (1 = plain decode)."""

    seconds: dict  # n -> s
    past: int
    machine: str
    engine: str
    model_key: str = ""
    # how to measure it again (engine, model_key, max_nodes, past, repeats, path); not saved
    source: tuple | None = field(default=None, repr=False, compare=False)

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
                "machine": self.machine, "engine": self.engine, "model_key": self.model_key}

    @classmethod
    def from_dict(cls, d) -> "LatencyProfile":
        return cls({int(k): float(v) for k, v in d["seconds"].items()}, d["past"], d["machine"], d["engine"],
                   d.get("model_key", ""))




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



def profile_path(engine, model_key: str, max_nodes: int = 32, past: int = 256) -> Path:
    key = hashlib.sha1(f"{machine_id()}|{model_key}|{engine.name}|{max_nodes}|{past}".encode()).hexdigest()[:16]
    return cache_path("latency", f"{key}.json")


def latency_profile(engine, model_key: str, max_nodes: int = 32, past: int = 256, repeats: int = 5,
                    refresh: bool = False, reason: str = "") -> LatencyProfile:
    """The cached profile for this machine, model and engine, measured (with progress) when missing or when
    ``refresh`` (then the cached file is replaced atomically; ``reason`` goes into the progress line)."""
    path = profile_path(engine, model_key, max_nodes, past)
    source = (engine, model_key, max_nodes, past, repeats, path)
    if path.is_file() and not refresh:
        try:
            profile = LatencyProfile.from_dict(json.loads(path.read_text()))
            profile.source = source
            return profile
        except (ValueError, KeyError, TypeError):
            pass  # unreadable: measure it again
    sizes = sorted(set(list(range(1, min(max_nodes, 16) + 1)) + list(range(16, max_nodes + 1, 4)) + [max_nodes]))
    why = f" ({reason})" if reason else ""
    with progress_step(f"measuring verify latency for {len(sizes)} tree sizes on this machine ({engine.name}){why}"):
        seconds = measure_latency(engine, sizes, past=past, repeats=repeats)
    profile = LatencyProfile(seconds, past, machine_id(), engine.name, model_key, source)
    atomic_write(path, json.dumps(profile.to_dict(), indent=1).encode())
    return profile


_REMEASURED: set = set()  # profile files measured again in this process (at most once each)


def remeasure(profile: LatencyProfile, reason: str) -> LatencyProfile | None:
    """``profile`` measured again and its cached file replaced, or None when it cannot be (no source) or was
    already measured again in this process."""
    if profile.source is None:
        return None
    engine, model_key, max_nodes, past, repeats, path = profile.source
    if str(path) in _REMEASURED:
        return None
    _REMEASURED.add(str(path))
    return latency_profile(engine, model_key, max_nodes, past, repeats, refresh=True, reason=reason)


def forget_profiles(engine_name: str | None = None, model_key: str | None = None) -> list:
    """Delete cached latency profiles (those of ``engine_name`` / ``model_key`` when given; files from before
    the model key was recorded match any key); returns the deleted paths. The next run measures again."""
    folder = cache_path("latency")
    deleted = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            d = json.loads(path.read_text())
        except ValueError:
            d = {}
        if engine_name is not None and d.get("engine", engine_name) != engine_name:
            continue
        if model_key is not None and d.get("model_key", model_key) not in ("", model_key):
            continue
        path.unlink()
        deleted.append(path)
    return deleted


class LatencyWatch:
    """Checks a profile against the verify forwards actually timed (no extra forwards): the ratio
    observed / t(n) per step, grouped by size bucket (1, 2-3, 4-7, 8-15, ...); once a bucket holds ``min_steps``
    ratios (of the last ``window``) whose median is outside ``band``, ``observe`` returns that median.
    The first ``skip`` steps of each ``generate`` call (``restart``) are not used.

    Example::

        watch = LatencyWatch(profile)
        ratio = watch.observe(nodes, seconds)      # None while the profile looks right
    """

    def __init__(self, profile: LatencyProfile, band=(0.5, 2.0), min_steps: int = 8, window: int = 16,
                 skip: int = 2):
        self.profile, self.band, self.min_steps, self.window, self.skip = profile, band, min_steps, window, skip
        self.buckets = {}
        self._seen = 0

    def restart(self) -> None:
        self._seen = 0

    def observe(self, nodes: int, seconds: float):
        self._seen += 1
        if self._seen <= self.skip or nodes < 1:
            return None
        predicted = self.profile(nodes)
        if predicted <= 0:
            return None
        ratios = self.buckets.setdefault(nodes.bit_length(), deque(maxlen=self.window))
        ratios.append(seconds / predicted)
        if len(ratios) < self.min_steps:
            return None
        median = statistics.median(ratios)
        return median if not self.band[0] <= median <= self.band[1] else None


def best_size(curve, profile: LatencyProfile, extra_nodes: int = 0, min_size: int = 1) -> int:
    """The number of draft nodes n (>= ``min_size``) maximizing ``curve[n] / profile(n + 1 + extra_nodes)``
    (``extra_nodes``: nodes the tree carries besides the n sized here, e.g. merged lookup guesses)."""
    rates = [(curve[n] / profile(n + 1 + extra_nodes), n) for n in range(min_size, len(curve))]
    return max(rates)[1]
