"""The library (``modkern/``) never imports its applications (``modkern/apps/``)."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "modkern"
APPS = PACKAGE / "apps"


def _imports(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)


def test_library_modules_never_import_the_apps():
    library = [p for p in PACKAGE.rglob("*.py") if APPS not in p.parents]
    assert len(library) > 20
    bad = [
        (str(p.relative_to(PACKAGE)), name) for p in library for name in _imports(p) if name.startswith("modkern.apps")
    ]
    assert not bad, bad


def test_importing_the_library_loads_no_app():
    code = (
        "import sys, modkern, modkern.objective, modkern.objective.augment, modkern.integrations.hf; "
        "import modkern.reference; "
        "print(sorted(m for m in sys.modules if m.startswith('modkern.apps')))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_apps_import_no_private_name_of_another_module():
    bad = []
    for path in APPS.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("modkern"):
                bad += [(path.name, node.module, a.name) for a in node.names if a.name.startswith("_")]
    assert not bad, bad
