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


def test_import_kernels_from_root_without_another_package_fails_as_if_absent(tmp_path):
    # Only the repository root and the standard library: no other ``kernels`` anywhere.
    proc = _run_from_root(
        """
        import sys
        sys.path[:] = [p for p in sys.path if "site-packages" not in p]
        try:
            import kernels
        except ModuleNotFoundError as e:
            print("ABSENT", e.name, "kernels" in sys.modules)
        else:
            print("FOUND", kernels.__file__)
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["ABSENT", "kernels", "False"]


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
