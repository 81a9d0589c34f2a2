"""Progress for steps that take more than a few seconds (export, capture, benchmarks), on stderr.

Silence it with ``TOKOPT_QUIET=1``.

Example::

    with progress_step("exporting to ONNX"):
        ...            # prints "tokopt: exporting to ONNX ..." then "... done in 41.2 s"
"""

from __future__ import annotations

import contextlib
import os
import sys
import time


def quiet() -> bool:
    return os.environ.get("TOKOPT_QUIET", "") not in ("", "0")


@contextlib.contextmanager
def progress_step(message: str):
    start = time.perf_counter()
    if not quiet():
        print(f"tokopt: {message} ...", file=sys.stderr, flush=True)
    yield
    if not quiet():
        print(f"tokopt: {message}: done in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)


def progress_bar(iterable, desc: str, unit: str = "it", disable: bool = False):
    """``iterable`` with a tqdm bar on stderr (none under ``TOKOPT_QUIET`` or with ``disable``).

    Example::

        for batch in progress_bar(batches, desc="answering", unit="batch"):
            ...
    """
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=f"tokopt: {desc}", unit=unit, disable=disable or quiet())
