"""Expert-parallel execution over torch.distributed process groups (gloo on CPU, NCCL on GPUs)."""
