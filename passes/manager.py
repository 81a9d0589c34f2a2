"""Running passes: the ordered list ``OptimizeConfig.passes`` names, a lint after each, one report per pass.

Importing this module registers every pass (it imports each pass module). What ran is appended to the graph's
metadata history (``GraphMeta.history``).

Example::

    gm, reports = run_passes(gm, ["remove_noop_casts", "entropy_tap"])
    print(format_reports(reports))
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from tokopt.errors import TokoptError
from tokopt.passes import (  # noqa: F401  (each module registers its pass)
    attention_taps, entropy_tap, expert_parallel, expert_placement, fuse_alltoall, logit_taps, lower_grouped_mm,
    ppd_slots, quantize_weights, remove_noop_casts, small_batch_linear,
)
from tokopt.models.graph_meta import graph_meta
from tokopt.passes.registry import _REGISTRY, PassConfig, PassReport, RegisteredPass


def registered_passes() -> dict[str, RegisteredPass]:
    """All passes, by name."""
    return dict(_REGISTRY)


def step_name(step) -> str:
    """The pass name of a step: a name, or a ``PassConfig`` (its ``pass_name``)."""
    if isinstance(step, PassConfig):
        return step.pass_name
    if isinstance(step, str):
        return step
    raise TokoptError(f"a pass step is a pass name or a pass config (tokopt.passes.registry.PassConfig), "
                      f"got {type(step).__name__}")


def check_pass_names(steps) -> None:
    """Raise a TokoptError naming any unregistered pass (steps: names or configs) and listing the registered ones."""
    passes = registered_passes()
    unknown = [n for n in map(step_name, steps) if n not in passes]
    if unknown:
        raise TokoptError(f"unknown pass(es) {', '.join(map(repr, unknown))}; registered passes: "
                          f"{', '.join(sorted(passes))} (see `tokopt passes`)")


def run_passes(gm: torch.fx.GraphModule, steps) -> tuple[torch.fx.GraphModule, list[PassReport]]:
    """Run the passes in order (``steps``: pass names, run with their default config, or ``PassConfig``
    instances); lint the graph after each; return the graph and one report per pass.

    Example::

        gm, reports = run_passes(gm, ["remove_noop_casts", PPDSlotsConfig(embeddings=table)])
    """
    check_pass_names(steps)
    passes = registered_passes()
    meta = graph_meta(gm)
    reports = []
    for step in steps:
        name = step_name(step)
        registered = passes[name]
        config = step if isinstance(step, PassConfig) else registered.default_config()
        start = time.perf_counter()
        before = set(gm.graph.nodes)
        try:
            gm, report = registered.fn(gm, config)
            gm.graph.lint()
            for node in gm.graph.nodes:  # who made each node: export failures name the pass
                if node not in before:
                    node.meta.setdefault("tokopt_pass", name)
        except TokoptError:
            raise
        except Exception as exc:
            raise TokoptError(f"pass {name!r} failed: {type(exc).__name__}: {exc}") from exc
        report.seconds = time.perf_counter() - start
        meta.history.append(report.to_dict())
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


@dataclass
class Report:
    """What ``optimize`` did: the capture time and the per-pass reports; prints as a table."""

    passes: list = field(default_factory=list)
    capture_s: float = 0.0

    def __str__(self) -> str:
        return f"capture: torch.export in {self.capture_s:.1f} s\n" + format_reports(self.passes)

    def to_dict(self) -> dict:
        return {"capture_s": self.capture_s, "passes": [r.to_dict() for r in self.passes]}
