"""The graph-op registry: every tokopt op carries the whole contract (reference, Numba CPU and CUDA, fake kernel,
ONNX translation, TensorRT plugin), and the TensorRT plugin functions describe what the torch op's fake kernel
does. TensorRT is not installable here: its ``tensorrt.plugin`` module is stood in by a recorder that checks
what the QDP API requires of the functions (annotated TensorDesc/Tensor parameters named as the op's schema)."""

import inspect
import types

import pytest
import torch

import tokopt
from tokopt.kernels import graph_ops


def test_every_graph_op_carries_the_whole_contract():
    for name, module in graph_ops.MODULES.items():
        overload = graph_ops.op_overload(name)
        assert module.OP_NAME == name and overload._name == name
        for part in ("onnx_translation", "tensorrt_plugin", "rows_launch", "cuda_kernels"):
            assert callable(getattr(module, part)), f"{name} lacks {part}"
        kernel = next(v for v in vars(module).values() if type(v).__name__ == "Kernel")
        assert kernel.reference and kernel.cpu and kernel.cuda
        with torch._subclasses.fake_tensor.FakeTensorMode():  # a fake kernel: shapes without running a kernel
            assert all(o.shape == (2,) for o in overload(torch.empty(2, 5)))
    assert set(graph_ops.onnx_translation_table()) == {graph_ops.op_overload(n) for n in graph_ops.MODULES}


def _stand_in_trtp():
    recorded = {"register": {}, "impl": {}}

    class TensorDesc:
        def __init__(self, shape, dtype):
            self.shape_expr, self.dtype = tuple(shape), dtype

    trtp = types.SimpleNamespace(
        TensorDesc=TensorDesc, Tensor=type("Tensor", (), {}),
        register=lambda name: lambda fn: recorded["register"].setdefault(name, fn),
        impl=lambda name: lambda fn: recorded["impl"].setdefault(name, fn),
        from_shape_expr=lambda shape, dtype: (tuple(shape), dtype))
    converters = []
    plugins = types.SimpleNamespace(
        generate_plugin_converter=lambda name, supports_dynamic_shapes: converters.append((name, supports_dynamic_shapes)))
    return trtp, plugins, recorded, converters


@pytest.mark.parametrize("shape", [(7,), (3, 7), (2, 5, 49152)])
def test_tensorrt_plugin_describes_what_the_fake_kernel_does(shape):
    trtp, plugins, recorded, converters = _stand_in_trtp()
    graph_ops._REGISTERED.clear()
    try:
        names = graph_ops.register_tensorrt_plugins(trtp, plugins)
    finally:
        graph_ops._REGISTERED.clear()
    assert names == list(graph_ops.MODULES)
    assert converters == [(n, True) for n in names]
    for name in names:
        describe, run = recorded["register"][name], recorded["impl"][name]
        schema_args = [a.name for a in graph_ops.op_overload(name)._schema.arguments]
        params = inspect.signature(describe).parameters
        assert list(params) == schema_args  # torch-tensorrt maps node inputs onto plugin inputs by these names
        assert all(p.annotation is trtp.TensorDesc for p in params.values())
        run_params = inspect.signature(run).parameters
        assert list(run_params)[: len(schema_args)] == schema_args and list(run_params)[-2:] == ["outputs", "stream"]
        assert all(run_params[a].annotation is trtp.Tensor for a in schema_args)
        with torch._subclasses.fake_tensor.FakeTensorMode():
            fake = graph_ops.op_overload(name)(torch.empty(shape))
        described = describe(trtp.TensorDesc(shape, "float32"))
        assert [d[0] for d in described] == [tuple(f.shape) for f in fake]
        assert all(d[1] == "float32" for d in described)


def test_tensorrt_registration_without_tensorrt_says_what_to_install():
    with pytest.raises(tokopt.TokoptError) as info:
        graph_ops.register_tensorrt_plugins()
    message = str(info.value)
    assert "\n" not in message.strip() and ("torch-tensorrt" in message or "CUDA" in message)


def test_ops_in_names_the_tokopt_ops_a_graph_calls():
    class Taps(torch.nn.Module):
        def forward(self, logits):
            return torch.ops.tokopt.logit_stats(logits)[0] + logits.sum(-1)

    program = torch.export.export(Taps(), (torch.randn(2, 8),))
    assert graph_ops.ops_in(program.graph_module) == ["tokopt::logit_stats"]
    assert graph_ops.ops_in(torch.fx.symbolic_trace(Taps())) == ["tokopt::logit_stats"]
    assert graph_ops.ops_in(torch.fx.symbolic_trace(torch.nn.Linear(2, 2))) == []
