"""Check the layering contracts in ``.importlinter`` (import-linter) over the installed package's whole tree.

``passes/``, ``runtime/``, ``kernels/`` and ``bench/`` install as ``tokopt.passes`` ... ``tokopt.bench`` through
``package-dir``, but import-linter reads a package from one folder. This assembles that folder (a copy of the
``.py`` files, in a temporary directory), checks that no two modules import each other (directly or through
others, function bodies included) and runs ``lint-imports`` on it; exits non-zero when either fails.

    .venv/bin/python tools/lint_imports.py
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAPPED = {"passes": "passes", "runtime": "runtime", "kernels": "kernels", "bench": "bench"}


def assemble(dest: Path) -> Path:
    """Copy the package's Python files into ``dest/tokopt`` as one tree; returns ``dest``."""
    ignore = shutil.ignore_patterns("__pycache__", "*.json", "*.png", "*.md", "out")
    shutil.copytree(ROOT / "tokopt", dest / "tokopt", ignore=ignore)
    for sub, folder in MAPPED.items():
        shutil.copytree(ROOT / folder, dest / "tokopt" / sub, ignore=ignore)
    return dest


def module_cycles(view: Path) -> list[list[str]]:
    """Import cycles between modules (every import statement, module level or in a function body), as lists of
    module names; empty when the import graph is acyclic."""
    import grimp
    import networkx as nx

    sys.path.insert(0, str(view))
    try:
        graph = grimp.build_graph("tokopt", cache_dir=None)
    finally:
        sys.path.remove(str(view))
    g = nx.DiGraph()
    for module in graph.modules:
        g.add_node(module)
        for other in graph.find_modules_directly_imported_by(module):
            g.add_edge(module, other)
    return [sorted(c) for c in nx.strongly_connected_components(g) if len(c) > 1]


def check(view: Path) -> int:
    """Cycles and contracts over an assembled ``view``; 0 when both hold. Run it in a fresh process (as ``main``
    does): grimp finds ``tokopt`` through the import system, so an already imported tokopt would be read instead."""
    cycles = module_cycles(view)
    print(f"import cycles between modules: {len(cycles)}" + "".join(f"\n  {' <-> '.join(c)}" for c in cycles),
          flush=True)
    exe = Path(sys.executable).with_name("lint-imports")
    env = {**os.environ, "PYTHONPATH": str(view)}
    contracts = subprocess.run([str(exe), str(ROOT / ".importlinter"), "--no-cache"], cwd=view, env=env).returncode
    return int(bool(cycles) or contracts != 0)


def main(argv=None) -> int:
    """``lint_imports.py`` checks the package; ``lint_imports.py --view DIR`` checks an assembled copy in DIR."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--view"]:
        return check(Path(argv[1]))
    with tempfile.TemporaryDirectory(prefix="tokopt-layers-") as tmp:
        return check(assemble(Path(tmp)))


if __name__ == "__main__":
    sys.exit(main())
