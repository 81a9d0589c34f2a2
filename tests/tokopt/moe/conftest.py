"""Fixtures for the MoE tests: the real FLAME-MoE routing traces where the shared data folder exists."""

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def flame_dir():
    """``flame_dir(sub)``: a folder of the real FLAME-MoE traces; skips the test when they are absent."""

    def find(sub: str = "prefill") -> Path:
        env = os.environ.get("TOKOPT_SHARED")
        shared = Path(env) if env else Path(__file__).resolve().parents[4] / "shared"
        path = shared / "data" / "moe_traces" / "flame_moe_290m" / sub
        if not path.exists():
            pytest.skip(f"real routing traces not found at {path}")
        return path

    return find
