"""Models and graph capture (layer: above kernels and the base modules, below the passes).

- ``loading.py``: ``load`` (the embedded default model, a local HF directory, or a loaded model), support checks,
  fingerprints; ``moefy.py``: smollm2-moe, SmolLM2 made a Mixture-of-Experts (a routing study model);
- ``decoder_graph.py``: the model as one step function with an explicit KV cache (``kv_cache.py``, ``masks.py``);
- ``capture.py``: torch.export of that step into the FX graph the passes rewrite; ``graph_meta.py``: the typed
  metadata the graph carries;
- ``ep_program/``: the expert-parallel step program (coarse ops over resident tokens) and its exchange ops.

Example::

    from tokopt.models.loading import load
    from tokopt.models.capture import capture
    model, tokenizer = load()
    gm = capture(model)
"""
