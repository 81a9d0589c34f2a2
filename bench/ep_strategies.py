"""Expert-parallel throughput on gloo ranks: two-Alltoall vs context-coherent, contiguous vs affinity placement.

Runs the same greedy decode of Spec-Bench questions (chat template) over N gloo ranks, every configuration
interleaved in each repeat, and reports per configuration: median decode step (slowest rank), tokens/s, the
measured cross-rank fraction and bytes per step, next to the alpha-beta cost model's prediction for this machine
(communication predicted, compute taken from the single-process step measured in the same run), and the same
model's PROJECTION for an 8-GPU NVLink node. The affinity placement is fitted on routing recorded from the
text shipped with tokopt (``tokopt trace``'s default) minus the benchmark's own questions.

    .venv/bin/python bench/expert_parallel.py [--model smollm2-moe] [--ranks 4] [--batch 8] [--new 16] [--repeats 2]
    .venv/bin/python bench/expert_parallel.py --top-k 1 --out bench/expert_parallel_top1   # same routers, top-1
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).parent


def questions(n):
    from tokopt.data import sample_turns

    return sample_turns(first_only=True)[:n]


def single_process_step(model, prompts, new):
    from tokopt.runtime.distributed.generate import generate_on_rank
    from tokopt.models.ep_program.program import StepContext, capture_program

    gm = capture_program(model)
    with torch.no_grad():
        out = generate_on_rank(gm, prompts, StepContext.single(gm, len(prompts)), max_new_tokens=new)
    return statistics.median(out["step_s"][1:]), out["step_s"][0], out["tokens"]


def affinity_placement(model, tokenizer, ranks, n_bench):
    import tokopt
    from tokopt.moe.traces import trace_text
    from tokopt.models.moefy import default_texts

    held_out = set(questions(n_bench))  # the benchmark's own prompts stay out of the profile
    text = "\n\n".join(t for t in default_texts() if t not in held_out)
    trace = trace_text(model, tokenizer, text, tokens=8000, chunk=256)
    start = time.perf_counter()
    placement = tokopt.place(trace, gpus=ranks)
    return placement, trace, time.perf_counter() - start


def with_top_k(model, k: int):
    """A copy of an MoEfied model routing each token to its top ``k`` experts instead (experts rescaled so a
    token still gets the sum of its experts at equal weights, as moefy builds them)."""
    import copy

    old = model.config.num_experts_per_tok
    model = copy.deepcopy(model)
    model.config.num_experts_per_tok = k
    for layer in model.model.layers:
        layer.mlp.gate.top_k = k
        layer.mlp.top_k = k
        with torch.no_grad():
            layer.mlp.experts.down_proj.mul_(k / old)
    return model


def main(argv=None):
    import tokopt
    from tokopt.moe.cost_model import MoEShape, Topology, step_time
    from tokopt.moe.placement import contiguous_placement
    from tokopt.moe.plan import routing_fractions
    from tokopt.runtime.distributed.run import ep_generate
    from tokopt.runtime.distributed.stats import trace_of_run
    from tokopt.runtime.prompts import encode_prompts
    from tokopt.machine import cpu_name

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-moe")
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--top-k", type=int, default=None, help="route to this many experts instead (e.g. 1)")
    ap.add_argument("--out", default=str(HERE / "expert_parallel"))
    args = ap.parse_args(argv)

    model, tokenizer = tokopt.load(args.model)
    if args.top_k:
        model = with_top_k(model, args.top_k)
    ids, mask = encode_prompts(tokenizer, questions(args.batch))
    prompts = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
    print(f"[1/4] single-process reference, {len(prompts)} prompts x {args.new} tokens", file=sys.stderr)
    single_decode, single_prefill, ref_tokens = single_process_step(model, prompts, args.new)
    print(f"[2/4] routing trace on the calibration text + placement for {args.ranks} ranks", file=sys.stderr)
    placement, trace, solve_s = affinity_placement(model, tokenizer, args.ranks, args.batch)
    layers, experts = placement.assignment.shape
    placements = {"contiguous": contiguous_placement(layers, experts, args.ranks), "affinity": placement.assignment}
    configs = [(s, p) for s in ("two_alltoall", "context_coherent") for p in placements]
    runs = {f"{s}/{p}": [] for s, p in configs}
    print(f"[3/4] {len(configs)} configurations x {args.repeats} repeats over {args.ranks} gloo ranks", file=sys.stderr)
    for rep in range(args.repeats):
        for strategy, pname in configs:
            t = time.perf_counter()
            res = ep_generate(model, prompts, ranks=args.ranks, strategy=strategy, placement=placements[pname],
                              max_new_tokens=args.new, timeout_s=600)
            s = res.summary()
            experts_run, _, keys = trace_of_run(res)
            sent = sum(rec["rows"] for r in res.ranks for rec in r["counters"]
                       if rec["kind"] in ("dispatch", "migrate") and rec["step"] >= 1)
            routed = sum(1 for step, _ in keys if step >= 1) * experts_run.shape[1]
            runs[f"{strategy}/{pname}"].append({
                "rows_per_token_layer": sent / max(routed, 1),
                "decode_step_s": max(s["step_s"]), "prefill_s": max(r["step_s"][0] for r in res.ranks),
                "identical": res.tokens == ref_tokens, "summary": s, "wall_s": time.perf_counter() - t,
                "experts": experts_run, "keys": keys})
            print(f"  repeat {rep + 1}: {strategy}/{pname}: decode step {max(s['step_s']) * 1000:.0f} ms",
                  file=sys.stderr)

    print("[4/4] cost model", file=sys.stderr)
    shape = MoEShape.from_config(model.config)
    here = Topology.preset("this-machine", gpus=args.ranks)
    gpus8 = min(8, experts)
    nvlink = Topology.preset("nvlink8", gpus=gpus8)
    placements8 = {"contiguous": contiguous_placement(layers, experts, gpus8),
                   "affinity": tokopt.place(trace, gpus=gpus8).assignment}
    rows = []
    for strategy, pname in configs:
        rs = runs[f"{strategy}/{pname}"]
        decode = statistics.median(r["decode_step_s"] for r in rs)
        decode_runs = [r for r in rs]
        exp = decode_runs[0]["experts"]
        home = np.array([(i if step > 0 else _seq_of(i, prompts)) % args.ranks for step, i in decode_runs[0]["keys"]])
        decode_rows = np.array([step > 0 for step, _ in decode_runs[0]["keys"]])
        frac = routing_fractions(exp[decode_rows], placements[pname], args.ranks,
                                 stay_home=strategy == "two_alltoall", home=home[decode_rows])
        common = dict(tokens=len(prompts), cross_fraction=frac["cross"], split_fraction=frac["split"],
                      phase="decode", context=int(np.mean([len(p) for p in prompts])) + args.new // 2,
                      sequences=len(prompts), partial_collectives=1)
        predicted = step_time(shape, here, strategy, compute_s=single_decode, **common)
        frac8 = routing_fractions(exp[decode_rows], placements8[pname], gpus8, stay_home=strategy == "two_alltoall",
                                  home=(home[decode_rows] % gpus8))
        projected = step_time(shape, nvlink, strategy, **{**common, "cross_fraction": frac8["cross"],
                                                           "split_fraction": frac8["split"]})
        rows.append({"strategy": strategy, "placement": pname, "decode_step_ms": decode * 1000,
                     "tokens_per_s": len(prompts) / decode, "identical": all(r["identical"] for r in rs),
                     "cross_fraction": frac["cross"], "split_fraction": frac["split"],
                     "rows_per_token_layer": rs[0]["rows_per_token_layer"],
                     "predicted_rows_per_token_layer": frac["cross"] + frac["split"],
                     "decode_bytes_per_step_max_rank": max(rs[0]["summary"]["decode_bytes_per_step"]),
                     "decode_comm_ms": 1000 * statistics.median(
                         statistics.mean(r["summary"]["decode_comm_s_per_step"]) for r in rs),
                     "kv_sync_bytes": rs[0]["summary"]["kv_sync_bytes"],
                     "predicted_step_ms": predicted.total_s * 1000, "predicted_comm_ms": predicted.comm_s * 1000,
                     "projected_nvlink8_step_us": projected.total_s * 1e6,
                     "projected_nvlink8_comm_us": projected.comm_s * 1e6})
    name = args.model + (f" (top-{args.top_k})" if args.top_k else "")
    result = {"machine": f"{cpu_name()}, {torch.get_num_threads()} threads", "model": name,
              "ranks": args.ranks, "batch": len(prompts), "new_tokens": args.new, "repeats": args.repeats,
              "single_process_decode_step_ms": single_decode * 1000, "placement_solve_s": solve_s,
              "placement_expected_cross_on_calibration": placement.objective, "rows": rows,
              "command": "python bench/expert_parallel.py " + " ".join(argv or sys.argv[1:])}
    Path(args.out + ".json").write_text(json.dumps(result, indent=1, default=float))
    _plot(result, args.out + ".png")
    print(_table(result))
    return result


def _seq_of(i, prompts):
    return int(np.searchsorted(np.cumsum([len(p) for p in prompts]), i, side="right"))


def _table(result) -> str:
    lines = ["| strategy | placement | decode step ms | tokens/s | identical | rows sent per token-layer (measured = predicted) | "
             "decode bytes/step, max rank | measured comm ms/step (mean rank) | predicted step ms (comm) | "
             "PROJECTED nvlink8 step us (comm) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['strategy']} | {r['placement']} | {r['decode_step_ms']:.0f} | {r['tokens_per_s']:.1f} | "
                     f"{r['identical']} | {r['rows_per_token_layer']:.3f} = {r['predicted_rows_per_token_layer']:.3f} | "
                     f"{r['decode_bytes_per_step_max_rank']:,.0f} | {r['decode_comm_ms']:.0f} | "
                     f"{r['predicted_step_ms']:.0f} ({r['predicted_comm_ms']:.0f}) | "
                     f"{r['projected_nvlink8_step_us']:.0f} ({r['projected_nvlink8_comm_us']:.0f}) |")
    return "\n".join(lines)


def _plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    labels = [f"{r['strategy'].replace('_', ' ')}\n{r['placement']}" for r in rows]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar(x - 0.2, [r["decode_step_ms"] for r in rows], 0.4, label="measured (slowest rank, median)")
    ax.bar(x + 0.2, [r["predicted_step_ms"] for r in rows], 0.4, label="cost model (alpha-beta + measured compute)")
    ax.axhline(result["single_process_decode_step_ms"], color="k", ls="--", lw=1, label="one process, unsharded")
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylabel("decode step (ms)")
    ax.set_title(f"{result['model']}: {result['ranks']} gloo ranks, batch {result['batch']} ({result['machine']})",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
