"""Mixture-of-Experts tooling: routing traces and affinity, expert placement, the expert-parallel cost model
and planner, and a small MoE with learned routing (SmolLM2 made sparse).

Example::

    from tokopt.moe.traces import load_trace
    trace = load_trace("routing.npz")              # experts [tokens, layers, top_k]
    placement = tokopt.place(trace, gpus=4)        # [layers][experts] -> GPU
"""
