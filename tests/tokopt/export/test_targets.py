"""Engine targets: one table (``TARGETS``); ``pt2`` (a torch.export program; ``ep`` is its deprecated old name)
round-trips through a moved directory and a fresh process with greedy tokens and taps equal to eager, and keeps the
speculative config it was exported with; ``tensorrt`` without torch-tensorrt fails first, in one line naming what
to install, and the shapes it would be handed are valid inputs of the graph."""

import json
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

import tokopt
from tokopt.export.engine_dir import (DEPRECATED_TARGETS, GRAPH_FILES, LOWERINGS, TARGETS, Target, export_engine,
                                     get_target)
from tokopt.api.engines import load_engine
from tokopt.errors import EngineError, TokoptError
from tokopt.api.optimize import DEFAULT_PASSES, OptimizeConfig
from tokopt.models.kv_cache import KVCache
from tokopt.models.masks import causal_structure, step_mask
from tokopt.export.tensorrt import ShapeRange, input_shapes, tensorrt_inputs
from tokopt.kernels.graph_ops import require_tensorrt

IDS = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79], [0, 0, 0, 27, 18, 28, 18, 28]])
MASK = torch.tensor([[1] * 8, [0, 0, 0, 1, 1, 1, 1, 1]])


@pytest.fixture(scope="module")
def pt2_export(tiny_model, tmp_path_factory):
    model = tiny_model("llama")
    opt = tokopt.optimize(model, OptimizeConfig(passes=DEFAULT_PASSES), uncertainty=True)
    root = tmp_path_factory.mktemp("pt2")
    export_engine(opt, root / "first", target="pt2", model_config=model.config.to_dict(), model_name="tiny")
    shutil.move(root / "first", root / "moved")
    return opt, root / "moved"


def test_targets_are_one_table():
    assert list(TARGETS) == ["onnx", "pt2", "tensorrt"]
    assert all(isinstance(t, Target) and t.name == name for name, t in TARGETS.items())
    assert dict(GRAPH_FILES) == {"onnx": "model.onnx", "pt2": "program.pt2", "tensorrt": "program_trt.ep"}
    assert dict(LOWERINGS) == {"onnx": ("lower_grouped_mm",), "pt2": (), "tensorrt": ("lower_grouped_mm",)}
    assert TARGETS["tensorrt"].check is require_tensorrt and TARGETS["pt2"].check is None
    assert dict(DEPRECATED_TARGETS) == {"ep": "pt2"}
    with pytest.raises(TokoptError, match="unknown export target 'onnxx'; this version exports: onnx, pt2, tensorrt"):
        get_target("onnxx")
    with pytest.warns(DeprecationWarning, match="'ep' is deprecated: use 'pt2'"):
        assert get_target("ep") is TARGETS["pt2"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert get_target("ep", warn=False) is TARGETS["pt2"]


def test_pt2_manifest_and_program(pt2_export):
    _, path = pt2_export
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["target"] == "pt2" and (path / "program.pt2").is_file()
    assert "logit_taps" in manifest["passes"] and "attention_taps" in manifest["passes"]
    assert manifest["speculative"] is None


def test_pt2_greedy_and_taps_equal_eager(pt2_export):
    opt, path = pt2_export
    pt2 = load_engine(path, uncertainty=True)
    assert pt2.engine.name == "torch.export" and pt2.speculative is None
    want = opt.generate(IDS, MASK, max_new_tokens=12)
    got = pt2.generate(IDS, MASK, max_new_tokens=12)
    assert torch.equal(got, want)
    for name, value in opt.last_result.taps.items():
        torch.testing.assert_close(pt2.last_result.taps[name], value, atol=1e-4, rtol=1e-4, equal_nan=True)


def test_an_engine_written_with_target_ep_still_loads(pt2_export, tmp_path):
    opt, path = pt2_export
    old = tmp_path / "old-ep-engine"
    shutil.copytree(path, old)
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["target"] = "ep"  # as engines exported before the rename say
    del manifest["speculative"]  # ... and before configs were recorded
    (old / "manifest.json").write_text(json.dumps(manifest))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # loading an old engine is not the user's deprecated call: no warning
        engine = load_engine(old)
    assert engine.engine.name == "torch.export" and engine.speculative is None
    assert torch.equal(engine.generate(IDS, MASK, max_new_tokens=6), opt.generate(IDS, MASK, max_new_tokens=6))


def test_export_target_ep_warns_and_writes_pt2(tiny_model, tmp_path):
    opt = tokopt.optimize(tiny_model("llama"), OptimizeConfig(passes=()))
    with pytest.warns(DeprecationWarning, match="use 'pt2'") as caught:
        export_engine(opt, tmp_path / "eng", target="ep")
    assert caught[0].filename == __file__  # points at the caller
    assert json.loads((tmp_path / "eng" / "manifest.json").read_text())["target"] == "pt2"
    assert (tmp_path / "eng" / "program.pt2").is_file()


@pytest.fixture(scope="module")
def recycling_export(tiny_model, tmp_path_factory):
    """A pt2 engine exported from a model decoding with RecyclingConfig(budget=5)."""
    model = tiny_model("llama")
    opt = tokopt.optimize(model, OptimizeConfig(passes=()), speculative=tokopt.RecyclingConfig(budget=5))
    path = tmp_path_factory.mktemp("spec") / "eng"
    export_engine(opt, path, target="pt2", model_config=model.config.to_dict(), model_name="tiny")
    return opt, path


def test_the_manifest_keeps_the_speculative_config(recycling_export):
    opt, path = recycling_export
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["speculative"] == {"method": "recycling", "budget": 5, "max_nodes": 32, "k": 8, "max_depth": 8,
                                       "lookup_nodes": 4, "update_from_prefill": True, "reshape_every": 16,
                                       "persist": True}
    loaded = load_engine(path)
    assert loaded.speculative == tokopt.RecyclingConfig(budget=5) and loaded.drafter.config.budget == 5
    want = opt.with_speculative(None).generate(IDS, MASK, max_new_tokens=10)
    assert torch.equal(loaded.generate(IDS, MASK, max_new_tokens=10), want)
    assert loaded.last_stats is not None  # decoded speculatively
    other = load_engine(path, speculative=tokopt.LookupConfig(budget=3))  # an explicit config wins
    assert other.speculative == tokopt.LookupConfig(budget=3)


@pytest.mark.parametrize("recorded, want", [
    ("lookup", tokopt.LookupConfig()),  # engines exported before configs were recorded: a bare name
    ({"method": "lookup", "budget": 3}, tokopt.LookupConfig(budget=3)),  # missing fields: defaults
    (None, None),
])
def test_older_and_partial_manifests_load(recycling_export, tmp_path, recorded, want):
    _, path = recycling_export
    copy = tmp_path / "eng"
    shutil.copytree(path, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["speculative"] = recorded
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert load_engine(copy).speculative == want


def test_an_unreadable_speculative_config_in_a_manifest_is_an_engine_error(recycling_export, tmp_path):
    _, path = recycling_export
    copy = tmp_path / "eng"
    shutil.copytree(path, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["speculative"] = {"method": "recycling", "budget": 5, "tree_shape": "wide"}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EngineError, match="no field 'tree_shape'.*pass speculative="):
        load_engine(copy)
    assert load_engine(copy, speculative="lookup").speculative == tokopt.LookupConfig()


def test_pt2_runs_in_a_fresh_process(pt2_export):
    opt, path = pt2_export
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
