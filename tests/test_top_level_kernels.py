"""The repository's ``kernels/`` folder is ``modkern.kernels`` only, never the top-level ``kernels``.

Hugging Face's ``kernels`` package (a dependency of transformers) owns that name; run from the
repository root, the folder used to shadow it and break ``import transformers`` integrations.
Each check runs in a fresh interpreter started from the repository root, as a user's script or
``python -m pytest`` would be.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROJECT_KERNELS = ROOT / "kernels"


def _run_from_root(code, extra_path=()):
    """Run ``code`` in a new interpreter, cwd = repository root, root first on sys.path."""
    prelude = f"import sys; sys.path[:0] = {[str(ROOT), *map(str, extra_path)]!r}\n"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_import_kernels_from_root_is_never_the_project_folder():
    proc = _run_from_root(
        """
        try:
            import kernels
        except ModuleNotFoundError:
            print("ABSENT")
        else:
            print("FILE", kernels.__file__)
            print("PATH", *getattr(kernels, "__path__", []))
        """
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert str(PROJECT_KERNELS) not in out, f"top-level 'kernels' resolved to the project's folder:\n{out}"
    assert "FILE" in out or "ABSENT" in out


def test_import_kernels_from_root_hands_over_to_the_next_package(tmp_path):
    # A stand-in for Hugging Face's package, after the repository root on sys.path.
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("MARK = 'hub kernels'\n")
    (tmp_path / "kernels" / "utils.py").write_text("VALUE = 7\n")
    proc = _run_from_root(
        """
        import kernels, kernels.utils
        import modkern.kernels.perturb as p
        print(kernels.MARK, kernels.utils.VALUE, p.__name__)
        """,
        extra_path=[tmp_path],
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["hub", "kernels", "7", "modkern.kernels.perturb"]


def test_import_kernels_from_root_without_another_package_is_an_empty_namespace(tmp_path):
    # Only the repository root and the standard library: no other ``kernels`` anywhere. The folder
    # is then what any stray folder of that name is, an empty namespace: nothing of modkern in it.
    proc = _run_from_root(
        """
        import sys
        sys.path[:] = [p for p in sys.path if "site-packages" not in p]
        import importlib.util
        import kernels
        print(kernels.__file__, hasattr(kernels, "__version__"), list(kernels.__path__))
        print(importlib.util.find_spec("kernels").origin)
        try:
            import kernels.divergence
        except ModuleNotFoundError as e:
            print("NO-SUBMODULE", e.name)
        try:
            kernels.get_kernel
        except AttributeError as e:
            print("not installed" in str(e), "modkern.kernels" in str(e))
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["None", "False", "[]", "None", "NO-SUBMODULE", "kernels.divergence", "True", "True"]


# Hides an installed Hugging Face ``kernels`` from the finders and from the package metadata.
HIDE_HUB_KERNELS = """
import importlib.machinery, importlib.metadata
_find = importlib.machinery.PathFinder.find_spec
def _find_without_hub(name, path=None, target=None):
    spec = _find(name, path, target)
    if name == "kernels" and spec is not None and "site-packages" in str(spec.origin):
        return None
    return spec
importlib.machinery.PathFinder.find_spec = _find_without_hub
_version = importlib.metadata.version
def _version_without_hub(name):
    if name == "kernels":
        raise importlib.metadata.PackageNotFoundError(name)
    return _version(name)
importlib.metadata.version = _version_without_hub
"""


def test_transformers_without_hub_kernels_imports_from_root():
    # transformers imports ``kernels`` to read its version when it finds no metadata: from the
    # repository root, without Hugging Face's package, that must read as "not installed".
    proc = _run_from_root(
        HIDE_HUB_KERNELS
        + """
import transformers.activations
from transformers.utils.import_utils import is_kernels_available
import modkern.kernels.divergence
print("OK", is_kernels_available())
"""
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["OK", "False"]


def test_transformers_hub_kernels_integration_imports_from_root():
    proc = _run_from_root(
        """
        import transformers.integrations.hub_kernels
        import modkern.kernels.divergence
        print("OK")
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "OK"
