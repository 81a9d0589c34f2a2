"""An engine directory exported with ``--speculative ppd``: the ONNX graph carries the prompt-token slots, the
manifest their count and accuracies, and the loaded engine decodes with PPD by default — its prompt rows equal the
eager graph's, and its greedy output equals plain decoding, also after the directory moved."""

import json
import shutil

import pytest
import torch

import tokopt
from tokopt.export.engine_dir import export_engine
from tokopt.api.engines import load_engine
from tokopt.models.loading import model_fingerprint
from tokopt.models.kv_cache import KVCache
from tokopt.models.masks import causal_structure, step_mask
from tokopt.runtime.artifacts import save_ppd_artifact

ACCURACY = [[0.3, 0.1], [0.2, 0.1], [0.1, 0.05]]


@pytest.fixture(scope="module")
def exported(tiny_model, tmp_path_factory):
    """A tiny Llama with a random 'trained' prompt table, exported with speculative='ppd' and then moved."""
    model = tiny_model("llama")
    root = tmp_path_factory.mktemp("ppd_engine")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TOKOPT_CACHE", str(root / "cache"))
        table = torch.randn(3, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
        save_ppd_artifact(table, model_fingerprint(model), {"rank_accuracy": ACCURACY})
        opt = tokopt.optimize(model, speculative=tokopt.SpeculativeConfig("ppd", budget=4))
        export_engine(opt, root / "first", model_config=model.config.to_dict(), model_name="tiny")
        shutil.move(root / "first", root / "moved")
        yield model, opt, root / "moved"


def test_manifest_records_slots_and_method(exported):
    model, _, path = exported
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["speculative"] == tokopt.PPDConfig(budget=4).to_dict()  # the whole config, as JSON
    assert manifest["speculative"]["method"] == "ppd"
    ppd = manifest["graph_meta"]["ppd"]
    assert ppd["k"] == 3 and ppd["vocab_size"] == model.config.vocab_size and ppd["trained"]
    assert ppd["rank_accuracy"] == ACCURACY


def test_prompt_rows_equal_eager(exported):
    model, opt, path = exported
    ort = load_engine(path)
    spec, vocab = opt.engine.spec, model.config.vocab_size
    ids = torch.tensor([[5, 9, 17, vocab, vocab + 1, vocab + 2]])  # text, then a prompt chain
    n = ids.shape[1]
    cache = KVCache.empty(spec, 1)
    mask = step_mask(cache.valid, causal_structure(n, 1))
    args = (ids, torch.arange(n)[None], mask, torch.arange(n), cache.tensors)
    eager, onnx = opt.engine(*args), ort.engine(*args)
    torch.testing.assert_close(onnx.logits, eager.logits, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(eager.logits[0, 3], eager.logits[0, 4])  # the slots read different embeddings


def test_loaded_engine_decodes_with_ppd_losslessly(exported):
    model, opt, path = exported
    ort = load_engine(path)  # no speculative argument: the manifest's
    assert ort.speculative == tokopt.PPDConfig(budget=4)  # the exported config, budget included
    ids = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79]])
    plain = opt.with_speculative(None).generate(ids, max_new_tokens=24)
    got = ort.generate(ids, max_new_tokens=24)
    assert torch.equal(got, plain)
    assert max(ort.last_stats.tree_sizes) >= 4  # the root and its prompt chain at least
