"""tokopt.bench.uncertainty: the quality table (PRR/ROC-AUC with intervals and a random control), its markdown
and plot, and the CLI's checks."""

import numpy as np
import pytest

from tokopt.bench.uncertainty import markdown, plot, quality_table
from tokopt.cli import main


def fake_result(table):
    return {"questions": 40, "counts": {"capital": 20, "arithmetic": 20}, "accuracy": 0.5, "machine": "test",
            "quality": table, "per_kind_prr": {}, "seconds_per_answer": {"good": 0.0, "bad": 0.0},
            "tap_overhead": {"default passes": {"tokens_per_s": 10.0, "relative": 1.0}}}


def test_quality_table_ranks_an_informative_score_above_random():
    rng = np.random.default_rng(0)
    correct = rng.random(200) < 0.5
    informative = np.where(correct, 0.0, 1.0) + rng.normal(0, 0.3, 200)  # higher when wrong
    table = quality_table({"good": informative, "bad": -informative}, correct, n_boot=200, seed=0)
    assert table["good"]["prr"] > 0.6 and table["good"]["roc_auc"] > 0.85
    assert table["bad"]["prr"] < -0.6 and table["bad"]["roc_auc"] < 0.15
    assert abs(table["random"]["prr"]) < 0.3 and 0.35 < table["random"]["roc_auc"] < 0.65
    lo, hi = table["good"]["prr_90"]
    assert lo <= table["good"]["prr"] <= hi


def test_markdown_and_plot(tmp_path):
    correct = np.array([True, False] * 20)
    table = quality_table({"good": (~correct).astype(float), "bad": correct.astype(float)}, correct, 50, 0)
    text = markdown(fake_result(table))
    assert text.index("| good |") < text.index("| bad |") < text.index("| random |")  # best first, control last
    plot(fake_result(table), tmp_path / "q.png")
    assert (tmp_path / "q.png").stat().st_size > 1000


def test_cli_rejects_unknown_estimators(capsys):
    assert main(["bench", "--suite", "uncertainty", "--estimators", "msp,nope"]) == 2
    assert "unknown uncertainty estimator" in capsys.readouterr().err
