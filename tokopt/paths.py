"""Where tokopt keeps what it computes once: converted models, engines, measurements, trained artifacts.

Everything lives under one cache root, ``$TOKOPT_CACHE`` or ``~/.cache/tokopt``; delete a sub-folder to make
tokopt measure or build it again (``latency/``: verify-latency profiles, ``ppd/``: PPD prompt embeddings, ...).

Example::

    cache_dir() / "models"          # PosixPath('/root/.cache/tokopt/models')
    cache_path("latency", "ab12.json")
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The cache root: ``$TOKOPT_CACHE`` or ``~/.cache/tokopt`` (not created here)."""
    return Path(os.environ.get("TOKOPT_CACHE", Path.home() / ".cache" / "tokopt"))


def cache_path(*parts: str) -> Path:
    """A path under the cache root, e.g. ``cache_path("latency", key + ".json")``."""
    return cache_dir().joinpath(*parts)


def shared_dir() -> Path | None:
    """The workplace's shared folder (offline corpus, Spec-Bench questions, routing traces) if there is one:
    ``$TOKOPT_SHARED`` or ``../shared`` beside a source checkout. Only benchmarks and training read it."""
    env = os.environ.get("TOKOPT_SHARED")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[2] / "shared")
    return next((p for p in candidates if p.is_dir()), None)
