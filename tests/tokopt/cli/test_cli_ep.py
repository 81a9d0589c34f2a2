"""`tokopt generate --ep N`: text through sharded experts, the counters table, and clear refusals."""

from __future__ import annotations

import pytest

from tokopt.cli import main


@pytest.fixture(scope="module")
def tiny_moe_dir(tiny_model, tokenizer, tmp_path_factory):
    """A small random Mixtral with SmolLM2's tokenizer, saved as a local HF directory."""
    model = tiny_model("mixtral", vocab_size=len(tokenizer), num_local_experts=4, num_experts=4)
    path = tmp_path_factory.mktemp("tiny_moe")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("strategy", ["context_coherent", "two_alltoall"])
def test_generate_ep_prints_text_and_counters(tiny_moe_dir, capsys, strategy):
    rc = main(["generate", "--model", str(tiny_moe_dir), "--ep", "2", "--ep-strategy", strategy,
               "--max-new-tokens", "4", "--no-chat", "--report", "Hello there", "Paris is"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert out.out.count("--- [") == 2
    assert f"{strategy} over 2 ranks" in out.err and "cross-rank fraction" in out.err
    assert ("Alltoalls per MoE layer [1]" if strategy == "context_coherent" else "Alltoalls per MoE layer [2]") in out.err


def test_generate_ep_refuses_a_dense_model(capsys):
    rc = main(["generate", "--model", "smollm2", "--ep", "2", "--max-new-tokens", "2", "Hi"])
    assert rc == 2
    assert "no Mixture-of-Experts layers" in capsys.readouterr().err


def test_generate_ep_refuses_sampling(tiny_moe_dir, capsys):
    rc = main(["generate", "--model", str(tiny_moe_dir), "--ep", "2", "--sample", "Hi"])
    assert rc == 2
    assert "greedy" in capsys.readouterr().err


def test_export_ep_then_generate_from_the_engine(tiny_moe_dir, tmp_path, capsys):
    args = ["--max-new-tokens", "4", "--no-chat", "Hello there"]
    assert main(["generate", "--model", str(tiny_moe_dir), "--ep", "2", *args]) == 0
    want = capsys.readouterr().out
    assert main(["export", str(tiny_moe_dir), "--ep", "2", "-o", str(tmp_path / "eng")]) == 0
    out = capsys.readouterr().out
    assert "expert-parallel engine for 2 ranks" in out and "rank1.safetensors" in out
    assert main(["generate", "--engine", str(tmp_path / "eng"), *args]) == 0
    got = capsys.readouterr()
    assert got.out == want and "context_coherent over 2 ranks" in got.err


@pytest.mark.parametrize("argv, message", [
    (["--ep", "2", "--target", "onnx"], "not --target onnx"),
    (["--ep", "2", "--uncertainty"], "not --uncertainty"),
    (["--ep-strategy", "two_alltoall"], "add --ep N"),
])
def test_export_ep_refusals(tiny_moe_dir, tmp_path, capsys, argv, message):
    assert main(["export", str(tiny_moe_dir), *argv, "-o", str(tmp_path / "eng")]) == 2
    assert message in capsys.readouterr().err


def test_generate_ep_refuses_a_single_process_engine(tmp_path, capsys):
    (tmp_path / "manifest.json").write_text('{"format": "tokopt-engine", "format_version": 1, "target": "onnx"}')
    assert main(["generate", "--engine", str(tmp_path), "--ep", "2", "Hi"]) == 2
    assert "single-process 'onnx' engine" in capsys.readouterr().err


def test_export_ep_takes_target_pt2_and_the_old_name_with_a_warning(tiny_moe_dir, tmp_path, capsys):
    assert main(["export", str(tiny_moe_dir), "--ep", "2", "--target", "pt2", "-o", str(tmp_path / "a")]) == 0
    assert "warning" not in capsys.readouterr().err
    assert main(["export", str(tiny_moe_dir), "--ep", "2", "--target", "ep", "-o", str(tmp_path / "b")]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if "deprecated" in line]
    assert len(err) == 1 and "use 'pt2'" in err[0]
