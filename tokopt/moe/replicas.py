"""Redundant experts, EPLB-style: copy the hottest experts and spread the copies to even out GPU load.

Per layer: start with one copy per expert, give each extra copy to argmax(load / copies) (so a copy's share of
the load is as small as possible), then pack copies heaviest-first onto the least loaded GPU that has a free
slot and no copy of that expert yet. Every GPU holds (E + R) / G copies.

Two packings: ``eplb_layer`` packs every copy (vanilla EPLB, affinity-blind); ``add_replicas`` keeps the
affinity placement's primaries where they are and packs only the extra copies (affinity-aware, cheap), so
the primary placement's cross-GPU fraction is unchanged and a token can additionally stay local whenever its
next expert has a copy on its GPU.

Example::

    p = place(trace, gpus=4, replicas=4)     # 64 experts + 4 copies = 17 slots per GPU
    p.replicas[0][5]                         # GPUs holding expert 5 of layer 0, primary first
"""

from __future__ import annotations

import numpy as np

from tokopt.errors import TokoptError


def replica_counts(load: np.ndarray, replicas: int) -> np.ndarray:
    """Copies per expert for one layer: greedily give each extra copy to argmax(load / copies).

    Example::

        replica_counts(np.array([10., 1., 1., 1.]), 2)     # [3, 1, 1, 1]
    """
    counts = np.ones(len(load), dtype=np.int64)
    for _ in range(replicas):
        counts[int(np.argmax(load / counts))] += 1
    return counts


def _pack(items, gpu_load, room, holders):
    for e, share in items:  # heaviest first
        options = [g for g in range(len(room)) if room[g] > 0 and g not in holders[e]]
        if not options:
            options = [g for g in range(len(room)) if room[g] > 0]
        g = min(options, key=lambda g: gpu_load[g])
        holders[e].append(g)
        gpu_load[g] += share
        room[g] -= 1


def eplb_layer(load: np.ndarray, replicas: int, gpus: int) -> list[list[int]]:
    """Vanilla EPLB for one layer: GPUs holding each expert (every copy packed by load, no affinity)."""
    E = len(load)
    if (E + replicas) % gpus:
        raise TokoptError(f"experts + replicas must be a multiple of gpus ({E} + {replicas}, {gpus} GPUs)")
    counts = replica_counts(load, replicas)
    items = sorted(((e, load[e] / counts[e]) for e in range(E) for _ in range(counts[e])), key=lambda t: -t[1])
    holders: list[list[int]] = [[] for _ in range(E)]
    _pack(items, np.zeros(gpus), np.full(gpus, (E + replicas) // gpus), holders)
    return holders


def _add_copies(holders, load, room, replicas):
    """One copy at a time: the (expert, GPU) that lowers the heaviest GPU's load the most (ties: lower total).

    A copy splits an expert's load evenly over its holders, so it moves load off the GPUs already holding it.
    Copies only go to a GPU with a free slot that does not hold that expert yet.
    """
    G = len(room)
    for _ in range(replicas):
        gpu_load = np.zeros(G)
        for e, hs in enumerate(holders):
            for g in hs:
                gpu_load[g] += load[e] / len(hs)
        best, best_key = None, None
        for e, hs in enumerate(holders):
            n = len(hs)
            drop = load[e] / n - load[e] / (n + 1)
            base = gpu_load.copy()
            base[hs] -= drop
            for g in range(G):
                if room[g] <= 0 or g in hs:
                    continue
                after = base.copy()
                after[g] += load[e] / (n + 1)
                key = (after.max(), np.sort(after)[-2] if G > 1 else 0.0, -load[e] / n)
                if best_key is None or key < best_key:
                    best, best_key = (e, g), key
        if best is None:
            break
        e, g = best
        holders[e].append(g)
        room[g] -= 1


def _imbalance(holders, load, gpus):
    gl = np.zeros(gpus)
    for e, hs in enumerate(holders):
        for g in hs:
            gl[g] += load[e] / len(hs)
    return float(gl.max() / max(gl.mean(), 1e-12))


def add_replicas(placement, load: np.ndarray, replicas: int):
    """``placement`` with ``replicas`` extra copies per layer packed around its primaries (affinity-aware EPLB).

    Sets ``placement.replicas[l][e]`` (GPUs, primary first) and reports load imbalance (max / mean GPU load)
    without copies, with copies, and with vanilla EPLB packing for comparison.
    """
    x = placement.assignment
    L, E = x.shape
    G = placement.gpus
    slots = (E + replicas) // G
    out, before, after, vanilla = [], [], [], []
    for l in range(L):
        room = slots - np.bincount(x[l], minlength=G)
        if (room < 0).any():
            raise TokoptError(f"layer {l}: a GPU holds more than {slots} primary experts; cannot add replicas")
        holders = [[int(x[l, e])] for e in range(E)]
        _add_copies(holders, load[l], room.copy(), replicas)
        out.append(holders)
        before.append(_imbalance([[int(x[l, e])] for e in range(E)], load[l], G))
        after.append(_imbalance(holders, load[l], G))
        vanilla.append(_imbalance(eplb_layer(load[l], replicas, G), load[l], G))
    placement.replicas = out
    placement.info.update({"num_replicas": replicas, "slots_per_gpu": slots,
                           "load_imbalance_no_replicas": float(np.mean(before)),
                           "load_imbalance_replicas": float(np.mean(after)),
                           "load_imbalance_vanilla_eplb": float(np.mean(vanilla))})
    return placement
