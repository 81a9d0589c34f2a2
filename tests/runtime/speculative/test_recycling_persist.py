"""Token Recycling's adjacency matrix and acceptance statistics persist per model across processes (a new
drafter starts warm), versioned and ignored cleanly when corrupt or made for another model; decoding stays
plain greedy's."""

import numpy as np
import pytest
import torch

import tokopt
from tokopt.runtime.speculative.configs import RecyclingConfig
from tokopt.runtime.speculative.drafters.recycling import TokenRecycling
from tokopt.runtime.speculative.methods import build_drafter
from tokopt.runtime.speculative.persist import load_arrays, save_arrays, state_path

IDS = torch.tensor([[5, 9, 17, 33, 5, 9, 17, 40, 41, 42]])


@pytest.fixture(scope="module")
def plain(tiny_model):
    return tokopt.optimize(tiny_model("llama"))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKOPT_CACHE", str(tmp_path))
    return tmp_path


def _spec(plain, **kw):
    return plain.with_speculative(RecyclingConfig(budget=6, **kw))


def test_state_survives_a_new_process(plain, cache):
    first = _spec(plain)
    out = first.generate(IDS, max_new_tokens=48, eos_token_id=[])
    assert torch.equal(out, plain.generate(IDS, max_new_tokens=48, eos_token_id=[]))
    files = list((cache / "recycling").glob("*.npz"))
    assert len(files) == 1 and files[0].stat().st_size < 64 << 20
    fresh = build_drafter(RecyclingConfig(budget=6), engine=plain.engine, model_key=plain.model_key)  # "new process"
    assert torch.equal(fresh.adj, first.drafter.adj)
    assert torch.equal(fresh.stats.trials, first.drafter.stats.trials) and fresh.stats.trials.sum() > 0
    last = int(out[0, -1])
    assert fresh._fill(last)[0][1:], "a warm drafter's first tree has draft nodes"
    cold = TokenRecycling(plain.spec.vocab_size, RecyclingConfig(budget=6))
    assert not cold._fill(last)[0][1:]
    again = plain.with_speculative(RecyclingConfig(budget=6))  # warm start, same tokens
    assert torch.equal(again.generate(IDS, max_new_tokens=48, eos_token_id=[]), out)


def test_persist_off_writes_nothing(plain, cache):
    _spec(plain, persist=False).generate(IDS, max_new_tokens=16, eos_token_id=[])
    assert not (cache / "recycling").exists()


def test_corrupt_or_mismatched_state_is_ignored(plain, cache, capsys, monkeypatch):
    monkeypatch.setenv("TOKOPT_QUIET", "0")
    path = state_path("recycling", plain.model_key)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not an npz")
    spec = _spec(plain)
    assert (spec.drafter.adj == -1).all()
    assert "ignoring" in capsys.readouterr().err
    out = spec.generate(IDS, max_new_tokens=24, eos_token_id=[])  # and overwrites it with a good file
    assert torch.equal(out, plain.generate(IDS, max_new_tokens=24, eos_token_id=[]))
    assert load_arrays(path, {"format": 1}) is not None
    # another vocabulary / model key / format: ignored with a note
    v = plain.spec.vocab_size
    save_arrays(path, {"adj": np.zeros((v + 1, 8), np.int32)}, {"format": 1, "vocab_size": v + 1, "k": 8,
                                                                "max_depth": 8, "model_key": plain.model_key})
    assert (_spec(plain).drafter.adj == -1).all() and "vocab_size" in capsys.readouterr().err
    save_arrays(path, {"adj": np.zeros((v, 8), np.int32)}, {"format": 99, "vocab_size": v, "k": 8, "max_depth": 8,
                                                            "model_key": plain.model_key})
    assert (_spec(plain).drafter.adj == -1).all() and "format" in capsys.readouterr().err
    # right header, wrong arrays
    save_arrays(path, {"adj": np.zeros((v, 8), np.int32)}, {"format": 1, "vocab_size": v, "k": 8, "max_depth": 8,
                                                            "model_key": plain.model_key})
    assert (_spec(plain).drafter.adj == -1).all() and "ignoring" in capsys.readouterr().err


def test_no_pickle_and_size_cap(tmp_path):
    path = tmp_path / "s.npz"
    assert not save_arrays(path, {"a": np.zeros(1000, np.int64)}, {"format": 1}, max_bytes=100)
    assert not path.exists()
    np.savez(path, __header__=np.frombuffer(b'{"format": 1}', np.uint8), a=np.array([{"x": 1}], dtype=object))
    assert load_arrays(path, {"format": 1}) is None  # object arrays would need pickle: refused


def test_cli_remeasure_forgets_states_and_profiles(cache, monkeypatch, capsys):
    from tokopt import cli
    from tokopt.runtime.speculative import persist

    for kind, name in [("recycling", "a.npz"), ("latency", "b.json")]:
        (cache / kind).mkdir()
        (cache / kind / name).write_text("{}")
    called = []
    monkeypatch.setattr("tokopt.bench.harness.run_bench", lambda *a, **k: called.append(1))
    try:
        cli.main(["bench", "--remeasure", "--engines", "eager", "--prompts", "1"])
    except Exception:
        pass  # only the deletion before the benchmark is checked here
    assert "deleted 1 latency profile(s) and 1 Token Recycling state(s)" in capsys.readouterr().out
    assert not list((cache / "recycling").iterdir()) and not list((cache / "latency").iterdir())
    assert persist.forget_states("recycling") == []


def test_saves_are_throttled_and_flushed_on_demand(plain, cache):
    """The first changed call writes at once; later calls within SAVE_EVERY_S leave the file alone (no write per
    request) until ``save()`` (also what runs at exit) writes the newer state."""
    spec = _spec(plain)
    spec.generate(IDS, max_new_tokens=16, eos_token_id=[])
    path = spec.drafter._state_path
    first = path.read_bytes()
    spec.generate(IDS[:, :6], max_new_tokens=16, eos_token_id=[])
    assert spec.drafter._dirty and path.read_bytes() == first
    spec.drafter.save()
    assert not spec.drafter._dirty and path.read_bytes() != first
