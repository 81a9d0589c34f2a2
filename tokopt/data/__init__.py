"""The data shipped inside the package (see README.md here for sources and licences), read in one place.

- ``spec_bench_sample.jsonl``: 26 Spec-Bench questions (two per category): ``spec_bench(...)``, ``first_turns(...)``;
- ``calibration.txt``: prose for calibrating (self-draft layers, smollm2-moe routing): ``calibration_text()``;
- ``capitals.tsv``: countries and capitals for the uncertainty QA task: ``capitals_tsv()``.

Both question readers take any Spec-Bench-style JSONL (``category``, ``turns``) in place of the sample.

Example::

    spec_bench(per_category=1)[0]     # {'category': 'writing', 'question': 'Compose an engaging travel blog ...'}
    first_turns(count=4)              # four questions, round robin over categories
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from tokopt.errors import TokoptError

SPEC_BENCH_SAMPLE = "spec_bench_sample.jsonl"


def read_text(name: str) -> str:
    """A shipped data file's text (``name`` as in this folder)."""
    return resources.files(__name__).joinpath(name).read_text(encoding="utf-8")


def calibration_text() -> str:
    return read_text("calibration.txt")


def capitals_tsv() -> str:
    return read_text("capitals.tsv")


def _question_rows(path) -> list[dict]:
    if path is None:
        text = read_text(SPEC_BENCH_SAMPLE)
    else:
        p = Path(path)
        if not p.is_file():
            raise TokoptError(f"questions file {p} does not exist; give a Spec-Bench-style JSONL file (one JSON "
                              "object per line with 'category' and a 'turns' list)")
        text = p.read_text(encoding="utf-8")
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TokoptError(f"questions file {path}: line {n} is not JSON ({exc.msg})") from None
        if isinstance(row, dict) and row.get("turns"):
            rows.append(row)
    return rows


def spec_bench(path=None, per_category: int = 2, skip: int = 0) -> list[dict]:
    """``per_category`` questions of every category (in file order, after its first ``skip``): dicts with
    category, question. ``skip`` keeps training prompts apart from the benchmark's (``tokopt train-ppd``)."""
    picked, count = [], {}
    for row in _question_rows(path):
        cat = row.get("category", "")
        seen = count.get(cat, 0)
        if skip <= seen < skip + per_category:
            picked.append({"category": cat, "question": row["turns"][0]})
        count[cat] = seen + 1
    if not picked:
        raise TokoptError("no questions found (need JSON lines with 'turns')")
    return picked


def first_turns(path=None, count: int = 8) -> list[str]:
    """``count`` first turns spread over categories (round robin)."""
    rows = _question_rows(path)
    by_category: dict[str, list[str]] = {}
    for row in rows:
        by_category.setdefault(row.get("category", ""), []).append(row["turns"][0])
    picked, k = [], 0
    while len(picked) < count and any(k < len(v) for v in by_category.values()):
        picked += [v[k] for v in by_category.values() if k < len(v)]
        k += 1
    if count < 1 or not picked:
        raise TokoptError(f"need at least one prompt (got --prompts {count}, {len(rows)} questions)")
    return picked[:count]


def sample_turns(first_only: bool = False) -> list[str]:
    """Every turn (or every first turn) of the shipped Spec-Bench sample, in file order."""
    return [turn for row in _question_rows(None) for turn in (row["turns"][:1] if first_only else row["turns"])]
