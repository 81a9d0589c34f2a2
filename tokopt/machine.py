"""What machine this is, in the words measurements are keyed and reported by.

Example::

    cpu_name()        # 'AMD EPYC 7B13'
    machine_id()      # 'AMD EPYC 7B13 x2 threads=2 cpu': the key of cached latency profiles
    describe()        # {'cpu': ..., 'cores': 2, 'torch_threads': 2, 'python': '3.11.7', ...} for reports
"""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_name() -> str:
    """The CPU model (``/proc/cpuinfo``'s model name where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_name() -> str:
    """The first CUDA device's name, or "cpu"."""
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def machine_id() -> str:
    """CPU model, cores and torch threads (what decides CPU forward latency), plus a CUDA device if used."""
    import torch

    return f"{cpu_name()} x{os.cpu_count()} threads={torch.get_num_threads()} {gpu_name()}"


def describe() -> dict:
    """The machine and software a benchmark ran on, for its report."""
    import torch

    return {"cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "gpu": gpu_name(), "python": platform.python_version(), "torch": torch.__version__,
            "platform": platform.platform()}
