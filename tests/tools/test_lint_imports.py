"""tools/lint_imports.py: the layer contracts hold on the package, and the checks catch what they are for."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("lint_imports", ROOT / "tools" / "lint_imports.py")
lint_imports = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lint_imports)


def test_layers_kept_and_no_module_cycles():
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "lint_imports.py")], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "import cycles between modules: 0" in run.stdout
    assert "3 kept, 0 broken" in run.stdout


@pytest.fixture
def view(tmp_path):
    return lint_imports.assemble(tmp_path)


def test_a_cycle_hidden_in_a_function_body_is_found(view):
    """Negative control: a deferred import that closes a cycle (models -> api -> models) is reported."""
    target = view / "tokopt" / "models" / "masks.py"
    target.write_text(target.read_text() + "\n\ndef _hidden():\n    from tokopt.api.optimize import optimize\n")
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "lint_imports.py"), "--view", str(view)],
                         capture_output=True, text=True)
    assert run.returncode != 0
    cycle = next(line for line in run.stdout.splitlines() if "tokopt.models.masks" in line)
    assert "tokopt.api.optimize" in cycle


def test_an_upward_import_breaks_the_layers_contract(view, tmp_path):
    """Negative control: the runtime importing the CLI breaks every contract (layers, leaves, no cycles)."""
    target = view / "tokopt" / "runtime" / "prompts.py"
    target.write_text(target.read_text() + "\n\ndef _up():\n    import tokopt.cli\n")
    exe = Path(sys.executable).with_name("lint-imports")
    run = subprocess.run([str(exe), str(ROOT / ".importlinter"), "--no-cache"], cwd=view, capture_output=True,
                         text=True, env={"PYTHONPATH": str(view), "PATH": ""})
    assert run.returncode != 0
    assert "tokopt.runtime is not allowed to import tokopt.cli" in run.stdout
    assert "0 kept, 3 broken" in run.stdout
