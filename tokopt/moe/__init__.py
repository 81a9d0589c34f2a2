"""Mixture-of-Experts planning (layer: above export, beside the uncertainty estimators, below the API): routing
traces and affinity, expert placement, the expert-parallel cost model and planner. (smollm2-moe, SmolLM2 made
sparse, is a model: ``tokopt.models.moefy``.)

Example::

    from tokopt.moe.traces import load_trace
    trace = load_trace("routing.npz")              # experts [tokens, layers, top_k]
    placement = tokopt.place(trace, gpus=4)        # [layers][experts] -> GPU
"""
