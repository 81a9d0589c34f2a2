"""tokopt: a compiler-style graph optimizer and runtime for LLM inference.

Example::

    import tokopt
    model, tokenizer = tokopt.load()          # SmolLM2-135M-Instruct, offline after the first fetch
    opt = tokopt.optimize(model)
    print(opt.report)
    out = opt.generate(tokenizer("Hello", return_tensors="pt").input_ids, max_new_tokens=16)
"""

__version__ = "0.1.0"

from tokopt.errors import TokoptError  # noqa: E402
from tokopt.models import load  # noqa: E402
from tokopt.optimize import OptimizeConfig, optimize  # noqa: E402
from tokopt.speculative import SpeculativeConfig  # noqa: E402


def load_engine(path, *, speculative=None, uncertainty: bool = False):
    """Load an exported engine directory (``tokopt export``) as an ``OptimizedModel``; see tokopt.engine_dir."""
    from tokopt.engine_dir import load_engine as _load_engine

    return _load_engine(path, speculative=speculative, uncertainty=uncertainty)


def place(trace, gpus, **kwargs):
    """Place MoE experts on GPUs from a routing trace (a RoutingTrace, an int array [T, L, k] or a path).

    Returns a ``Placement``; see tokopt.moe.placement.place for the options (nodes, method, replicas...).

    Example::

        p = tokopt.place("shared/data/moe_traces/flame_moe_290m/prefill", gpus=4)
        p.assignment          # [layers, experts] -> GPU
    """
    from tokopt.moe.placement import place as _place

    return _place(trace, gpus, **kwargs)


def ep_generate(model, prompts, *, ranks, strategy="context_coherent", placement=None, **kwargs):
    """Greedy-decode ``prompts`` (lists of token ids) with an MoE model's experts sharded over ``ranks``
    processes (gloo on CPU; under ``torchrun`` this process is one rank). ``strategy``: "context_coherent"
    (one Alltoall per MoE layer, K/V on every rank) or "two_alltoall"; ``placement``: from ``tokopt.place``.
    Returns an ``EPResult`` (``.tokens``, ``.reports``, ``.summary()``); see tokopt.runtime.distributed.run.

    Example::

        res = tokopt.ep_generate(model, [[1, 2, 3]], ranks=4, placement=tokopt.place(trace, gpus=4).assignment)
        res.tokens, res.summary()["cross_fraction"]
    """
    from tokopt.runtime.distributed.run import ep_generate as _ep_generate

    if placement is not None and hasattr(placement, "assignment"):
        placement = placement.assignment
    return _ep_generate(model, prompts, ranks=ranks, strategy=strategy, placement=placement, **kwargs)


__all__ = ["load", "optimize", "OptimizeConfig", "SpeculativeConfig", "load_engine", "place", "ep_generate",
           "TokoptError", "__version__"]
