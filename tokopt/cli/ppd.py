"""``tokopt train-ppd``: train a model's Parallel Prompt Decoding prompt embeddings (for ``speculative="ppd"``).

Example::

    tokopt train-ppd                                  # SmolLM2-135M, offline corpus + shipped text, ~200 steps
    tokopt train-ppd ./my-llama --text notes.txt --steps 400 -k 3
    tokopt train-ppd --prompts questions.jsonl --prompts-skip 2   # on the model's own answers
    tokopt generate --speculative ppd "What is the capital of France?"
"""

from __future__ import annotations

from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("train-ppd", help="train the prompt-token embeddings of parallel prompt decoding (PPD)",
                       description="Self-distil k prompt-token embeddings on text so that one forward also guesses "
                                   "the tokens 2..k+1 ahead; saves them for MODEL under the tokopt cache, where "
                                   "tokopt.optimize(model, speculative='ppd') finds them.")
    p.add_argument("model", nargs="?", default=None, help="model name or local HF dir (default SmolLM2-135M-Instruct)")
    p.add_argument("--text", action="append", default=[], metavar="FILE",
                   help="text file or folder of .txt files (repeatable; default: the offline corpus when present "
                        "plus the text shipped with tokopt)")
    p.add_argument("--prompts", default=None, metavar="FILE",
                   help="chat prompts the model answers first, its answers then being training text "
                        "(self-distillation on its own generations): Spec-Bench-style .jsonl or one prompt per line; "
                        "without --text, only these answers are used")
    p.add_argument("--prompts-skip", type=int, default=0, metavar="N",
                   help="skip the first N questions of each category of a .jsonl (the ones `tokopt bench "
                        "--per-category N` measures), default 0")
    p.add_argument("--max-prompts", type=int, default=None, metavar="N",
                   help="use N of the prompts, spread evenly over the file (default all)")
    p.add_argument("--gen-tokens", type=int, default=128, help="tokens generated per prompt (default 128)")
    p.add_argument("-k", type=int, default=3, help="prompt tokens (default 3)")
    p.add_argument("--steps", type=int, default=200, help="Adam steps, one text chunk each (default 200)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per chunk (default 128)")
    p.add_argument("--anchors", type=int, default=48, help="prompt chains per chunk (default 48)")
    p.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate (default 3e-3)")
    p.add_argument("-o", "--output", default=None, metavar="OUT.pt",
                   help="where to save (default: where speculative='ppd' looks for this model's artifact)")
    p.set_defaults(handler=run)


def run(args) -> int:
    from tokopt.training.ppd import read_prompts, train_ppd

    prompts = read_prompts(args.prompts, args.prompts_skip, args.max_prompts) if args.prompts else None
    result = train_ppd(args.model, texts=[Path(t) for t in args.text] or None, prompts=prompts, k=args.k,
                       steps=args.steps, seq_len=args.seq_len, anchors=args.anchors, lr=args.lr,
                       gen_tokens=args.gen_tokens, out=args.output)
    m = result.metrics
    print(f"{m['steps']} steps in {m['train_seconds']:.1f} s ({m['seconds']:.1f} s in all); train KL "
          f"{m['train_kl_first']:.3f} -> {m['train_kl_last']:.3f}; artifact {m['bytes']} bytes of embeddings")
    for name, key in (("trained", "val"), ("untrained control", "val_control")):
        v = m[key]
        per = "; ".join(f"t+{j + 2}: top1 {v['top1'][j]:.3f} top5 {v['top5'][j]:.3f} top10 {v['top10'][j]:.3f} "
                        f"KL {v['kl'][j]:.3f}" for j in range(m["k"]))
        print(f"held-out {name}: {per}")
    print(f"wrote {result.path} (loss curve {result.plot})")
    return 0
