"""Greedy acceptance of a draft tree: the longest path whose every token is the target's argmax at its parent.

``greedy_accept(tree, logits)`` walks from the root: at node i the target's choice is ``argmax(logits[i])``
(ties: the first index, as ``torch.argmax``; a NaN wins, as in torch); if a child of i (children in index
order) carries that token the walk descends, else that token is the next token. Returns ``(path, next_token)``,
path root (0) first. The Numba versions compute the argmax only at the nodes the walk visits (about MAT rows)
instead of every node's row, fused with the walk.

Example::

    tree = DraftTree.from_parents([5, 7, 9, 11], [-1, 0, 0, 1])
    path, next_token = greedy_accept(tree, logits)      # logits [N, V] of the verify forward for this row
"""

from __future__ import annotations

import numpy as np
import torch

from tokopt.kernels.dispatch import as_cuda_array, grid, Kernel, lazy_cuda, lazy_njit

NUMBA_DTYPES = (torch.float32, torch.float64)


def greedy_accept_reference(tree, logits: torch.Tensor):
    best = logits[: tree.size].argmax(dim=-1).tolist()
    node, path = 0, [0]
    while True:
        want = best[node]
        child = next((c for c in tree.children[node] if tree.tokens[c] == want), None)
        if child is None:
            return path, want
        node = child
        path.append(node)


# ----------------------------------------------------------------------------------------------- Numba CPU

def _walk(logits, tokens, parents, size, path):
    """The walk on arrays: fills ``path`` and returns (its length, next token); argmax inlined (Numba)."""
    node, length = 0, 1
    path[0] = 0
    while True:
        row = logits[node]
        want, best = 0, row[0]
        if best == best:  # a NaN at 0 wins at once
            for v in range(1, row.shape[0]):
                x = row[v]
                if x != x:  # NaN: torch.argmax returns the first NaN
                    want = v
                    break
                if x > best:
                    best, want = x, v
        child = -1
        for c in range(node + 1, size):
            if parents[c] == node and tokens[c] == want:
                child = c
                break
        if child < 0:
            return length, want
        path[length] = child
        length += 1
        node = child


_walk_jit = lazy_njit(_walk)


def _tree_arrays(tree):
    return np.asarray(tree.tokens, dtype=np.int64), np.asarray(tree.parents, dtype=np.int64)


def greedy_accept_cpu(tree, logits: torch.Tensor):
    tokens, parents = _tree_arrays(tree)
    path = np.empty(tree.size, dtype=np.int64)
    length, want = _walk_jit(logits.detach().numpy(), tokens, parents, tree.size, path)
    return path[:length].tolist(), int(want)


# ----------------------------------------------------------------------------------------------- Numba CUDA

cuda = None  # bound to numba's by lazy_cuda when the kernels are first built


@lazy_cuda()
def cuda_kernels():
    """``greedy_accept``: one thread per tree row of a batch (compiled on first use; also under the simulator)."""

    @cuda.jit
    def greedy_accept_kernel(logits, tokens, parents, sizes, path, lengths, next_tokens):
        b = cuda.grid(1)
        if b >= logits.shape[0]:
            return
        node, length = 0, 1
        path[b, 0] = 0
        while True:
            want, best = 0, logits[b, node, 0]
            if best == best:
                for v in range(1, logits.shape[2]):
                    x = logits[b, node, v]
                    if x != x:
                        want = v
                        break
                    if x > best:
                        best, want = x, v
            child = -1
            for c in range(node + 1, sizes[b]):
                if parents[b, c] == node and tokens[b, c] == want:
                    child = c
                    break
            if child < 0:
                lengths[b] = length
                next_tokens[b] = want
                return
            path[b, length] = child
            length += 1
            node = child

    return {"greedy_accept": greedy_accept_kernel}


def greedy_accept_launch(logits, tokens, parents, sizes, path, lengths, next_tokens):
    """Launch on a batch: ``logits [B, N, V]``, ``tokens``/``parents``/``path`` ``[B, N]``, ``sizes``/``lengths``/
    ``next_tokens`` ``[B]`` (device arrays, or numpy under ``NUMBA_ENABLE_CUDASIM=1``)."""

    cuda_kernels()["greedy_accept"][grid(logits.shape[0], 32)](logits, tokens, parents, sizes, path, lengths,
                                                                next_tokens)


def greedy_accept_cuda(tree, logits: torch.Tensor):
    device = logits.device
    tokens, parents = (torch.from_numpy(a)[None].to(device) for a in _tree_arrays(tree))
    sizes = torch.tensor([tree.size], device=device)
    path = torch.zeros((1, tree.size), dtype=torch.long, device=device)
    lengths = torch.zeros(1, dtype=torch.long, device=device)
    nxt = torch.zeros(1, dtype=torch.long, device=device)
    greedy_accept_launch(*(as_cuda_array(t) for t in (logits[None, : tree.size].contiguous(), tokens, parents, sizes,
                                                      path, lengths, nxt)))
    length = int(lengths[0])
    return path[0, :length].tolist(), int(nxt[0])


# ----------------------------------------------------------------------------------------------- dispatch

def _accepts(tree, logits):
    return logits.dtype in NUMBA_DTYPES and logits.dim() == 2


GREEDY_ACCEPT = Kernel("greedy_accept", reference=greedy_accept_reference, cpu=greedy_accept_cpu,
                       cuda=greedy_accept_cuda, device_of=lambda tree, logits: logits.device, accepts=_accepts)


def greedy_accept(tree, logits: torch.Tensor):
    """``(path, next_token)`` of greedy verification of ``tree`` (a ``DraftTree``) against ``logits [N, V]`` (the
    target's logits at each node, padding rows past ``tree.size`` ignored); see the module docstring.

    Example::

        tree = DraftTree.from_parents([5, 7, 9], [-1, 0, 0])
        logits = torch.zeros(3, 16); logits[0, 9] = 1; logits[2, 4] = 1
        greedy_accept(tree, logits)    # ([0, 2], 4): 9 accepted, then the target's 4
    """
    return GREEDY_ACCEPT(tree, logits)
