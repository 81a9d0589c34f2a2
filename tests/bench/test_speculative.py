"""The speculative benchmark's summary: speedups against the same engine's greedy and Token Recycling, identical
outputs, and PPD's guess acceptance per position, from hand-made run records."""

from tokopt.bench.speculative import SpecBenchConfig, markdown, summarize


def _record(runner, repeat, tokens, seconds, output, guesses=None):
    return {"repeat": repeat, "question": 0, "category": "qa", "runner": runner, "tokens": tokens,
            "seconds": seconds, "mat": None if runner == "onnx" else 2.0, "steps": 1, "tree_sizes": [4],
            "guesses": guesses, "output": output}


def test_summary_compares_with_recycling_and_reports_ppd_guesses():
    config = SpecBenchConfig(methods=("recycling", "ppd+recycling"), baselines=(), repeats=2)
    names = ["onnx", "onnx+recycling", "onnx+ppd+recycling"]
    records = []
    for r in range(2):
        records += [_record("onnx", r, 100, 10.0, [1, 2]),
                    _record("onnx+recycling", r, 100, 8.0, [1, 2]),
                    _record("onnx+ppd+recycling", r, 100, 5.0 + r, [1, 3],
                            guesses=[[10, 4, 6], [6, 1, 3], [3, 0, 1]])]
    results = summarize(config, [{"category": "qa", "question": "q"}], names, records)
    row = results["table"]["overall"]["onnx+ppd+recycling"]
    assert row["speedup_vs_onnx"] == (10 / 5 + 10 / 6) / 2  # median of two repeats
    assert row["speedup_vs_onnx+recycling"] == (8 / 5 + 8 / 6) / 2
    assert "speedup_vs_onnx+recycling" not in results["table"]["overall"]["onnx+recycling"]
    assert results["identical_to_plain_greedy"]["onnx+ppd+recycling"] == "0/2"
    g = results["ppd_guess_acceptance"]["onnx+ppd+recycling"]
    assert g["trials"] == [20, 12, 6] and g["top1"] == [0.4, 1 / 6, 0.0] and g["any_rank"] == [0.6, 0.5, 1 / 3]
    text = markdown(results)
    assert "t+2: top-1 0.40, top-10 0.60 (20 steps)" in text and "| 1.47x |" in text
