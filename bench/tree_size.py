"""Which tree size pays on this machine: predicted and measured speedup of Token Recycling vs tree size.

Measures verify latency t(n) for n up to the reference 80-node tree in the eager and ONNX Runtime engines,
learns recycling acceptance rates on Spec-Bench questions, predicts speedup(n) = E(n) / t(n + 1) * t(1)
(E from ``acceptance.expected_tokens``), and measures MAT and tokens/s for the size tokopt picks ("auto") and
for 80 nodes in the ONNX Runtime engine. Writes bench/tree_size.json and bench/tree_size.png.

    .venv/bin/python bench/tree_size.py --questions ../shared/data/spec_bench/questions.jsonl
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import tokopt
from tokopt.bench.harness import cached_engine_dir
from tokopt.machine import describe
from tokopt.data import spec_bench
from tokopt.api.optimize import DEFAULT_PASSES, OptimizeConfig
from tokopt.runtime.prompts import encode_prompts
from tokopt.runtime.speculative.acceptance import expected_tokens
from tokopt.runtime.speculative.drafters.recycling import RecyclingConfig
from tokopt.runtime.speculative.tree_size import best_size, LatencyProfile, measure_latency
from tokopt.runtime.speculative.methods import SpeculativeConfig

SIZES = [1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32, 48, 64, 81]


def run(opt, cfg, prompts, max_new_tokens):
    spec = opt.with_speculative(cfg)
    tokens = seconds = 0
    mats = []
    for ids, mask in prompts:
        start = time.perf_counter()
        out = spec.generate(ids, mask, max_new_tokens=max_new_tokens)
        seconds += time.perf_counter() - start
        tokens += out.shape[1] - ids.shape[1]
        mats.append(spec.last_stats.mat)
    return spec, {"mat": sum(mats) / len(mats), "tokens_per_s": tokens / seconds}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--replot", action="store_true", help="only redraw the plot from OUT/tree_size.json")
    ap.add_argument("--questions", default=None)
    ap.add_argument("--per-category", type=int, default=1)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--out", default="bench")
    args = ap.parse_args()
    if args.replot:
        out = Path(args.out)
        return plot(json.loads((out / "tree_size.json").read_text()), out / "tree_size.png")

    model, tokenizer = tokopt.load()
    eager = tokopt.optimize(model, OptimizeConfig(passes=(*DEFAULT_PASSES, "small_batch_linear")), tokenizer=tokenizer)
    ort = tokopt.load_engine(cached_engine_dir(argparse.Namespace(engine_dir=None, model=None, passes=DEFAULT_PASSES),
                                         None, model))
    latency = {}
    for name, opt in (("eager", eager), ("onnx", ort)):
        print(f"measuring {name} verify latency for {len(SIZES)} sizes ...", flush=True)
        latency[name] = measure_latency(opt.engine, SIZES, past=256, repeats=3)
    questions = spec_bench(args.questions, args.per_category)
    prompts = [encode_prompts(tokenizer, [q["question"]]) for q in questions]
    pure = RecyclingConfig(lookup_nodes=0)
    print("learning acceptance rates and measuring auto vs 80 nodes (ONNX Runtime) ...", flush=True)
    start = time.perf_counter()
    tokens = 0
    for ids, mask in prompts:
        tokens += ort.generate(ids, mask, max_new_tokens=args.max_new_tokens).shape[1] - ids.shape[1]
    plain_tps = tokens / (time.perf_counter() - start)
    auto, auto_m = run(ort, SpeculativeConfig("recycling", recycling=pure), prompts, args.max_new_tokens)
    _, big_m = run(ort, SpeculativeConfig("recycling", budget=80, max_nodes=80, recycling=pure), prompts,
                   args.max_new_tokens)
    rates = auto.drafter.stats.rates()
    curve = expected_tokens(rates, 80)
    predicted = {}
    for name, secs in latency.items():
        profile = LatencyProfile(secs, 256, describe()["cpu"], name)
        predicted[name] = {"speedup": [curve[n] * profile(1) / profile(n + 1) for n in range(1, 81)],
                           "best": best_size(curve, profile)}
    results = {"machine": describe(), "latency_s": latency, "expected_tokens": curve, "predicted": predicted,
               "measured_onnx": {"plain_tokens_per_s": plain_tps, "auto": auto_m | {"nodes": auto.drafter.config.budget},
                                 "80_nodes": big_m},
               "questions": len(questions), "max_new_tokens": args.max_new_tokens}
    out = Path(args.out)
    (out / "tree_size.json").write_text(json.dumps(results, indent=1))
    plot(results, out / "tree_size.png")
    print(json.dumps({k: v for k, v in results.items() if k not in ("expected_tokens", "predicted")}, indent=1))
    print({k: v["best"] for k, v in predicted.items()})


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    n = list(range(1, 81))
    for name, p in results["predicted"].items():
        ax.plot(n, p["speedup"], label=f"{name}: predicted (best n={p['best']})")
    m = results["measured_onnx"]
    for key, label, marker in (("auto", f"onnx measured, auto (n={m['auto']['nodes']})", "o"),
                               ("80_nodes", "onnx measured, 80 nodes", "s")):
        x = m["auto"]["nodes"] if key == "auto" else 80
        ax.scatter([x], [m[key]["tokens_per_s"] / m["plain_tokens_per_s"]], zorder=3, color="C1", marker=marker,
                   edgecolor="black", label=f"{label}, MAT {m[key]['mat']:.2f}")
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("draft nodes per step (log)")
    ax.set_ylabel("speedup vs plain decoding")
    ax.set_title(f"Token Recycling tree size on {results['machine']['cores']} CPU cores", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
