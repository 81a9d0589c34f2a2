"""`tokopt export --target`: the targets' table names the choices; pt2 writes a torch.export program, and the old
name ep still works with one line on stderr saying to use pt2."""

from __future__ import annotations

import json

import pytest

from tokopt.cli import build_parser, main
from tokopt.export.engine_dir import TARGETS


@pytest.fixture(scope="module")
def tiny_dir(tiny_model, tokenizer, tmp_path_factory):
    """A small random Llama with SmolLM2's tokenizer, saved as a local HF directory."""
    model = tiny_model("llama", vocab_size=len(tokenizer))
    path = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_target_choices_are_the_table_and_the_old_name():
    parser = build_parser()
    for name in [*TARGETS, "ep"]:
        assert parser.parse_args(["export", "--target", name, "-o", "x"]).target == name
    with pytest.raises(SystemExit):
        parser.parse_args(["export", "--target", "gguf", "-o", "x"])


@pytest.mark.parametrize("flag", ["pt2", "ep"])
def test_export_target_pt2_and_its_old_name(tiny_dir, tmp_path, capsys, flag):
    out = tmp_path / "eng"
    assert main(["export", str(tiny_dir), "--target", flag, "--passes", "", "-o", str(out)]) == 0
    got = capsys.readouterr()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["target"] == "pt2" and (out / "program.pt2").is_file()
    assert "wrote pt2 engine" in got.out
    warned = [line for line in got.err.splitlines() if "deprecated" in line]
    if flag == "ep":
        assert warned == ["tokopt: warning: export target 'ep' is deprecated: use 'pt2' (--target pt2; 'ep' also "
                          "means expert parallelism, --ep)"]
    else:
        assert not warned
    assert main(["generate", "--engine", str(out), "--max-new-tokens", "3", "--no-chat", "Hello"]) == 0


def test_export_records_the_speculative_method_config(tiny_dir, tmp_path, capsys):
    out = tmp_path / "eng"
    assert main(["export", str(tiny_dir), "--target", "pt2", "--passes", "", "--speculative", "lookup",
                 "-o", str(out)]) == 0
    assert json.loads((out / "manifest.json").read_text())["speculative"]["method"] == "lookup"
