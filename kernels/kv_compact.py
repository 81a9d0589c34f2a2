"""KV compaction after a verify step: move each row's accepted tree slots to the front of the step's tail.

``compact_tail(tensors, start, index, index_valid)``: for every cache tensor ``[B, H, L, D]`` and row b, slot
``start + j`` takes slot ``start + index[b, j]`` for the valid entries (``index_valid [B, K]``), in place.
Slots of invalid entries hold unspecified values afterwards (the cache marks them invalid). Accepted paths are
increasing (``index[b, j] >= j``), so the Numba versions move slots in place in increasing j, skip rows whose
entries are already in place (``index[b, j] == j``: a path along the first children, or nothing accepted) and
copy nothing at all when every row is; any other index runs the reference (gather, then write).

Example::

    compact_tail(cache.tensors, start=40, index=torch.tensor([[0, 2, 5]]), index_valid=torch.ones(1, 3, dtype=torch.bool))
"""

from __future__ import annotations

import torch

from tokopt.kernels.dispatch import Kernel, as_cuda_array, grid, lazy_cuda, lazy_njit

IN_PLACE, MOVE, GATHER, OUT_OF_RANGE = 0, 1, 2, 3
NUMBA_DTYPES = (torch.float32, torch.float64)  # float16/bfloat16 caches: the reference


def compact_tail_reference(tensors, start: int, index: torch.Tensor, index_valid: torch.Tensor) -> None:
    k = index.shape[1]
    with torch.inference_mode():
        for t in tensors:
            tail = t[:, :, start:]
            idx = index.to(t.device)[:, None, :, None].expand(t.shape[0], t.shape[1], k, t.shape[3])
            t[:, :, start:start + k] = tail.gather(2, idx)


# ----------------------------------------------------------------------------------------------- Numba CPU

def _plan(index, index_valid, tail):
    """IN_PLACE: nothing moves; MOVE: valid entries satisfy index[b, j] >= j; GATHER: otherwise;
    OUT_OF_RANGE: a valid entry outside [0, tail)."""
    plan = IN_PLACE
    for b in range(index.shape[0]):
        for j in range(index.shape[1]):
            if not index_valid[b, j]:
                continue
            if index[b, j] < 0 or index[b, j] >= tail:
                return OUT_OF_RANGE
            if index[b, j] < j:
                plan = GATHER
            elif index[b, j] != j and plan == IN_PLACE:
                plan = MOVE
    return plan


def _move(t, start, index, index_valid):
    batch, heads, _, dim = t.shape
    for b in range(batch):
        for j in range(index.shape[1]):
            src = index[b, j]
            if not index_valid[b, j] or src == j:
                continue
            for h in range(heads):
                for d in range(dim):
                    t[b, h, start + j, d] = t[b, h, start + src, d]


_plan_jit = lazy_njit(_plan)
_move_jit = lazy_njit(_move)


def compact_tail_cpu(tensors, start: int, index: torch.Tensor, index_valid: torch.Tensor) -> None:
    idx, ok = index.long().numpy(), index_valid.numpy()
    plan = _plan_checked(tensors, start, idx, ok)
    if plan == GATHER:
        return compact_tail_reference(tensors, start, index, index_valid)
    if plan == MOVE:
        for t in tensors:
            _move_jit(t.detach().numpy(), start, idx, ok)


def _plan_checked(tensors, start, idx, ok):
    if idx.shape != ok.shape or idx.ndim != 2:
        raise ValueError(f"compact_tail: index and index_valid must both be [B, K], got {idx.shape} and {ok.shape}")
    tail = tensors[0].shape[2] - start if tensors else 0
    how = _plan_jit(idx, ok, tail)
    if how == OUT_OF_RANGE or (tensors and idx.shape[1] > tail):
        raise ValueError(f"compact_tail: valid index entries must lie in [0, {tail}) (the slots after start={start}) "
                         f"and K = {idx.shape[1]} <= {tail}")
    return how


# ----------------------------------------------------------------------------------------------- Numba CUDA

cuda = None  # bound to numba's by lazy_cuda when the kernels are first built


@lazy_cuda()
def cuda_kernels():
    """``move``: one thread per (row, head, channel), slots moved in increasing j (safe in place)."""

    @cuda.jit
    def move_kernel(t, start, index, index_valid):
        x = cuda.grid(1)
        batch, heads, _, dim = t.shape
        if x >= batch * heads * dim:
            return
        b, rest = x // (heads * dim), x % (heads * dim)
        h, d = rest // dim, rest % dim
        for j in range(index.shape[1]):
            src = index[b, j]
            if index_valid[b, j] and src != j:
                t[b, h, start + j, d] = t[b, h, start + src, d]

    return {"move": move_kernel}


def move_launch(t, start, index, index_valid):
    """Launch the in-place move on one device array (numpy under ``NUMBA_ENABLE_CUDASIM=1``); ``index`` must
    satisfy ``index[b, j] >= j`` on valid entries (``plan`` says so)."""
    batch, heads, _, dim = t.shape
    cuda_kernels()["move"][grid(batch * heads * dim)](t, start, index, index_valid)


def compact_tail_cuda(tensors, start: int, index: torch.Tensor, index_valid: torch.Tensor) -> None:
    how = _plan_checked(tensors, start, index.long().cpu().numpy(), index_valid.cpu().numpy())
    if how == GATHER:
        return compact_tail_reference(tensors, start, index, index_valid)
    if how == MOVE:
        device = tensors[0].device
        idx, ok = as_cuda_array(index.long().to(device)), as_cuda_array(index_valid.to(device))
        for t in tensors:
            move_launch(as_cuda_array(t), start, idx, ok)


# ----------------------------------------------------------------------------------------------- dispatch

def _device(tensors, *args):
    return tensors[0].device if tensors else torch.device("cpu")


def _accepts(tensors, *args):
    return all(t.dtype in NUMBA_DTYPES for t in tensors)


COMPACT_TAIL = Kernel("compact_tail", reference=compact_tail_reference, cpu=compact_tail_cpu,
                      cuda=compact_tail_cuda, device_of=_device, accepts=_accepts)


def compact_tail(tensors: list, start: int, index: torch.Tensor, index_valid: torch.Tensor) -> None:
    """In place, per cache tensor ``[B, H, L, D]``: slot ``start + j`` of row b takes slot ``start + index[b, j]``
    where ``index_valid[b, j]``; other moved-to slots hold unspecified values. See the module docstring.

    Example::

        t = torch.arange(6.).view(1, 1, 6, 1)
        compact_tail([t], 2, torch.tensor([[0, 3]]), torch.tensor([[True, True]]))
        t.flatten()[:4].tolist()   # [0., 1., 2., 5.]
    """
    COMPACT_TAIL(tensors, start, index, index_valid)
