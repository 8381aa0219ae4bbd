"""Triton kernels of modkern, installed as ``modkern.kernels``.

One module per op family. Importing a module defines its ``@triton.jit`` kernels, so on a machine
without a GPU ``TRITON_INTERPRET=1`` must be set before the import (modkern imports these modules
lazily, on first use of ``backend="triton"``).
"""

# This folder is only ever ``modkern.kernels``. With the repository root on sys.path (``python -m
# pytest``, ``python -c``, a notebook in the checkout) Python would also find it as the top-level
# module ``kernels``, a name that belongs to Hugging Face's package (a dependency of transformers).
# It stays a regular package (setuptools' editable install needs the __init__.py), so the import
# system runs this file first in that case; this file then steps aside: it loads the next
# ``kernels`` that the finders see with the repository root left out of sys.path, or fails as if
# this folder were not there. The import statement returns what sys.modules holds at the end.
if __name__ == "kernels":
    import os as _os
    import sys as _sys

    _root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _saved_path = _sys.path
    _sys.path = [p for p in _saved_path if not isinstance(p, str) or _os.path.abspath(p) != _root]
    try:
        _spec = next(
            (s for f in _sys.meta_path if hasattr(f, "find_spec") for s in [f.find_spec("kernels", None)] if s),
            None,
        )
    finally:
        _sys.path = _saved_path
    if _spec is None or _spec.origin == __file__:
        raise ModuleNotFoundError("No module named 'kernels'", name="kernels")
    import importlib.util as _util

    _module = _util.module_from_spec(_spec)
    _sys.modules["kernels"] = _module
    _spec.loader.exec_module(_module)
