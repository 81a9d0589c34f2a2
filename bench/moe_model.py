"""smollm2-moe (issue 4): build time, held-out loss of dense vs MoEfied SmolLM2, a greedy sample, routing statistics.

Held-out text: three slices of the offline corpus (/work/shared/data/corpus: jargon, KJV bible, Python docs) where
it exists, else the tail of tokopt's calibration text. The routers are trained on tokopt's shipped calibration text
only, so the corpus is out-of-domain for them.

Usage: .venv/bin/python bench/moe_model.py [--top-k 2,4] [--clusters activations,weights] [--tokens 512] [--threads 1]
Writes bench/moe_model.json.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

import tokopt
from tokopt.moe.affinity import mi_bits
from tokopt.models.moefy import default_texts, moefy
from tokopt.moe.traces import record_trace

CORPUS = Path("/work/shared/data/corpus")
SLICES = (("jargon.txt", 200_000), ("kjv_bible.txt", 1_000_000), ("python311_docs.rst.txt", 3_000_000))
PROMPT = "The capital of France is"


def held_out_rows(tokenizer, tokens_per_source: int, seq_len: int = 256) -> tuple[torch.Tensor, str]:
    if CORPUS.is_dir():
        rows = []
        for name, offset in SLICES:
            text = (CORPUS / name).read_text(encoding="utf-8", errors="ignore")[offset: offset + 40_000]
            ids = tokenizer(text, add_special_tokens=False).input_ids[:tokens_per_source]
            rows += [torch.tensor(ids[i: i + seq_len]) for i in range(0, tokens_per_source, seq_len)]
        return torch.stack(rows), "corpus: " + ", ".join(f"{n}@{o}" for n, o in SLICES)
    ids = tokenizer(default_texts()[0], add_special_tokens=False).input_ids[-seq_len:]
    return torch.tensor(ids)[None], "tail of tokopt/data/calibration.txt (in-domain)"


@torch.no_grad()
def mean_nll(model, rows: torch.Tensor) -> float:
    total, count = 0.0, 0
    for row in rows:
        logits = model(row[None], use_cache=False).logits[0, :-1]
        total += torch.nn.functional.cross_entropy(logits, row[1:], reduction="sum").item()
        count += len(row) - 1
    return total / count


@torch.no_grad()
def greedy(model, tokenizer, n: int = 12) -> str:
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


@torch.no_grad()
def routing_trace(model, rows: torch.Tensor) -> np.ndarray:
    """Top-k experts of every token at every layer: [tokens, layers, top_k]."""
    return record_trace(model, [row[None] for row in rows]).experts


def routing_stats(trace: np.ndarray, num_experts: int, seed: int = 0) -> dict:
    tokens, layers, _ = trace.shape
    load = [np.bincount(trace[:, l].ravel(), minlength=num_experts) for l in range(layers)]
    max_over_mean = [float(c.max() / c.mean()) for c in load]
    rng = np.random.default_rng(seed)
    top1 = trace[:, :, 0]
    mi = [mi_bits(top1[:, l], top1[:, l + 1], num_experts) for l in range(layers - 1)]
    mi_shuffled = [mi_bits(top1[:, l], rng.permutation(top1[:, l + 1]), num_experts)
                   for l in range(layers - 1)]
    shares = [np.bincount(top1[:, l], minlength=num_experts) / tokens for l in range(layers)]
    entropy = [float(-(p[p > 0] * np.log2(p[p > 0])).sum()) for p in shares]
    return {
        "tokens": int(tokens),
        "load_max_over_mean_per_layer": [round(v, 3) for v in max_over_mean],
        "load_max_over_mean": {"mean": round(float(np.mean(max_over_mean)), 3), "max": round(max(max_over_mean), 3)},
        "top1_entropy_bits_mean": round(float(np.mean(entropy)), 3),
        "adjacent_mi_bits_per_layer": [round(v, 3) for v in mi],
        "adjacent_mi_bits_mean": round(float(np.mean(mi)), 4),
        "shuffled_mi_bits_mean": round(float(np.mean(mi_shuffled)), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--top-k", default="2,4")
    parser.add_argument("--clusters", default="activations", help="comma list: activations, weights")
    parser.add_argument("--tokens", type=int, default=512, help="held-out tokens per corpus source")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a shared 2-core machine 2 threads ran 4x slower, oversubscribed)")
    parser.add_argument("--out", default=str(Path(__file__).with_name("moe_model.json")))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    dense, tok = tokopt.load()
    rows, source = held_out_rows(tok, args.tokens)
    result = {"held_out": source, "held_out_tokens": int(rows.numel()), "threads": torch.get_num_threads()}
    nll = mean_nll(dense, rows)
    result["dense"] = {"nll": round(nll, 4), "ppl": round(math.exp(nll), 2), "greedy": greedy(dense, tok)}
    print("dense", result["dense"], flush=True)

    variants = []
    for cluster in args.clusters.split(","):
        for top_k in (int(k) for k in args.top_k.split(",")):
            start = time.perf_counter()
            moe = moefy(dense, tok, num_experts=8, top_k=top_k, cluster=cluster)
            build_s = time.perf_counter() - start
            nll = mean_nll(moe, rows)
            entry = {"cluster": cluster, "top_k": top_k, "build_s": round(build_s, 1), "nll": round(nll, 4),
                     "ppl": round(math.exp(nll), 2), "greedy": greedy(moe, tok)}
            if cluster == "activations":
                entry["routing"] = routing_stats(routing_trace(moe, rows), 8)
            variants.append(entry)
            print({k: v for k, v in entry.items() if k != "routing"}, flush=True)
            if "routing" in entry:
                r = entry["routing"]
                print("  load max/mean", r["load_max_over_mean"], "MI", r["adjacent_mi_bits_mean"],
                      "shuffled", r["shuffled_mi_bits_mean"], flush=True)
    result["moe"] = variants

    # the cached known model: first use builds it (timed), later loads read it back
    start = time.perf_counter()
    tokopt.load("smollm2-moe")
    first = time.perf_counter() - start
    start = time.perf_counter()
    tokopt.load("smollm2-moe")
    result["smollm2_moe_load_s"] = {"first": round(first, 1), "cached": round(time.perf_counter() - start, 1)}
    print(result["smollm2_moe_load_s"], flush=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
