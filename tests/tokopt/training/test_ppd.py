"""``tokopt train-ppd``: a tiny training run lowers the distillation loss, saves the artifact for its model (with
a loss curve and per-position accuracies beside the untrained control), and another model's is refused."""

import json

import pytest
import torch

from tokopt.errors import TokoptError
from tokopt.models.loading import model_fingerprint
from tokopt.runtime.artifacts import load_ppd_artifact, ppd_artifact_path
from tokopt.training.ppd import RANKS, generated_sequences, read_prompts, train_ppd

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


def test_read_prompts_skips_benchmark_questions(tmp_path):
    rows = [{"category": c, "turns": [f"{c} question {i}"]} for c in ("math", "qa") for i in range(3)]
    jsonl = tmp_path / "q.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows))
    assert read_prompts(jsonl, skip_per_category=2) == ["math question 2", "qa question 2"]
    lines = tmp_path / "p.txt"
    lines.write_text("first prompt\n\nsecond prompt\n")
    assert read_prompts(lines) == ["first prompt", "second prompt"]
    assert read_prompts(jsonl, limit=3) == ["math question 0", "math question 2", "qa question 1"]
    with pytest.raises(TokoptError, match="does not exist"):
        read_prompts(tmp_path / "missing.txt")


def test_generated_sequences_are_prompt_plus_greedy_answer(real_model, tokenizer):
    from tokopt.runtime.prompts import encode_prompts

    prompts = ["Name a color.", "What is two plus two? Answer briefly."]
    rows = generated_sequences(real_model, tokenizer, prompts, max_new_tokens=6, progress=False)
    for prompt, row in zip(prompts, rows):
        ids, mask = encode_prompts(tokenizer, [prompt])
        expected = real_model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)[0]
        assert row == expected.tolist()
