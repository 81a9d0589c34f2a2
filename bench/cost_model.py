"""Expert-parallel cost model: a gloo Alltoall sweep on this machine, and PROJECTED step times of two-Alltoall and
context-coherent (ExFlow) EP for Mixtral-8x7B and OLMoE-1B-7B on H100 topologies.

Measured: gloo ``all_to_all_single`` and ``all_gather`` over 2 and 4 local ranks (loopback), median over repeats
of the slowest rank, fitted ``T = alpha + S / B``. Projected (no GPU was used): ``tokopt.moe.plan`` on nvlink8
(4 and 8 GPUs) and 2node-rdma (2 nodes x 4 GPUs) at batch 1 / 32 / 256, decode (1024 tokens of context) and
prefill (512-token prompts). Context-coherent cross fractions under affinity placement take ExFlow's Mixtral
reduction (4 GPUs 56.4% vs 75% uniform; 8 GPUs 71.5% vs 87.5%) as a ratio applied to this model's uniform
fraction. Writes bench/cost_model.json and bench/cost_model.png.

    .venv/bin/python bench/cost_model.py            # ~40 s (two sweeps)
    .venv/bin/python bench/cost_model.py --replot
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tokopt.moe.cost_model import AlphaBeta, MoEShape, Topology, measure_alltoall, step_time, uniform_fractions
from tokopt.moe.plan import plan

SIZES = (4096, 32768, 262144, 1 << 20, 4 << 20)
EXFLOW = {4: (0.564, 0.75), 8: (0.715, 0.875)}  # GPUs -> (affinity, uniform) cross-GPU fraction, Mixtral-8x7B
TOPOLOGIES = {"nvlink 4 GPUs": ("nvlink8", 4), "nvlink8": ("nvlink8", 8), "2node-rdma 2x4": ("2node-rdma", 8)}
MODELS = ("mixtral-8x7b", "olmoe-1b-7b")
BATCHES = (1, 32, 256)
PHASES = {"decode": 1024, "prefill": 512}


def project() -> list[dict]:
    rows = []
    for model in MODELS:
        shape = MoEShape.preset(model)
        for label, (preset, gpus) in TOPOLOGIES.items():
            topo = Topology.preset(preset, gpus=gpus)
            uni_cross, uni_split = uniform_fractions(shape, gpus)
            aff, base = EXFLOW[gpus]
            cross_aff = uni_cross * aff / base
            for phase, context in PHASES.items():
                for batch in BATCHES:
                    p = plan(shape, topo, batch=batch, phase=phase, context=context,
                             cross_fractions={"affinity": cross_aff})
                    t2 = p.estimate("two_alltoall")
                    cc = p.estimate("context_coherent", "affinity")
                    fused = step_time(shape, topo, "context_coherent", tokens=cc.tokens, cross_fraction=cross_aff,
                                      split_fraction=uni_split, phase=phase, context=context, sequences=batch,
                                      partial_collectives=1)
                    # the ExFlow regime: top-1 routing (or all k experts co-located), no partial exchange
                    top1 = {s: step_time(shape, topo, s, tokens=cc.tokens, phase=phase, context=context,
                                         sequences=batch, cross_fraction=f, split_fraction=0.0).to_dict()
                            for s, f in (("two_alltoall", (gpus - 1) / gpus),
                                         ("context_coherent", (gpus - 1) / gpus * aff / base))}
                    rows.append({"model": model, "topology": label, "gpus": gpus, "nodes": topo.nodes,
                                 "phase": phase, "batch": batch, "context": context, "cross_uniform": uni_cross,
                                 "cross_affinity": cross_aff, "split": uni_split,
                                 "two_alltoall": t2.to_dict(), "context_coherent": cc.to_dict(),
                                 "context_coherent_fused_partial": fused.to_dict(), "top1": top1,
                                 "best": list(p.best), "explanation": p.explanation})
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--replot", action="store_true")
    ap.add_argument("--project-only", action="store_true", help="keep the sweeps in OUT/cost_model.json")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="bench")
    args = ap.parse_args()
    out = Path(args.out)
    if args.replot:
        data = json.loads((out / "cost_model.json").read_text())
    elif args.project_only:
        data = json.loads((out / "cost_model.json").read_text())
        data["projections"] = project()
        (out / "cost_model.json").write_text(json.dumps(data, indent=1))
    else:
        sweeps = {str(w): measure_alltoall(w, sizes=SIZES, repeats=args.repeats) for w in (2, 4)}
        data = {"command": ".venv/bin/python bench/cost_model.py", "sweeps": sweeps,
                "projections_note": "PROJECTIONS from the alpha-beta model with datasheet H100/NVLink/NDR numbers; "
                                    "no GPU measured", "projections": project()}
        (out / "cost_model.json").write_text(json.dumps(data, indent=1))
    print(table(data))
    plot(data, out / "cost_model.png")


def table(data) -> str:
    lines = []
    for w, s in data["sweeps"].items():
        for key, kind in (("fit", "all_to_all_single"), ("fit_all_gather", "all_gather")):
            f = AlphaBeta(**s[key])
            lines.append(f"gloo {kind} {w} ranks: alpha {f.alpha_s * 1e6:.0f} us, {f.bytes_per_s / 1e9:.3f} GB/s")
    lines += ["", "| model | topology | phase | batch | two_alltoall ms | ctx-coherent ms (affinity) | fused partial ms "
              "| K/V sync ms | best | top-1 variant: two_alltoall / ctx-coherent ms |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["projections"]:
        t2, cc, fu = r["two_alltoall"], r["context_coherent"], r["context_coherent_fused_partial"]
        lines.append(f"| {r['model']} | {r['topology']} | {r['phase']} | {r['batch']} | {t2['total_s'] * 1e3:.2f} | "
                     f"{cc['total_s'] * 1e3:.2f} | {fu['total_s'] * 1e3:.2f} | {cc['kv_sync_s'] * 1e3:.2f} | "
                     f"{r['best'][0]} | {r['top1']['two_alltoall']['total_s'] * 1e3:.2f} / "
                     f"{r['top1']['context_coherent']['total_s'] * 1e3:.2f} |")
    return "\n".join(lines)


def plot(data, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 5))
    for (w, s), color in zip(data["sweeps"].items(), ("tab:blue", "tab:orange")):
        for key, pts_key, style in (("fit", "points", "o"), ("fit_all_gather", "points_all_gather", "s")):
            pts = s[pts_key]
            x = [p["bytes_per_rank"] for p in pts]
            f = AlphaBeta(**s[key])
            kind = "all_to_all_single" if key == "fit" else "all_gather"
            a.loglog(x, [p["seconds"] * 1e3 for p in pts], style, color=color, alpha=0.8 if key == "fit" else 0.4,
                     label=f"{kind} {w} ranks (measured)")
            a.loglog(x, [f.time(v) * 1e3 for v in x], "-" if key == "fit" else ":", color=color,
                     label=f"fit: {f.alpha_s * 1e6:.0f} us + S / {f.bytes_per_s / 1e9:.2f} GB/s")
    a.set_xlabel("bytes sent per rank")
    a.set_ylabel("ms (median over repeats of the slowest rank)")
    a.set_title("gloo over loopback, AMD EPYC 2 cores (measured)")
    a.legend(fontsize=7)
    for model, marker in zip(MODELS, ("o", "s")):
        for (label, _), color in zip(TOPOLOGIES.items(), ("tab:green", "tab:blue", "tab:red")):
            for phase, ls in (("decode", "-"), ("prefill", "--")):
                rs = [r for r in data["projections"] if r["model"] == model and r["topology"] == label
                      and r["phase"] == phase]
                b.plot([r["batch"] for r in rs],
                       [r["two_alltoall"]["total_s"] / r["context_coherent"]["total_s"] for r in rs],
                       marker=marker, ls=ls, color=color, label=f"{model}, {label}, {phase}")
    b.axhline(1.0, color="k", lw=0.8)
    b.set_xscale("log")
    b.set_xlabel("batch (sequences)")
    b.set_ylabel("two_alltoall time / context_coherent time (>1: context-coherent faster)")
    b.set_title("PROJECTIONS (alpha-beta + roofline, H100 datasheet numbers)")
    b.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
