"""The ``tokopt`` torch.compile backend: tokopt's graph passes on a dynamo-captured graph, then inductor.

``torch.compile(model, backend="tokopt")`` (registered through the ``torch_dynamo_backends`` entry point in
pyproject.toml; ``register()`` where it is not installed) hands dynamo's torch-level FX graph to inductor's ``compile_fx``
with an ``inner_compile`` hook: the passes run on the aten-level graph that AOTAutograd produced (the level tokopt's
passes are written for: ``aten._to_copy``, ``aten.linear``), then inductor compiles it. The graph carries no
tokopt decoder metadata (``GraphMeta``), so only passes that need none run here (``GRAPH_LOCAL_PASSES``); a
requested pass that needs the decoder graph's metadata (the taps, PPD slots, the expert-parallel passes) is
skipped with a report that says why. Reports of the last compile: ``last_reports()``.

Layer: runtime (it runs passes, so it sits above them; it is an executor like the engines; the API layer would
drag ``tokopt.api``'s imports into dynamo's backend lookup).

Example::

    compiled = torch.compile(model, backend="tokopt")                                   # default passes
    compiled = torch.compile(model, backend="tokopt", options={"passes": ["remove_noop_casts"]})
"""

from __future__ import annotations

from tokopt.errors import TokoptError
from tokopt.passes.manager import check_pass_names, registered_passes, step_name
from tokopt.passes.registry import PassReport

# passes that read only the graph itself (no GraphMeta): meaningful on any FX graph
GRAPH_LOCAL_PASSES = ("remove_noop_casts", "small_batch_linear")
DEFAULT_PASSES = ("remove_noop_casts",)
_LAST: list = []


def last_reports() -> list:
    """The pass reports of the most recent graph the backend compiled (one per requested pass)."""
    return list(_LAST)


def _run(gm, steps) -> list:
    passes = registered_passes()
    reports = []
    for step in steps:
        name = step_name(step)
        if name not in GRAPH_LOCAL_PASSES:
            reports.append(PassReport(name, why_not="needs tokopt's decoder graph metadata (GraphMeta: spec, output "
                                                    "names), which a dynamo-captured graph lacks; skipped"))
            continue
        registered = passes[name]
        config = step if not isinstance(step, str) else registered.default_config()
        try:
            gm, report = registered.fn(gm, config)
            gm.graph.lint()
        except Exception as exc:  # a pass must not break torch.compile: report and go on with the graph as it was
            report = PassReport(name, why_not=f"failed on this graph ({type(exc).__name__}: {exc}); skipped")
        reports.append(report)
    return reports


def tokopt_backend(gm, example_inputs, options: dict | None = None, **kwargs):
    """A dynamo backend: ``(GraphModule, example_inputs) -> callable``. ``options={"passes": [...]}`` picks the
    passes (names or ``PassConfig``s; default ``DEFAULT_PASSES``); other options go to inductor's config."""
    from torch._inductor.compile_fx import compile_fx, compile_fx_inner

    options = dict(options or {})
    steps = tuple(options.pop("passes", DEFAULT_PASSES))
    if isinstance(steps, str):
        raise TokoptError(f"options['passes'] must be a sequence of pass names, not the string {steps!r}")
    check_pass_names(steps)

    def inner(aten_gm, inputs, **kw):
        reports = _run(aten_gm, steps)
        _LAST[:] = reports
        return compile_fx_inner(aten_gm, inputs, **kw)

    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    # inductor's and AOTAutograd's caches key on the graph, not on tokopt's passes: a hit would skip the passes
    # (or return code compiled with other passes), so they are off for this backend
    with inductor_config.patch({**options, "fx_graph_cache": False}), \
            functorch_config.patch(enable_autograd_cache=False):
        return compile_fx(gm, example_inputs, inner_compile=inner)


def register() -> None:
    """Register ``tokopt`` with dynamo by hand, where the package's entry point is not installed (the entry point
    registers it lazily on first use; importing this module does not, so the two never collide)."""
    from torch._dynamo.backends.registry import _COMPILER_FNS, register_backend

    if "tokopt" not in _COMPILER_FNS:
        register_backend(tokopt_backend, name="tokopt")
