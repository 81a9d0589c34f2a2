"""Showing uncertainty: entropy levels, ANSI colouring, the HTML report, and `tokopt generate --uncertainty`."""

from __future__ import annotations

import pytest

from tokopt.cli import main
from tokopt.uncertainty.show import ansi_tokens, html_report, level, summary_line


def records(tokenizer, text="Paris is <big> & old"):
    ids = tokenizer(text).input_ids
    ent = [0.2, 1.5, 3.0, 0.1, 2.0, 4.0, 0.5][: len(ids)] + [0.3] * max(0, len(ids) - 7)
    return [{"token": t, "entropy": e, "logprob": -e / 2, "max_prob": 0.5, "topk": [(t, -e / 2)]}
            for t, e in zip(ids, ent)]


def test_levels():
    assert level(0.5)[0] == "low" and level(1.0)[0] == "medium" and level(2.49)[0] == "medium"
    assert level(2.5)[0] == "high" and level(50.0)[0] == "high"


def test_ansi_text_round_trips(tokenizer):
    recs = records(tokenizer)
    coloured = ansi_tokens(tokenizer, recs)
    plain = coloured
    for code in ("\033[48;5;42m", "\033[48;5;178m", "\033[48;5;167m", "\033[30m", "\033[0m"):
        plain = plain.replace(code, "")
    assert plain == tokenizer.decode([r["token"] for r in recs], skip_special_tokens=True)
    assert coloured.count("\033[48;5;167m") == sum(r["entropy"] >= 2.5 for r in recs)


def test_html_report_escapes_and_colours(tokenizer):
    recs = records(tokenizer)
    page = html_report(["<prompt>"], tokenizer, [recs])
    assert page.startswith("<!doctype html>") and "&lt;prompt&gt;" in page and "<prompt>" not in page
    assert page.count('<span style="background:') == len(recs) + 3  # tokens + legend
    assert "<big>" not in page and "&lt;" in page and "&amp;" in page  # the answer's own text is escaped
    assert summary_line(recs, tokenizer).startswith(f"{len(recs)} tokens: mean entropy")
    assert "RAUQ" not in summary_line(recs, tokenizer)  # no attention taps in these records
    with_attention = [dict(r, prev_attention=[[0.5, 0.2]]) for r in recs]
    assert "RAUQ" in summary_line(with_attention, tokenizer)


@pytest.fixture(scope="module")
def tiny_dir(tiny_model, tokenizer, tmp_path_factory):
    model = tiny_model("llama", vocab_size=len(tokenizer))
    path = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_cli_generate_uncertainty_writes_html(tiny_dir, tmp_path, capsys):
    out = tmp_path / "report.html"
    rc = main(["generate", "--model", str(tiny_dir), "--no-chat", "--max-new-tokens", "5", "--uncertainty",
               "--html", str(out), "Hello"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "uncertainty: " in err and "mean entropy" in err
    assert "<h3>Hello</h3>" in out.read_text()


def test_cli_html_needs_uncertainty(tiny_dir, capsys):
    assert main(["generate", "--model", str(tiny_dir), "--html", "x.html", "Hello"]) == 2
    assert "add --uncertainty" in capsys.readouterr().err
