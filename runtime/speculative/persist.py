"""State that speculation learns once and keeps across processes, in the cache folder (never pickled).

- ``atomic_write``: bytes to a file through a temporary file and ``os.replace`` (readers never see half a file).
- ``save_arrays`` / ``load_arrays``: named numpy arrays plus a JSON header in one ``.npz`` (``allow_pickle``
  off), with a format version and the facts a reader must match (vocabulary size, model key, ...); a file that
  is missing, too big, corrupt or made for something else is ignored with a note on stderr, never an error.

Token Recycling keeps its adjacency matrix and acceptance statistics per model under
``cache_dir()/recycling/<hash of the model key>.npz``; delete that folder (or run ``tokopt bench --remeasure``)
to start cold.

Example::

    path = state_path("recycling", model_key)
    save_arrays(path, {"adj": adj}, {"format": 1, "vocab_size": 49152})
    arrays = load_arrays(path, {"format": 1, "vocab_size": 49152})     # None when absent or mismatched
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
from pathlib import Path

import numpy as np

from tokopt.paths import cache_path
from tokopt.progress import quiet

MAX_STATE_BYTES = 64 << 20  # a state file bigger than this is neither written nor read


def note(message: str) -> None:
    if not quiet():
        print(f"tokopt: {message}", file=sys.stderr, flush=True)


def state_path(kind: str, model_key: str, suffix: str = ".npz") -> Path:
    """``cache_dir()/<kind>/<16 hex of sha1(model_key)><suffix>``."""
    return cache_path(kind, hashlib.sha1(model_key.encode()).hexdigest()[:16] + suffix)


def atomic_write(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_arrays(path: Path, arrays: dict, header: dict, max_bytes: int = MAX_STATE_BYTES) -> bool:
    """Write ``arrays`` and ``header`` atomically; False (nothing written) when over ``max_bytes``."""
    buf = io.BytesIO()
    meta = np.frombuffer(json.dumps(header, sort_keys=True).encode(), dtype=np.uint8)
    np.savez(buf, __header__=meta, **{k: np.ascontiguousarray(v) for k, v in arrays.items()})
    if buf.tell() > max_bytes:
        note(f"not saving {path.name}: {buf.tell() / 1e6:.1f} MB is over the {max_bytes / 1e6:.0f} MB cap")
        return False
    atomic_write(path, buf.getvalue())
    return True


def load_arrays(path: Path, expect: dict, max_bytes: int = MAX_STATE_BYTES) -> dict | None:
    """The arrays saved at ``path`` when its header agrees with ``expect`` on every key, else None (with a
    note when the file exists but is unusable)."""
    path = Path(path)
    if not path.is_file():
        return None
    if path.stat().st_size > max_bytes:
        note(f"ignoring {path}: bigger than the {max_bytes / 1e6:.0f} MB cap")
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            header = json.loads(bytes(z["__header__"]).decode())
            wrong = {k: (header.get(k), v) for k, v in expect.items() if header.get(k) != v}
            if wrong:
                note(f"ignoring {path}: made for another setup ({', '.join(f'{k}: {a!r} != {b!r}' for k, (a, b) in wrong.items())})")
                return None
            return {k: z[k] for k in z.files if k != "__header__"}
    except Exception as e:  # corrupt, truncated, not an npz: start cold
        note(f"ignoring {path}: unreadable ({type(e).__name__}: {e})")
        return None


def forget_states(kind: str) -> list:
    """Delete every saved state of ``kind`` (e.g. "recycling"); returns the deleted paths."""
    folder = cache_path(kind)
    deleted = sorted(folder.glob("*.npz")) if folder.is_dir() else []
    for path in deleted:
        path.unlink()
    return deleted
