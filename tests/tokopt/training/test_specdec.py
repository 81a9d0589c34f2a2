"""``tokopt train-specdec``: training the SpecDec++ acceptance head on a tiny random model (pre-tokenized ids),
saving it for its target/draft pair, and using it losslessly through ``tokopt.optimize``."""

import math
from pathlib import Path

import pytest
import torch

import tokopt
from tokopt.cli import main
from tokopt.errors import TokoptError
from tokopt.models.loading import model_fingerprint
from tokopt.runtime.speculative.drafters.specdec import load_head
from tokopt.runtime.artifacts import specdec_head_path
from tokopt.runtime.speculative.methods import SpeculativeConfig
from tokopt.training.specdec import _read_texts, _text_chunks, train_specdec

CONFIG = SpeculativeConfig("specdec++", draft_layers=(0,))
CHUNKS, SEQ = 16, 32


@pytest.fixture(scope="module")
def trained(tiny_model, tmp_path_factory):
    """(tiny target, TrainResult): a head trained on random ids, saved at the default place of a tmp cache."""
    model = tiny_model("llama")
    cache = tmp_path_factory.mktemp("cache")
    ids = torch.randint(0, model.config.vocab_size, (CHUNKS, SEQ), generator=torch.Generator().manual_seed(1))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TOKOPT_CACHE", str(cache))
        result = train_specdec(model, config=CONFIG, token_ids=ids, seq_len=SEQ, epochs=2, progress=False)
        default = specdec_head_path(model_fingerprint(model), model_fingerprint(model, [0]))
    assert result.path == default
    return model, result


def test_head_is_saved_for_its_pair_with_a_loss_curve(trained):
    model, result = trained
    head = load_head(result.path, target_fingerprint=model_fingerprint(model),
                     draft_fingerprint=model_fingerprint(model, [0]))
    assert head(torch.zeros(3, model.config.hidden_size)).shape == (3,)
    assert result.plot == result.path.with_suffix(".png")
    assert result.plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    blob = torch.load(result.path, weights_only=True)
    assert blob["meta"]["examples"] == CHUNKS * SEQ and blob["meta"]["draft_layers"] == [0]


def test_head_is_refused_for_another_target_or_draft(trained, tiny_model):
    model, result = trained
    other = tiny_model("llama", seed=1)
    with pytest.raises(TokoptError, match="trained for another model pair.*train-specdec"):
        load_head(result.path, target_fingerprint=model_fingerprint(other),
                  draft_fingerprint=model_fingerprint(other, [0]))
    with pytest.raises(TokoptError, match="another model pair"):  # same target, another self-draft
        load_head(result.path, target_fingerprint=model_fingerprint(model),
                  draft_fingerprint=model_fingerprint(model, [1]))


def test_metrics_are_finite_and_consistent(trained):
    m = trained[1].metrics
    numbers = {k: v for k, v in m.items() if isinstance(v, float)}
    assert {"train_bce", "val_bce", "val_accuracy", "val_balanced_accuracy", "val_auc", "positive_rate_greedy",
            "positive_rate_sampling", "seconds"} <= set(numbers)
    assert all(math.isfinite(v) for v in numbers.values()), numbers
    assert 0 < m["positive_rate_greedy"] < 1 and 0 < m["positive_rate_sampling"] <= 1
    assert 0 <= m["val_auc"] <= 1 and 0 <= m["val_accuracy"] <= 1
    assert m["val_examples"] == 2 * SEQ and m["train_examples"] + m["val_examples"] == m["examples"]


def test_specdec_greedy_equals_plain_greedy_with_varying_chains(trained):
    model, result = trained
    threshold = 1 - result.metrics["val_mean_p_accept"]  # about half of the first drafted tokens go on
    config = SpeculativeConfig("specdec++", draft_layers=(0,), specdec_head=str(result.path),
                               specdec_threshold=threshold)
    opt = tokopt.optimize(model, tokopt.OptimizeConfig(passes=()), speculative=config)
    prompts = torch.randint(3, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(2))
    plain = opt.with_speculative(None).generate(prompts, max_new_tokens=16, eos_token_id=[])
    spec = opt.generate(prompts, max_new_tokens=16, eos_token_id=[])
    assert torch.equal(spec, plain)
    lengths = opt.drafter.policy.lengths
    assert len(set(lengths)) > 1, lengths


def test_texts_are_sampled_across_long_files(tmp_path):
    class Chars:  # a character-level tokenizer: enough to check chunking
        def __call__(self, text, add_special_tokens=False):
            return type("Encoding", (), {"input_ids": [ord(c) % 128 for c in text]})()

    long = "".join(f"line {i}\n" for i in range(5000))
    (tmp_path / "a.txt").write_text(long)
    (tmp_path / "b.txt").write_text("short text")
    texts = _read_texts([tmp_path, "an inline string"])
    assert texts == [long, "short text", "an inline string"]
    chunks = _text_chunks(texts, Chars(), seq_len=64, max_tokens=64 * 6)  # two chunks per text at most
    decoded = ["".join(chr(t) for t in c.tolist()) for c in chunks]
    assert all(len(c) <= 64 for c in chunks) and sum(len(c) for c in chunks) <= 64 * 6
    assert decoded[0].startswith("line 0\n") and decoded[1].startswith("line 49")  # the file's start and end
    assert decoded[2:] == ["short text", "an inline string"]


def test_missing_corpus_asks_for_text(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("TOKOPT_SHARED", str(tmp_path))  # a shared folder without data/corpus
    model = tiny_model("llama")
    with pytest.raises(TokoptError, match=r"pass --text FILE"):
        train_specdec(model, config=CONFIG, progress=False)
    with pytest.raises(TokoptError, match="no such file or folder"):
        train_specdec(model, config=CONFIG, texts=[tmp_path / "missing.txt"], progress=False)


@pytest.mark.parametrize("argv, message", [
    (["--epochs", "0"], "epochs must be an integer >= 1, got 0"),
    (["--text", "/no/such/corpus.txt"], "no such file or folder: /no/such/corpus.txt"),
])
def test_cli_bad_argument_is_one_line(argv, message, capsys):
    assert main(["train-specdec", *argv]) == 2  # fails before loading any model
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tokopt: error: ") and message in err[0]


def test_cli_passes_its_arguments_and_prints_the_metrics(trained, tmp_path, monkeypatch, capsys):
    import tokopt.training.specdec as module

    calls = []
    monkeypatch.setattr(module, "train_specdec", lambda model, **kw: calls.append((model, kw)) or trained[1])
    assert main(["train-specdec", "some-model", "--text", "a.txt", "--text", str(tmp_path), "--max-tokens", "999",
                 "--epochs", "4", "--draft-model", "small", "-o", "head.pt"]) == 0
    [(model, kw)] = calls
    assert model == "some-model" and kw["texts"] == [Path("a.txt"), tmp_path] and kw["out"] == "head.pt"
    assert kw["max_tokens"] == 999 and kw["epochs"] == 4
    assert kw["config"].method == "specdec++" and kw["config"].draft_model == "small"
    out = capsys.readouterr().out
    assert f"wrote {trained[1].path}" in out and "AUC" in out and "acceptance rate greedy" in out
