"""Tokens/s of the eager and inductor engines (``tokopt.optimize(model, engine=...)``) on the default model:
greedy plain decode, engines interleaved (order rotates per repeat), medians of the repeats, JSON out.
Compile time (the first calls) is reported apart and not in the rates; ``compiles`` counts inductor's graphs.

Usage::

    .venv/bin/python -m tokopt.bench.inductor_engine --repeats 5 --new-tokens 32 --out inductor.json

For ONNX Runtime beside eager on the same prompts: ``tokopt bench --engines eager,onnx``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Write a short poem about the sea."]


def run(repeats: int = 5, new_tokens: int = 32, speculative=None) -> dict:
    import tokopt

    model, tokenizer = tokopt.load(progress=False)
    eager = tokopt.optimize(model, tokenizer=tokenizer)
    start = time.perf_counter()
    inductor = tokopt.optimize(model, tokenizer=tokenizer, engine="inductor")
    engines = {"eager": eager.with_speculative(speculative), "inductor": inductor.with_speculative(speculative)}
    ids = [tokenizer(p, return_tensors="pt").input_ids for p in PROMPTS]
    for x in ids:  # warm-up: inductor compiles here
        engines["inductor"].generate(x, max_new_tokens=new_tokens)
    compile_s = time.perf_counter() - start
    rates = {name: [] for name in engines}
    same = True
    for r in range(repeats):
        order = list(engines) if r % 2 == 0 else list(reversed(engines))
        outs = {}
        for name in order:
            tokens, seconds = 0, 0.0
            for x in ids:
                t = time.perf_counter()
                out = engines[name].generate(x, max_new_tokens=new_tokens)
                seconds += time.perf_counter() - t
                tokens += out.shape[1] - x.shape[1]
                outs.setdefault(name, []).append(out)
            rates[name].append(tokens / seconds)
        same &= all(torch.equal(a, b) for a, b in zip(outs["eager"], outs["inductor"]))
    return {"repeats": repeats, "new_tokens": new_tokens, "prompts": len(PROMPTS),
            "speculative": speculative, "threads": torch.get_num_threads(),
            "tokens_per_s_median": {k: statistics.median(v) for k, v in rates.items()},
            "tokens_per_s_all": rates, "inductor_compile_and_warmup_s": compile_s,
            "inductor_compiles": inductor.engine.compiles, "tokens_identical": same}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--speculative", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    result = run(args.repeats, args.new_tokens, args.speculative)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
