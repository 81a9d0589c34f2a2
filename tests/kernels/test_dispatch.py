"""The kernel dispatch: TOKOPT_KERNELS chooses reference / Numba; bad values are named."""

import pytest
import torch

from tokopt.kernels import dispatch
from tokopt.kernels.dispatch import Kernel


def _kernel(**kw):
    return Kernel("probe", reference=lambda x: "reference", cpu=lambda x: "cpu", cuda=lambda x: "cuda", **kw)


def test_env_var_picks_the_backend(monkeypatch):
    x = torch.zeros(2)
    monkeypatch.setenv("TOKOPT_KERNELS", "reference")
    assert _kernel()(x) == "reference"
    monkeypatch.setenv("TOKOPT_KERNELS", "numba")
    assert _kernel()(x) == "cpu" and _kernel(auto_cpu=False)(x) == "cpu"
    monkeypatch.delenv("TOKOPT_KERNELS")
    assert dispatch.backend_name() == "auto"
    assert _kernel()(x) == "cpu" and _kernel(auto_cpu=False)(x) == "reference"
    assert _kernel(accepts=lambda x: False)(x) == "reference"


def test_cuda_inputs_without_a_cuda_device_run_the_reference(monkeypatch):
    monkeypatch.setattr(dispatch, "cuda_available", lambda: False)
    assert _kernel(device_of=lambda x: torch.device("cuda"))(torch.zeros(1)) == "reference"
    monkeypatch.setattr(dispatch, "cuda_available", lambda: True)
    assert _kernel(device_of=lambda x: torch.device("cuda"))(torch.zeros(1)) == "cuda"


def test_unknown_backend_is_named(monkeypatch):
    monkeypatch.setenv("TOKOPT_KERNELS", "triton")
    with pytest.raises(ValueError, match="accepted: auto, numba, reference"):
        _kernel()(torch.zeros(1))
