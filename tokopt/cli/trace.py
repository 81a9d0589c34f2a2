"""``tokopt trace``: record an MoE model's routing on real text, for ``tokopt place``.

Example::

    tokopt trace smollm2-moe -o routing.npz                     # the text shipped with tokopt
    tokopt trace ./my-mixtral --text corpus.txt -o routing.npz
    tokopt place routing.npz --gpus 4 -o MAP.json
"""

from __future__ import annotations

import sys
from pathlib import Path

from tokopt.errors import TokoptError


def add_parser(sub) -> None:
    p = sub.add_parser("trace", help="record an MoE model's routing (experts per token per layer) on text",
                       description="Run MODEL on TEXT (default: the calibration text bundled with tokopt) in chunks "
                                   "and save the routing trace (.npz: experts and gate weights [tokens, layers, "
                                   "top_k]) for `tokopt place`.")
    p.add_argument("model", nargs="?", default="smollm2-moe", help="an MoE model name or local HF dir")
    p.add_argument("--text", default=None, metavar="FILE", help="UTF-8 text to run (default: the ~4,000 tokens of text shipped with tokopt)")
    p.add_argument("--tokens", type=int, default=8000, help="tokens to trace at most (default 8000)")
    p.add_argument("--chunk", type=int, default=256, help="tokens per forward (default 256)")
    p.add_argument("-o", "--output", required=True, metavar="OUT.npz")
    p.set_defaults(handler=run)


def read_text(path) -> str:
    if path is None:  # the text shipped with tokopt (about 4,000 tokens: calibration text + sample questions)
        from tokopt.models.moefy import default_texts

        return "\n\n".join(default_texts())
    p = Path(path)
    if not p.is_file():
        raise TokoptError(f"--text {path}: no such file; give a UTF-8 text file")
    return p.read_text(encoding="utf-8", errors="replace")


def run(args) -> int:
    from tokopt.models.loading import load
    from tokopt.moe.traces import save_trace, trace_text

    model, tokenizer = load(args.model)
    if tokenizer is None:
        raise TokoptError(f"{args.model} has no tokenizer files; tracing text needs one")
    trace = trace_text(model, tokenizer, read_text(args.text), tokens=args.tokens, chunk=args.chunk)
    path = save_trace(trace, args.output)
    T, L, k = trace.experts.shape
    print(f"wrote {path}: {T} tokens x {L} MoE layers x top-{k} of {trace.num_experts} experts", file=sys.stderr)
    return 0
