"""One dispatch for the runtime's hot-loop kernels: Numba CUDA, Numba CPU (``njit``, cached) or the reference.

Every kernel family (``tree_inputs``, ``recycling``, ``accept``, ``kv_compact``) has a torch/Python reference
(the runtime's original code, kept as the definition of what the kernel computes), a Numba CPU version and a
Numba CUDA version. ``Kernel`` picks one per call, by ``TOKOPT_KERNELS``:

- ``auto`` (unset): the CUDA version for CUDA tensors when ``numba.cuda`` sees a device; for CPU tensors the
  Numba CPU version where it measured faster than the reference (``auto_cpu``; bench/overhead.py), else the
  reference;
- ``numba``: the Numba versions wherever they exist (CPU or CUDA), for tests and A/B benchmarks;
- ``reference``: always the reference.

Numba missing, or inputs a kernel does not handle (its ``accepts`` says no, e.g. a bfloat16 mask), run the
reference. The variable is read at every call, so one process can compare both. Numba is imported on first use.

Example::

    from tokopt.kernels.dispatch import Kernel, backend_name
    double = Kernel("double", reference=lambda x: x * 2, cpu=lambda x: x + x)
    double(torch.ones(3))          # the CPU version unless TOKOPT_KERNELS=reference
    backend_name()                 # "auto", "numba" or "reference"
"""

from __future__ import annotations

import os
from functools import lru_cache

BACKENDS = ("auto", "numba", "reference")
ENV = "TOKOPT_KERNELS"


def requested() -> str:
    """The backend ``TOKOPT_KERNELS`` asks for (``auto`` when unset)."""
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"{ENV}={value!r} is not a kernel backend; accepted: {', '.join(BACKENDS)}")
    return value


@lru_cache(maxsize=None)
def numba_available() -> bool:
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


@lru_cache(maxsize=None)
def cuda_available() -> bool:
    """Whether ``numba.cuda`` can launch kernels on a real device (False under the simulator)."""
    if not numba_available() or os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        return False
    try:
        from numba import cuda

        return bool(cuda.is_available())
    except Exception:  # numba without its CUDA target, no driver, ...
        return False


def backend_name() -> str:
    """What ``TOKOPT_KERNELS`` resolves to here: ``auto``, ``numba`` or ``reference`` (also when Numba is missing)."""
    mode = requested()
    return "reference" if mode == "reference" or not numba_available() else mode


class Kernel:
    """A kernel family member: ``reference``, ``cpu`` and optional ``cuda`` callables with the same arguments.

    ``device_of(*args)`` says where the inputs live (default: the first argument's ``.device``);
    ``accepts(*args)`` (default: always) says whether the Numba versions handle these inputs; ``auto_cpu``:
    whether ``auto`` runs the CPU version (False where the reference measured faster at the runtime's sizes).
    """

    def __init__(self, name, *, reference, cpu, cuda=None, device_of=None, accepts=None, auto_cpu=True):
        self.name, self.reference, self.cpu, self.cuda = name, reference, cpu, cuda
        self.auto_cpu = auto_cpu
        self._device_of = device_of or (lambda *args, **kw: args[0].device)
        self._accepts = accepts or (lambda *args, **kw: True)

    def pick(self, *args, **kwargs):
        """The implementation this call would run."""
        mode = backend_name()
        if mode == "reference" or not self._accepts(*args, **kwargs):
            return self.reference
        device = self._device_of(*args, **kwargs)
        if getattr(device, "type", device) == "cuda":
            return self.cuda if self.cuda is not None and cuda_available() else self.reference
        return self.cpu if self.auto_cpu or mode == "numba" else self.reference

    def __call__(self, *args, **kwargs):
        return self.pick(*args, **kwargs)(*args, **kwargs)

    def __repr__(self) -> str:
        return f"Kernel({self.name!r}, backend={backend_name()})"


def as_cuda_array(t):
    """A Numba device view of a CUDA torch tensor (no copy)."""
    from numba import cuda

    return cuda.as_cuda_array(t.detach())


def grid(n: int, threads: int = 128) -> tuple:
    """(blocks, threads) covering ``n`` threads."""
    return (max(1, (n + threads - 1) // threads), threads)


def lazy_njit(fn):
    """``numba.njit(cache=True)(fn)``, compiled (or loaded from Numba's cache) on the first call; ``fn`` itself
    stays plain Python, so importing a kernel module does not import Numba."""
    compiled = None

    def call(*args):
        nonlocal compiled
        if compiled is None:
            from numba import njit

            compiled = njit(cache=True)(fn)
        return compiled(*args)

    call.py_func = fn
    call.__name__, call.__doc__ = fn.__name__, fn.__doc__
    return call


def lazy_cuda(*numba_names):
    """Decorator for a kernel module's ``cuda_kernels()``: its body defines the ``@cuda.jit`` kernels and returns
    them by name; they are built on the first call and the same dict is returned after. Numba is imported then:
    ``numba.cuda`` (and ``numba_names`` such as ``"float32"``, for shared/local array types) are bound as globals
    of the kernel's module, which is what the kernel bodies name (a global, not a closure variable: Numba's CUDA
    simulator swaps the kernels' global ``cuda``).

    Example::

        @lazy_cuda("float32")
        def cuda_kernels():
            @cuda.jit
            def double(x):
                i = cuda.grid(1)
                if i < x.shape[0]:
                    x[i] *= float32(2.0)
            return {"double": double}
    """

    def decorate(build):
        kernels = {}

        def get():
            if not kernels:
                import numba
                from numba import cuda

                build.__globals__["cuda"] = cuda
                for name in numba_names:
                    build.__globals__[name] = getattr(numba, name)
                kernels.update(build())
            return kernels

        get.__name__, get.__doc__ = build.__name__, build.__doc__
        return get

    return decorate

