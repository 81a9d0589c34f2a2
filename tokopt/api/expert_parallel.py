"""Expert parallelism from the public API: ``tokopt.place``, ``tokopt.ep_generate`` and text in, text out with the
experts of an MoE model sharded over N processes (``tokopt generate --ep N``).

Example::

    texts, result = generate_text_ep("smollm2-moe", ["What is the capital of France?"], ranks=4)
    print(texts[0]); print(format_summary(result.summary()))
"""

from __future__ import annotations

import sys
from pathlib import Path

from tokopt.errors import TokoptError
from tokopt.export.ep_engine import is_ep_engine, load_ep_engine
from tokopt.models.loading import load
from tokopt.moe.placement import Placement
from tokopt.moe.placement import place as _place
from tokopt.runtime.distributed.run import ep_generate as _ep_generate
from tokopt.runtime.prompts import encode_prompts


def place(trace, gpus, **kwargs):
    """Place MoE experts on GPUs from a routing trace (a RoutingTrace, an int array [T, L, k] or a path).

    Returns a ``Placement``; see tokopt.moe.placement.place for the options (nodes, method, replicas...).

    Example::

        p = tokopt.place("shared/data/moe_traces/flame_moe_290m/prefill", gpus=4)
        p.assignment          # [layers, experts] -> GPU
    """
    return _place(trace, gpus, **kwargs)


def ep_generate(model, prompts, *, ranks=None, strategy=None, placement=None, **kwargs):
    """Greedy-decode ``prompts`` (lists of token ids) with an MoE model's experts sharded over ``ranks``
    processes (gloo on CPU; under ``torchrun`` this process is one rank). ``strategy``: "context_coherent"
    (one Alltoall per MoE layer, K/V on every rank; the default) or "two_alltoall"; ``placement``: from
    ``tokopt.place``. ``model`` may also be an expert-parallel engine (``load_ep_engine``): its ranks, strategy
    and placement are then the default.
    Returns an ``EPResult`` (``.tokens``, ``.reports``, ``.summary()``); see tokopt.runtime.distributed.run.

    Example::

        res = tokopt.ep_generate(model, [[1, 2, 3]], ranks=4, placement=tokopt.place(trace, gpus=4).assignment)
        res.tokens, res.summary()["cross_fraction"]
    """
    if placement is not None and hasattr(placement, "assignment"):
        placement = placement.assignment
    return _ep_generate(model, prompts, ranks=ranks, strategy=strategy, placement=placement, **kwargs)


def generate_text_ep(model_name, prompts, *, ranks: int | None = None, strategy: str | None = None, placement=None,
                     max_new_tokens: int = 64, chat=None, timeout_s: float = 300.0):
    """Encode ``prompts``, run ``ep_generate`` over ``ranks`` processes, decode; returns (texts, EPResult).
    ``model_name``: a model ``tokopt.load`` accepts (``ranks`` needed; ``strategy`` default context_coherent) or an
    expert-parallel engine directory (``tokopt export --ep N``: its ranks, strategy and placement; ``ranks`` and
    ``strategy``, if given, must agree). ``placement``: a MAP.json path (``tokopt place``), a Placement, an
    array, or None (contiguous)."""
    if is_ep_engine(model_name) or (Path(model_name) / "manifest.json").is_file():  # single-process: refused
        from transformers import AutoTokenizer

        model = load_ep_engine(model_name)
        if not (model.path / "tokenizer").is_dir():
            raise TokoptError(f"{model_name} has no tokenizer/ folder; re-export it with `tokopt export --ep`")
        tokenizer = AutoTokenizer.from_pretrained(model.path / "tokenizer")
        ranks, strategy = ranks or model.world, strategy or model.strategy
    else:
        if ranks is None:
            raise TokoptError(f"{model_name} is a model, not an expert-parallel engine: give the number of ranks "
                              "(--ep N)")
        model, tokenizer = load(model_name)
        strategy = strategy or "context_coherent"
    if tokenizer is None:
        raise TokoptError(f"{model_name} has no tokenizer files; text prompts need one")
    if placement is not None and not hasattr(placement, "shape"):
        placement = (placement if isinstance(placement, Placement) else Placement.from_json(placement)).assignment
    ids, mask = encode_prompts(tokenizer, prompts, chat=chat)
    lists = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
    eos = tokenizer.eos_token_id
    result = _ep_generate(model, lists, ranks=ranks, strategy=strategy, placement=placement,
                         max_new_tokens=max_new_tokens, eos_token_id=eos, timeout_s=timeout_s)
    texts = [tokenizer.decode(t, skip_special_tokens=True) for t in result.tokens]
    return texts, result


def format_summary(s: dict) -> str:
    """The counters of an EP run as a small table: per MoE layer, tokens crossing ranks and bytes per rank."""
    lines = [f"{s['strategy']} over {s['ranks']} ranks, {s['steps']} steps: payload Alltoalls per MoE layer "
             f"{sorted(set(s['alltoalls_per_layer'].values()))}, cross-rank fraction {s['cross_fraction']:.3f}",
             "layer  kind       tokens  bytes max/rank  bytes mean/rank"]
    for layer, kinds in s["per_layer"].items():
        for kind, row in kinds.items():
            lines.append(f"{layer:>5}  {kind:<9} {row['tokens']:>7}  {row['bytes_max']:>14,}  {row['bytes_mean']:>15,.0f}")
    lines.append(f"K/V coherence traffic {s['kv_sync_bytes']:,.0f} B; K/V held per rank "
                 f"{', '.join(f'{b:,}' for b in s['kv_bytes_per_rank'])} B; collectives per step "
                 + ", ".join(f"{k} {v:.1f}" for k, v in sorted(s["collectives_per_step"].items())))
    lines.append("median step time per rank: " + ", ".join(f"{t * 1000:.1f} ms" for t in s["step_s"]))
    return "\n".join(lines)


def print_summary(result, file=None) -> None:
    print(format_summary(result.summary()), file=file or sys.stderr)
