"""Every pass combination through every engine target, for dense and MoE families: an engine directory exported
with all graph passes at once (default passes, uncertainty taps, PPD prompt slots) gives greedy tokens identical
to the eager graph and taps within 1e-4, plain and with PPD + Token Recycling speculation (tiny random models of
each architecture; the real SmolLM2 runs in test_engine_dir.py; ``-m slow`` adds the other families)."""

import shutil

import pytest
import torch

import tokopt
from tokopt.export.engine_dir import export_engine
from tokopt.api.engines import load_engine
from tokopt.models.loading import model_fingerprint
from tokopt.api.optimize import DEFAULT_PASSES, OptimizeConfig
from tokopt.runtime.artifacts import save_ppd_artifact

IDS = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79], [0, 0, 0, 27, 18, 28, 18, 28]])
MASK = torch.tensor([[1] * 8, [0, 0, 0, 1, 1, 1, 1, 1]])
FAST = [("llama", "onnx"), ("mixtral", "onnx"), ("llama", "pt2")]
MORE = [("qwen2", "onnx"), ("qwen2_moe", "onnx"), ("olmoe", "onnx"), ("mixtral", "pt2")]  # same paths as a default
# case of the same kind (dense / MoE, onnx / pt2); ~1 min each
CASES = [pytest.param(c, id=f"{c[0]}-{c[1]}") for c in FAST] + [
    pytest.param(c, id=f"{c[0]}-{c[1]}", marks=pytest.mark.slow) for c in MORE]


@pytest.fixture(scope="module", params=CASES)
def pair(request, tiny_model, tmp_path_factory):
    family, target = request.param
    model = tiny_model(family)
    root = tmp_path_factory.mktemp(f"{family}-{target}")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TOKOPT_CACHE", str(root / "cache"))
        table = torch.randn(3, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
        save_ppd_artifact(table, model_fingerprint(model), {"rank_accuracy": [[0.3, 0.1]] * 3})
        opt = tokopt.optimize(model, OptimizeConfig(passes=DEFAULT_PASSES), uncertainty=True,
                              speculative=tokopt.SpeculativeConfig("ppd+recycling", budget=4))
        export_engine(opt, root / "a", target=target, model_config=model.config.to_dict(), model_name=family)
        shutil.move(root / "a", root / "b")
        yield opt, load_engine(root / "b", uncertainty=True)


@pytest.mark.parametrize("method", [None, "ppd+recycling"])
def test_engine_equals_eager(pair, method):
    eager, engine = (o.with_speculative(tokopt.SpeculativeConfig(method, budget=4) if method else None)
                     for o in pair)
    want = eager.generate(IDS, MASK, max_new_tokens=10)
    got = engine.generate(IDS, MASK, max_new_tokens=10)
    assert torch.equal(got, want)
    if method is None:  # taps of plain decoding, token by token
        assert set(engine.last_result.taps) == set(eager.last_result.taps)
        for name, value in eager.last_result.taps.items():
            torch.testing.assert_close(engine.last_result.taps[name], value, atol=1e-4, rtol=1e-4, equal_nan=True)



def test_tokopt_ops_are_named_and_lowered(pair):
    """The taps' tokopt::logit_stats node reaches the engine: listed in the manifest, one node of pt2 programs
    (registered again on load), standard ONNX ops in ONNX graphs (plain ONNX Runtime, which refuses unknown
    domains, ran them in test_engine_equals_eager)."""
    _, engine = pair
    assert engine.manifest["tokopt_ops"] == ["tokopt::logit_stats"]
    if engine.manifest["target"] == "pt2":
        calls = [n.target for n in engine.engine.module.graph.nodes if n.op == "call_function"]
        assert calls.count(torch.ops.tokopt.logit_stats.default) == 1
