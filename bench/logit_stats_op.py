"""The taps' logit statistics per step: the aten composition the passes emitted before, the tokopt::logit_stats op
on each backend (torch reference, Numba CPU), and both lowered to ONNX Runtime (the composition, and the op's
standard-op translation), interleaved in one run at SmolLM2's vocabulary, medians over repeats.

    OMP_NUM_THREADS=1 .venv/bin/python bench/logit_stats.py --out bench/logit_stats.json

Rows: 1 (a decode step), 16 and 64 (verify trees of Token Recycling / PPD).
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

from tokopt.kernels import graph_ops, logit_stats
from tokopt.progress import progress_bar

VOCAB = 49152  # SmolLM2
ROWS = (1, 16, 64)


class Composition(torch.nn.Module):
    """What entropy_tap emitted before the op: log-softmax, exp, product, sum, max."""

    def forward(self, logits):
        logprobs = torch.log_softmax(logits, -1)
        return -(logprobs.exp() * logprobs).sum(-1), logprobs.amax(-1)


class Op(torch.nn.Module):
    def forward(self, logits):
        entropy, max_logprob, _ = torch.ops.tokopt.logit_stats(logits)
        return entropy, max_logprob


def ort_session(module, path):
    import onnxruntime as ort

    batch, rows = torch.export.Dim("batch"), torch.export.Dim("rows")
    program = torch.export.export(module, (torch.randn(2, 2, VOCAB),), dynamic_shapes=({0: batch, 1: rows},))
    torch.onnx.export(program, (), dynamo=True, verbose=False,
                      custom_translation_table=graph_ops.onnx_translation_table()).save(str(path))
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(os.environ.get("OMP_NUM_THREADS", "1"))
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x.numpy()})


def with_backend(backend, fn):
    def call(x):
        os.environ["TOKOPT_KERNELS"] = backend
        return fn(x)
    return call


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--calls", type=int, default=10, help="calls per timed repeat")
    ap.add_argument("--out", type=Path, default=Path("bench/logit_stats.json"))
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        variants = {
            "aten composition (eager)": Composition(),
            "logit_stats, reference (eager)": with_backend("reference", Op()),
            "logit_stats, Numba CPU (eager)": with_backend("numba", Op()),
            "aten composition (ORT)": ort_session(Composition(), Path(tmp) / "composition.onnx"),
            "logit_stats translation (ORT)": ort_session(Op(), Path(tmp) / "op.onnx"),
        }
        times = {(name, r): [] for name in variants for r in ROWS}
        inputs = {r: 4 * torch.randn(1, r, VOCAB) for r in ROWS}
        for fn in variants.values():  # warm-up: Numba compiles (or loads its cache), ORT allocates
            for x in inputs.values():
                fn(x)
        for _ in progress_bar(range(args.repeats), desc="logit_stats bench", unit="repeat"):
            for r, x in inputs.items():
                for name, fn in variants.items():
                    start = time.perf_counter()
                    for _ in range(args.calls):
                        fn(x)
                    times[(name, r)].append((time.perf_counter() - start) / args.calls * 1e3)
    os.environ.pop("TOKOPT_KERNELS", None)
    base = "aten composition (eager)"
    rows = []
    for r in ROWS:
        ref = statistics.median(times[(base, r)])
        for name in variants:
            ms = statistics.median(times[(name, r)])
            rows.append({"rows": r, "variant": name, "median_ms": round(ms, 4), "vs_composition": round(ref / ms, 3)})
    result = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "threads": os.environ.get("OMP_NUM_THREADS"), "vocab": VOCAB, "repeats": args.repeats,
              "command": " ".join(["bench/logit_stats.py", *(argv or sys.argv[1:])]), "results": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"{'rows':>4}  {'variant':34s} {'median ms':>10} {'speed vs eager composition':>27}")
    for row in rows:
        print(f"{row['rows']:>4}  {row['variant']:34s} {row['median_ms']:>10.3f} {row['vs_composition']:>26.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
