"""The Numba CUDA kernels equal the references under NUMBA_ENABLE_CUDASIM=1 (a fresh process: the variable must
be set before Numba is imported)."""

import json
import os
import subprocess
import sys


def test_cuda_kernels_equal_references_in_the_simulator():
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "tokopt.bench.cuda_check", "--sim", "--json"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    kernels = {r["kernel"] for r in results}
    assert kernels == {"tree_inputs", "step_mask", "greedy_accept", "recycling_update", "recycling_fill",
                       "compact_tail", "logit_stats"}
    failed = [r for r in results if not r["ok"]]
    assert not failed, failed
    assert proc.returncode == 0
