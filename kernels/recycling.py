"""Token Recycling's two hot loops: the adjacency update from the target's logits and the template tree fill.

- ``recycling_update(adj, tokens, valid, logits)``: for every valid node (b, n), row ``adj[tokens[b, n]]``
  becomes the indices of the ``k = adj.shape[1]`` largest ``logits[b, n]``, largest first. The Numba version
  is one pass over each logits row keeping the k best (ties: lower index first; a NaN counts as largest) instead
  of ``torch.topk`` plus a scatter. Several valid nodes with one token: the last in (b, n) order wins on the CPU
  (any one of them on CUDA).
- ``recycling_fill(adj, roots, template)``: per root, the tree of the template ``[(parent, rank), ...]``
  (template node i + 1 hangs under template node ``parent``, 0 = the root, and takes ``adj[token of parent,
  rank]``); nodes whose parent was dropped, or whose adjacency entry is -1 (never seen), are dropped. Returns one
  ``(tokens, parents)`` pair of lists per root.

Example::

    adj = torch.full((vocab, 8), -1, dtype=torch.int32)
    recycling_update(adj, tokens, valid, logits)                    # tokens/valid [B, N], logits [B, N, V]
    trees = recycling_fill(adj, [42], [(0, 0), (0, 1), (1, 0)])     # [([42, a, b, c], [-1, 0, 0, 1])]
"""

from __future__ import annotations

import numpy as np
import torch

from tokopt.kernels.dispatch import Kernel, as_cuda_array, grid, lazy_cuda, lazy_njit

NUMBA_DTYPES = (torch.float32, torch.float64)
CUDA_MAX_K = 64  # local buffers of the CUDA update
CUDA_MAX_TEMPLATE = 1024  # local buffer of the CUDA fill


# ----------------------------------------------------------------------------------------------- reference

def recycling_update_reference(adj, tokens, valid, logits):
    top = logits.topk(adj.shape[1], dim=-1).indices.to(adj.dtype)
    adj[tokens[valid]] = top[valid]


def recycling_fill_reference(adj, roots, template):
    table = adj.numpy()  # scalar lookups are faster in numpy
    out = []
    for root in roots:
        tokens, parents = [int(root)], [-1]
        where = {0: 0}  # template index -> tree index (dropped nodes absent)
        for i, (parent, rank) in enumerate(template, start=1):
            at = where.get(parent)
            if at is None:
                continue
            tok = int(table[tokens[at], rank])
            if tok < 0:
                continue
            where[i] = len(tokens)
            tokens.append(tok)
            parents.append(at)
        out.append((tokens, parents))
    return out


# ----------------------------------------------------------------------------------------------- Numba CPU

COLUMNS = 512  # a logits row is seen as [V // 512, 512]; column c (elements c, c + 512, ...) is one block
F64_MAX = np.finfo(np.float64).max


def _update_loop(adj, tokens, valid, logits, block_max, vals, idx):
    batch, n, vocab = logits.shape
    k = adj.shape[1]
    cols = block_max.shape[2]
    rows = vocab // COLUMNS if cols else 0
    for b in range(batch):
        for i in range(n):
            if not valid[b, i]:
                continue
            row = logits[b, i]
            count, thr, thr_at = 0, -np.inf, -1
            for blk in range(cols + 1):  # the blocks, then the tail past rows * COLUMNS
                if blk < cols:
                    if count == k and block_max[b, i, blk] < thr:  # a NaN max never skips
                        continue
                    first, last, step = blk, rows * COLUMNS, COLUMNS
                else:
                    first, last, step = rows * COLUMNS, vocab, 1
                for v in range(first, last, step):
                    x = row[v]
                    if count == k and x < thr:  # False for NaN
                        continue
                    # sort key: NaN above +inf above every finite value (torch.topk's order)
                    y = np.inf if x != x else (F64_MAX if x == np.inf else np.float64(x))
                    if count == k and not (y > thr or (y == thr and v < thr_at)):
                        continue
                    j = count if count < k else k - 1
                    # ties: the lower index first (blocks are visited out of index order)
                    while j > 0 and (y > vals[j - 1] or (y == vals[j - 1] and v < idx[j - 1])):
                        vals[j] = vals[j - 1]
                        idx[j] = idx[j - 1]
                        j -= 1
                    vals[j] = y
                    idx[j] = v
                    if count < k:
                        count += 1
                    if count == k:
                        thr, thr_at = vals[k - 1], idx[k - 1]
            t = tokens[b, i]
            for j in range(k):
                adj[t, j] = idx[j]


def block_max(logits: np.ndarray) -> np.ndarray:
    """``[B, N, 512]`` maxima of the column blocks of each logits row seen as ``[V // 512, 512]`` (numpy's
    vectorized max over rows; NaN kept); ``[B, N, 0]`` when V < 512 (the kernel then scans every element)."""
    batch, n, vocab = logits.shape
    rows = vocab // COLUMNS
    if rows == 0:
        return np.empty((batch, n, 0), dtype=logits.dtype)
    return logits[:, :, : rows * COLUMNS].reshape(batch, n, rows, COLUMNS).max(axis=2)


_update_jit = lazy_njit(_update_loop)


def recycling_update_cpu(adj, tokens, valid, logits):
    k = adj.shape[1]
    if logits.shape[-1] < k:
        raise ValueError(f"recycling_update: k = {k} successors but only {logits.shape[-1]} logits per row")
    array = logits.detach().numpy()
    _update_jit(adj.numpy(), tokens.long().numpy(), valid.numpy(), array, block_max(array),
                np.empty(k, dtype=np.float64), np.empty(k, dtype=np.int64))


def _fill_loop(adj, roots, tparent, trank, tokens, parents, sizes, where):
    m = tparent.shape[0]
    for b in range(roots.shape[0]):
        tokens[b, 0] = roots[b]
        parents[b, 0] = -1
        size = 1
        where[0] = 0
        for i in range(m):
            where[i + 1] = -1
            at = where[tparent[i]]
            if at < 0:
                continue
            tok = adj[tokens[b, at], trank[i]]
            if tok < 0:
                continue
            where[i + 1] = size
            tokens[b, size] = tok
            parents[b, size] = at
            size += 1
        sizes[b] = size


_fill_jit = lazy_njit(_fill_loop)
_TEMPLATE = [None, None]  # the last template seen and its arrays (the drafter reshapes every few steps)


def template_arrays(template):
    """``(parents, ranks)`` int64 arrays of ``[(parent, rank), ...]``, checked (parents precede, ranks >= 0)."""
    if _TEMPLATE[0] is template:
        return _TEMPLATE[1]
    arr = np.asarray(template, dtype=np.int64).reshape(-1, 2)
    positions = np.arange(1, arr.shape[0] + 1)
    if arr.size and (((arr[:, 0] < 0) | (arr[:, 0] >= positions)).any() or (arr[:, 1] < 0).any()):
        raise ValueError("recycling template: entries are (parent, rank) with 0 <= parent < own index "
                         "(0 = root, template node i is index i + 1) and rank >= 0")
    _TEMPLATE[:] = [template, (np.ascontiguousarray(arr[:, 0]), np.ascontiguousarray(arr[:, 1]))]
    return _TEMPLATE[1]


def _check_ranks(adj, ranks):
    if ranks.size and int(ranks.max()) >= adj.shape[1]:
        raise ValueError(f"recycling template rank {int(ranks.max())} >= k = {adj.shape[1]} successors per token")


def _fill_outputs(tokens, parents, sizes):
    return [(tokens[b, : sizes[b]].tolist(), parents[b, : sizes[b]].tolist()) for b in range(len(sizes))]


def recycling_fill_cpu(adj, roots, template):
    tparent, trank = template_arrays(template)
    _check_ranks(adj, trank)
    roots = np.asarray(roots, dtype=np.int64).reshape(-1)
    width = tparent.shape[0] + 1
    tokens = np.empty((roots.shape[0], width), dtype=np.int64)
    parents = np.empty((roots.shape[0], width), dtype=np.int64)
    sizes = np.empty(roots.shape[0], dtype=np.int64)
    _fill_jit(adj.numpy(), roots, tparent, trank, tokens, parents, sizes, np.empty(width, dtype=np.int64))
    return _fill_outputs(tokens, parents, sizes)


# ----------------------------------------------------------------------------------------------- Numba CUDA

cuda = float64 = int64 = None  # bound to numba's by lazy_cuda when the kernels are first built


@lazy_cuda("float64", "int64")
def cuda_kernels():
    """The ``@cuda.jit`` kernels: update one thread per logits row, fill one thread per root."""

    @cuda.jit
    def update_kernel(adj, tokens, valid, logits):
        t = cuda.grid(1)
        batch, n, vocab = logits.shape
        if t >= batch * n:
            return
        b, i = t // n, t % n
        if not valid[b, i]:
            return
        k = adj.shape[1]
        vals = cuda.local.array(CUDA_MAX_K, float64)
        idx = cuda.local.array(CUDA_MAX_K, int64)
        count = 0
        for v in range(vocab):
            x = logits[b, i, v] * 1.0
            # sort key: NaN above +inf above every finite value (as on the CPU and in torch.topk)
            x = np.inf if x != x else (F64_MAX if x == np.inf else x)
            if count == k and not x > vals[k - 1]:
                continue
            j = count if count < k else k - 1
            while j > 0 and x > vals[j - 1]:
                vals[j] = vals[j - 1]
                idx[j] = idx[j - 1]
                j -= 1
            vals[j] = x
            idx[j] = v
            if count < k:
                count += 1
        tok = tokens[b, i]
        for j in range(k):
            adj[tok, j] = idx[j]

    @cuda.jit
    def fill_kernel(adj, roots, tparent, trank, tokens, parents, sizes):
        b = cuda.grid(1)
        if b >= roots.shape[0]:
            return
        where = cuda.local.array(CUDA_MAX_TEMPLATE + 1, int64)
        tokens[b, 0] = roots[b]
        parents[b, 0] = -1
        size = 1
        where[0] = 0
        for i in range(tparent.shape[0]):
            where[i + 1] = -1
            at = where[tparent[i]]
            if at < 0:
                continue
            tok = adj[tokens[b, at], trank[i]]
            if tok < 0:
                continue
            where[i + 1] = size
            tokens[b, size] = tok
            parents[b, size] = at
            size += 1
        sizes[b] = size

    return dict(update=update_kernel, fill=fill_kernel)


def recycling_update_launch(adj, tokens, valid, logits):
    """Launch the update on device arrays (numpy under ``NUMBA_ENABLE_CUDASIM=1``); k <= 64."""
    if adj.shape[1] > CUDA_MAX_K:
        raise ValueError(f"recycling_update on CUDA keeps at most {CUDA_MAX_K} successors, got k = {adj.shape[1]}")
    cuda_kernels()["update"][grid(logits.shape[0] * logits.shape[1], 64)](adj, tokens, valid, logits)


def recycling_fill_launch(adj, roots, tparent, trank, tokens, parents, sizes):
    """Launch the fill on device arrays (numpy under the simulator); templates of at most 1024 nodes."""
    if tparent.shape[0] > CUDA_MAX_TEMPLATE:
        raise ValueError(f"recycling_fill on CUDA takes templates of at most {CUDA_MAX_TEMPLATE} nodes, "
                         f"got {tparent.shape[0]}")
    cuda_kernels()["fill"][grid(roots.shape[0], 32)](adj, roots, tparent, trank, tokens, parents, sizes)


def recycling_update_cuda(adj, tokens, valid, logits):
    recycling_update_launch(as_cuda_array(adj), as_cuda_array(tokens.long().contiguous()),
                            as_cuda_array(valid.contiguous()), as_cuda_array(logits.contiguous()))


def recycling_fill_cuda(adj, roots, template):
    tparent, trank = template_arrays(template)
    _check_ranks(adj, trank)
    device = adj.device
    roots = torch.as_tensor(np.asarray(roots, dtype=np.int64).reshape(-1), device=device)
    width = tparent.shape[0] + 1
    tokens = torch.empty((roots.shape[0], width), dtype=torch.long, device=device)
    parents = torch.empty_like(tokens)
    sizes = torch.empty(roots.shape[0], dtype=torch.long, device=device)
    tp, tr = (torch.from_numpy(a).to(device) for a in (tparent, trank))
    recycling_fill_launch(*(as_cuda_array(t) for t in (adj, roots, tp, tr, tokens, parents, sizes)))
    return _fill_outputs(tokens.cpu().numpy(), parents.cpu().numpy(), sizes.cpu().numpy())


# ----------------------------------------------------------------------------------------------- dispatch

def _update_accepts(adj, tokens, valid, logits):
    return logits.dtype in NUMBA_DTYPES and logits.dim() == 3 and adj.is_contiguous()


RECYCLING_UPDATE = Kernel("recycling_update", reference=recycling_update_reference, cpu=recycling_update_cpu,
                          cuda=recycling_update_cuda, device_of=lambda adj, *a: adj.device, accepts=_update_accepts)
# auto_cpu=False: for one root and a ~10-node template the Python walk (~13 us) beats the Numba call with its
# array setup (~22 us); TOKOPT_KERNELS=numba still runs it
RECYCLING_FILL = Kernel("recycling_fill", reference=recycling_fill_reference, cpu=recycling_fill_cpu,
                        cuda=recycling_fill_cuda, device_of=lambda adj, *a: adj.device, auto_cpu=False)


def recycling_update(adj: torch.Tensor, tokens: torch.Tensor, valid: torch.Tensor, logits: torch.Tensor) -> None:
    """In place: ``adj[tokens[b, n]]`` = top-``adj.shape[1]`` indices of ``logits[b, n]`` for valid nodes
    (``adj [V, k]`` int32, ``tokens``/``valid`` ``[B, N]``, ``logits [B, N, V]``); see the module docstring.

    Example::

        adj = torch.full((5, 2), -1, dtype=torch.int32)
        recycling_update(adj, torch.tensor([[3]]), torch.tensor([[True]]), torch.tensor([[[0., 2., 1., 5., 0.]]]))
        adj[3].tolist()   # [3, 1]
    """
    RECYCLING_UPDATE(adj, tokens, valid, logits)


def recycling_fill(adj: torch.Tensor, roots, template) -> list:
    """Per root, ``(tokens, parents)`` of the template tree filled from ``adj [V, k]``; see the module docstring.

    Example::

        adj = torch.full((5, 2), -1, dtype=torch.int32); adj[3] = torch.tensor([1, 4]); adj[1, 0] = 2
        recycling_fill(adj, [3], [(0, 0), (0, 1), (1, 0), (2, 0)])   # [([3, 1, 4, 2], [-1, 0, 0, 1])]
    """
    return RECYCLING_FILL(adj, roots, template)
