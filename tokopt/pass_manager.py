"""Graph passes: a registry, a report per pass, and the manager that runs an ordered list of them.

A pass is a function ``GraphModule -> (GraphModule, PassReport)`` registered under a name with
``@register_pass``. Each report says how many places matched, whether the graph changed, how long it took,
and, when nothing matched, why (what was looked for, what was found instead). The order of passes is data:
``OptimizeConfig.passes``. What ran is appended to ``gm.meta['tokopt']['history']``.

Example::

    @register_pass("my_pass", "what it does in one line")
    def my_pass(gm):
        ...
        return gm, PassReport("my_pass", matched=1, changed=True, detail="rewrote 1 node")
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from tokopt.errors import TokoptError


@dataclass
class PassReport:
    name: str
    matched: int = 0
    changed: bool = False
    detail: str = ""
    why_not: str = ""  # filled when matched == 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class RegisteredPass:
    name: str
    description: str
    fn: Callable


_REGISTRY: dict[str, RegisteredPass] = {}


def register_pass(name: str, description: str):
    """Decorator registering ``fn(gm) -> (gm, PassReport)`` under ``name`` (each name once)."""

    def wrap(fn):
        if name in _REGISTRY:
            raise ValueError(f"pass {name!r} is registered twice")
        _REGISTRY[name] = RegisteredPass(name, description, fn)
        return fn

    return wrap


def registered_passes() -> dict[str, RegisteredPass]:
    """All passes, by name (importing ``tokopt.passes`` registers them)."""
    import tokopt.passes  # noqa: F401  (registers every pass module)

    return dict(_REGISTRY)


def check_pass_names(names) -> None:
    """Raise a TokoptError naming any unregistered pass and listing the registered ones."""
    passes = registered_passes()
    unknown = [n for n in names if n not in passes]
    if unknown:
        raise TokoptError(f"unknown pass(es) {', '.join(map(repr, unknown))}; registered passes: "
                          f"{', '.join(sorted(passes))} (see `tokopt passes`)")


def run_passes(gm: torch.fx.GraphModule, names) -> tuple[torch.fx.GraphModule, list[PassReport]]:
    """Run the named passes in order; lint the graph after each; return the graph and one report per pass."""
    check_pass_names(names)
    passes = registered_passes()
    reports = []
    for name in names:
        start = time.perf_counter()
        before = set(gm.graph.nodes)
        try:
            gm, report = passes[name].fn(gm)
            gm.graph.lint()
            for node in gm.graph.nodes:  # who made each node: export failures name the pass
                if node not in before:
                    node.meta.setdefault("tokopt_pass", name)
        except TokoptError:
            raise
        except Exception as exc:
            raise TokoptError(f"pass {name!r} failed: {type(exc).__name__}: {exc}") from exc
        report.seconds = time.perf_counter() - start
        gm.meta["tokopt"]["history"].append(report.to_dict())
        reports.append(report)
    return gm, reports


def format_reports(reports) -> str:
    """A readable table of pass reports (what ``print(opt.report)`` shows)."""
    rows = [("pass", "matched", "changed", "time", "detail")]
    for r in reports:
        rows.append((r.name, str(r.matched), "yes" if r.changed else "no", f"{r.seconds * 1000:.1f} ms",
                     r.detail if r.matched else f"nothing matched: {r.why_not}"))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = []
    for k, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:4])) + "  " + row[4])
        if k == 0:
            lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 6)
    return "\n".join(lines)
