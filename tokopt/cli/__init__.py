"""The ``tokopt`` command: generate, export, bench, train-specdec, passes (layer: a leaf, nothing imports it).

Errors in what the user gave (a model, a prompt, an engine directory) print one line and exit 2; set
``TOKOPT_DEBUG=1`` for a traceback.

Example::

    tokopt generate "What is the capital of France?"
    tokopt export --target onnx -o engines/smollm2
    tokopt export --target pt2 -o engines/smollm2-pt2
    tokopt generate --engine engines/smollm2 "What is the capital of France?"
    tokopt bench --prompts 8 --repeats 3
    tokopt train-specdec --max-tokens 8000 --epochs 2
    tokopt passes
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys


def _add_sampling(p):
    g = p.add_argument_group("decoding")
    g.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate at most (default 128)")
    g.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=50, help="0 disables (default 50, as HF)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None, help="makes sampling repeatable")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop a row once it contains TEXT")


def _add_passes(p):
    p.add_argument("--passes", default=None,
                   help="comma-separated passes to run, in order (default: the default pipeline; '' for none)")


def _add_ep(p, ep_help):
    ep = p.add_argument_group("expert parallelism (MoE models, e.g. --model smollm2-moe)")
    ep.add_argument("--ep", type=int, default=None, metavar="N", help=ep_help)
    ep.add_argument("--ep-strategy", default=None, choices=["context_coherent", "two_alltoall"],
                    help="one Alltoall per MoE layer with K/V on every rank (ExFlow; default), or dispatch + combine")
    ep.add_argument("--placement", default=None, metavar="MAP.json", help="expert placement from `tokopt place`")


def _add_speculative(p):
    from tokopt.runtime.speculative.methods import METHODS

    g = p.add_argument_group("speculative decoding (lossless)")
    g.add_argument("--speculative", default=None, metavar="NAME",
                   help=f"draft and verify trees of tokens: {', '.join(METHODS)}")
    g.add_argument("--budget", default="auto", metavar="N",
                   help="draft nodes per step, or 'auto' (recycling: sized from this machine's measured latency)")


def _add_target(p):
    from tokopt.export.engine_dir import DEPRECATED_TARGETS, TARGETS

    rows = ", ".join(f"{name} ({t.description})" for name, t in TARGETS.items())
    p.add_argument("--target", default=None, choices=[*TARGETS, *DEPRECATED_TARGETS],
                   metavar="{" + ",".join(TARGETS) + "}",
                   help=f"{rows}. With --ep: pt2 (the default; one torch program per rank). "
                        f"{', '.join(DEPRECATED_TARGETS)}: the old name of {', '.join(DEPRECATED_TARGETS.values())}")


def _target(args) -> None:
    """``--target``: an old name (ep) becomes its new one (pt2), with one line on stderr."""
    from tokopt.export.engine_dir import DEPRECATED_TARGETS, deprecated_target_message

    if args.target in DEPRECATED_TARGETS:
        print(f"tokopt: warning: {deprecated_target_message(args.target)}", file=sys.stderr)
        args.target = DEPRECATED_TARGETS[args.target]


def _speculative(args):
    from tokopt.errors import TokoptError
    from tokopt.runtime.speculative.methods import SpeculativeConfig

    if not args.speculative:
        return None
    budget = args.budget
    if budget != "auto":
        try:
            budget = int(budget)
        except ValueError:
            raise TokoptError(f"--budget must be 'auto' or a number of draft nodes, got {budget!r}") from None
    return SpeculativeConfig(args.speculative, budget=budget)


def _config(args):
    from tokopt.api.optimize import DEFAULT_PASSES, OptimizeConfig

    if args.passes is None:
        return OptimizeConfig(passes=DEFAULT_PASSES)
    return OptimizeConfig(passes=tuple(p.strip() for p in args.passes.split(",") if p.strip()))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokopt", description="Optimize, export and run LLMs for fast inference.")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text for one or more prompts",
                       description="Generate an answer for each PROMPT (chat template applied for chat models), "
                                   "with the default model, --model, or an exported --engine directory.")
    g.add_argument("prompts", nargs="+", metavar="PROMPT")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, help="model name or local HF directory (default: SmolLM2-135M-Instruct)")
    src.add_argument("--engine", default=None, metavar="DIR", help="an engine directory written by `tokopt export`")
    g.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    g.add_argument("--report", action="store_true", help="print the pass report and timings")
    _add_passes(g)
    _add_speculative(g)
    _add_sampling(g)
    u = g.add_argument_group("uncertainty")
    u.add_argument("--uncertainty", action="store_true",
                   help="record per-token uncertainty: tokens coloured by entropy (on a terminal) and a summary")
    u.add_argument("--html", default=None, metavar="FILE", help="with --uncertainty: write a self-contained HTML report")
    _add_ep(g, "shard the experts over N processes (gloo); an --engine exported with --ep runs on its own ranks")

    e = sub.add_parser("export", help="export an engine directory ahead of time",
                       description="Capture MODEL, run the passes and lower it to an engine directory.")
    e.add_argument("model", nargs="?", default=None, help="model name or local HF directory (default: SmolLM2)")
    _add_target(e)
    e.add_argument("-o", "--output", required=True, metavar="DIR", help="engine directory to write")
    _add_passes(e)
    e.add_argument("--speculative", default=None, metavar="NAME",
                   help="the speculative method the engine decodes with by default (ppd, ppd+recycling: the graph "
                        "gets the trained prompt-token slots); recorded in the manifest")
    e.add_argument("--uncertainty", action="store_true",
                   help="add the uncertainty taps (logit_taps, attention_taps) so the engine records per-token "
                        "uncertainty (load it with --uncertainty)")
    e.add_argument("--quantize", default=None, metavar="{int8,int4}",
                   help="weight-only quantized ONNX engine: the MatMul weights (LM head included) become "
                        "com.microsoft.MatMulNBits, 8- or 4-bit blocks of 32 (tokopt.export.quantize)")
    _add_ep(e, "an expert-parallel engine: one weight file per rank holding only its experts (MoE models; "
               "run it with `tokopt generate --engine DIR`)")

    b = sub.add_parser("bench", help="tokens/s of tokopt (eager, ONNX Runtime) against HF generate",
                       description="Greedy tokens/s of HF generate, tokopt's eager loop and its ONNX Runtime engine on "
                                   "the same prompts in one run, repeated; medians and ratios to JSON + markdown.")
    b.add_argument("model", nargs="?", default=None, help="model name or local HF directory (default: SmolLM2)")
    b.add_argument("--prompts", type=int, default=8, help="number of prompts (default 8)")
    b.add_argument("--questions", default=None, metavar="JSONL",
                   help="Spec-Bench-style questions file (default: the sample shipped with tokopt)")
    b.add_argument("--max-new-tokens", type=int, default=64)
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--engines", default="hf,eager,onnx", help="comma-separated from hf, eager, onnx")
    b.add_argument("--engine", default=None, metavar="DIR",
                   help="ONNX engine directory (default: exported once into the tokopt cache)")
    b.add_argument("--out", default="bench/out", metavar="DIR", help="where to write bench.json, bench.md, bench.png")
    b.add_argument("--speculative", default=None, metavar="METHODS",
                   help="compare speculative methods (comma-separated, e.g. recycling,lookup) against plain greedy, "
                        "HF greedy and HF prompt lookup per Spec-Bench category; --engines then takes eager,onnx")
    b.add_argument("--per-category", type=int, default=2, help="questions per category (speculative suite)")
    b.add_argument("--budget", default="auto", metavar="N", help="draft nodes per step, or 'auto' (speculative suite)")
    b.add_argument("--remeasure", action="store_true",
                   help="first delete the cached verify-latency profiles and Token Recycling states (cache folders "
                        "latency/ and recycling/): this run measures and learns them again")
    b.add_argument("--suite", default="speed", choices=["speed", "uncertainty"],
                   help="speed (default): tokens/s; uncertainty: PRR/ROC-AUC of every uncertainty estimator on "
                        "questions with checkable answers, and the taps' cost")
    b.add_argument("--per-kind", type=int, default=40,
                   help="uncertainty suite: questions per kind (capitals, arithmetic, cloze with --corpus)")
    b.add_argument("--corpus", default=None, metavar="TEXT",
                   help="uncertainty suite: a text file (one sentence per line) for next-word cloze questions")
    b.add_argument("--estimators", default=None, metavar="NAMES",
                   help="uncertainty suite: comma-separated estimators (default: all)")
    b.add_argument("--peers", default=None, choices=["ortgenai"],
                   help="peer benchmark: tokopt against ONNX Runtime GenAI (fp32, int4, n-gram) in separate "
                        "processes on the same prompts; needs pip install 'tokopt[peers]'")
    b.add_argument("--rounds", type=int, default=2, help="peer benchmark: interleaved rounds (default 2)")
    _add_passes(b)

    t = sub.add_parser("train-specdec", help="train the SpecDec++ acceptance head for a target/draft pair",
                       description="Run MODEL and its draft teacher-forced over text, train the head that predicts "
                                   "whether a drafted token is accepted, and save it where `--speculative specdec++` "
                                   "finds it (a few minutes on CPU).")
    t.add_argument("model", nargs="?", default=None, help="model name or local HF directory (default: SmolLM2)")
    t.add_argument("--text", action="append", default=[], metavar="PATH",
                   help="a text file or a folder of .txt files; repeatable (default: the offline corpus in "
                        "shared/data/corpus)")
    t.add_argument("--draft-model", default=None, metavar="NAME_OR_PATH",
                   help="a draft model sharing the tokenizer (default: the self-speculative draft)")
    t.add_argument("--max-tokens", type=int, default=24_000, metavar="N",
                   help="training examples (tokens) at most (default 24000: about 3 minutes for SmolLM2-135M)")
    t.add_argument("--epochs", type=int, default=3, metavar="N", help="passes over the examples (default 3)")
    t.add_argument("-o", "--output", default=None, metavar="PATH",
                   help="where to save the head (default: the tokopt cache, where specdec++ looks for it)")

    sub.add_parser("passes", help="list the registered graph passes")
    for module in SUBCOMMAND_MODULES:  # each adds its own subcommand(s), with set_defaults(handler=...)
        importlib.import_module(module).add_parser(sub)
    return parser


def cmd_generate(args) -> int:
    import tokopt
    from tokopt.errors import PromptError
    from tokopt.runtime.prompts import decode_new_tokens, encode_prompts

    if any(not p.strip() for p in args.prompts):  # before minutes of loading and capture
        raise PromptError("empty prompt: give a non-blank PROMPT, e.g. tokopt generate \"What is the capital of France?\"")
    speculative = _speculative(args)
    if args.ep is not None or (args.engine and _is_ep_engine(args.engine)):
        return _generate_ep(args, speculative)
    if args.html and not args.uncertainty:
        raise tokopt.TokoptError("--html writes the uncertainty report: add --uncertainty")
    if args.engine:
        opt = tokopt.load_engine(args.engine, speculative=speculative, uncertainty=args.uncertainty)
        if opt.tokenizer is None:
            raise tokopt.TokoptError(f"{args.engine} has no tokenizer/ folder; re-export it with `tokopt export`")
    else:
        config = _config(args)
        model, tokenizer = tokopt.load(args.model)
        if tokenizer is None:
            raise tokopt.TokoptError(f"{args.model} has no tokenizer files; text prompts need one")
        opt = tokopt.optimize(model, config, speculative=speculative, uncertainty=args.uncertainty,
                              tokenizer=tokenizer)
    ids, mask = encode_prompts(opt.tokenizer, args.prompts, chat=False if args.no_chat else None)
    out = opt.generate(ids, mask, max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                       temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                       stop_strings=args.stop)
    records = opt.last_uncertainty if args.uncertainty else None
    for i, text in enumerate(decode_new_tokens(opt.tokenizer, out, ids.shape[1])):
        if len(args.prompts) > 1:
            print(f"--- [{i}] {args.prompts[i]}")
        if records is not None and sys.stdout.isatty():
            from tokopt.uncertainty.show import ansi_tokens

            print(ansi_tokens(opt.tokenizer, records[i]))
        else:
            print(text.strip())
        if records is not None:
            from tokopt.uncertainty.show import summary_line

            print(f"uncertainty: {summary_line(records[i], opt.tokenizer)}", file=sys.stderr)
    if args.html:
        from pathlib import Path

        from tokopt.uncertainty.show import html_report

        Path(args.html).write_text(html_report(args.prompts, opt.tokenizer, records), encoding="utf-8")
        print(f"wrote {args.html}", file=sys.stderr)
    if args.report:
        r = opt.last_result
        tokens = int(r.generated_counts.sum())
        print(f"\n{opt.report}\n\nengine {opt.engine.name}: prefill {r.prefill_s:.2f} s, {tokens} tokens in "
              f"{r.decode_s:.2f} s ({tokens / max(r.prefill_s + r.decode_s, 1e-9):.1f} tokens/s overall)",
              file=sys.stderr)
        if r.stats is not None:
            print(f"speculative {opt.speculative.method}: {r.stats.steps} verify steps, mean accepted tokens per "
                  f"step (MAT) {r.stats.mat:.2f}, tree sizes {sorted(set(r.stats.tree_sizes))}", file=sys.stderr)
    return 0


def _generate_ep(args, speculative) -> int:
    from tokopt.errors import TokoptError
    from tokopt.api.expert_parallel import generate_text_ep, print_summary

    if args.ep is not None and args.ep < 1:
        raise TokoptError(f"--ep must be a number of processes >= 1, got {args.ep}")
    unsupported = [flag for flag, on in (("--speculative", speculative), ("--sample", args.sample),
                                         ("--stop", args.stop), ("--uncertainty", args.uncertainty)) if on]
    if unsupported:
        raise TokoptError(f"expert-parallel generation is greedy decoding (not {', '.join(unsupported)}); drop "
                          "those flags")
    texts, result = generate_text_ep(args.engine or args.model or "smollm2-moe", args.prompts, ranks=args.ep,
                                     strategy=args.ep_strategy, placement=args.placement,
                                     max_new_tokens=args.max_new_tokens, chat=False if args.no_chat else None)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 speaks for all
        return 0
    for i, text in enumerate(texts):
        if len(args.prompts) > 1:
            print(f"--- [{i}] {args.prompts[i]}")
        print(text.strip())
    if args.report:
        print("\n".join(f"{r['name']}: {r['detail'] or r['why_not']}" for r in result.reports), file=sys.stderr)
    print_summary(result)
    return 0


def _is_ep_engine(path) -> bool:
    from tokopt.export.ep_engine import is_ep_engine

    return is_ep_engine(path)


def _export_ep(args) -> int:
    import tokopt
    from tokopt.export.ep_engine import export_ep_engine, load_ep_engine
    from tokopt.errors import TokoptError
    from tokopt.moe.placement import Placement

    if args.ep < 1:
        raise TokoptError(f"--ep must be a number of ranks >= 1, got {args.ep}")
    if args.target not in (None, "pt2"):
        raise TokoptError(f"--ep exports each rank's step program for the torch runtime (its Alltoalls run in "
                          f"torch.distributed between ops), not --target {args.target}; use --target pt2 or drop it")
    unsupported = [flag for flag, on in (("--passes", args.passes is not None), ("--speculative", args.speculative),
                                         ("--uncertainty", args.uncertainty)) if on]
    if unsupported:
        raise TokoptError(f"--ep engines run the expert-parallel passes only (not {', '.join(unsupported)}); drop "
                          "those flags")
    placement = Placement.from_json(args.placement).assignment if args.placement else None
    model, tokenizer = tokopt.load(args.model or "smollm2-moe")
    path = export_ep_engine(model, args.output, ranks=args.ep, strategy=args.ep_strategy or "context_coherent",
                            placement=placement, tokenizer=tokenizer, model_name=str(args.model or "smollm2-moe"))
    ranks = load_ep_engine(path).manifest["expert_parallel"]
    print(f"wrote an expert-parallel engine for {args.ep} ranks to {path}: "
          + ", ".join(f"{r['file']} {r['bytes'] / 2**20:.1f} MiB" for r in ranks["ranks"])
          + f" (whole model {ranks['model_bytes'] / 2**20:.1f} MiB)")
    return 0


def cmd_export(args) -> int:
    import tokopt
    from tokopt.export.engine_dir import export_engine, get_target
    from tokopt.export.quantize import check_quantize

    _target(args)
    quantize = check_quantize(args.quantize)  # a bad value fails before anything loads
    if quantize is not None and args.ep is not None:
        raise tokopt.TokoptError("--quantize quantizes single-process ONNX engines; drop --ep or --quantize")
    if args.ep is not None:
        return _export_ep(args)
    args.target = args.target or "onnx"
    if quantize is not None and args.target != "onnx":
        raise tokopt.TokoptError(f"--quantize {quantize} quantizes ONNX Runtime engines (--target onnx), not "
                                 f"--target {args.target}")
    if args.ep_strategy or args.placement:
        raise tokopt.TokoptError("--ep-strategy and --placement shape an expert-parallel engine: add --ep N")
    config = _config(args)  # bad pass names fail before the model loads
    row = get_target(args.target)
    if row.check is not None:  # so does a missing dependency (torch-tensorrt)
        row.check()
    model, tokenizer = tokopt.load(args.model)
    opt = tokopt.optimize(model, config, uncertainty=args.uncertainty, speculative=args.speculative,
                          tokenizer=tokenizer)
    path = export_engine(opt, args.output, target=args.target, model_config=model.config.to_dict(),
                         model_name=str(args.model or tokopt.models.loading.DEFAULT_MODEL), quantize=quantize)
    print(f"wrote {args.target} engine{f' ({quantize} weights)' if quantize else ''} to {path}\n{opt.report}")
    return 0


def cmd_bench(args) -> int:
    from tokopt.bench.harness import BenchConfig, run_bench

    if args.remeasure:
        from tokopt.runtime.speculative.persist import forget_states
        from tokopt.runtime.speculative.tree_size import forget_profiles

        print(f"deleted {len(forget_profiles())} latency profile(s) and {len(forget_states('recycling'))} "
              "Token Recycling state(s); measuring again")
    if args.peers:
        from tokopt.bench.peers import PeerMissing, PeersConfig, check_peer, run_peers_bench

        try:
            check_peer(args.peers)
        except PeerMissing as exc:
            print(f"tokopt: {exc}", file=sys.stderr)
            return 2
        out = args.out if args.out != "bench/out" else "bench/out/peers"
        run_peers_bench(PeersConfig(model=args.model, prompts=args.prompts, questions=args.questions,
                                    max_new_tokens=args.max_new_tokens, rounds=args.rounds, engine_dir=args.engine,
                                    out=out), peer=args.peers)
        return 0
    if args.suite == "uncertainty":
        from tokopt.bench.uncertainty import ESTIMATORS_BENCHED, UncertaintyBenchConfig, run_uncertainty_bench
        from tokopt.uncertainty.estimators import check_estimators

        estimators = ESTIMATORS_BENCHED if not args.estimators else check_estimators(
            tuple(e.strip() for e in args.estimators.split(",") if e.strip()))
        out = args.out if args.out != "bench/out" else "bench/out/uncertainty_quality"
        run_uncertainty_bench(UncertaintyBenchConfig(model=args.model, per_kind=args.per_kind, corpus=args.corpus,
                                                     estimators=estimators, overhead_repeats=args.repeats, out=out))
        return 0
    engines = tuple(e.strip() for e in args.engines.split(",") if e.strip())
    passes = _config(args).passes
    if args.speculative:
        from tokopt.bench.speculative import SpecBenchConfig, run_speculative_bench

        budget = _speculative(argparse.Namespace(speculative="recycling", budget=args.budget)).budget
        config = SpecBenchConfig(
            model=args.model, methods=tuple(m.strip() for m in args.speculative.split(",") if m.strip()),
            engines=tuple(e for e in engines if e != "hf"), baselines=("hf", "hf-lookup") if "hf" in engines else (),
            questions=args.questions, per_category=args.per_category, max_new_tokens=args.max_new_tokens,
            repeats=args.repeats, budget=budget, engine_dir=args.engine, out=args.out, passes=passes)
        run_speculative_bench(config)
        return 0
    config = BenchConfig(model=args.model, prompts=args.prompts, questions=args.questions,
                         max_new_tokens=args.max_new_tokens, repeats=args.repeats, engines=engines,
                         engine_dir=args.engine, out=args.out, passes=passes)
    run_bench(config)
    return 0


def cmd_train_specdec(args) -> int:
    from pathlib import Path

    from tokopt.runtime.speculative.methods import SpeculativeConfig
    from tokopt.training.specdec import train_specdec

    result = train_specdec(args.model, config=SpeculativeConfig("specdec++", draft_model=args.draft_model),
                           texts=[Path(t) for t in args.text] or None, max_tokens=args.max_tokens,
                           epochs=args.epochs, out=args.output)
    m = result.metrics
    print(f"{m['examples']} examples ({m['val_examples']} held out) in {m['seconds']:.1f} s; acceptance rate "
          f"greedy {m['positive_rate_greedy']:.3f}, sampling {m['positive_rate_sampling']:.3f}")
    print(f"validation ({m['label']} label): AUC {m['val_auc']:.3f} (draft top probability alone "
          f"{m['val_auc_draft_confidence']:.3f}), accuracy {m['val_accuracy']:.3f}, balanced "
          f"accuracy {m['val_balanced_accuracy']:.3f}, BCE {m['val_bce']:.4f} (constant predictor "
          f"{m['val_bce_constant']:.4f}, train {m['train_bce']:.4f}, reject weight {m['reject_weight']:g})")
    print(f"wrote {result.path} (loss curve {result.plot})")
    return 0


def cmd_passes(args) -> int:
    from tokopt.api.optimize import DEFAULT_PASSES
    from tokopt.passes.manager import registered_passes

    passes = registered_passes()
    width = max(len(n) for n in passes)
    for name, p in passes.items():
        mark = "*" if name in DEFAULT_PASSES else " "
        print(f"{mark} {name.ljust(width)}  {p.description}")
    print("\n* = in the default pipeline (order: " + ", ".join(DEFAULT_PASSES) + ")")
    return 0


# Modules that define further subcommands: ``add_parser(sub)`` adds them with ``set_defaults(handler=fn)``.
SUBCOMMAND_MODULES: list[str] = ["tokopt.cli.plan", "tokopt.cli.place", "tokopt.cli.trace",
                                 "tokopt.cli.ppd"]

COMMANDS = {"generate": cmd_generate, "export": cmd_export, "bench": cmd_bench, "train-specdec": cmd_train_specdec,
            "passes": cmd_passes}


def main(argv=None) -> int:
    from tokopt.errors import TokoptError

    args = build_parser().parse_args(argv)
    debug = os.environ.get("TOKOPT_DEBUG", "") not in ("", "0")
    try:
        handler = getattr(args, "handler", None) or COMMANDS[args.command]
        return handler(args)
    except TokoptError as exc:
        if debug:
            raise
        print(f"tokopt: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tokopt: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # an unexpected failure: still one line unless debugging
        if debug:
            raise
        print(f"tokopt: internal error: {type(exc).__name__}: {exc} (set TOKOPT_DEBUG=1 for the traceback)",
              file=sys.stderr)
        return 1
