"""Starting N ranks of a function on one machine, or joining a group started by ``torchrun``.

``run_ranks(fn, world_size, *args)`` spawns ``world_size`` processes, each of which joins a
``torch.distributed`` process group (gloo on CPU, NCCL when ``backend="nccl"``) and calls
``fn(rank, world_size, *args)``; it returns the ranks' return values in rank order. A rank that raises, dies
or hangs ends the whole run within ``timeout_s`` with a ``DistributedError`` that names the rank and its
error: the others are stopped, nothing is left running.

Example::

    def hello(rank, world):
        t = torch.tensor([rank]); torch.distributed.all_reduce(t); return int(t)
    run_ranks(hello, 4)          # -> [6, 6, 6, 6]
"""

from __future__ import annotations

import os
import pickle
import queue
import socket
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tokopt.errors import TokoptError

DEFAULT_TIMEOUT_S = 120.0


class DistributedError(TokoptError):
    """A rank failed, died or hung; the message names it."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_group(rank: int, world_size: int, *, backend: str = "gloo", port: int | None = None,
               timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Join the default process group (``torchrun`` sets the env vars itself; a spawned rank gets ``port``)."""
    if port is not None:
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s))


def in_torchrun() -> bool:
    """True in a process started by ``torchrun`` (it sets RANK, WORLD_SIZE and the rendezvous address)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def _child(rank, world_size, port, backend, timeout_s, threads, fn, args, results):
    torch.set_num_threads(threads)
    try:
        init_group(rank, world_size, backend=backend, port=port, timeout_s=timeout_s)
        value = fn(rank, world_size, *args)
        results.put((rank, True, pickle.dumps(value)))  # plain bytes: tensors must outlive this process
    except BaseException as exc:  # reported to the parent, which names the rank
        results.put((rank, False, f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=6)}"))
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:
                pass


def run_ranks(fn, world_size: int, *args, backend: str = "gloo", timeout_s: float = DEFAULT_TIMEOUT_S,
              threads_per_rank: int | None = None, start_method: str | None = None) -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` fresh processes; return their results by rank.

    ``fn`` and ``args`` must be picklable (a module-level function). ``timeout_s`` bounds every collective
    and the whole run's silence: if no rank finishes for that long, all are stopped and a DistributedError
    names the ranks still running.
    """
    if world_size < 1:
        raise DistributedError(f"world_size must be >= 1, got {world_size}")
    threads = threads_per_rank or max(1, (os.cpu_count() or 1) // world_size)
    ctx = mp.get_context(start_method or ("fork" if "fork" in mp.get_all_start_methods() else "spawn"))
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_child, args=(r, world_size, port, backend, timeout_s, threads, fn, args, results),
                         daemon=True) for r in range(world_size)]
    for p in procs:
        p.start()
    out: dict[int, object] = {}
    failure = None
    deadline = time.monotonic() + timeout_s + 60.0  # spawn + import time on top of the collective timeout
    try:
        while len(out) < world_size and failure is None:
            try:
                rank, ok, value = results.get(timeout=0.5)
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if r not in out and p.exitcode not in (None, 0)]
                if dead:
                    time.sleep(0.5)  # its own report may still be in flight
                    while not results.empty():
                        rank, ok, value = results.get()
                        if not ok:
                            failure = f"rank {rank} failed: {value}"
                            break
                        out[rank] = pickle.loads(value)
                    failure = failure or (f"rank {dead[0]} died (exit code {procs[dead[0]].exitcode}) "
                                          "without a result")
                elif time.monotonic() > deadline:
                    waiting = [r for r in range(world_size) if r not in out]
                    failure = f"ranks {waiting} did not finish within {timeout_s:.0f} s (hung?)"
                continue
            if ok:
                out[rank] = pickle.loads(value)
                deadline = time.monotonic() + timeout_s + 10.0
            else:
                waiting = [r for r in range(world_size) if r not in out and r != rank]
                hint = (f" (ranks {waiting} had not finished: a hung or dead rank makes the others time out)"
                        if "Timed out" in str(value) or "timed out" in str(value) else "")
                failure = f"rank {rank} failed{hint}: {value}"
    finally:
        for p in procs:
            if failure is not None and p.is_alive():
                p.kill()
            p.join(timeout=10)
    if failure is not None:
        raise DistributedError(f"distributed run over {world_size} ranks ({backend}) stopped: {failure}")
    return [out[r] for r in range(world_size)]
