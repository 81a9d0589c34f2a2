"""tokopt.passes.manager: the registry, running passes in order with lint and history, and the report table."""

import pytest
import torch

from tokopt.errors import TokoptError
from tokopt.passes.manager import format_reports, registered_passes, run_passes
from tokopt.passes.registry import _REGISTRY, PassReport, RegisteredPass, register_pass
from tokopt.models.graph_meta import graph_meta, GraphMeta, set_graph_meta
from tokopt.models.decoder_graph import GraphSpec


class _Head(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 6)

    def forward(self, x):
        return (self.proj(x),)


def toy_graph(output_names=("logits",)):
    torch.manual_seed(0)
    gm = torch.fx.symbolic_trace(_Head())
    set_graph_meta(gm, GraphMeta(GraphSpec(0, 1, 4, 6, 16, "toy"), list(output_names)))
    return gm


@pytest.fixture
def temp_pass(monkeypatch):
    """Register a pass for one test only (the registry is restored afterwards)."""

    def add(name, fn, description="test pass"):
        monkeypatch.setitem(_REGISTRY, name, RegisteredPass(name, description, fn))

    return add


def test_registered_passes_include_entropy_tap():
    passes = registered_passes()
    assert "entropy_tap" in passes
    assert passes["entropy_tap"].description
    assert callable(passes["entropy_tap"].fn)


def test_unknown_pass_raises_listing_registered_passes():
    gm = toy_graph()
    with pytest.raises(TokoptError) as info:
        run_passes(gm, ["entropy_tap", "no_such_pass"])
    message = str(info.value)
    assert "no_such_pass" in message
    for name in registered_passes():
        assert name in message
    assert graph_meta(gm).history == []  # nothing ran: names are checked first


def test_history_and_timing_recorded(temp_pass):
    calls = []

    def noop(gm, config=None):
        calls.append("noop")
        return gm, PassReport("noop", why_not="looked for nothing")

    temp_pass("noop", noop)
    gm = toy_graph()
    gm, reports = run_passes(gm, ["entropy_tap", "noop"])
    assert calls == ["noop"]
    assert [r.name for r in reports] == ["entropy_tap", "noop"]
    history = graph_meta(gm).history
    assert history == [r.to_dict() for r in reports]
    assert history[0]["matched"] == 1 and history[0]["changed"] is True
    assert history[1]["matched"] == 0 and history[1]["why_not"] == "looked for nothing"
    assert all(r.seconds > 0 for r in reports)
    # the tapped toy graph works
    out = gm(torch.randn(2, 4))
    assert len(out) == 3


def test_passes_run_in_the_given_order(temp_pass):
    order = []

    def make(name):
        def fn(gm, config=None):
            order.append(name)
            return gm, PassReport(name, matched=1)
        return fn

    for name in ("p_a", "p_b", "p_c"):
        temp_pass(name, make(name))
    run_passes(toy_graph(), ["p_c", "p_a", "p_b", "p_a"])
    assert order == ["p_c", "p_a", "p_b", "p_a"]


def test_failing_pass_is_reported_as_tokopt_error_naming_it(temp_pass):
    def broken(gm, config=None):
        raise RuntimeError("boom")

    temp_pass("broken", broken)
    with pytest.raises(TokoptError, match=r"'broken'.*RuntimeError.*boom"):
        run_passes(toy_graph(), ["broken"])


def test_tokopt_error_from_a_pass_passes_through(temp_pass):
    def picky(gm, config=None):
        raise TokoptError("picky says no")

    temp_pass("picky", picky)
    with pytest.raises(TokoptError, match="^picky says no$"):
        run_passes(toy_graph(), ["picky"])


def test_graph_that_fails_lint_is_rejected(temp_pass):
    def corrupt(gm, config=None):
        target = next(n for n in gm.graph.nodes if n.op == "call_module")
        with gm.graph.inserting_before(target):  # a node using a value before it is defined: fails lint
            gm.graph.call_function(torch.relu, (target,))
        return gm, PassReport("corrupt", matched=1, changed=True)

    temp_pass("corrupt", corrupt)
    gm = toy_graph()
    with pytest.raises(TokoptError, match="corrupt"):
        run_passes(gm, ["corrupt"])
    assert graph_meta(gm).history == []


def test_register_pass_refuses_a_duplicate_name(monkeypatch):
    monkeypatch.setattr("tokopt.passes.registry._REGISTRY", dict(_REGISTRY))
    import tokopt.passes.registry as pm

    @register_pass("dup_test_pass", "first")
    def first(gm, config=None):
        return gm, PassReport("dup_test_pass")

    assert pm._REGISTRY["dup_test_pass"].fn is first
    with pytest.raises(ValueError, match="dup_test_pass"):
        register_pass("dup_test_pass", "second")(lambda gm, config=None: (gm, PassReport("dup_test_pass")))
    assert "dup_test_pass" not in _REGISTRY  # the real registry was not touched


def test_format_reports_table():
    reports = [
        PassReport("fuse_things", matched=3, changed=True, detail="fused 3 pairs", seconds=0.0123),
        PassReport("find_nothing", matched=0, why_not="looked for foo; found bar"),
    ]
    table = format_reports(reports)
    lines = table.splitlines()
    assert len(lines) == 4
    assert lines[0].split() == ["pass", "matched", "changed", "time", "detail"]
    assert set(lines[1].replace(" ", "")) == {"-"}
    assert lines[2].split()[:4] == ["fuse_things", "3", "yes", "12.3"]
    assert lines[2].rstrip().endswith("fused 3 pairs")
    assert lines[3].split()[:3] == ["find_nothing", "0", "no"]
    assert "nothing matched: looked for foo; found bar" in lines[3]
    # columns line up: every row's 'matched' cell starts at the same offset
    offsets = {line.index(cell) for line, cell in zip([lines[0], lines[2], lines[3]], ["matched", "3", "0"])}
    assert len(offsets) == 1


def test_report_of_a_pass_that_matched_nothing_says_why():
    gm, reports = run_passes(toy_graph(["hidden"]), ["entropy_tap"])
    assert reports[0].matched == 0 and reports[0].why_not
    row = format_reports(reports).splitlines()[2]
    assert row.split()[:3] == ["entropy_tap", "0", "no"]
    assert f"nothing matched: {reports[0].why_not}" in row
    assert graph_meta(gm).history[0]["why_not"] == reports[0].why_not


def test_format_reports_empty():
    lines = format_reports([]).splitlines()
    assert lines[0].split() == ["pass", "matched", "changed", "time", "detail"] and len(lines) == 2
