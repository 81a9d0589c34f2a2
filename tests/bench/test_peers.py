"""bench/peers.py: summary/ratio/markdown math, interleaving, the missing-package line, one tiny end-to-end run."""

import builtins
import json

import pytest

from tokopt.bench import peers
from tokopt.cli import main


def _rows(tps_by_q, rounds=2, tokens=10):
    return [{"question": q, "round": r, "tokens": tokens, "seconds": tokens / tps}
            for r in range(rounds) for q, tps in enumerate(tps_by_q)]


def test_summary_medians_and_ratios():
    samples = {"ortgenai-fp32": _rows([10.0, 20.0, 40.0]), "tokopt-onnx": _rows([12.0, 30.0, 40.0]),
               "ortgenai-int4": _rows([20.0, 40.0, 80.0])}
    s = peers.summarize(samples)
    assert s["ortgenai-fp32"]["tokens_per_s"] == pytest.approx(20.0)
    assert s["ortgenai-fp32"]["ratio"] == pytest.approx(1.0)
    # per-question ratios 1.2, 1.5, 1.0 -> median 1.2 (not 30/20)
    assert s["tokopt-onnx"]["ratio"] == pytest.approx(1.2)
    assert s["ortgenai-int4"]["ratio"] == pytest.approx(2.0)
    assert s["tokopt-onnx"]["samples"] == 6


def test_targets_and_markdown():
    summary = {"ortgenai-fp32": {"tokens_per_s": 20.0, "ratio": 1.0, "samples": 2},
               "tokopt-onnx": {"tokens_per_s": 24.0, "ratio": 1.2, "samples": 2},
               "tokopt-onnx-recycling": {"tokens_per_s": 26.0, "ratio": 1.3, "samples": 2}}
    t = peers.targets(summary)
    assert t[0]["met"] and t[0]["gap"] == pytest.approx(0.1)
    assert t[1]["runner"] == "tokopt-onnx-recycling" and not t[1]["met"]
    md = peers.to_markdown({"summary": summary, "runners": list(summary), "targets": t,
                            "matches_hf": {"ortgenai-fp32": True, "tokopt-onnx": False},
                            "skipped": {"ortgenai-fp32-ngram": "not in this version"}})
    assert "| tokopt-onnx | 24.0 | 1.20x | no |" in md
    assert "| ortgenai-fp32 | 20.0 | 1.00x | yes |" in md
    assert "skipped: not in this version" in md
    assert "no (short by 0.10x)" in md


def test_interleaving_rotates():
    order = peers.interleaved_order(["a", "b", "c"], 4)
    assert order == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]
    assert all(sorted(r) == ["a", "b", "c"] for r in order)


def test_missing_package_one_line_exit_2(monkeypatch, capsys):
    real = builtins.__import__

    def fake(name, *a, **k):
        if name.startswith("onnxruntime_genai"):
            raise ImportError("no")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake)
    rc = main(["bench", "--peers", "ortgenai", "--prompts", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and "pip install 'tokopt[peers]'" in err[0]


@pytest.fixture
def tiny_llama_dir(tiny_model, tokenizer, tmp_path):
    model = tiny_model("llama", vocab_size=len(tokenizer))
    path = tmp_path / "tiny_llama"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.slow
def test_end_to_end_tiny_llama(tiny_llama_dir, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime_genai")
    monkeypatch.setenv("TOKOPT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    result = peers.run_peers_bench(peers.PeersConfig(model=str(tiny_llama_dir), prompts=1, max_new_tokens=8,
                                                     rounds=1, out=str(out)))
    assert (out / "peers.png").exists() and (out / "peers.md").exists()
    saved = json.loads((out / "peers.json").read_text())
    assert set(saved["summary"]) == set(result["summary"])
    for name in result["runners"]:
        assert result["tokens"][name][0], name
    assert result["matches_hf"]["ortgenai-fp32"] is True
