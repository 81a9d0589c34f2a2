"""Expert-parallel execution over torch.distributed process groups (gloo on CPU, NCCL on GPUs); layer: runtime.

``launch.py`` starts N ranks, ``rank_program.py`` builds a rank's step program, ``generate.py`` decodes on a
rank, ``run.py`` drives a run (also under torchrun), ``stats.py`` summarizes the counters.
"""
