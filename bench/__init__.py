"""Benchmarks (layer: a leaf; installed as ``tokopt.bench``; only the CLI imports it).

- the harness behind ``tokopt bench``: ``harness.py`` (HF vs tokopt engines), ``speculative.py`` (Spec-Bench per
  method and engine), ``uncertainty.py`` (estimator quality and tap cost);
- studies run as scripts (``python bench/<name>.py``), each writing JSON and a plot beside RESULTS.md:
  ``overhead.py``, ``tree_size.py``, ``ppd_control.py``, ``moe_onnx.py``, ``moe_model.py``, ``placement.py``,
  ``cost_model.py``, ``ep_strategies.py``, ``logit_stats_op.py``; ``gpu_check.py`` and ``cuda_check.py`` check
  the CUDA paths on a GPU machine.

Example::

    tokopt bench --prompts 8 --repeats 3
"""
