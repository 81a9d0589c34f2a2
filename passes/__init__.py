"""Graph passes over the captured decoder (``GraphModule -> (GraphModule, PassReport)``), one per file.

Layer: passes, above kernels and models (graph capture), below the runtime. ``registry.py`` defines a pass
and its report; ``manager.py`` imports every pass module (registering it) and runs an ordered list;
``tokopt passes`` lists them. Expert-parallel passes (``expert_placement``, ``expert_parallel``,
``fuse_alltoall``) rewrite the per-rank step program of ``tokopt.models.ep_program``.
"""
