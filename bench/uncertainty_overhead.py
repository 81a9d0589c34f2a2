"""Cost of the uncertainty taps on SmolLM2 decoding: tokens/s with the default passes vs + logit_taps and
per-token records (``uncertainty=True``), same prompts, same run, interleaved, medians.

    .venv/bin/python bench/uncertainty_overhead.py [--prompts 4] [--new 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from importlib import resources
from pathlib import Path

import torch

HERE = Path(__file__).parent


def main(argv=None):
    import tokopt
    from tokopt.runtime.prompts import encode_prompts
    from tokopt.runtime.speculative.tree_size import cpu_name

    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    model, tok = tokopt.load()
    rows = [json.loads(x) for x in resources.files("tokopt").joinpath("data/spec_bench_sample.jsonl")
            .read_text().splitlines() if x.strip()]
    ids, mask = encode_prompts(tok, [r["turns"][0] for r in rows[: args.prompts]])
    runners = {"default passes": tokopt.optimize(model), "+ logit_taps, records": tokopt.optimize(model, uncertainty=True)}
    times = {k: [] for k in runners}
    tokens = {}
    for rep in range(args.repeats):
        for name, opt in runners.items():
            start = time.perf_counter()
            out = opt.generate(ids, mask, max_new_tokens=args.new)
            times[name].append(time.perf_counter() - start)
            tokens[name] = int(opt.last_result.generated_counts.sum())
            print(f"  repeat {rep + 1}: {name}: {tokens[name] / times[name][-1]:.1f} tokens/s", file=sys.stderr)
    base = "default passes"
    result = {"machine": f"{cpu_name()}, {torch.get_num_threads()} threads", "prompts": args.prompts,
              "new_tokens": args.new, "repeats": args.repeats,
              "tokens_per_s": {k: tokens[k] / statistics.median(v) for k, v in times.items()},
              "command": "python bench/uncertainty_overhead.py " + " ".join(argv or sys.argv[1:])}
    tps = result["tokens_per_s"]
    result["overhead"] = {k: 1 - tps[k] / tps[base] for k in tps if k != base}
    (HERE / "uncertainty_overhead.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
