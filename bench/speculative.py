"""``tokopt bench --speculative METHODS``: speculative decoding against plain greedy, per Spec-Bench category.

For each question (spread over categories) every runner generates greedily, runners interleaved in a
rotating order; runners are tokopt's plain loop and each method in each chosen engine (eager, onnx), HF
``generate`` greedy (``hf``) and HF prompt lookup (``hf-lookup``, ``prompt_lookup_num_tokens=10``). Each
repeat starts every drafter afresh (Token Recycling's state then carries across that repeat's questions, as
in use; never from a question to itself). Per repeat, tokens/s = new tokens / seconds over the questions of a
category (and overall); reported are medians over repeats of tokens/s and of the per-repeat speedups against
the same engine's plain greedy, HF greedy and HF prompt lookup, MAT, and outputs identical to the same
engine's plain greedy. Writes ``spec_bench.json``, ``spec_bench.md`` and ``spec_bench.png``.

Example::

    run_speculative_bench(SpecBenchConfig(methods=("recycling", "lookup"), per_category=2, repeats=2))
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import torch

from tokopt.bench.harness import cached_engine_dir, count_new
from tokopt.machine import describe
from tokopt.errors import TokoptError
from tokopt.api.optimize import DEFAULT_PASSES
from tokopt.progress import quiet
from tokopt.runtime.speculative.methods import METHODS

BASELINES = ("hf", "hf-lookup")


@dataclass
class SpecBenchConfig:
    model: str | None = None
    methods: tuple = ("recycling", "lookup")
    engines: tuple = ("onnx",)
    baselines: tuple = BASELINES
    questions: str | None = None  # Spec-Bench-style JSONL; default: the sample shipped with tokopt
    per_category: int = 2
    max_new_tokens: int = 128
    repeats: int = 2
    budget: int | str = "auto"
    engine_dir: str | None = None
    out: str = "bench/out"
    passes: tuple = field(default_factory=lambda: DEFAULT_PASSES)  # of the ONNX engine
    eager_passes: tuple = field(default_factory=lambda: (*DEFAULT_PASSES, "small_batch_linear"))

    def __post_init__(self):
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise TokoptError(f"unknown speculative method(s) {bad}; choose from {', '.join(METHODS)}")
        bad = [e for e in self.engines if e not in ("eager", "onnx")]
        if bad or not self.engines:
            raise TokoptError(f"speculative bench engines must be eager and/or onnx, got {list(self.engines)}")
        bad = [b for b in self.baselines if b not in BASELINES]
        if bad:
            raise TokoptError(f"unknown baseline(s) {bad}; choose from {', '.join(BASELINES)}")
        if self.repeats < 1 or self.max_new_tokens < 1 or self.per_category < 1:
            raise TokoptError("repeats, max_new_tokens and per_category must be >= 1")
        if self.engine_dir:
            self.engines = tuple(dict.fromkeys([*self.engines, "onnx"]))  # an ONNX engine dir is asked for: run it



def _runners(config, model, tokenizer):
    import tokopt
    from tokopt.api.optimize import OptimizeConfig
    from tokopt.runtime.speculative.methods import PPD_METHODS, SpeculativeConfig, add_ppd_slots

    runners, engines, opt = {}, {}, None
    n = config.max_new_tokens
    if "eager" in config.engines:
        engines["eager"] = tokopt.optimize(model, OptimizeConfig(passes=tuple(config.eager_passes)),
                                           tokenizer=tokenizer)
    if "onnx" in config.engines and not config.engine_dir:
        opt = engines["eager"] if config.eager_passes == config.passes and "eager" in engines else \
            tokopt.optimize(model, OptimizeConfig(passes=tuple(config.passes)), tokenizer=tokenizer)
        if any(m in PPD_METHODS for m in config.methods):  # the engine carries the trained prompt-token slots
            add_ppd_slots(opt.graph_module, model)
    if "onnx" in config.engines:
        engines["onnx"] = tokopt.load_engine(cached_engine_dir(config, opt, model), model=model)  # for drafting
    for b in config.baselines:
        extra = {"prompt_lookup_num_tokens": 10} if b == "hf-lookup" else {}

        def run_hf(ids, mask, extra=extra):
            with torch.inference_mode():
                return model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, **extra), None
        runners[b] = run_hf
    specs = {}
    for e, opt in engines.items():
        runners[e] = lambda ids, mask, opt=opt: (opt.generate(ids, mask, max_new_tokens=n), None)
        for m in config.methods:
            cfg = SpeculativeConfig(m, budget=config.budget)
            if hasattr(cfg, "persist"):  # every repeat starts cold: no state saved by an earlier run or process
                cfg = dataclasses.replace(cfg, persist=False)
            specs[f"{e}+{m}"] = (opt, cfg)
    return runners, specs


def run_speculative_bench(config: SpecBenchConfig) -> dict:
    import tokopt
    from tqdm.auto import tqdm

    from tokopt.runtime.prompts import encode_prompts

    questions = spec_bench(config.questions, config.per_category)
    model, tokenizer = tokopt.load(config.model)
    runners, specs = _runners(config, model, tokenizer)
    eos = set(tokopt.api.optimized_model.GenerationDefaults.from_model(model).eos_token_ids)
    encoded = [encode_prompts(tokenizer, [q["question"]]) for q in questions]
    names = list(runners) + list(specs)
    records = []
    bar = tqdm(total=config.repeats * len(questions) * len(names), desc="spec bench", unit="run", disable=quiet())
    for r in range(config.repeats):
        for opt, cfg in specs.values():  # untimed warm-up (lazy init, latency profiles, draft layers)
            opt.with_speculative(cfg).generate(*encode_prompts(tokenizer, ["Hello"]), max_new_tokens=4)
        fresh = {name: opt.with_speculative(cfg) for name, (opt, cfg) in specs.items()}  # drafters start afresh
        for i, (ids, mask) in enumerate(encoded):
            order = names[(i + r) % len(names):] + names[:(i + r) % len(names)]
            for name in order:
                before = guess_counts(fresh[name].drafter) if name in fresh else None
                start = time.perf_counter()
                if name in fresh:
                    seq = fresh[name].generate(ids, mask, max_new_tokens=config.max_new_tokens)
                    stats = fresh[name].last_stats
                else:
                    seq, stats = runners[name](ids, mask)
                seconds = time.perf_counter() - start
                after = guess_counts(fresh[name].drafter) if before is not None else None
                records.append({"repeat": r, "question": i, "category": questions[i]["category"], "runner": name,
                                "tokens": count_new(seq[0], ids.shape[1], eos), "seconds": seconds,
                                "mat": stats.mat if stats else None,
                                "steps": stats.steps if stats else None,
                                "tree_sizes": sorted(set(stats.tree_sizes)) if stats else None,
                                "guesses": None if after is None else (after - before).tolist(),
                                "output": seq[0, ids.shape[1]:].tolist()})
                bar.update()
    bar.close()
    results = summarize(config, questions, names, records)
    write_reports(results, Path(config.out))
    return results


def _reference(name: str) -> str:
    return name.split("+")[0]


def guess_counts(drafter):
    """PPD drafters: ``[k, 3]`` counts per guess depth (depth d guesses the token d + 1 after the last accepted
    one): trials (its parent was accepted), top-1 hits, hits within the drafter's ranks (top-10 by default);
    None for other drafters."""
    from tokopt.runtime.speculative.drafters.ppd import ParallelPromptDecoding

    if not isinstance(drafter, ParallelPromptDecoding):
        return None
    s = drafter.stats
    k = drafter.k
    return torch.stack([s.trials[1:k + 1], s.hits[1:k + 1, 0], s.hits[1:k + 1].sum(1)], 1)


def _versus_recycling(name: str) -> str | None:
    """``engine+recycling`` for another method of the same engine that builds on it (ppd+recycling, ...)."""
    engine, _, method = name.partition("+")
    return f"{engine}+recycling" if method and method != "recycling" else None


def summarize(config, questions, names, records) -> dict:
    cats = list(dict.fromkeys(q["category"] for q in questions))
    groups = {c: [c] for c in cats} | {"overall": cats}
    table = {}
    for group, members in groups.items():
        rows = {}
        for name in names:
            tps = []
            for r in range(config.repeats):
                sel = [x for x in records if x["runner"] == name and x["repeat"] == r and x["category"] in members]
                tps.append(sum(x["tokens"] for x in sel) / max(sum(x["seconds"] for x in sel), 1e-9))
            rows[name] = tps
        entry = {}
        for name in names:
            e = {"tokens_per_s": statistics.median(rows[name])}
            for ref in {_reference(name), _versus_recycling(name), *config.baselines} - {None}:
                if ref != name and ref in rows:
                    e[f"speedup_vs_{ref}"] = statistics.median(a / b for a, b in zip(rows[name], rows[ref]))
            mats = [x["mat"] for x in records if x["runner"] == name and x["category"] in members and x["mat"]]
            if mats:
                e["mat"] = statistics.mean(mats)
            entry[name] = e
        table[group] = entry
    identical = {}
    for name in names:
        ref = _reference(name)
        if ref == name:
            continue
        pairs = [(x, y) for x in records for y in records if x["runner"] == name and y["runner"] == ref
                 and x["repeat"] == y["repeat"] and x["question"] == y["question"]]
        identical[name] = f"{sum(x['output'] == y['output'] for x, y in pairs)}/{len(pairs)}"
    sizes = {name: sorted({s for x in records if x["runner"] == name and x["tree_sizes"] for s in x["tree_sizes"]})
             for name in names if "+" in name}
    guesses = {}
    for name in names:
        counts = [torch.tensor(x["guesses"], dtype=torch.float64) for x in records if x["runner"] == name and x.get("guesses")]
        if counts:
            total = torch.stack(counts).sum(0)  # [k, 3]
            trials = total[:, 0].clamp_min(1)
            guesses[name] = {"trials": total[:, 0].tolist(), "top1": (total[:, 1] / trials).tolist(),
                             "any_rank": (total[:, 2] / trials).tolist()}
    return {
        "command": "tokopt " + " ".join(sys.argv[1:]) if sys.argv and "tokopt" in sys.argv[0] else "",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": describe(),
        "config": asdict(config),
        "questions": len(questions),
        "categories": cats,
        "table": table,
        "identical_to_plain_greedy": identical,
        "tree_sizes": sizes,
        "ppd_guess_acceptance": guesses,
        "records": records,
    }


def markdown(results: dict) -> str:
    m, cfg = results["machine"], results["config"]
    names = list(results["table"]["overall"])
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads); "
             f"{results['date']}", "",
             f"Greedy, {results['questions']} Spec-Bench questions ({cfg['per_category']} per category) x "
             f"{cfg['max_new_tokens']} new tokens, {cfg['repeats']} repeats, runners interleaved; medians over "
             "repeats.", ""]
    header = "| runner | tok/s | MAT | vs same-engine greedy | vs same-engine recycling | vs HF greedy | vs HF lookup |"
    for group, entry in [("overall", results["table"]["overall"])] + [
            (g, e) for g, e in results["table"].items() if g != "overall"]:
        lines += [f"**{group}**", "", header, "|---|---|---|---|---|---|---|"]
        for name in names:
            e = entry[name]
            ref = _reference(name)

            def f(key):
                return f"{e[key]:.2f}x" if key in e else "-"
            lines.append(f"| {name} | {e['tokens_per_s']:.2f} | {e['mat']:.2f} | " if "mat" in e else
                         f"| {name} | {e['tokens_per_s']:.2f} | - | ")
            rec = _versus_recycling(name)
            lines[-1] += (f"{f('speedup_vs_' + ref)} | {f('speedup_vs_' + rec) if rec else '-'} | "
                          f"{f('speedup_vs_hf')} | {f('speedup_vs_hf-lookup')} |")
        lines.append("")
    lines.append("Outputs identical to the same engine's plain greedy: " +
                 ", ".join(f"{k}: {v}" for k, v in results["identical_to_plain_greedy"].items()))
    lines.append("Tree sizes used (nodes incl. root): " +
                 ", ".join(f"{k}: {v}" for k, v in results["tree_sizes"].items()))
    for name, g in results.get("ppd_guess_acceptance", {}).items():
        lines.append(f"PPD guesses of {name}, by position after the last accepted token (given its predecessor was "
                     "accepted): " + "; ".join(f"t+{d + 2}: top-1 {a:.2f}, top-10 {b:.2f} "
                                              f"({int(n)} steps)" for d, (n, a, b) in
                                              enumerate(zip(g["trials"], g["top1"], g["any_rank"]))))
    if results.get("command"):
        lines += ["", f"Command: `{results['command']}`"]
    return "\n".join(lines) + "\n"


def write_reports(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "spec_bench.json").write_text(json.dumps(results, indent=1))
    (out / "spec_bench.md").write_text(markdown(results))
    plot(results, out / "spec_bench.png")
    print(markdown(results))
    print(f"wrote {out / 'spec_bench.json'}, {out / 'spec_bench.md'}, {out / 'spec_bench.png'}")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = results["categories"] + ["overall"]
    spec = [n for n in results["table"]["overall"] if "+" in n]
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(groups) * max(len(spec), 1) / 2 + 3), 3.6))
    width = 0.8 / max(len(spec), 1)
    for k, name in enumerate(spec):
        ref = "speedup_vs_" + _reference(name)
        values = [results["table"][g][name].get(ref, 0) for g in groups]
        ax.bar([i + k * width for i in range(len(groups))], values, width, label=name)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))], groups, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("speedup vs plain greedy (same engine)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
