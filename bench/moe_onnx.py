"""MoE experts in ONNX Runtime: the two standard-op lowerings of transformers' grouped_mm_fallback, end to end.

Exports smollm2-moe (30 MoE layers x 8 experts, top-4) to two ONNX engines that differ only in the experts'
lowering — "dense" (every expert for every row, the lowering before) and "switched" (gathered expert matrices for
at most E/2 rows, dense above; passes/lower_grouped_mm.py) — then greedy-decodes the same prompts on both,
interleaved, and reports median prefill and decode times and whether the tokens agree. A second part times one
expert projection alone at given shapes.

    OMP_NUM_THREADS=1 .venv/bin/python bench/moe_onnx.py --out bench/moe_onnx.json
"""

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import tokopt
from tokopt.export.engine_dir import export_engine
from tokopt.api.engines import load_engine
from tokopt.passes import lower_grouped_mm as lowering
from tokopt.progress import progress_bar

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain what a compiler does."]


def export_variant(opt, path, variant: str):
    """Export with the experts lowered as ``variant`` ("dense" or "switched")."""
    chosen = lowering.grouped_mm_lowered
    if variant == "dense":
        lowering.grouped_mm_lowered = lowering.grouped_mm_dense
    try:
        export_engine(opt, path, target="onnx", model_name="smollm2-moe")
    finally:
        lowering.grouped_mm_lowered = chosen
    return load_engine(path)


def projection_times(experts, k, n, rows, repeats=7):
    """Median ms of one expert projection [rows, k] x [E, k, n] in ORT, per lowering."""
    import onnxruntime as ort

    class Form(torch.nn.Module):
        def __init__(self, form):
            super().__init__()
            self.form = form
            self.weight = torch.nn.Parameter(torch.randn(experts, k, n) * 0.02, requires_grad=False)

        def forward(self, x, offs):
            return self.form(x, self.weight, offs)

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, form in (("dense", lowering.grouped_mm_dense), ("gathered", lowering.grouped_mm_gathered)):
            dim = torch.export.Dim("rows", min=1)
            program = torch.export.export(Form(form), (torch.randn(20, k), torch.arange(experts) % 21),
                                          dynamic_shapes=({0: dim}, None))
            path = Path(tmp) / f"{name}.onnx"
            torch.onnx.export(program, (), dynamo=True, verbose=False).save(str(path))
            options = ort.SessionOptions()
            options.intra_op_num_threads = int(os.environ.get("OMP_NUM_THREADS", "1"))
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            for r in rows:
                x = torch.randn(r, k)
                offs = torch.sort(torch.randint(0, r + 1, (experts,))).values
                offs[-1] = r
                feeds = {"x": x.numpy(), "offs": offs.numpy()}
                session.run(None, feeds)
                times = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    session.run(None, feeds)
                    times.append((time.perf_counter() - start) * 1e3)
                out.setdefault(r, {})[name] = round(statistics.median(times), 3)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=len(PROMPTS), help="batch size: the first N prompts (1-3)")
    ap.add_argument("--out", type=Path, default=Path("bench/moe_onnx.json"))
    args = ap.parse_args(argv)
    model, tokenizer = tokopt.load("smollm2-moe")
    opt = tokopt.optimize(model, tokenizer=tokenizer)
    from tokopt.runtime.prompts import encode_prompts

    prompts = PROMPTS[: max(1, min(args.prompts, len(PROMPTS)))]
    ids, mask = encode_prompts(tokenizer, prompts)
    with tempfile.TemporaryDirectory() as tmp:
        engines = {v: export_variant(opt, Path(tmp) / v, v) for v in ("dense", "switched")}
        runs = {v: {"prefill_s": [], "decode_s": []} for v in engines}
        tokens = {}
        for _ in progress_bar(range(args.repeats), desc="smollm2-moe ORT: dense vs switched experts", unit="repeat"):
            for name, engine in engines.items():
                out = engine.generate(ids, mask, max_new_tokens=args.max_new_tokens)
                runs[name]["prefill_s"].append(engine.last_result.prefill_s)
                runs[name]["decode_s"].append(engine.last_result.decode_s)
                tokens[name] = out
    generated = int(engines["switched"].last_result.generated_counts.sum())
    summary = {name: {"prefill_s": statistics.median(r["prefill_s"]), "decode_s": statistics.median(r["decode_s"]),
                      "decode_tokens_per_s": generated / statistics.median(r["decode_s"])} for name, r in runs.items()}
    shapes = {"gate_up (E=8, K=576, N=384)": projection_times(8, 576, 384, (1, 4, 8, 16, 64, 256)),
              "many experts (E=64, K=1024, N=1024)": projection_times(64, 1024, 1024, (2, 8, 32, 128))}
    result = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "threads": os.environ.get("OMP_NUM_THREADS"), "prompts": prompts, "batch": len(prompts),
              "max_new_tokens": args.max_new_tokens, "repeats": args.repeats,
              "tokens_identical": bool(torch.equal(tokens["dense"], tokens["switched"])),
              "engines": summary, "projection_ms": shapes,
              "command": " ".join(["bench/moe_onnx.py", *(argv or sys.argv[1:])])}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    for name, row in summary.items():
        print(f"{name:9s} prefill {row['prefill_s']:.2f} s, decode {row['decode_s']:.2f} s "
              f"({row['decode_tokens_per_s']:.1f} tokens/s)")
    print(f"decode speed-up switched vs dense: {summary['dense']['decode_s'] / summary['switched']['decode_s']:.2f}x; "
          f"tokens identical: {result['tokens_identical']}")
    for label, table in shapes.items():
        print(label + ": " + ", ".join(f"S={r}: {v['gathered']}/{v['dense']} ms" for r, v in table.items())
              + " (gathered/dense)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
