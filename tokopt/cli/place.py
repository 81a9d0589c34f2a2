"""``tokopt place``: compute an affinity-aware expert placement from a routing trace and write MAP.json.

Example::

    tokopt place shared/data/moe_traces/flame_moe_290m/prefill --gpus 4 -o MAP.json
    tokopt place trace.npz --gpus 8 --nodes 2 --method ilp --time-limit 60 --replicas 8 -o MAP.json
"""

from __future__ import annotations

from pathlib import Path

from tokopt.errors import TokoptError


def add_parser(sub) -> None:
    p = sub.add_parser(
        "place", help="place MoE experts on GPUs so tokens rarely change GPU between layers",
        description="Read a routing trace (.npy/.npz [tokens, layers, top_k], or a folder of per-layer CSVs), "
                    "place each layer's experts on GPUs to minimize cross-GPU layer transitions, print the "
                    "expected top-1 cross-GPU fraction against contiguous and random placement, write MAP.json.")
    p.add_argument("trace", metavar="TRACE", help="routing trace file or folder")
    p.add_argument("--gpus", type=int, required=True, help="number of GPUs (must divide the experts per layer)")
    p.add_argument("--nodes", type=int, default=1, help="nodes (GPUs split evenly; nodes placed first)")
    p.add_argument("--method", default="heuristic", choices=["heuristic", "ilp", "graph"],
                   help="heuristic (default, < 1 s), ilp (pulp/CBC, time-boxed, warm-started), graph (networkx)")
    p.add_argument("--time-limit", type=float, default=30.0, metavar="S", help="ILP time limit (default 30 s)")
    p.add_argument("--replicas", type=int, default=0, metavar="R", help="redundant expert copies per layer (EPLB)")
    p.add_argument("--balance", type=float, default=None, metavar="EPS",
                   help="cap each GPU's token load at (1+EPS) x mean")
    p.add_argument("--smoothing", type=float, default=0.0, help="additive smoothing of affinity rows")
    p.add_argument("--top1", action="store_true",
                   help="optimize top-1 transitions only (default: all k x k pairs weighted by gate weights)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--output", required=True, metavar="MAP.json", help="where to write the placement map")
    p.set_defaults(handler=run)


def format_table(pl) -> str:
    """The small report ``tokopt place`` prints."""
    i = pl.info
    ours, cont, rand = i["expected_cross_fraction"], i["contiguous_cross_fraction"], i["random_cross_fraction"]
    rows = [("placement", "cross-GPU (top-1)", "vs contiguous", "vs random"),
            (pl.method, f"{ours:.3f}", f"{(ours - cont) / cont:+.1%}" if cont else "-",
             f"{(ours - rand) / rand:+.1%}" if rand else "-"),
            ("contiguous", f"{cont:.3f}", "", f"{(cont - rand) / rand:+.1%}" if rand else "-"),
            ("random (expected)", f"{rand:.3f}", "", "")]
    w = [max(len(r[c]) for r in rows) for c in range(4)]
    lines = ["  ".join(r[c].ljust(w[c]) for c in range(4)).rstrip() for r in rows]
    extra = [f"objective: {i['objective_variant']} transitions, {i['profiling_tokens']} profiling tokens; "
             f"solve {pl.solve_s:.2f} s"]
    if "solver" in i:
        extra.append(f"ILP: {i['solver']} {i['ilp_solution']}, heuristic {i['heuristic_objective']:.4f} -> ILP "
                     f"{i['ilp_objective']:.4f} ({'improved' if i['ilp_improved'] else 'kept heuristic'})")
    if pl.nodes > 1:
        extra.append(f"{pl.nodes} nodes: intra-node crossings {i['intra_node_cross_fraction']:.3f}, inter-node "
                     f"{i['inter_node_cross_fraction']:.3f}")
    if pl.replicas is not None:
        extra.append(f"replicas {i['num_replicas']}: load imbalance (max/mean) {i['load_imbalance_no_replicas']:.3f}"
                     f" -> {i['load_imbalance_replicas']:.3f} (vanilla EPLB {i['load_imbalance_vanilla_eplb']:.3f})")
    return "\n".join(lines + extra)


def run(args) -> int:
    from tokopt.moe.placement import place
    from tokopt.moe.traces import load_trace

    trace = load_trace(args.trace)
    pl = place(trace, args.gpus, nodes=args.nodes, method=args.method, time_limit=args.time_limit,
               balance=args.balance, replicas=args.replicas, seed=args.seed, smoothing=args.smoothing,
               top1=args.top1)
    out = Path(args.output)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(pl.to_json())
    except OSError as exc:
        raise TokoptError(f"cannot write {out}: {exc.strerror}") from None
    print(f"{trace!r}, {args.gpus} GPUs")
    print(format_table(pl))
    print(f"wrote {out}")
    return 0
