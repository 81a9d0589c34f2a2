"""Tree verify inputs: positions, ancestor structure and validity of a batch of draft trees, and the step mask.

``tree_inputs(parents, sizes, roots)``: row b's tree has ``sizes[b]`` nodes listed parents-first (``parents[b,
0] = -1``, entries past the size are padding); node i's position is ``roots[b] + depth(i)`` and it sees node j
iff j is i or one of its ancestors. ``step_mask(past_valid, structure, new_valid, dtype)``: the additive
``[B, 1, N, P + N]`` attention mask (0 where allowed, ``finfo.min`` elsewhere) of N new tokens after a cache
whose slots are ``past_valid``.

Example::

    parents = torch.tensor([[-1, 0, 0, 1], [-1, 0, 0, 0]])    # row 1's tree has 2 nodes (sizes), 2 pads
    positions, structure, valid = tree_inputs(parents, torch.tensor([4, 2]), torch.tensor([12, 7]))
    positions[0].tolist()   # [12, 13, 13, 14]
    mask = step_mask(cache.valid, structure, valid, dtype=torch.float32)
"""

from __future__ import annotations

import torch

from tokopt.kernels.dispatch import Kernel, as_cuda_array, grid, lazy_cuda, lazy_njit

NUMBA_MASK_DTYPES = (torch.float32, torch.float64)


# ----------------------------------------------------------------------------------------------- reference

def ancestor_matrix(parents) -> torch.Tensor:
    """``[N, N]`` bool: node i sees node j iff j is i or one of its ancestors (parents-first lists)."""
    n = len(parents)
    seen = torch.eye(n, dtype=torch.bool)
    for i in range(1, n):
        seen[i] |= seen[parents[i]]
    return seen


def tree_inputs_reference(parents: torch.Tensor, sizes: torch.Tensor, roots: torch.Tensor):
    batch, width = parents.shape
    depths = torch.zeros((batch, width), dtype=torch.long)
    structure = torch.zeros((batch, width, width), dtype=torch.bool)
    valid = torch.zeros((batch, width), dtype=torch.bool)
    for b in range(batch):
        n = int(sizes[b])
        row = parents[b, :n].tolist()
        for i in range(1, n):
            if not 0 <= row[i] < i:
                raise ValueError(f"tree node {i} has parent {row[i]}: parents must precede their children")
            depths[b, i] = depths[b, row[i]] + 1
        structure[b, :n, :n] = ancestor_matrix(row)
        valid[b, :n] = True
    return roots[:, None] + depths, structure, valid


def step_mask_reference(past_valid, new_structure, new_valid=None, dtype=torch.float32):
    batch, n = past_valid.shape[0], new_structure.shape[-1]
    structure = new_structure.expand(batch, n, n)
    if new_valid is not None:
        structure = structure & new_valid[:, None, :]
    allowed = torch.cat([past_valid[:, None, :].expand(batch, n, past_valid.shape[1]), structure], dim=2)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=past_valid.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


# ----------------------------------------------------------------------------------------------- Numba CPU

def _tree_inputs_loop(parents, sizes, roots, positions, structure, valid):
    batch, width = parents.shape
    for b in range(batch):
        n = sizes[b]
        if n < 1 or n > width or parents[b, 0] != -1:
            raise ValueError("tree_inputs: every row needs 1..width nodes and a root (parents[b, 0] = -1)")
        positions[b, 0] = roots[b]
        structure[b, 0, 0] = True
        valid[b, 0] = True
        for i in range(1, width):
            if i >= n:
                positions[b, i] = roots[b]
                continue
            p = parents[b, i]
            if p < 0 or p >= i:
                raise ValueError("tree_inputs: a tree node's parent must precede it (parents-first order)")
            positions[b, i] = positions[b, p] + 1
            valid[b, i] = True
            for j in range(i):
                structure[b, i, j] = structure[b, p, j]
            structure[b, i, i] = True


_tree_inputs_jit = lazy_njit(_tree_inputs_loop)


def _outputs(parents, device="cpu"):
    batch, width = parents.shape
    return (torch.empty((batch, width), dtype=torch.long, device=device),
            torch.zeros((batch, width, width), dtype=torch.bool, device=device),
            torch.zeros((batch, width), dtype=torch.bool, device=device))


def tree_inputs_cpu(parents, sizes, roots):
    positions, structure, valid = _outputs(parents)
    _tree_inputs_jit(parents.long().numpy(), sizes.long().numpy(), roots.long().numpy(), positions.numpy(),
                     structure.numpy(), valid.numpy())
    return positions, structure, valid


def _step_mask_loop(past_valid, structure, new_valid, use_new_valid, minval, out):
    batch, past = past_valid.shape
    n = structure.shape[1]
    for b in range(batch):
        for i in range(n):
            for s in range(past):
                out[b, 0, i, s] = 0.0 if past_valid[b, s] else minval
            for j in range(n):
                ok = structure[b, i, j] and (new_valid[b, j] or not use_new_valid)
                out[b, 0, i, past + j] = 0.0 if ok else minval


_step_mask_jit = lazy_njit(_step_mask_loop)


def _mask_args(past_valid, new_structure, new_valid):
    batch, n = past_valid.shape[0], new_structure.shape[-1]
    structure = new_structure.expand(batch, n, n)
    use = new_valid is not None
    return structure, (new_valid if use else structure[:, 0]), use


def step_mask_cpu(past_valid, new_structure, new_valid=None, dtype=torch.float32):
    structure, nv, use = _mask_args(past_valid, new_structure, new_valid)
    batch, n = structure.shape[:2]
    out = torch.empty((batch, 1, n, past_valid.shape[1] + n), dtype=dtype)
    _step_mask_jit(past_valid.numpy(), structure.numpy(), nv.numpy(), use, torch.finfo(dtype).min, out.numpy())
    return out


# ----------------------------------------------------------------------------------------------- Numba CUDA

cuda = None  # bound to numba's by lazy_cuda when the kernels are first built


@lazy_cuda()
def cuda_kernels():
    """The ``@cuda.jit`` kernels (compiled on first use; also under ``NUMBA_ENABLE_CUDASIM=1``)."""

    @cuda.jit
    def tree_inputs_kernel(parents, sizes, roots, positions, structure, valid):
        t = cuda.grid(1)
        batch, width = parents.shape
        if t >= batch * width:
            return
        b, i = t // width, t % width
        if i >= sizes[b]:
            positions[b, i] = roots[b]
            return
        valid[b, i] = True
        structure[b, i, i] = True
        node, depth = i, 0
        while node > 0:
            p = parents[b, node]
            if p < 0 or p >= node:  # not parents-first: stop (inputs are validated on the host)
                break
            node = p
            structure[b, i, node] = True
            depth += 1
        positions[b, i] = roots[b] + depth

    @cuda.jit
    def step_mask_kernel(past_valid, structure, new_valid, use_new_valid, minval, out):
        t = cuda.grid(1)
        batch, past = past_valid.shape
        n = structure.shape[1]
        cols = past + n
        if t >= batch * n * cols:
            return
        b, rest = t // (n * cols), t % (n * cols)
        i, c = rest // cols, rest % cols
        if c < past:
            ok = past_valid[b, c]
        else:
            j = c - past
            ok = structure[b, i, j] and (new_valid[b, j] or not use_new_valid)
        out[b, 0, i, c] = 0.0 if ok else minval

    return dict(tree_inputs=tree_inputs_kernel, step_mask=step_mask_kernel)


def tree_inputs_launch(parents, sizes, roots, positions, structure, valid):
    """Launch the CUDA tree-inputs kernel on device (or, under the simulator, numpy) arrays."""
    cuda_kernels()["tree_inputs"][grid(parents.shape[0] * parents.shape[1])](parents, sizes, roots, positions,
                                                                              structure, valid)


def step_mask_launch(past_valid, structure, new_valid, use_new_valid, minval, out):
    total = out.shape[0] * out.shape[2] * out.shape[3]
    cuda_kernels()["step_mask"][grid(total)](past_valid, structure, new_valid, use_new_valid, minval, out)


def tree_inputs_cuda(parents, sizes, roots):
    _check_rows(parents, sizes)
    positions, structure, valid = _outputs(parents, parents.device)
    tree_inputs_launch(*(as_cuda_array(t) for t in (parents.long(), sizes.long(), roots.long(), positions, structure,
                                                    valid)))
    return positions, structure, valid


def step_mask_cuda(past_valid, new_structure, new_valid=None, dtype=torch.float32):
    structure, nv, use = _mask_args(past_valid, new_structure, new_valid)
    batch, n = structure.shape[:2]
    out = torch.empty((batch, 1, n, past_valid.shape[1] + n), dtype=dtype, device=past_valid.device)
    step_mask_launch(as_cuda_array(past_valid), as_cuda_array(structure.contiguous()), as_cuda_array(nv.contiguous()),
                     use, torch.finfo(dtype).min, as_cuda_array(out))
    return out


def _check_rows(parents, sizes):
    """Host-side check for the CUDA version (the CPU loop checks inside)."""
    if parents.shape[0] and (bool((sizes < 1).any()) or bool((sizes > parents.shape[1]).any())):
        raise ValueError("tree_inputs: every row needs 1..width nodes")
    idx = torch.arange(parents.shape[1], device=parents.device)
    live = idx[None, :] < sizes[:, None]
    bad = live & (idx[None, :] > 0) & ((parents < 0) | (parents >= idx[None, :]))
    if bool(bad.any()) or bool((parents[:, 0] != -1).any()):
        raise ValueError("tree_inputs: a tree node's parent must precede it (parents-first order), root parent -1")


# ----------------------------------------------------------------------------------------------- dispatch

def _mask_device(past_valid, *args, **kwargs):
    return past_valid.device


def _mask_accepts(past_valid, new_structure, new_valid=None, dtype=torch.float32):
    return dtype in NUMBA_MASK_DTYPES


TREE_INPUTS = Kernel("tree_inputs", reference=tree_inputs_reference, cpu=tree_inputs_cpu, cuda=tree_inputs_cuda)
STEP_MASK = Kernel("step_mask", reference=step_mask_reference, cpu=step_mask_cpu, cuda=step_mask_cuda,
                   device_of=_mask_device, accepts=_mask_accepts)


def tree_inputs(parents: torch.Tensor, sizes: torch.Tensor, roots: torch.Tensor):
    """``(positions [B, N] long, structure [B, N, N] bool, valid [B, N] bool)`` of padded trees ``parents [B, N]``
    with ``sizes [B]`` nodes each, roots at positions ``roots [B]`` (see the module docstring). Padding nodes get
    the root's position, no structure, valid False. A parent that does not precede its node: ValueError.

    Example::

        positions, structure, valid = tree_inputs(torch.tensor([[-1, 0, 1]]), torch.tensor([3]), torch.tensor([5]))
        positions.tolist()   # [[5, 6, 7]]
    """
    return TREE_INPUTS(parents, sizes, roots)


def step_mask(past_valid: torch.Tensor, new_structure: torch.Tensor, new_valid: torch.Tensor | None = None,
              dtype=torch.float32) -> torch.Tensor:
    """Additive mask ``[B, 1, N, P + N]`` (0 allowed, ``finfo(dtype).min`` not) for N new tokens after a cache
    whose slots are ``past_valid [B, P]``; ``new_structure [B, N, N]`` or ``[N, N]`` says which new tokens see
    which, ``new_valid [B, N]`` marks padding among them (never attended to). Numba handles float32/float64.

    Example::

        mask = step_mask(torch.tensor([[False, True]]), torch.ones(2, 2, dtype=torch.bool).tril())
        mask.shape   # (1, 1, 2, 4)
    """
    return STEP_MASK(past_valid, new_structure, new_valid, dtype)
