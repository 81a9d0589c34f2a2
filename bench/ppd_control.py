"""PPD's long-range guesses with the trained prompt tokens against the untrained ones (the control), online.

Both variants decode the same Spec-Bench questions greedily with ``speculative="ppd"`` in the eager engine (``tokopt.api.optimize``), in one
fixed shape that drafts every position (6 guess nodes, 2 chains of all 3 prompt tokens; one capture each; the control's prompt embeddings are the mean token embedding, which is where training starts) and
report, per position after the last accepted token (t+2, t+3, t+4), how often the prompt token's top-1 and top-10
guesses were the emitted token (given the previous position was accepted), MAT, tokens/s, and the extra memory
PPD holds at run time: the prompt table, and the peak KV cache against plain decoding's. Writes
bench/ppd_control.json.

    OMP_NUM_THREADS=1 .venv/bin/python bench/ppd_control.py --questions ../shared/data/spec_bench/questions.jsonl
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


import tokopt
from tokopt.machine import describe
from tokopt.bench.speculative import guess_counts
from tokopt.data import spec_bench
from tokopt.passes.ppd_slots import TABLE
from tokopt.progress import progress_bar
from tokopt.models import kv_cache
from tokopt.runtime.prompts import encode_prompts
from tokopt.runtime.speculative.drafters.ppd import PPDConfig
from tokopt.runtime.speculative.methods import SpeculativeConfig, add_ppd_slots
from tokopt.runtime.artifacts import load_ppd_artifact


class PeakCache:
    """Peak bytes of the KV cache tensors seen by ``KVCache.extend`` while active."""

    def __init__(self):
        self.peak = 0
        self._orig = kv_cache.KVCache.extend

    def __enter__(self):
        orig, tracker = self._orig, self

        def extend(cache, present, new_valid):
            out = orig(cache, present, new_valid)
            tracker.peak = max(tracker.peak, sum(t.numel() * t.element_size() for t in out.tensors))
            return out
        kv_cache.KVCache.extend = extend
        return self

    def __exit__(self, *exc):
        kv_cache.KVCache.extend = self._orig


def variant(model, tokenizer, artifact):
    """``tokopt.optimize(model)`` (its own capture) with ``artifact``'s prompt embeddings in the slots."""
    opt = tokopt.optimize(model, tokenizer=tokenizer)
    add_ppd_slots(opt.graph_module, model, artifact)
    return opt


# Every position measured: all 3 prompt tokens on every chain and a fixed tree (the latency rule would drop the
# far positions on this CPU, see bench/RESULTS.md), the same shape for both variants.
LONG_RANGE = SpeculativeConfig("ppd", budget=6, ppd=PPDConfig(chain_nodes=2, chain_len=3))


def decode(opt, prompts, method, max_new_tokens):
    spec = opt.with_speculative(LONG_RANGE if method else None)
    before = guess_counts(spec.drafter)
    tokens = seconds = 0
    mats = []
    with PeakCache() as peak:
        for ids, mask in progress_bar(prompts, desc=f"decoding ({method or 'plain'})", unit="question"):
            start = time.perf_counter()
            out = spec.generate(ids, mask, max_new_tokens=max_new_tokens)
            seconds += time.perf_counter() - start
            tokens += out.shape[1] - ids.shape[1]
            if spec.last_stats:
                mats.append(spec.last_stats.mat)
    row = {"tokens_per_s": tokens / seconds, "peak_kv_bytes": peak.peak,
           "mat": sum(mats) / len(mats) if mats else 1.0}
    if before is not None:
        total = guess_counts(spec.drafter) - before
        trials = total[:, 0].clamp_min(1)
        row |= {"trials": total[:, 0].tolist(), "top1": (total[:, 1] / trials).tolist(),
                "top10": (total[:, 2] / trials).tolist()}
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--questions", default=None)
    ap.add_argument("--per-category", type=int, default=1)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--out", default="bench/ppd_control.json")
    args = ap.parse_args()
    model, tokenizer = tokopt.load(None)
    trained = load_ppd_artifact(model)
    embed = model.model.embed_tokens.weight
    control = {**trained, "embeddings": embed.detach().mean(0, keepdim=True).repeat(trained["k"], 1)}
    prompts = [encode_prompts(tokenizer, [q["question"]])
               for q in spec_bench(args.questions, args.per_category)]
    results = {"machine": describe(), "questions": len(prompts), "max_new_tokens": args.max_new_tokens}
    for name, artifact in (("trained", trained), ("untrained control", control)):
        opt = variant(model, tokenizer, artifact)
        results[name] = decode(opt, prompts, "ppd", args.max_new_tokens)
        table = getattr(opt.graph_module, TABLE)
        results[name]["table_bytes"] = table.numel() * table.element_size()
    results["plain"] = decode(opt, prompts, None, args.max_new_tokens)
    Path(args.out).write_text(json.dumps(results, indent=1))
    for name in ("trained", "untrained control"):
        r = results[name]
        per = "; ".join(f"t+{d + 2}: top-1 {a:.2f} top-10 {b:.2f} ({int(n)})"
                        for d, (n, a, b) in enumerate(zip(r["trials"], r["top1"], r["top10"])))
        print(f"{name}: MAT {r['mat']:.2f}, {r['tokens_per_s']:.2f} tok/s; {per}; peak KV {r['peak_kv_bytes']} B")
    print(f"plain: {results['plain']['tokens_per_s']:.2f} tok/s, peak KV {results['plain']['peak_kv_bytes']} B; "
          f"prompt table {results['trained']['table_bytes']} B; wrote {args.out}")


if __name__ == "__main__":
    main()
