"""Export (layer: above the runtime, below MoE planning, the estimators and the API): engine directories.

- ``engine_dir.py``: ``export_engine`` writes an optimized graph as an ONNX Runtime, torch.export (pt2) or
  TensorRT engine directory with its manifest; ``open_engine`` / ``read_manifest`` read one back;
- ``tensorrt.py``: the TensorRT target (torch-tensorrt);
- ``ep_engine.py``: expert-parallel directories, one weight file per rank.

``tokopt.load_engine`` (``tokopt/api/engines.py``) turns an opened engine into an ``OptimizedModel``.

Example::

    export_engine(tokopt.optimize(model), "engines/smollm2")
    opened = open_engine("engines/smollm2"); opened.manifest["passes"]
"""
