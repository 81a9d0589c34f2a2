"""``tokopt train-ppd``: a tiny training run lowers the distillation loss, saves the artifact for its model (with
a loss curve and per-position accuracies beside the untrained control), and another model's is refused."""

import pytest
import torch

from tokopt.errors import TokoptError
from tokopt.models import model_fingerprint
from tokopt.train_ppd import RANKS, load_ppd_artifact, ppd_artifact_path, train_ppd

SEQ = 32


@pytest.fixture(scope="module")
def trained(tiny_model, tmp_path_factory):
    model = tiny_model("llama")
    cache = tmp_path_factory.mktemp("cache")
    gen = torch.Generator().manual_seed(1)
    base = torch.randint(0, model.config.vocab_size, (4, 8), generator=gen)
    ids = base.repeat(1, 4).repeat(3, 1)  # periodic text: the model's next tokens are somewhat predictable
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TOKOPT_CACHE", str(cache))
        result = train_ppd(model, token_ids=ids, seq_len=SEQ, steps=30, anchors=8, lr=3e-2, progress=False)
        assert result.path == ppd_artifact_path(model_fingerprint(model))
        artifact = load_ppd_artifact(model)
        yield model, result, artifact, cache


def test_loss_lowers_and_artifact_saved(trained):
    model, result, artifact, _ = trained
    m = result.metrics
    assert sum(m["val"]["kl"]) < sum(m["val_control"]["kl"])
    assert artifact["embeddings"].shape == (3, model.config.hidden_size) and artifact["k"] == 3
    assert len(artifact["metrics"]["rank_accuracy"]) == 3 and len(artifact["metrics"]["rank_accuracy"][0]) == RANKS
    assert result.plot.is_file() and result.plot.stat().st_size > 0
    assert all(p.requires_grad for p in model.parameters())  # the model is left as it was


def test_other_model_refused(trained, tiny_model):
    model, result, _, _ = trained
    other = tiny_model("llama", seed=5)
    with pytest.raises(TokoptError, match=model_fingerprint(other)) as err:
        load_ppd_artifact(other, path=result.path)
    assert model_fingerprint(model) in str(err.value)
    with pytest.raises(TokoptError, match="tokopt train-ppd"):
        load_ppd_artifact(other)
