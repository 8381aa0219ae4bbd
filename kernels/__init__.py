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
# ``kernels`` that the finders see with the repository root left out of sys.path. Where there is
# none it leaves what a stray folder of that name would be (a PEP 420 namespace package): an empty
# module with no file, no version and no submodules, whose attributes say why. Raising instead is
# not an option: the finders already found this folder, and transformers (``is_kernels_available``
# imports the package when it has no metadata) would fail on ``import transformers.activations``;
# an empty namespace is what it recognises as "not installed". The import statement returns what
# sys.modules holds at the end.
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
        import importlib.machinery as _machinery
        import types as _types

        _module = _types.ModuleType("kernels", "Not Hugging Face's `kernels` (not installed): an empty stand-in.")
        _module.__file__ = None
        _module.__path__ = []
        _module.__spec__ = _machinery.ModuleSpec("kernels", None, is_package=True)
        _module.__spec__.submodule_search_locations = []

        def __getattr__(name):
            raise AttributeError(
                f"module 'kernels' has no attribute {name!r}: Hugging Face's `kernels` package is not "
                "installed (pip install kernels); the folder kernels/ of the modkern checkout is modkern.kernels"
            )

        _module.__getattr__ = __getattr__
        _sys.modules["kernels"] = _module
    else:
        import importlib.util as _util

        _module = _util.module_from_spec(_spec)
        _sys.modules["kernels"] = _module
        _spec.loader.exec_module(_module)
