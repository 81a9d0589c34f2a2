"""``tokopt place``: the table, the map file, one-line errors."""

import json

import numpy as np

from tokopt.cli import main


def _trace(tmp_path):
    rng = np.random.default_rng(0)
    g = rng.integers(0, 2, 400)
    experts = np.stack([g * 4 + rng.integers(0, 4, 400) for _ in range(3)], axis=1)[:, :, None]
    path = tmp_path / "t.npy"
    np.save(path, experts)
    return path


def test_place_writes_map_and_prints_table(tmp_path, capsys):
    out = tmp_path / "MAP.json"
    assert main(["place", str(_trace(tmp_path)), "--gpus", "2", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "contiguous" in text and "random (expected)" in text and "solve" in text
    d = json.loads(out.read_text())
    assert d["gpus"] == 2 and d["num_layers"] == 3 and len(d["placement"][0]) == 8
    assert d["expected_cross_fraction"] <= d["contiguous_cross_fraction"]


def test_place_with_nodes_and_replicas(tmp_path, capsys):
    out = tmp_path / "MAP.json"
    assert main(["place", str(_trace(tmp_path)), "--gpus", "4", "--nodes", "2", "--replicas", "4",
                 "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "inter-node" in text and "replicas 4" in text
    assert len(json.loads(out.read_text())["replicas"]) == 3


def test_place_errors_are_one_line(tmp_path, capsys):
    assert main(["place", str(_trace(tmp_path)), "--gpus", "3", "-o", str(tmp_path / "m.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tokopt: error:") and "divide" in err and "\n" not in err
    assert main(["place", str(tmp_path / "missing.npz"), "--gpus", "2", "-o", str(tmp_path / "m.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
