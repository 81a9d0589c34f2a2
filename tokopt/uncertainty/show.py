"""Showing per-token uncertainty: tokens coloured in the terminal, and a self-contained HTML report.

Colour follows the entropy of the distribution each token was chosen from (nats): green below 1, yellow
below 2.5, red above; hovering a token in the HTML shows its entropy, log-probability and top alternatives.

Example::

    opt = tokopt.optimize(model, uncertainty=True); opt.generate(ids, max_new_tokens=32)
    print(ansi_tokens(tokenizer, opt.last_uncertainty[0]))
    Path("report.html").write_text(html_report(["prompt"], tokenizer, opt.last_uncertainty))
"""

from __future__ import annotations

import html

from tokopt.uncertainty.estimators import score_sequence

LEVELS = ((1.0, "low", 42, "#c8f0c8"), (2.5, "medium", 178, "#fbe7a1"), (float("inf"), "high", 167, "#f6b3b3"))


def level(entropy: float):
    """(name, ANSI 256 colour, HTML colour) of an entropy value."""
    for bound, name, ansi, css in LEVELS:
        if entropy < bound:
            return name, ansi, css
    return LEVELS[-1][1:]


def _pieces(tokenizer, records):
    """Each generated token's text (decoded incrementally, so multi-byte characters come out whole)."""
    ids, out, prev = [], [], ""
    for rec in records:
        ids.append(rec["token"])
        text = tokenizer.decode(ids, skip_special_tokens=True)
        out.append(text[len(prev):])
        prev = text
    return out


def ansi_tokens(tokenizer, records) -> str:
    """The generated text with each token's background coloured by its entropy (ANSI 256 colours)."""
    parts = [f"\033[48;5;{level(r['entropy'])[1]}m\033[30m{p}\033[0m"
             for p, r in zip(_pieces(tokenizer, records), records)]
    return "".join(parts)


def summary_line(records, tokenizer=None) -> str:
    """One line: tokens, mean entropy, lowest-probability token, share of high-entropy tokens."""
    if not records:
        return "no generated tokens"
    ent = [r["entropy"] for r in records]
    worst = min(records, key=lambda r: r["logprob"])
    high = sum(level(e)[0] == "high" for e in ent) / len(ent)
    line = (f"{len(records)} tokens: mean entropy {sum(ent) / len(ent):.2f} nats, {high:.0%} high-entropy, "
            f"least likely token {_name(worst['token'], tokenizer)} (log p {worst['logprob']:.2f})")
    if "prev_attention" in records[0]:
        line += f", RAUQ {score_sequence(records, ('rauq',))['rauq']:.2f}"
    return line


def _name(token: int, tokenizer) -> str:
    return repr(tokenizer.decode([token])) if tokenizer is not None else f"id {token}"


def html_report(prompts, tokenizer, records_per_row, title: str = "tokopt: per-token uncertainty") -> str:
    """A self-contained HTML page: per prompt, the answer's tokens coloured by entropy with tooltips."""
    rows = []
    for prompt, records in zip(prompts, records_per_row):
        spans = []
        for piece, r in zip(_pieces(tokenizer, records), records):
            alts = ", ".join(f"{tokenizer.decode([i])!r} {lp:.2f}" for i, lp in r.get("topk", [])[:5])
            tip = (f"entropy {r['entropy']:.2f} nats | log p {r['logprob']:.2f} | p max {r['max_prob']:.2f}"
                   f" | top: {alts}")
            spans.append(f'<span style="background:{level(r["entropy"])[2]}" title="{html.escape(tip)}">'
                         f"{html.escape(piece)}</span>")
        rows.append(f"<h3>{html.escape(prompt)}</h3><p class=answer>{''.join(spans)}</p>"
                    f"<p class=summary>{html.escape(summary_line(records, tokenizer))}</p>")
    legend = " ".join(f'<span style="background:{css}">{name} entropy</span>' for _, name, _, css in LEVELS)
    legend += " (below 1 nat, 1 to 2.5, above 2.5)"
    return (f"<!doctype html><html><head><meta charset=utf-8><title>{html.escape(title)}</title><style>"
            "body{font-family:sans-serif;max-width:60em;margin:2em auto}.answer{white-space:pre-wrap;"
            "line-height:1.7}.summary{color:#555;font-size:90%}</style></head><body>"
            f"<h1>{html.escape(title)}</h1><p>{legend}; hover a token for details.</p>{''.join(rows)}</body></html>")
