"""``tokopt plan``: which expert-parallel strategy to run for a model on a topology, with predicted step times.

Example::

    tokopt plan mixtral-8x7b --topology nvlink8 --batch 32
    tokopt plan path/to/config.json --topology 2node-rdma --inter-gbps 25 --json plan.json
    tokopt plan olmoe-1b-7b --topology this-machine --gpus 4 --trace routing.npz
"""

from __future__ import annotations

import json
from pathlib import Path

from tokopt.moe.cost_model import BUILTIN_SHAPES, PHASES, PRESETS


def add_parser(sub) -> None:
    p = sub.add_parser("plan", help="predict expert-parallel step times and pick two-Alltoall or context-coherent EP",
                       description="Predict one decode or prefill step of two-Alltoall expert parallelism and of "
                                   "context-coherent (ExFlow) expert parallelism for MODEL on a topology, under "
                                   "contiguous and affinity-aware expert placements; recommend the fastest and say "
                                   "why. MODEL: a built-in shape (" + ", ".join(BUILTIN_SHAPES) + "), a HF "
                                   "config.json or a local HF MoE model directory.")
    p.add_argument("model", nargs="?", default="mixtral-8x7b", metavar="MODEL",
                   help="built-in shape, config.json or HF directory (default mixtral-8x7b)")
    p.add_argument("--topology", default="nvlink8", choices=list(PRESETS),
                   help="nvlink8 (8x H100 NVLink), 2node-rdma (2x8 H100, 400 Gb/s IB), this-machine (gloo sweep)")
    p.add_argument("--gpus", type=int, default=None, help="ranks in all (default: the topology's)")
    p.add_argument("--nodes", type=int, default=None, help="nodes (default: the topology's)")
    p.add_argument("--intra-gbps", type=float, default=None, metavar="X", help="intra-node GB/s per GPU per direction")
    p.add_argument("--inter-gbps", type=float, default=None, metavar="Y", help="inter-node GB/s per GPU per direction")
    p.add_argument("--trace", default=None, metavar="TRACE",
                   help="routing trace (.npz/.npy/CSV folder): cross fractions simulated on it, affinity placement "
                        "from tokopt.moe.placement.place")
    p.add_argument("--placement", default=None, metavar="MAP_JSON", help="a placement map from `tokopt place`")
    p.add_argument("--cross-fraction", type=float, default=None, metavar="F",
                   help="context-coherent cross fraction of an affinity placement measured elsewhere")
    p.add_argument("--batch", type=int, default=32, help="sequences per step (default 32)")
    p.add_argument("--context", type=int, default=1024, help="KV length (decode) or prompt length (prefill)")
    p.add_argument("--phase", default="decode", choices=list(PHASES))
    p.add_argument("--dtype-bytes", type=int, default=None, help="bytes per element (default: from the config)")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the plan as JSON")
    p.set_defaults(handler=run)


def run(args) -> int:
    from tokopt.errors import TokoptError
    from tokopt.moe.cost_model import Topology
    from tokopt.moe.plan import plan

    if args.placement and not args.trace:
        raise TokoptError("--placement needs --trace (cross fractions are simulated on the trace)")
    topo = Topology.preset(args.topology, gpus=args.gpus, nodes=args.nodes, intra_gbps=args.intra_gbps,
                           inter_gbps=args.inter_gbps)
    result = plan(args.model, topo, trace=args.trace, placement=args.placement, batch=args.batch, phase=args.phase,
                  context=args.context, dtype_bytes=args.dtype_bytes,
                  cross_fractions={"affinity": args.cross_fraction} if args.cross_fraction is not None else None)
    print(result)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result.to_dict(), indent=1))
        print(f"\nwrote {args.json}")
    return 0
