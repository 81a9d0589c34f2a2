"""The pass registry: what a pass is, its report, and ``@register_pass``.

A pass is a function ``(GraphModule, config) -> (GraphModule, PassReport)`` registered under a name with
``@register_pass``; a pass that takes arguments declares a typed config (a frozen dataclass subclassing
``PassConfig``, defined beside the pass) and receives an instance of it (its defaults when run by name), others
receive None. Each report says how many places matched, whether the graph changed, how long it took,
and, when nothing matched, why (what was looked for, what was found instead). ``manager.py`` runs them.

Example::

    @dataclass(frozen=True)
    class MyPassConfig(PassConfig):
        pass_name: ClassVar[str] = "my_pass"
        threshold: float = 0.5

    @register_pass("my_pass", "what it does in one line", config=MyPassConfig)
    def my_pass(gm, config: MyPassConfig):
        ...
        return gm, PassReport("my_pass", matched=1, changed=True, detail="rewrote 1 node")

    run_passes(gm, ["remove_noop_casts", MyPassConfig(threshold=0.9)])   # names or configs, in order
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, ClassVar


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
class PassConfig:
    """Base of typed pass configs: ``pass_name`` names the pass the config is for."""

    pass_name: ClassVar[str] = ""


@dataclass(frozen=True)
class RegisteredPass:
    name: str
    description: str
    fn: Callable
    config: type | None = None  # the pass's PassConfig subclass, if it takes arguments

    def default_config(self):
        return None if self.config is None else self.config()


_REGISTRY: dict[str, RegisteredPass] = {}

# why_not of a decoder-graph pass handed another graph
NOT_DECODER = ("looked for a captured decoder graph (tokopt.models.capture.capture: typed metadata with the graph's "
               "spec and output names); this graph has none")


def register_pass(name: str, description: str, config: type | None = None):
    """Decorator registering ``fn(gm, config) -> (gm, PassReport)`` under ``name`` (each name once);
    ``config``: the pass's ``PassConfig`` subclass, when it takes arguments."""

    def wrap(fn):
        if name in _REGISTRY:
            raise ValueError(f"pass {name!r} is registered twice")
        if config is not None and config.pass_name != name:
            raise ValueError(f"pass {name!r} declares config {config.__name__} for pass {config.pass_name!r}")
        _REGISTRY[name] = RegisteredPass(name, description, fn, config)
        return fn

    return wrap
