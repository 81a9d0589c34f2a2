"""Engine targets besides ONNX: ``ep`` (a torch.export program) round-trips through a moved directory and a fresh
process with greedy tokens and taps equal to eager; ``tensorrt`` without torch-tensorrt fails first, in one line
naming what to install, and the shapes it would be handed are valid inputs of the graph."""

import json
import shutil
import subprocess
import sys

import pytest
import torch

import tokopt
from tokopt.engine_dir import export_engine, load_engine
from tokopt.errors import TokoptError
from tokopt.optimize import DEFAULT_PASSES, OptimizeConfig
from tokopt.runtime.kv_cache import KVCache
from tokopt.runtime.masks import causal_structure, step_mask
from tokopt.tensorrt_target import ShapeRange, input_shapes, require_tensorrt, tensorrt_inputs

IDS = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79], [0, 0, 0, 27, 18, 28, 18, 28]])
MASK = torch.tensor([[1] * 8, [0, 0, 0, 1, 1, 1, 1, 1]])


@pytest.fixture(scope="module")
def ep_export(tiny_model, tmp_path_factory):
    model = tiny_model("llama")
    opt = tokopt.optimize(model, OptimizeConfig(passes=DEFAULT_PASSES), uncertainty=True)
    root = tmp_path_factory.mktemp("ep")
    export_engine(opt, root / "first", target="ep", model_config=model.config.to_dict(), model_name="tiny")
    shutil.move(root / "first", root / "moved")
    return opt, root / "moved"


def test_ep_manifest_and_program(ep_export):
    _, path = ep_export
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["target"] == "ep" and (path / "program.pt2").is_file()
    assert "logit_taps" in manifest["passes"] and "attention_taps" in manifest["passes"]


def test_ep_greedy_and_taps_equal_eager(ep_export):
    opt, path = ep_export
    ep = load_engine(path, uncertainty=True)
    assert ep.engine.name == "torch.export"
    want = opt.generate(IDS, MASK, max_new_tokens=12)
    got = ep.generate(IDS, MASK, max_new_tokens=12)
    assert torch.equal(got, want)
    for name, value in opt.last_result.taps.items():
        torch.testing.assert_close(ep.last_result.taps[name], value, atol=1e-4, rtol=1e-4, equal_nan=True)


def test_ep_runs_in_a_fresh_process(ep_export):
    opt, path = ep_export
    want = opt.generate(IDS[:1], max_new_tokens=10)[0].tolist()
    code = ("import torch, tokopt; opt = tokopt.load_engine(%r); "
            "print(opt.generate(torch.tensor([%r]), max_new_tokens=10)[0].tolist())") % (str(path), IDS[0].tolist())
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == str(want)


def _no_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_tensorrt", None)  # import fails as if not installed


def test_tensorrt_missing_is_one_clear_error_before_any_work(monkeypatch, tiny_model, tmp_path):
    _no_tensorrt(monkeypatch)
    with pytest.raises(TokoptError, match=r"pip install 'tokopt\[tensorrt\]'") as err:
        require_tensorrt()
    assert "\n" not in str(err.value) and "--target onnx" in str(err.value)
    opt = tokopt.optimize(tiny_model("llama"), OptimizeConfig(passes=()))
    with pytest.raises(TokoptError, match="torch-tensorrt"):
        export_engine(opt, tmp_path / "trt", target="tensorrt")
    assert not (tmp_path / "trt").exists()


def test_cli_export_tensorrt_without_it_says_what_to_install(tmp_path):
    code = ("import sys; sys.modules['torch_tensorrt'] = None; from tokopt.cli import main; "
            "sys.exit(main(['export', '--target', 'tensorrt', '-o', %r]))") % str(tmp_path / "trt")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    lines = [line for line in out.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "torch-tensorrt" in lines[0], out.stderr
    assert not (tmp_path / "trt").exists()


def test_tensorrt_shapes_are_valid_graph_inputs(tiny_model):
    opt = tokopt.optimize(tiny_model("llama"), OptimizeConfig(passes=DEFAULT_PASSES))
    spec = opt.engine.spec
    shapes = ShapeRange(max_batch=3, max_new=5, max_past=7, opt_batch=2, opt_new=3, opt_past=4)
    specs = input_shapes(spec, shapes)
    assert [name for name, _, _ in specs] == spec.input_names
    for which in range(3):  # min, opt, max: the graph runs at each, as TensorRT's profile would
        sizes = {name: ranges[which] for name, ranges, _ in specs}
        batch, n = sizes["input_ids"]
        past = sizes["past_key.0"][2] if "past_key.0" in sizes else sizes[spec.input_names[4]][2]
        assert sizes["attention_mask"] == (batch, 1, n, past + n) and sizes["logits_rows"] == (n,)
        cache = KVCache([torch.randn(s) for s in (sizes[k] for k in spec.input_names[4:])],
                        torch.ones(batch, past, dtype=torch.bool))
        mask = step_mask(cache.valid, causal_structure(n, batch))
        ids = torch.randint(0, spec.vocab_size, (batch, n))
        out = opt.engine(ids, torch.arange(past, past + n).expand(batch, n), mask, torch.arange(n), cache.tensors)
        assert out.logits.shape == (batch, n, spec.vocab_size)


def test_tensorrt_inputs_name_dtype_and_range(tiny_model):
    class FakeTRT:  # stands in for torch_tensorrt to see what would be handed to it
        class Input(dict):
            def __init__(self, **kw):
                super().__init__(kw)

    spec = tokopt.optimize(tiny_model("llama"), OptimizeConfig(passes=())).engine.spec
    inputs = tensorrt_inputs(spec, ShapeRange(), torch_tensorrt=FakeTRT)
    assert [i["name"] for i in inputs] == spec.input_names
    assert inputs[0]["dtype"] == torch.int64 and inputs[2]["dtype"] == spec.torch_dtype
    assert inputs[4]["min_shape"] == (1, spec.num_kv_heads, 1, spec.head_dim)
    assert inputs[4]["max_shape"] == (8, spec.num_kv_heads, 4096, spec.head_dim)
