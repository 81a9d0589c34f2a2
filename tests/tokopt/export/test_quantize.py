"""Weight-only quantized ONNX engines (tokopt.export.quantize; export_engine(quantize=), tokopt export --quantize).

Tiny random llama (hidden 64, 2 layers, vocab 256): exports take a few seconds each. Tolerance on logits: the
quantized engine's prefill logits differ from the fp32 engine's by at most 5% (int8) / 25% (int4) of the fp32
logits' largest magnitude (random weights have no outliers; measured: about 1% and 14-16%).
"""

from __future__ import annotations

import json

import onnx
import pytest
import torch

import tokopt
from tokopt.cli import main
from tokopt.errors import TokoptError
from tokopt.export.engine_dir import export_engine
from tokopt.export.quantize import check_quantize
from tokopt.runtime.request import prefill_rows

PROMPTS = torch.tensor([[5, 9, 17, 3, 5, 9, 17, 3], [1, 2, 3, 4, 1, 2, 3, 4]])
TOL = {"int8": 0.05, "int4": 0.25}


@pytest.fixture(scope="module")
def engines(tiny_model, tmp_path_factory):
    opt = tokopt.optimize(tiny_model("llama", vocab_size=256))
    root = tmp_path_factory.mktemp("quant")
    paths = {q: export_engine(opt, root / q, model_config=opt.model.config.to_dict(), model_name="tiny",
                              quantize=None if q == "fp32" else q) for q in ("fp32", "int8", "int4")}
    return opt, paths


def _logits(path):
    engine = tokopt.load_engine(path).engine
    n = PROMPTS.shape[1]
    out, _ = prefill_rows(engine, PROMPTS, torch.ones_like(PROMPTS, dtype=torch.bool), torch.arange(n))
    return out.logits


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_engine_loads_runs_and_stays_close(engines, mode):
    _, paths = engines
    manifest = json.loads((paths[mode] / "manifest.json").read_text())
    q = manifest["quantize"]
    assert q["mode"] == mode and q["bits"] == (8 if mode == "int8" else 4) and q["op"] == "com.microsoft.MatMulNBits"
    assert q["head_quantized"] and q["head_bits"] == 8 and q["matmuls"] == 15  # 2 x 7 projections + the LM head
    assert json.loads((paths["fp32"] / "manifest.json").read_text())["quantize"] is None
    graph = onnx.load(str(paths[mode] / "model.onnx"), load_external_data=False).graph
    inits = {i.name for i in graph.initializer}
    assert sum(n.op_type == "MatMulNBits" for n in graph.node) == 15
    assert not [n for n in graph.node if n.op_type == "MatMul" and n.input[1] in inits]  # every weight quantized
    assert (paths[mode] / "model.onnx.data").is_file()  # the external-data layout is kept
    assert q["weights_bytes"] < (paths["fp32"] / "model.onnx.data").stat().st_size
    ref, got = _logits(paths["fp32"]), _logits(paths[mode])
    assert got.shape == ref.shape and torch.isfinite(got).all()
    err = (got - ref).abs().max() / ref.abs().max()
    assert 0 < err < TOL[mode], f"{mode}: relative error {err:.3f}"
    out = tokopt.load_engine(paths[mode]).generate(PROMPTS, max_new_tokens=6)
    assert out.shape == (2, PROMPTS.shape[1] + 6)


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("method", ["lookup", "recycling"])
def test_quantized_engine_speculative_equals_its_greedy(engines, mode, method):
    _, paths = engines
    greedy = tokopt.load_engine(paths[mode]).generate(PROMPTS, max_new_tokens=16)
    spec = tokopt.load_engine(paths[mode], speculative=method)
    assert torch.equal(spec.generate(PROMPTS, max_new_tokens=16), greedy)
    assert spec.last_stats is not None


def test_head_can_stay_fp32(engines, tmp_path):
    opt, _ = engines
    path = export_engine(opt, tmp_path / "e", model_name="tiny", quantize="int4", quantize_head=False)
    q = json.loads((path / "manifest.json").read_text())["quantize"]
    assert not q["head_quantized"] and q["matmuls"] == 14
    graph = onnx.load(str(path / "model.onnx"), load_external_data=False).graph
    assert sum(n.op_type == "MatMulNBits" for n in graph.node) == 14


def test_tied_head_is_quantized(tiny_model, tmp_path):
    opt = tokopt.optimize(tiny_model("llama", vocab_size=256, tie_word_embeddings=True))
    path = export_engine(opt, tmp_path / "tied", model_name="tiny", quantize="int4")
    q = json.loads((path / "manifest.json").read_text())["quantize"]
    assert q["head_quantized"] and q["matmuls"] == 15
    graph = onnx.load(str(path / "model.onnx"), load_external_data=False).graph
    assert sum(n.op_type == "MatMulNBits" for n in graph.node) == 15
    greedy = tokopt.load_engine(path).generate(PROMPTS, max_new_tokens=8)
    assert torch.equal(tokopt.load_engine(path, speculative="recycling").generate(PROMPTS, max_new_tokens=8), greedy)
    tokopt.load_engine(path).generate(PROMPTS[:1], max_new_tokens=3)


def test_bad_values_are_refused(engines, tmp_path):
    opt, _ = engines
    assert check_quantize(None) is None and check_quantize("int4") == "int4"
    with pytest.raises(TokoptError, match="--quantize must be one of int8, int4"):
        check_quantize("int3")
    with pytest.raises(TokoptError, match="quantizes ONNX Runtime engines"):
        export_engine(opt, tmp_path / "p", target="pt2", quantize="int8")


@pytest.mark.parametrize("argv, message", [
    (["export", "--quantize", "int3", "-o", "X"], "--quantize must be one of int8, int4"),
    (["export", "--quantize", "int8", "--target", "pt2", "-o", "X"], "quantizes ONNX Runtime engines"),
])
def test_cli_bad_quantize_exits_2_in_one_line(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(tokopt, "load", lambda *a, **k: pytest.fail("loaded a model before checking --quantize"))
    argv = [a if a != "X" else str(tmp_path / "e") for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


def test_int4_body_int8_head(engines):
    _, paths = engines
    graph = onnx.load(str(paths["int4"] / "model.onnx"), load_external_data=False).graph
    bits = [next(a.i for a in n.attribute if a.name == "bits") for n in graph.node if n.op_type == "MatMulNBits"]
    assert sorted(bits) == [4] * 14 + [8]
