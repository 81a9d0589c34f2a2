"""The runtime's non-model overhead per decode step: Token Recycling greedy decoding on SmolLM2.

Runs ``speculative_generate`` with Token Recycling over Spec-Bench questions (one per category by default) and
times, per decode step, the model forward (the engine call) and everything else the runtime does around it:
drafting (recycling tree fill + lookup merge), ``pack_trees`` (tree tokens, positions, ancestor structure),
``step_mask``, verification, the cache (``extend``, ``compact_tail``, ``drop_dead``), the drafter's ``observe``
(top-k of the logits into the adjacency) and ``feedback`` (acceptance statistics), and the rest of the loop
(bookkeeping). The pieces are timed by wrapping those functions from here (the decode loop is unchanged), and a
second pass runs under cProfile with the profiler paused inside the engine call, so its top-N lists only
non-model functions. ``TOKOPT_KERNELS=reference|numba`` chooses the kernels (tokopt.kernels.dispatch).

Writes OUT/overhead_<label>.json and OUT/overhead_<label>.png and prints a table::

    OMP_NUM_THREADS=1 .venv/bin/python bench/overhead.py --label before
    OMP_NUM_THREADS=1 TOKOPT_KERNELS=numba .venv/bin/python bench/overhead.py --label after
    .venv/bin/python bench/overhead.py --compare before after     # table + plot of both runs
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import time
from pathlib import Path

import torch

OUT = Path(__file__).parent / "overhead"
QUESTIONS = Path(__file__).resolve().parents[2] / "shared" / "data" / "spec_bench" / "questions.jsonl"

# (module, attribute, name in the table); methods are wrapped on their class
PIECES = [
    ("tokopt.runtime.speculative.decode", "pack_trees", "pack_trees"),
    ("tokopt.runtime.speculative.decode", "step_mask", "step_mask"),
    ("tokopt.runtime.speculative.decode", "verify_greedy", "verify"),
    ("tokopt.models.kv_cache", "KVCache.extend", "kv_extend"),
    ("tokopt.models.kv_cache", "KVCache.compact_tail", "kv_compact_tail"),
    ("tokopt.models.kv_cache", "KVCache.drop_dead", "kv_drop_dead"),
]
DRAFTER_PIECES = [("draft", "draft"), ("observe", "observe"), ("feedback", "feedback")]
NON_MODEL = ["draft", "pack_trees", "step_mask", "verify", "kv_extend", "kv_compact_tail", "kv_drop_dead",
             "observe", "feedback", "other"]


class StepTimer:
    """Accumulates wrapped functions' seconds into the current decode step (a step starts at ``draft``)."""

    def __init__(self):
        self.steps = []  # per step: {piece: seconds, "step": seconds, "model": seconds}
        self.current = None
        self.step_start = None
        self.profiler = None  # paused inside the engine call when set

    def close_step(self, now):
        if self.current is not None:
            self.current["step"] = now - self.step_start
            self.steps.append(self.current)
        self.current = None

    def wrap(self, fn, name, starts_step=False, is_model=False):
        timer = self

        def wrapped(*args, **kwargs):
            t0 = time.perf_counter()
            if starts_step:
                timer.close_step(t0)
                timer.current, timer.step_start = {}, t0
            if is_model and timer.profiler is not None:
                timer.profiler.disable()
            try:
                return fn(*args, **kwargs)
            finally:
                t1 = time.perf_counter()
                if is_model and timer.profiler is not None:
                    timer.profiler.enable()
                if timer.current is not None:
                    timer.current[name] = timer.current.get(name, 0.0) + (t1 - t0)

        wrapped.__wrapped__ = fn
        return wrapped


def instrument(timer, opt):
    """Wrap the pieces (module functions, KVCache methods, the drafter's methods, the engine call)."""
    import importlib

    for module_name, attr, name in PIECES:
        module = importlib.import_module(module_name)
        owner, _, leaf = attr.rpartition(".")
        target = getattr(module, owner) if owner else module
        setattr(target, leaf, timer.wrap(getattr(target, leaf), name))
    drafter = opt.drafter
    for attr, name in DRAFTER_PIECES:
        setattr(drafter, attr, timer.wrap(getattr(drafter, attr), name, starts_step=(attr == "draft")))
    engine = opt.engine
    call = engine.__call__
    opt.engine = _WrappedEngine(engine, timer.wrap(call, "model", is_model=True))


class _WrappedEngine:
    def __init__(self, engine, call):
        self._engine, self._call = engine, call
        self.spec, self.name = engine.spec, engine.name

    def __call__(self, *args, **kwargs):
        return self._call(*args, **kwargs)

    def __getattr__(self, attr):
        return getattr(self._engine, attr)


def load(engine_kind: str, budget):
    import tokopt
    from tokopt.paths import cache_dir

    speculative = tokopt.SpeculativeConfig("recycling", budget=budget)
    if engine_kind in ("auto", "onnx"):
        dirs = sorted(p.parent for p in (cache_dir() / "engines").glob("smollm2*/manifest.json"))
        if dirs:
            from tokopt.api.engines import load_engine

            return load_engine(dirs[0], threads=torch.get_num_threads(), speculative=speculative), f"onnx:{dirs[0].name}"
        if engine_kind == "onnx":
            raise SystemExit(f"no exported SmolLM2 engine under {cache_dir() / 'engines'}; run `tokopt export` or use --engine eager")
    return tokopt.optimize(speculative=speculative), "eager"


def run(opt, prompts, max_new_tokens, timer=None):
    tokens = []
    for ids, mask in prompts:
        out = opt.generate(ids, mask, max_new_tokens=max_new_tokens)
        if timer is not None:
            timer.close_step(time.perf_counter())
        tokens.append(out[0, ids.shape[1]:].tolist())
    return tokens


def kernels_backend() -> str:
    try:
        from tokopt.kernels.dispatch import backend_name
    except ImportError:  # before tokopt.kernels had kernels
        return "reference"
    return backend_name()


def summarize(steps) -> dict:
    per_step = []
    for s in steps:
        row = {k: s.get(k, 0.0) for k in ["step", "model"] + NON_MODEL[:-1]}
        row["other"] = row["step"] - row["model"] - sum(row[k] for k in NON_MODEL[:-1])
        row["non_model"] = row["step"] - row["model"]
        per_step.append(row)
    keys = ["step", "model", "non_model"] + NON_MODEL
    med = {k: statistics.median(r[k] for r in per_step) for k in keys}
    mean = {k: statistics.fmean(r[k] for r in per_step) for k in keys}
    return {"steps": len(per_step), "median_s": med, "mean_s": mean,
            "non_model_share_median": statistics.median(r["non_model"] / r["step"] for r in per_step),
            "non_model_share_of_total": sum(r["non_model"] for r in per_step) / sum(r["step"] for r in per_step)}


def profile_top(opt, prompts, max_new_tokens, timer, top: int) -> list:
    profiler = cProfile.Profile()
    timer.profiler = profiler
    profiler.enable()
    run(opt, prompts, max_new_tokens, timer)
    profiler.disable()
    timer.profiler = None
    stats = pstats.Stats(profiler, stream=io.StringIO())
    rows = []
    for (filename, line, func), (cc, nc, tt, ct, _) in stats.stats.items():
        if "bench/overhead.py" in filename:
            continue
        where = func if filename == "~" else f"{_short(filename)}:{line}({func})"
        rows.append({"function": where, "calls": nc, "tottime_s": tt, "cumtime_s": ct})
    rows.sort(key=lambda r: -r["tottime_s"])
    return rows[:top]


def _short(filename: str) -> str:
    for marker in ("/tokopt/", "/runtime/", "/kernels/", "site-packages/"):
        if marker in filename:
            return marker.strip("/") + "/" + filename.split(marker, 1)[1]
    return filename


def print_table(results: list):
    header = f"{'per decode step (median, ms)':30s}" + "".join(f"{r['label']:>14s}" for r in results)
    print(header)
    print("-" * len(header))
    for key in ["step", "model", "non_model"] + NON_MODEL:
        print(f"{key:30s}" + "".join(f"{1e3 * r['summary']['median_s'][key]:14.3f}" for r in results))
    print(f"{'non-model share (median)':30s}" + "".join(f"{100 * r['summary']['non_model_share_median']:13.1f}%" for r in results))
    print(f"{'non-model share (of total)':30s}" + "".join(f"{100 * r['summary']['non_model_share_of_total']:13.1f}%" for r in results))
    print(f"{'steps':30s}" + "".join(f"{r['summary']['steps']:14d}" for r in results))


def plot(results: list, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 1]})
    width = 0.8 / len(results)
    xs = range(len(NON_MODEL))
    for i, r in enumerate(results):
        ax1.bar([x + i * width for x in xs], [1e3 * r["summary"]["median_s"][k] for k in NON_MODEL], width,
                label=f"{r['label']} ({r['kernels']})")
    ax1.set_xticks([x + width * (len(results) - 1) / 2 for x in xs], NON_MODEL, rotation=30, ha="right")
    ax1.set_ylabel("ms per decode step (median)")
    ax1.set_title("non-model time per step, by piece")
    ax1.legend()
    labels = [r["label"] for r in results]
    model = [1e3 * r["summary"]["median_s"]["model"] for r in results]
    non_model = [1e3 * r["summary"]["median_s"]["non_model"] for r in results]
    ax2.bar(labels, model, label="model forward")
    ax2.bar(labels, non_model, bottom=model, label="non-model")
    for i, r in enumerate(results):
        ax2.text(i, model[i] + non_model[i], f"{100 * r['summary']['non_model_share_median']:.1f}%", ha="center",
                 va="bottom")
    ax2.set_ylabel("ms per decode step (median)")
    ax2.set_title("step time")
    ax2.set_ylim(0, 1.3 * max(m + n for m, n in zip(model, non_model)))
    ax2.tick_params(axis="x", labelrotation=30)
    ax2.legend(loc="upper center", ncol=2, fontsize="small")
    fig.suptitle(f"Token Recycling on SmolLM2-135M ({results[0]['engine']}), runtime overhead per decode step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engine", choices=["auto", "onnx", "eager"], default="auto",
                    help="auto: the exported SmolLM2 ONNX engine under the tokopt cache if there is one, else eager")
    ap.add_argument("--questions", default=str(QUESTIONS))
    ap.add_argument("--per-category", type=int, default=1)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--budget", default="auto", help="recycling tree budget: an int or auto (measured latency)")
    ap.add_argument("--top", type=int, default=25, help="cProfile rows to keep")
    ap.add_argument("--label", default="run")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--compare", nargs="+", metavar="LABEL", help="only print and plot saved runs side by side")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.compare:
        results = [json.loads((out / f"overhead_{label}.json").read_text()) for label in args.compare]
        print_table(results)
        plot(results, out / f"overhead_{'_vs_'.join(args.compare)}.png")
        print(f"plot: {out / ('overhead_' + '_vs_'.join(args.compare) + '.png')}")
        return

    from tokopt.machine import describe
    from tokopt.data import spec_bench
    from tokopt.runtime.prompts import encode_prompts

    budget = args.budget if args.budget == "auto" else int(args.budget)
    opt, engine_name = load(args.engine, budget)
    questions = spec_bench(args.questions, per_category=args.per_category)
    prompts = [encode_prompts(opt.tokenizer, [q["question"]]) for q in questions]
    run(opt, prompts[:1], 16)  # warm-up: numba compilation / cache load, ORT first-run allocations

    timer = StepTimer()
    instrument(timer, opt)
    start = time.perf_counter()
    tokens = run(opt, prompts, args.max_new_tokens, timer)
    wall = time.perf_counter() - start
    summary = summarize(timer.steps)
    sizes = opt.last_stats.tree_sizes
    timer.steps = []
    top = profile_top(opt, prompts, args.max_new_tokens, timer, args.top)
    result = {"label": args.label, "kernels": kernels_backend(), "engine": engine_name, "machine": describe(),
              "questions": len(prompts), "max_new_tokens": args.max_new_tokens, "budget": args.budget,
              "tokens": sum(len(t) for t in tokens), "wall_s": wall, "summary": summary,
              "last_tree_sizes": sizes, "profile_top_non_model": top,
              "outputs_digest": hash(tuple(tuple(t) for t in tokens)) & 0xFFFFFFFF,
              "command": "OMP_NUM_THREADS=1 " + " ".join(f"{k}={v}" for k, v in os.environ.items()
                                                         if k == "TOKOPT_KERNELS") + " .venv/bin/python bench/overhead.py"}
    (out / f"overhead_{args.label}.json").write_text(json.dumps(result, indent=1))
    print(f"{engine_name}, kernels={result['kernels']}, {len(prompts)} questions x {args.max_new_tokens} tokens, "
          f"{summary['steps']} steps, {result['tokens']} tokens in {wall:.1f} s")
    print_table([result])
    print(f"\ncProfile, non-model functions (engine call excluded), top {args.top} by own time:")
    print(f"{'tottime s':>10s} {'cumtime s':>10s} {'calls':>8s}  function")
    for r in top:
        print(f"{r['tottime_s']:10.3f} {r['cumtime_s']:10.3f} {r['calls']:8d}  {r['function']}")
    plot([result], out / f"overhead_{args.label}.png")


if __name__ == "__main__":
    main()
