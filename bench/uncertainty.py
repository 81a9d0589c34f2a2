"""The uncertainty benchmark suite (``tokopt bench --suite uncertainty``): how well each estimator flags wrong
answers, and what the taps cost.

Quality: SmolLM2 answers short questions with checkable answers (``uncertainty.qa_task``: capitals, arithmetic,
and next-word cloze on real text when a corpus is given) greedily with ``uncertainty=True``; every estimator
scores the answer's tokens (the first line); PRR and ROC-AUC against correctness, with a bootstrap 90% interval
and a random-score control. Cost: tokens/s of the same decoding with the default passes, with ``logit_taps`` and
with ``logit_taps`` + ``attention_taps`` (interleaved repeats, medians), and each estimator's seconds per answer.

Writes ``OUT.json``, ``OUT.md`` and ``OUT.png``.

Example::

    run_uncertainty_bench(UncertaintyBenchConfig(per_kind=40, out="bench/uncertainty_quality"))
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from tokopt.progress import progress_bar, progress_step

ESTIMATORS_BENCHED = ("msp", "perplexity", "mean_entropy", "max_entropy", "self_certainty", "rauq", "ccp",
                      "token_sar", "uqac")


@dataclass
class UncertaintyBenchConfig:
    model: str | None = None
    per_kind: int = 40
    seed: int = 0
    corpus: str | None = None  # a text file for cloze questions (e.g. ../shared/data/corpus/kjv_bible.txt)
    estimators: tuple = ESTIMATORS_BENCHED
    batch: int = 8
    max_new_tokens: int = 24
    overhead_repeats: int = 3
    bootstrap: int = 1000
    out: str = "bench/uncertainty_quality"
    extra: dict = field(default_factory=dict)


@dataclass
class Answer:
    text: str  # the generation
    records: list  # per generated token
    span: tuple  # the answer's tokens in records
    prompt_ids: torch.Tensor


def generate_answers(opt, items, batch: int, max_new_tokens: int) -> list:
    """Greedy answers with records, one ``Answer`` per item."""
    from tokopt.runtime.prompts import encode_prompts
    from tokopt.uncertainty.qa_task import answer_token_span

    out = []
    for start in progress_bar(range(0, len(items), batch), desc="answering", unit="batch"):
        chunk = items[start:start + batch]
        ids, mask = encode_prompts(opt.tokenizer, [it.prompt for it in chunk], chat=False)
        seqs = opt.generate(ids, mask, max_new_tokens=max_new_tokens, stop_strings=["\n"])
        for b, recs in enumerate(opt.last_uncertainty):
            tokens = [r["token"] for r in recs]
            span = answer_token_span(chunk[b].kind, opt.tokenizer, tokens)
            out.append(Answer(opt.tokenizer.decode(tokens), recs, span, ids[b][mask[b].bool()]))
    return out


def score_answers(opt, items, answers, estimators):
    """Per estimator, the scores of every answer (of its answer tokens; UQAC: of the response up to the answer's
    end, with the answer span; NaN where the estimator refused the answer, counted in ``failures``) and the
    seconds spent."""
    from tokopt.errors import TokoptError
    from tokopt.uncertainty.estimators import ScoringContext, score_sequence

    scores = {e: [] for e in estimators}
    seconds = {e: 0.0 for e in estimators}
    failures = {e: [] for e in estimators}
    for item, ans in progress_bar(list(zip(items, answers)), desc="scoring", unit="answer"):
        start, end = ans.span
        context = opt.tokenizer.decode([r["token"] for r in ans.records[:start]])
        ctx = ScoringContext(tokenizer=opt.tokenizer, model=opt.model, prompt_ids=ans.prompt_ids,
                             prompt_text=item.prompt + context)
        for e in estimators:
            t0 = time.perf_counter()
            try:
                if e == "uqac":
                    ctx.answer_span = (start, end)
                    value = score_sequence(ans.records[:end], (e,), ctx)[e]
                else:
                    value = score_sequence(ans.records[start:end], (e,), ctx)[e]
            except TokoptError as exc:
                value = float("nan")
                failures[e].append(f"{item.question}: {exc}")
            scores[e].append(value)
            seconds[e] += time.perf_counter() - t0
    return scores, seconds, failures


def bootstrap_interval(fn, scores, correct, n: int, seed: int) -> list:
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n):
        idx = rng.integers(0, len(correct), len(correct))
        if correct[idx].all() or not correct[idx].any():
            continue
        values.append(fn(scores[idx], correct[idx]))
    if not values:
        return [float("nan"), float("nan")]
    return [float(np.percentile(values, 5)), float(np.percentile(values, 95))]


def quality_table(scores: dict, correct: np.ndarray, n_boot: int, seed: int) -> dict:
    from tokopt.uncertainty.evaluation import prr, roc_auc

    rows = {}
    controls = {"random": np.random.default_rng([seed, 7]).random(len(correct))}  # a stream of its own
    for name, values in {**scores, **controls}.items():
        s = np.asarray(values, dtype=np.float64)
        ok = np.isfinite(s)  # answers an estimator refused are left out of its row (and counted)
        s, c = s[ok], correct[ok]
        q = c.astype(np.float64)
        rows[name] = {"n": int(ok.sum()),
            "prr": prr(s, q), "roc_auc": roc_auc(s, ~c),
            "prr_90": bootstrap_interval(lambda a, k: prr(a, k.astype(np.float64)), s, c, n_boot, seed),
            "roc_auc_90": bootstrap_interval(lambda a, k: roc_auc(a, ~k), s, c, n_boot, seed),
        }
    return rows


def tap_overhead(model, tokenizer, repeats: int, prompts: list, max_new_tokens: int = 48) -> dict:
    """Decoding tokens/s with the default passes, + logit_taps, + logit_taps and attention_taps (same prompts,
    interleaved repeats, medians)."""
    import tokopt
    from tokopt.api.optimize import DEFAULT_PASSES, OptimizeConfig
    from tokopt.runtime.prompts import encode_prompts

    variants = {
        "default passes": (OptimizeConfig(DEFAULT_PASSES), False),
        "+ logit_taps": (OptimizeConfig((*DEFAULT_PASSES, "logit_taps")), True),
        "+ logit_taps + attention_taps": (OptimizeConfig((*DEFAULT_PASSES, "logit_taps", "attention_taps")), True),
    }
    opts = {}
    for name, (config, records) in variants.items():
        with progress_step(f"capturing the {name} graph"):
            opt = tokopt.optimize(model, config)
        opt.uncertainty = records  # records as a user gets them (the attention variant adds the tail forward)
        opts[name] = opt
    ids, mask = encode_prompts(tokenizer, prompts, chat=False)
    for opt in opts.values():  # warm-up
        opt.generate(ids, mask, max_new_tokens=4)
    rates = {name: [] for name in opts}
    for _ in progress_bar(range(repeats), desc="tap overhead", unit="round"):
        for name, opt in opts.items():
            t0 = time.perf_counter()
            out = opt.generate(ids, mask, max_new_tokens=max_new_tokens)
            _ = opt.last_uncertainty  # building the records is part of the cost
            elapsed = time.perf_counter() - t0
            rates[name].append(int(opt.last_result.generated_counts.sum()) / elapsed)
            del out
    med = {name: statistics.median(v) for name, v in rates.items()}
    base = med["default passes"]
    return {name: {"tokens_per_s": med[name], "runs": rates[name], "relative": med[name] / base} for name in med}


def run_uncertainty_bench(config: UncertaintyBenchConfig) -> dict:
    import tokopt
    from tokopt.uncertainty.qa_task import answer_text, build_items, is_correct

    torch.manual_seed(config.seed)
    cloze = Path(config.corpus).read_text(encoding="utf-8") if config.corpus else None
    items = build_items(config.per_kind, config.seed, cloze)
    model, tokenizer = tokopt.load(config.model)
    with progress_step("capturing the decoder graph with uncertainty taps"):
        opt = tokopt.optimize(model, uncertainty=True, tokenizer=tokenizer)
    answers = generate_answers(opt, items, config.batch, config.max_new_tokens)
    correct = np.array([is_correct(it, ans.text) for it, ans in zip(items, answers)])
    scores, seconds, failures = score_answers(opt, items, answers, config.estimators)
    table = quality_table(scores, correct, config.bootstrap, config.seed)
    kinds = sorted({it.kind for it in items})
    per_kind = {}
    for kind in kinds:
        sel = np.array([it.kind == kind for it in items])
        if correct[sel].all() or not correct[sel].any():
            continue
        per_kind[kind] = {"n": int(sel.sum()), "accuracy": float(correct[sel].mean()),
                          **{e: quality_table({e: np.asarray(scores[e])[sel]}, correct[sel], 0, config.seed)[e]["prr"]
                             for e in config.estimators}}
    overhead = tap_overhead(model, tokenizer, config.overhead_repeats, [it.prompt for it in items[:4]])
    result = {
        "config": asdict(config),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "questions": len(items), "accuracy": float(correct.mean()),
        "counts": {k: int(sum(it.kind == k for it in items)) for k in kinds},
        "quality": table, "per_kind_prr": per_kind,
        "seconds_per_answer": {e: seconds[e] / len(items) for e in config.estimators},
        "failures": failures,
        "tap_overhead": overhead,
        "examples": [{"kind": it.kind, "question": it.question, "generated": ans.text.split("\n")[0],
                      "answer": answer_text(it.kind, ans.text), "correct": bool(c),
                      **{e: scores[e][i] for e in config.estimators}}
                     for i, (it, ans, c) in enumerate(zip(items, answers, correct)) if i < 12],
    }
    out = Path(config.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(markdown(result))
    plot(result, out.with_suffix(".png"))
    print(markdown(result))
    return result


def markdown(result: dict) -> str:
    q = result["quality"]
    order = sorted((n for n in q if n != "random"), key=lambda n: -q[n]["prr"]) + ["random"]
    lines = [f"{result['questions']} questions ({', '.join(f'{k}: {v}' for k, v in result['counts'].items())}), "
             f"accuracy {result['accuracy']:.3f}; {result['machine']}",
             "", "| estimator | n | PRR | 90% CI | ROC-AUC | 90% CI | s / answer |", "|---|---|---|---|---|---|---|"]
    for name in order:
        r = q[name]
        sec = result["seconds_per_answer"].get(name)
        lines.append(f"| {name} | {r['n']} | {r['prr']:.3f} | {r['prr_90'][0]:.2f}..{r['prr_90'][1]:.2f} | {r['roc_auc']:.3f} | "
                     f"{r['roc_auc_90'][0]:.2f}..{r['roc_auc_90'][1]:.2f} | "
                     f"{'-' if sec is None else f'{sec:.4f}'} |")
    if result["per_kind_prr"]:
        ests = [n for n in order if n != "random"]
        lines += ["", "PRR per kind of question:", "", "| kind | n | accuracy | " + " | ".join(ests) + " |",
                  "|---" * (3 + len(ests)) + "|"]
        for kind, r in result["per_kind_prr"].items():
            lines.append(f"| {kind} | {r['n']} | {r['accuracy']:.2f} | " + " | ".join(f"{r[e]:.2f}" for e in ests) + " |")
    lines += ["", "Tap overhead (decoding tokens/s, medians, same run):", "", "| graph | tokens/s | relative |",
              "|---|---|---|"]
    for name, r in result["tap_overhead"].items():
        lines.append(f"| {name} | {r['tokens_per_s']:.1f} | {r['relative']:.3f} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    q = result["quality"]
    names = sorted((n for n in q if n != "random"), key=lambda n: -q[n]["prr"]) + ["random"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in ((axes[0], "prr", "PRR (higher is better; random = 0)"),
                           (axes[1], "roc_auc", "ROC-AUC of wrong answers (random = 0.5)")):
        values = [q[n][key] for n in names]
        lo = [q[n][key] - q[n][f"{key}_90"][0] for n in names]
        hi = [q[n][f"{key}_90"][1] - q[n][key] for n in names]
        colors = ["#888" if n == "random" else "#3a7" for n in names]
        ax.bar(names, values, yerr=[lo, hi], color=colors, capsize=3)
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", rotation=45)
        ax.axhline(0.5 if key == "roc_auc" else 0.0, color="k", lw=0.6)
    fig.suptitle(f"SmolLM2-135M, {result['questions']} questions, accuracy {result['accuracy']:.2f} "
                 "(bars: 90% bootstrap)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
