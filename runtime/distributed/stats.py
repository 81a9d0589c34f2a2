"""Counters of an expert-parallel run, summarized: traffic per layer and step, per rank, and predicted vs measured.

Example::

    s = summarize(result)      # result: an EPResult
    s["per_layer"][3]["bytes_max"], s["cross_fraction"], s["kv_sync_bytes"]
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np


def summarize(result) -> dict:
    ranks = result.ranks
    per_kind = defaultdict(lambda: defaultdict(lambda: np.zeros(len(ranks))))  # kind -> layer -> bytes per rank
    tokens = defaultdict(lambda: defaultdict(int))
    collectives = defaultdict(int)
    steps = 0
    for r, res in enumerate(ranks):
        for rec in res["counters"]:
            per_kind[rec["kind"]][rec["layer"]][r] += rec["bytes"]
            tokens[rec["kind"]][rec["layer"]] += rec.get("tokens", rec["rows"])
            if r == 0:
                collectives[rec["kind"]] += rec["collectives"]
                steps = max(steps, rec["step"] + 1)
    moe_layers = ranks[0]["moe_layers"]
    decode_steps = max(steps - 1, 1)
    decode_comm = [sum(rec.get("seconds", 0.0) for rec in res["counters"] if rec["step"] >= 1) / decode_steps
                   for res in ranks]
    decode_bytes = [sum(rec["bytes"] for rec in res["counters"] if rec["step"] >= 1) / decode_steps for res in ranks]
    per_layer = {}
    for layer in moe_layers:
        row = {}
        for kind in ("dispatch", "combine", "migrate", "partial"):
            if layer in per_kind[kind]:
                b = per_kind[kind][layer]
                row[kind] = {"tokens": tokens[kind][layer], "bytes_max": int(b.max()), "bytes_mean": float(b.mean())}
        per_layer[layer] = row
    kv = sum(float(v.sum()) for v in per_kind["kv_sync"].values())
    total = sum(float(v.sum()) for kind in per_kind for v in per_kind[kind].values())
    routed = routed_tokens(result)
    moving_kind = "migrate" if result.strategy == "context_coherent" else "dispatch"
    moved = sum(tokens[moving_kind][layer] for layer in moe_layers)
    return {
        "strategy": result.strategy,
        "ranks": result.world,
        "steps": steps,
        "alltoalls_per_layer": ranks[0]["alltoalls_per_layer"],
        "per_layer": per_layer,
        "collectives_per_step": {k: v / max(steps, 1) for k, v in collectives.items()},
        "bytes_total": total,
        "bytes_per_rank_max": float(max(sum(float(v[r]) for kind in per_kind for v in per_kind[kind].values())
                                        for r in range(len(ranks)))),
        "kv_sync_bytes": kv,
        "kv_bytes_per_rank": [res["kv_bytes"] for res in ranks],
        "cross_fraction": moved / max(routed, 1),
        "decode_comm_s_per_step": decode_comm,  # per rank: wall time inside collectives per decode step
        "decode_bytes_per_step": decode_bytes,  # per rank: bytes sent to other ranks per decode step
        "step_s": [float(np.median(res["step_s"][1:])) if len(res["step_s"]) > 1 else float(res["step_s"][0])
                   for res in ranks],
    }


def routed_tokens(result) -> int:
    """Token-layer routings over the run (each token counted once per MoE layer, on the rank that routed it)."""
    return sum(len(idx) for res in result.ranks for (_, _, idx, _, _) in res["routes"])


def trace_of_run(result):
    """The run's routing as ``(experts [T, L, k] in the model's original numbering, home-rank per token,
    rank that routed it at each layer [T, L])`` over every (step, token), for comparing with predictions."""
    rows = defaultdict(dict)
    where = defaultdict(dict)
    for res in result.ranks:
        for step, layer, idx, experts, rank in res["routes"]:
            for i, e in zip(idx.tolist(), experts):
                rows[(step, i)][layer] = e
                where[(step, i)][layer] = rank
    layers = result.ranks[0]["moe_layers"]
    keys = sorted(rows)
    experts = np.stack([np.stack([rows[k][layer] for layer in layers]) for k in keys])
    ranks = np.array([[where[k][layer] for layer in layers] for k in keys])
    return experts, ranks, keys
