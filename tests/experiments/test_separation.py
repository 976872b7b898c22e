"""The paper's evaluation and the demo use the library; the library never imports them."""

import ast
import pathlib
import subprocess
import sys

import pytest

import tf_backdoor_defense

PACKAGE = pathlib.Path(tf_backdoor_defense.__file__).parent


def _imported_modules(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)


def test_no_library_module_imports_experiments():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        part = path.relative_to(PACKAGE).parts[0]
        if part in ("experiments", "cli", "__init__.py"):   # the demo command runs the demo
            continue
        if any(".experiments" in name for name in _imported_modules(path)):
            offenders.append(path.relative_to(PACKAGE).as_posix())
    assert offenders == []


@pytest.mark.slow
def test_using_the_library_loads_no_experiment_module():
    code = ("import sys, tf_backdoor_defense as t\n"
            "t.prune_to_threshold, t.fine_prune, t.defend, t.strip_masks, t.attacks\n"
            "print(sorted(m for m in sys.modules if '.experiments' in m))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
