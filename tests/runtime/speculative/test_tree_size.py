"""runtime.speculative.tree_size: latency profiles (measured, cached, interpolated) and the best size."""

import json

import pytest

from tokopt.models.decoder_graph import DecoderGraph
from tokopt.runtime.eager_engine import EagerEngine
from tokopt.runtime.speculative.tree_size import LatencyProfile, best_size, latency_profile, measure_latency


def test_profile_interpolates_and_extrapolates():
    p = LatencyProfile({1: 1.0, 2: 2.0, 4: 3.0}, past=8, machine="m", engine="e")
    assert p(3) == pytest.approx(2.5)
    assert p(6) == pytest.approx(4.0)
    assert LatencyProfile.from_dict(json.loads(json.dumps(p.to_dict()))).seconds == p.seconds


def test_best_size_follows_the_hardware():
    curve = [1.0 + sum(0.5 ** k for k in range(1, n + 1)) for n in range(33)]  # E(n) saturating at 2
    flat = LatencyProfile({1: 1.0, 33: 1.05}, 0, "gpu-like", "e")  # verify cost nearly flat
    steep = LatencyProfile({1: 1.0, 2: 1.3, 33: 4.0}, 0, "2-core cpu", "e")
    assert best_size(curve, flat) >= 8
    assert best_size(curve, steep) <= 3
    assert best_size(curve, steep) >= 1


def test_measure_and_cache(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("TOKOPT_CACHE", str(tmp_path))
    graph = DecoderGraph(tiny_model("llama")).eval()
    engine = EagerEngine(graph, graph.spec)
    seconds = measure_latency(engine, [1, 2, 5], past=16, repeats=2)
    assert set(seconds) == {1, 2, 5} and all(s > 0 for s in seconds.values())
    profile = latency_profile(engine, "tiny", max_nodes=4, past=16, repeats=1)
    files = list((tmp_path / "latency").glob("*.json"))
    assert len(files) == 1 and set(profile.seconds) == {1, 2, 3, 4}
    again = latency_profile(engine, "tiny", max_nodes=4, past=16, repeats=1)
    assert again.seconds == profile.seconds  # read back, not re-measured
