"""bench/gpu_check.py --dry-run: every part of the GPU check runs on the CPU (kernels in Numba's simulator)."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PARTS = ("environment", "kernels", "engine", "families", "verify_latency", "tree_size", "speculative", "compile",
         "logit_stats")


def test_gpu_check_dry_run(tmp_path):
    env = {**os.environ, "TOKOPT_QUIET": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--dry-run", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    for part in PARTS:
        assert report["parts"][part]["status"] == "ok", (part, report["parts"][part])
    assert (tmp_path / "verify_cost.png").stat().st_size > 1000
    assert report["parts"]["speculative"]["token_recycling"]["equal_to_greedy"]
    assert report["parts"]["tree_size"]["by_cache_length"]["128"]["predicted_speedup"] > 0
