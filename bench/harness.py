"""``tokopt bench``: greedy tokens/s of HF ``generate``, tokopt's eager loop and its ONNX Runtime engine.

All engines run the same prompts in one process, interleaved (engine order rotates per prompt), for several
repeats; each repeat gives tokens/s per engine (new tokens / wall time over all prompts) and ratios between
engines, and the report gives their medians, so machine noise hits every engine alike. Outputs are also
compared token for token. Writes ``bench.json``, ``bench.md`` and ``bench.png`` to the output directory.

Example::

    run_bench(BenchConfig(prompts=8, repeats=3))
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import torch

from tokopt.errors import TokoptError
from tokopt.api.optimize import DEFAULT_PASSES
from tokopt.data import first_turns
from tokopt.machine import describe
from tokopt.progress import progress_step, quiet

ENGINES = ("hf", "eager", "onnx")


@dataclass
class BenchConfig:
    model: str | None = None
    prompts: int = 8
    questions: str | None = None
    max_new_tokens: int = 64
    repeats: int = 3
    engines: tuple = ENGINES
    engine_dir: str | None = None
    out: str = "bench/out"
    passes: tuple = field(default_factory=lambda: DEFAULT_PASSES)




def count_new(sequence: torch.Tensor, prompt_len: int, eos_ids) -> int:
    new = sequence[prompt_len:].tolist()
    for i, t in enumerate(new):
        if t in eos_ids:
            return i + 1
    return len(new)


def _runners(config: BenchConfig):
    import tokopt
    from tokopt.api.optimize import OptimizeConfig

    model, tokenizer = tokopt.load(config.model)
    runners = {}
    opt = None
    if "eager" in config.engines or ("onnx" in config.engines and config.engine_dir is None):
        opt = tokopt.optimize(model, OptimizeConfig(passes=tuple(config.passes)), tokenizer=tokenizer)
    if "hf" in config.engines:
        def run_hf(ids, mask):
            with torch.inference_mode():
                return model.generate(ids, attention_mask=mask, max_new_tokens=config.max_new_tokens, do_sample=False)
        runners["hf"] = run_hf
    if "eager" in config.engines:
        runners["eager"] = lambda ids, mask: opt.generate(ids, mask, max_new_tokens=config.max_new_tokens)
    if "onnx" in config.engines:
        ort_opt = tokopt.load_engine(cached_engine_dir(config, opt, model))
        runners["onnx"] = lambda ids, mask: ort_opt.generate(ids, mask, max_new_tokens=config.max_new_tokens)
    eos = set(opt.defaults.eos_token_ids if opt else tokopt.api.optimized_model.GenerationDefaults.from_model(model).eos_token_ids)
    return runners, tokenizer, eos


def cached_engine_dir(config, opt, model) -> Path:
    from tokopt.export.engine_dir import export_engine, read_manifest
    from tokopt.errors import EngineError
    from tokopt.models.loading import DEFAULT_MODEL
    from tokopt.paths import cache_dir

    if config.engine_dir:
        return Path(config.engine_dir)
    name = Path(str(config.model or DEFAULT_MODEL)).name
    path = cache_dir() / "engines" / f"{name}-{'-'.join(config.passes) or 'nopasses'}{_slots_tag(opt)}"
    try:
        read_manifest(path)
        return path
    except EngineError:
        with progress_step(f"exporting the ONNX engine once into {path}"):
            return export_engine(opt, path, model_config=model.config.to_dict(), model_name=name)


def _slots_tag(opt) -> str:
    """Engine-cache name part for a graph with PPD prompt slots: their count and a hash of the embeddings (a
    retrained artifact gets a new engine)."""
    import hashlib

    gm = getattr(opt, "graph_module", None)
    if gm is None or opt.engine.facts.ppd is None:
        return ""
    from tokopt.passes.ppd_slots import TABLE

    table = getattr(gm, TABLE)
    return f"-ppd{table.shape[0]}-{hashlib.sha1(table.numpy().tobytes()).hexdigest()[:8]}"


def run_bench(config: BenchConfig) -> dict:
    from tqdm.auto import tqdm

    from tokopt.runtime.prompts import encode_prompts

    if config.repeats < 1 or config.max_new_tokens < 1:
        raise TokoptError("--repeats and --max-new-tokens must be >= 1")
    unknown = set(config.engines) - set(ENGINES)
    if unknown or not config.engines:
        raise TokoptError(f"unknown bench engine(s) {sorted(unknown)}; choose from {', '.join(ENGINES)}")
    prompts = first_turns(config.questions, config.prompts)
    runners, tokenizer, eos = _runners(config)
    encoded = [encode_prompts(tokenizer, [p]) for p in prompts]
    names = list(runners)
    # one untimed warm-up per engine (first-call allocations, lazy init)
    for name in names:
        runners[name](*encode_prompts(tokenizer, ["Hello"]))
    per_repeat = {n: [] for n in names}
    outputs: dict[str, list] = {n: [None] * len(prompts) for n in names}
    bar = tqdm(total=config.repeats * len(prompts) * len(names), desc="tokopt bench", unit="run", disable=quiet())
    for r in range(config.repeats):
        tokens = {n: 0 for n in names}
        seconds = {n: 0.0 for n in names}
        for i, (ids, mask) in enumerate(encoded):
            order = names[(i + r) % len(names):] + names[:(i + r) % len(names)]
            for name in order:
                start = time.perf_counter()
                seq = runners[name](ids, mask)
                seconds[name] += time.perf_counter() - start
                tokens[name] += count_new(seq[0], ids.shape[1], eos)
                outputs[name][i] = seq[0].tolist()
                bar.update()
        for n in names:
            per_repeat[n].append(tokens[n] / seconds[n])
    bar.close()
    results = summarize(config, prompts, per_repeat, outputs)
    write_reports(results, Path(config.out))
    return results


def summarize(config, prompts, per_repeat, outputs) -> dict:
    names = list(per_repeat)
    medians = {n: statistics.median(v) for n, v in per_repeat.items()}
    ratios = {}
    for a, b in (("eager", "hf"), ("onnx", "eager"), ("onnx", "hf")):
        if a in per_repeat and b in per_repeat:
            ratios[f"{a}/{b}"] = statistics.median(x / y for x, y in zip(per_repeat[a], per_repeat[b]))
    identical = {}
    for n in names[1:]:
        identical[f"{n} vs {names[0]}"] = sum(outputs[n][i] == outputs[names[0]][i] for i in range(len(prompts)))
    return {
        "command": "tokopt " + " ".join(sys.argv[1:]) if sys.argv and "tokopt" in sys.argv[0] else "",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": describe(),
        "config": asdict(config),
        "prompts": len(prompts),
        "tokens_per_s_per_repeat": per_repeat,
        "tokens_per_s_median": medians,
        "ratios_median": ratios,
        "identical_outputs": {k: f"{v}/{len(prompts)}" for k, v in identical.items()},
    }


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads); "
             f"{results['date']}", "",
             f"Greedy, {results['prompts']} prompts x {results['config']['max_new_tokens']} new tokens, "
             f"{results['config']['repeats']} repeats, engines interleaved.", "",
             "| engine | tokens/s (median) | per repeat |", "|---|---|---|"]
    for n, v in results["tokens_per_s_median"].items():
        runs = ", ".join(f"{x:.1f}" for x in results["tokens_per_s_per_repeat"][n])
        lines.append(f"| {n} | {v:.2f} | {runs} |")
    lines += ["", "| ratio (median of per-repeat ratios) | value |", "|---|---|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in results["ratios_median"].items()]
    lines += ["", "Identical greedy outputs: " + ", ".join(f"{k}: {v}" for k, v in results["identical_outputs"].items())]
    if results.get("command"):
        lines += ["", f"Command: `{results['command']}`"]
    return "\n".join(lines) + "\n"


def write_reports(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(results, indent=2))
    (out / "bench.md").write_text(markdown(results))
    plot(results, out / "bench.png")
    print(markdown(results))
    print(f"wrote {out / 'bench.json'}, {out / 'bench.md'}, {out / 'bench.png'}")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["tokens_per_s_median"])
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.bar(names, [results["tokens_per_s_median"][n] for n in names], color="#4a7fb5", alpha=0.8, label="median")
    for i, n in enumerate(names):
        runs = results["tokens_per_s_per_repeat"][n]
        ax.scatter([i] * len(runs), runs, color="black", s=12, zorder=3, label="repeats" if i == 0 else None)
    ax.set_ylabel("new tokens / s (greedy)")
    ax.set_title(f"{results['prompts']} prompts x {results['config']['max_new_tokens']} tokens, "
                 f"{results['machine']['cores']} cores", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
