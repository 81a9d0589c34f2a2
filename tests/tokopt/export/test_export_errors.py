"""An export that cannot lower an op fails with one message naming the op, the node that calls it and the pass that
added it, and writes nothing."""

import pytest
import torch

import tokopt
from tokopt.export.engine_dir import export_engine
from tokopt.errors import EngineError
from tokopt.api.optimize import OptimizeConfig
from tokopt.passes.manager import registered_passes
from tokopt.passes.registry import PassReport, register_pass


@torch.library.custom_op("tokopt_test::mystery", mutates_args=())
def mystery(x: torch.Tensor) -> torch.Tensor:
    return x.clone()


@mystery.register_fake
def _(x):
    return torch.empty_like(x)


if "test_mystery" not in registered_passes():
    @register_pass("test_mystery", "test only: routes the logits through an op no exporter knows")
    def _mystery_pass(gm, config=None):
        output = next(n for n in gm.graph.nodes if n.op == "output")
        values = list(output.args[0])
        with gm.graph.inserting_before(output):
            values[0] = gm.graph.call_function(torch.ops.tokopt_test.mystery.default, (values[0],))
        output.args = (tuple(values),)
        gm.recompile()
        return gm, PassReport("test_mystery", matched=1, changed=True)


def test_unlowerable_op_names_node_op_and_pass(tiny_model, tmp_path):
    opt = tokopt.optimize(tiny_model("llama"), OptimizeConfig(passes=("test_mystery",)))
    with pytest.raises(EngineError) as err:
        export_engine(opt, tmp_path / "engine", target="onnx")
    message = str(err.value)
    assert "tokopt_test.mystery" in message and "added by pass 'test_mystery'" in message and "node mystery" in message
    assert "--target pt2" in message and "\n" not in message
    assert not (tmp_path / "engine").exists()
