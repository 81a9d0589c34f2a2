"""Weight-only quantized ONNX Runtime engines: what int8 / int4 cost in quality and what they buy in speed.

Exports the default model (SmolLM2-135M-Instruct, default passes) once as an fp32 ONNX engine and quantizes copies
of it (``tokopt.export.quantize``): int8 (MatMulNBits bits=8, blocks of 32), int4 (MatMulNBits bits=4, blocks of
32) and, for the speed comparison only, int8 "dynamic" (``quantize_dynamic``: MatMulInteger, activations quantized
per tensor at run time, which makes rows depend on each other, so it is not used for engines). Then:

- held-out perplexity: windows of the tail of ``tokopt.data.calibration_text()`` (or ``--text FILE``), every
  position's logits from one prefill;
- greedy agreement with fp32 on Spec-Bench questions: identical answers, and the mean length of the common prefix;
- greedy tokens/s of each engine on the same questions (engines interleaved, median of ``--repeats``);
- lossless check: each quantized engine's Token Recycling output equals its own greedy output.

    .venv/bin/python bench/quantize_quality.py --out bench/quantize_quality.json

The CPU is shared with other jobs: timings are noisy (the JSON keeps every repeat).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import tokopt
from tokopt.data import calibration_text, spec_bench
from tokopt.export.engine_dir import export_engine
from tokopt.export.quantize import quantize_onnx
from tokopt.runtime.prompts import encode_prompts
from tokopt.runtime.request import prefill_rows

VARIANTS = ("fp32", "int8", "int4", "int8-dynamic")


def held_out_tokens(tokenizer, text_file, windows: int, length: int) -> list[torch.Tensor]:
    text = Path(text_file).read_text(errors="ignore") if text_file else calibration_text()
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    tail = ids[-windows * length:]  # the tail: text the rest of tokopt does not calibrate on first
    return [tail[i * length:(i + 1) * length][None] for i in range(len(tail) // length)]


def perplexity(engine, windows) -> float:
    nll, count = 0.0, 0
    for ids in windows:
        n = ids.shape[1]
        out, _ = prefill_rows(engine, ids, torch.ones_like(ids, dtype=torch.bool), torch.arange(n - 1))
        logp = torch.log_softmax(out.logits[0].float(), dim=-1)
        nll -= logp.gather(1, ids[0, 1:, None]).sum().item()
        count += n - 1
    return math.exp(nll / count)


def common_prefix(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench/quantize_quality.json")
    ap.add_argument("--questions", type=int, default=6)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--text", default=None, help="held-out text file (default: the calibration text's tail)")
    ap.add_argument("--engines-dir", default=None, help="keep the engines here (default: a temporary folder)")
    ap.add_argument("--reuse", action="store_true", help="reuse the fp32 engine in --engines-dir")
    args = ap.parse_args(argv)

    model, tokenizer = tokopt.load()
    opt = tokopt.optimize(model, tokenizer=tokenizer)
    root = Path(args.engines_dir or tempfile.mkdtemp(prefix="tokopt-quant-"))
    dirs, export_s, sizes, info = {}, {}, {}, {}
    for variant in VARIANTS:
        path = root / variant
        start = time.perf_counter()
        if variant == "fp32" and (path / "manifest.json").is_file() and args.reuse:
            info[variant] = None  # an fp32 engine exported by an earlier run
        elif variant == "fp32":
            export_engine(opt, path, model_config=model.config.to_dict(), model_name="smollm2-135m-instruct")
            export_s[variant] = time.perf_counter() - start
            info[variant] = None
        else:  # what export_engine(quantize=) does after the export, on a copy of the fp32 engine
            if path.exists():
                shutil.rmtree(path)
            shutil.copytree(root / "fp32", path)
            mode, method = ("int8", "dynamic") if variant == "int8-dynamic" else (variant, "nbits")
            info[variant] = quantize_onnx(path / "model.onnx", mode, int8_method=method)
            manifest = json.loads((path / "manifest.json").read_text())
            manifest["quantize"] = info[variant]
            (path / "manifest.json").write_text(json.dumps(manifest, indent=2))
            export_s[variant] = time.perf_counter() - start
        dirs[variant] = path
        sizes[variant] = sum(f.stat().st_size for f in path.glob("model.onnx*"))
        print(f"{variant}: {sizes[variant] / 2**20:.1f} MiB", file=sys.stderr)
    engines = {v: tokopt.load_engine(d) for v, d in dirs.items()}

    windows = held_out_tokens(tokenizer, args.text, args.windows, args.window)
    ppl = {v: perplexity(e.engine, windows) for v, e in engines.items()}
    print(f"perplexity: {ppl}", file=sys.stderr)

    questions = [q["question"] for q in spec_bench(per_category=1)][:args.questions]
    prompts = [encode_prompts(tokenizer, [q]) for q in questions]
    answers = {v: [] for v in engines}
    times = {v: [] for v in engines}
    for rep in range(args.repeats):
        for v, e in engines.items():  # interleaved, so drift in the machine's load spreads over all
            tokens, seconds, outs = 0, 0.0, []
            for ids, mask in prompts:
                start = time.perf_counter()
                out = e.generate(ids, mask, max_new_tokens=args.max_new_tokens)
                seconds += time.perf_counter() - start
                new = out[0, ids.shape[1]:].tolist()
                tokens += len(new)
                outs.append(new)
            times[v].append(tokens / seconds)
            if rep == 0:
                answers[v] = outs
    agreement = {}
    for v in engines:
        same = sum(a == b for a, b in zip(answers[v], answers["fp32"]))
        prefix = [common_prefix(a, b) for a, b in zip(answers[v], answers["fp32"])]
        agreement[v] = {"identical_answers": same, "questions": len(questions),
                        "mean_common_prefix_tokens": statistics.mean(prefix), "common_prefix": prefix}
    lossless = {}
    for v in ("int8", "int4"):
        spec = tokopt.load_engine(dirs[v], speculative="recycling")
        rows = []
        for (ids, mask), greedy in zip(prompts, answers[v]):
            out = spec.generate(ids, mask, max_new_tokens=args.max_new_tokens)
            rows.append(out[0, ids.shape[1]:].tolist() == greedy)
        lossless[v] = {"recycling_equals_greedy": all(rows), "rows": rows}
    tps = {v: statistics.median(t) for v, t in times.items()}
    result = {
        "model": "SmolLM2-135M-Instruct", "engine": "onnxruntime", "passes": list(opt.config.passes),
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
        "date": time.strftime("%Y-%m-%d"), "max_new_tokens": args.max_new_tokens, "repeats": args.repeats,
        "held_out": {"source": args.text or "calibration_text() tail", "windows": len(windows),
                     "tokens_per_window": args.window},
        "quantize": info, "export_s": export_s, "graph_bytes": sizes, "perplexity": ppl,
        "agreement_with_fp32": agreement, "tokens_per_s": tps, "tokens_per_s_repeats": times,
        "speedup_vs_fp32": {v: tps[v] / tps["fp32"] for v in tps}, "lossless": lossless,
        "note": "CPU shared with other agents' jobs: tokens/s are noisy; int8-dynamic is measured for speed only "
                "(per-tensor activation scales couple the rows of a step, so speculative != greedy)",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    for v in engines:
        print(f"{v:>13}: {sizes[v] / 2**20:6.1f} MiB  ppl {ppl[v]:7.3f}  identical {agreement[v]['identical_answers']}"
              f"/{len(questions)}  prefix {agreement[v]['mean_common_prefix_tokens']:.1f}  {tps[v]:.1f} tok/s "
              f"({tps[v] / tps['fp32']:.2f}x)")
    print(f"lossless: {lossless}")
    if not args.engines_dir:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
