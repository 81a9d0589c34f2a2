"""Kernels for the runtime's hot loops (layer: above the base modules, below models and graph capture), one family per file, each with a torch reference, a Numba CPU (``njit``,
cached) and a Numba CUDA version behind one dispatch (``dispatch.py``, ``TOKOPT_KERNELS=auto|numba|reference``):

- ``tree_inputs.py``: positions, ancestor structure and validity of a batch of draft trees; the step mask;
- ``accept.py``: greedy acceptance of a draft tree (argmax only along the walk);
- ``recycling.py``: Token Recycling's adjacency update (top-k of the logits) and template tree fill;
- ``kv_compact.py``: moving accepted tree slots to the front of the K/V cache's tail;
- ``logit_stats.py``: entropy, max log-probability and log-normalizer per logits row; also tokopt's graph op
  ``tokopt::logit_stats`` (the uncertainty taps emit it), with a fake kernel, an ONNX translation and a TensorRT
  plugin. ``graph_ops.py`` lists the graph ops and lowers them for each export target.

``cuda_check.py`` checks the CUDA versions against the references (``--sim``: Numba's simulator); the profile that
chose these is ``bench/overhead.py`` (figures in bench/RESULTS.md).
"""
