"""Token Recycling's per-(depth, rank) acceptance statistics on the real SmolLM2-135M-Instruct, measured on the CPU
over a few Spec-Bench questions and written to ``tokopt/data/acceptance_smollm2.json`` (read by bench/gpu_check.py
to predict the speedup of the tree size it picks on a GPU)::

    python bench/acceptance_profile.py [--questions 4] [--max-new-tokens 96]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--questions", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--budget", type=int, default=16)
    ap.add_argument("--out", default=str(REPO / "tokopt" / "data" / "acceptance_smollm2.json"))
    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO))
    import torch

    import tokopt
    from tokopt.data import first_turns
    from tokopt.runtime.prompts import encode_prompts
    from tokopt.runtime.speculative.decode import speculative_generate
    from tokopt.runtime.speculative.drafters.recycling import RecyclingConfig, TokenRecycling

    torch.manual_seed(0)
    start = time.perf_counter()
    model, tokenizer = tokopt.load()
    opt = tokopt.optimize(model)
    drafter = TokenRecycling(opt.engine.spec.vocab_size, RecyclingConfig(budget=args.budget))
    mats = []
    for q in first_turns(count=args.questions):
        ids, mask = encode_prompts(tokenizer, [q])
        res = speculative_generate(opt.engine, ids, mask, drafter=drafter, max_new_tokens=args.max_new_tokens,
                                   eos_token_ids=opt.defaults.eos_token_ids)
        mats.append(res.stats.mat)
    stats = drafter.stats
    out = {"model": "HuggingFaceTB/SmolLM2-135M-Instruct", "drafter": "token_recycling", "budget": args.budget,
           "questions": args.questions, "max_new_tokens": args.max_new_tokens, "mat": mats,
           "max_depth": stats.max_depth, "ranks": stats.ranks, "prior_weight": stats.prior_weight,
           **stats.to_dict(), "rates": stats.rates().tolist(), "seconds": time.perf_counter() - start}
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}: MAT {sum(mats) / len(mats):.2f} over {len(mats)} questions ({out['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
