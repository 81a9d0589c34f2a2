"""``tokopt::logit_stats``: entropy, max log-probability and log-normalizer of every logits row, in one op.

The uncertainty taps (``passes/entropy_tap.py``, ``passes/logit_taps.py``) read these three numbers from the
logits of every row the graph produces. One op keeps them one node through every export target and lets each
target run its best kernel: the Numba/CUDA versions make two passes over a row and write only the results; on a
CPU the torch reference (log-softmax passes, vectorised by torch) measured fastest, so it runs there by default
(bench/logit_stats.py). Per row z (V logits), with m = max z, s = sum exp(z - m), t = sum exp(z - m) (z - m)::

    lse = m + log s        max_logprob = -log s        entropy = log s - t / s

Logits are finite, as an LM head's are; a -inf entry makes the entropy nan in every version, as it does in
torch's log-softmax composition.

It is tokopt's graph op, so it carries the whole contract every target needs:

- ``logit_stats_reference``: the definition in torch ops (also the fallback for any dtype or device);
- Numba CPU (``njit``, cached, rows in parallel) and Numba CUDA (one block per row, shared-memory reductions)
  versions behind ``kernels.dispatch`` (``TOKOPT_KERNELS``);
- ``torch.ops.tokopt.logit_stats``: a ``torch.library`` custom op with a fake kernel, so it stays one node through
  ``torch.compile`` and ``torch.export`` (and in ``.pt2`` engines);
- ``onnx_translation``: the op in standard ONNX ops (LogSoftmax, Exp, ReduceSum, ReduceMax), which plain ONNX Runtime
  runs with its own kernels, so no ORT custom-op library is needed;
- ``tensorrt_plugin``: a TensorRT Quickly Deployable Plugin of the same name whose kernel is the Numba CUDA one
  (``kernels.graph_ops.register_tensorrt_plugins`` registers it with TensorRT and torch-tensorrt).

Example::

    import torch, tokopt.kernels.logit_stats  # registers the op
    entropy, max_logprob, lse = torch.ops.tokopt.logit_stats(torch.randn(2, 3, 50))   # each [2, 3]
"""

import math

import numpy as np
import torch

from tokopt.kernels.dispatch import Kernel, as_cuda_array, lazy_cuda

OP_NAME = "tokopt::logit_stats"
OUTPUTS = ("entropy", "max_logprob", "lse")
NUMBA_DTYPES = (torch.float32, torch.float64)  # float16/bfloat16 logits: the reference
CUDA_THREADS = 128  # threads per row (one block each); a power of two for the tree reductions


def _check(logits: torch.Tensor) -> None:
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logit_stats: logits need a non-empty last (vocabulary) dimension, got shape "
                         f"{tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"logit_stats: logits must be floating point, got {logits.dtype}")


def logit_stats_reference(logits: torch.Tensor):
    """``(entropy, max_logprob, lse)``, each ``logits.shape[:-1]`` in ``logits.dtype``; computed in float32
    (float64 for float64 input) with the passes of a log-softmax tap: log-softmax, exp, product, sum, and two
    maxima (``lse = max z - max log p``; a max with its index is several times slower than two plain maxima)."""
    _check(logits)
    z = logits.float() if logits.dtype != torch.float64 else logits
    logprobs = torch.log_softmax(z, -1)
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    max_logprob = logprobs.amax(-1)
    lse = z.amax(-1) - max_logprob
    return tuple(o.to(logits.dtype) for o in (entropy, max_logprob, lse))


# ----------------------------------------------------------------------------------------------- Numba CPU

prange = range  # numba.prange once the kernel is compiled (``_rows_kernel``)


def _rows(z, entropy, max_logprob, lse):
    for r in prange(z.shape[0]):
        m = z[r, 0]
        for j in range(1, z.shape[1]):
            m = max(m, z[r, j])
        s = np.float32(0.0)  # float32 for float32 logits, float64 for float64 (Numba unifies)
        t = np.float32(0.0)
        for j in range(z.shape[1]):
            d = z[r, j] - m
            e = np.exp(d)
            s += e
            t += e * d
        log_s = math.log(s)
        entropy[r] = log_s - t / s
        max_logprob[r] = -log_s
        lse[r] = m + log_s


_rows_jit = None


def _rows_kernel():
    global _rows_jit, prange
    if _rows_jit is None:
        from numba import njit, prange

        # reassociation lets LLVM vectorise the sums (no nnan/ninf flags: nan and inf propagate as in torch)
        _rows_jit = njit(cache=True, parallel=True, fastmath={"reassoc", "contract", "arcp"})(_rows)
    return _rows_jit


def _flat(logits):
    return logits.detach().reshape(-1, logits.shape[-1]).contiguous()


def logit_stats_cpu(logits: torch.Tensor):
    _check(logits)
    rows = _flat(logits)
    out = [torch.empty(rows.shape[0], dtype=logits.dtype) for _ in OUTPUTS]
    if rows.shape[0]:
        _rows_kernel()(rows.numpy(), *(o.numpy() for o in out))
    return tuple(o.view(logits.shape[:-1]) for o in out)


# ----------------------------------------------------------------------------------------------- Numba CUDA

cuda = float32 = None  # bound to numba's by lazy_cuda when the kernels are first built


@lazy_cuda("float32")
def cuda_kernels():
    """``rows``: one block of ``CUDA_THREADS`` threads per row; max, then the two sums, by tree reduction."""

    @cuda.jit
    def rows_kernel(z, entropy, max_logprob, lse):
        r = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        vocab = z.shape[1]
        red_a = cuda.shared.array(CUDA_THREADS, float32)
        red_b = cuda.shared.array(CUDA_THREADS, float32)
        m = z[r, 0]
        for j in range(tid, vocab, CUDA_THREADS):
            m = max(m, z[r, j])
        red_a[tid] = m
        cuda.syncthreads()
        step = CUDA_THREADS // 2
        while step > 0:
            if tid < step:
                red_a[tid] = max(red_a[tid], red_a[tid + step])
            cuda.syncthreads()
            step //= 2
        m = red_a[0]
        cuda.syncthreads()
        s = float32(0.0)
        t = float32(0.0)
        for j in range(tid, vocab, CUDA_THREADS):
            d = z[r, j] - m
            e = math.exp(d)
            s += e
            t += e * d
        red_a[tid] = s
        red_b[tid] = t
        cuda.syncthreads()
        step = CUDA_THREADS // 2
        while step > 0:
            if tid < step:
                red_a[tid] += red_a[tid + step]
                red_b[tid] += red_b[tid + step]
            cuda.syncthreads()
            step //= 2
        if tid == 0:
            log_s = math.log(red_a[0])
            entropy[r] = log_s - red_b[0] / red_a[0]
            max_logprob[r] = -log_s
            lse[r] = m + log_s

    return {"rows": rows_kernel}


def rows_launch(z, entropy, max_logprob, lse, stream=0):
    """Launch the row kernel on device arrays ``z [R, V]`` and three ``[R]`` outputs (numpy arrays under
    ``NUMBA_ENABLE_CUDASIM=1``); ``stream``: a Numba stream (TensorRT's, in the plugin) or 0 for the default."""
    if z.shape[0]:
        cuda_kernels()["rows"][z.shape[0], CUDA_THREADS, stream](z, entropy, max_logprob, lse)


def logit_stats_cuda(logits: torch.Tensor):
    from numba import cuda as numba_cuda

    _check(logits)
    rows = _flat(logits)
    out = [torch.empty(rows.shape[0], dtype=logits.dtype, device=logits.device) for _ in OUTPUTS]
    stream = numba_cuda.external_stream(torch.cuda.current_stream(logits.device).cuda_stream)
    rows_launch(as_cuda_array(rows), *(as_cuda_array(o) for o in out), stream=stream)
    return tuple(o.view(logits.shape[:-1]) for o in out)


# ----------------------------------------------------------------------------------------------- dispatch

def _accepts(logits):
    return logits.dtype in NUMBA_DTYPES and logits.dim() >= 1 and logits.shape[-1] > 0


# auto_cpu=False: on CPU torch's vectorised log-softmax beats the Numba loop (scalar exp, no SVML) at every row
# count the runtime meets (bench/logit_stats.py); the Numba CPU version runs under TOKOPT_KERNELS=numba.
LOGIT_STATS = Kernel("logit_stats", reference=logit_stats_reference, cpu=logit_stats_cpu,
                     cuda=logit_stats_cuda, accepts=_accepts, auto_cpu=False)


# ----------------------------------------------------------------------------------------------- the graph op

@torch.library.custom_op(OP_NAME, mutates_args=())
def logit_stats(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(entropy, max_logprob, lse)`` of every row of ``logits [..., V]``, each ``[...]`` (see module docstring).

    Example::

        entropy, max_logprob, lse = torch.ops.tokopt.logit_stats(torch.zeros(1, 4))
        # entropy = log 4, max_logprob = -log 4, lse = log 4
    """
    return LOGIT_STATS(logits)


@logit_stats.register_fake
def _logit_stats_fake(logits):
    _check(logits)
    shape = logits.shape[:-1]
    return tuple(logits.new_empty(shape) for _ in OUTPUTS)


# ----------------------------------------------------------------------------------------------- ONNX

def onnx_translation(logits):
    """The op in standard ONNX ops, for ``torch.onnx.export(..., custom_translation_table=...)``: the reference's
    passes (LogSoftmax, Exp, Mul, ReduceSum, two ReduceMax)."""
    from onnxscript import opset18 as op

    axes = op.Constant(value_ints=[-1])
    logprobs = op.LogSoftmax(logits, axis=-1)
    entropy = op.Neg(op.ReduceSum(op.Mul(op.Exp(logprobs), logprobs), axes, keepdims=0))
    max_logprob = op.ReduceMax(logprobs, axes, keepdims=0)
    lse = op.Sub(op.ReduceMax(logits, axes, keepdims=0), max_logprob)
    return entropy, max_logprob, lse


# ----------------------------------------------------------------------------------------------- TensorRT

def tensorrt_plugin(trtp):
    """``(describe, run)``: the Quickly Deployable Plugin's two functions, to be decorated with
    ``trtp.register(OP_NAME)`` and ``trtp.impl(OP_NAME)`` (``graph_ops.register_tensorrt_plugins`` does).
    ``describe`` gives the outputs' shapes (the input's without its last dimension) and dtypes; ``run`` launches
    the Numba CUDA row kernel on TensorRT's stream. Parameter names equal the torch op's (``logits``), which is
    how torch-tensorrt's generated converter maps the node's inputs onto the plugin's."""

    def describe(logits: trtp.TensorDesc) -> tuple[trtp.TensorDesc, trtp.TensorDesc, trtp.TensorDesc]:
        shape = tuple(logits.shape_expr[i] for i in range(len(logits.shape_expr) - 1))
        return tuple(trtp.from_shape_expr(shape, dtype=logits.dtype) for _ in OUTPUTS)

    def run(logits: trtp.Tensor, outputs: tuple[trtp.Tensor, ...], stream: int) -> None:
        from numba import cuda as numba_cuda

        z = numba_cuda.as_cuda_array(logits)
        rows = z.reshape(-1, z.shape[-1]) if z.ndim != 2 else z
        flat = [numba_cuda.as_cuda_array(o).reshape(rows.shape[0]) for o in outputs]
        rows_launch(rows, *flat, stream=numba_cuda.external_stream(stream))

    return describe, run
