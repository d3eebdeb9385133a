"""`import celldsl` registers celldsl's torch ops (celldsl::cell_sequence, celldsl::matrix_sequence and
their backwards), so that a saved torch.export program that calls them loads in a fresh process.

celldsl's own import does not import torch (about a second: `celldsl check` starts without it). So
the ops are registered at `import celldsl` when torch is already imported, and otherwise right after
torch's own import finishes: a finder on sys.meta_path notices `import torch`, lets the ordinary
finders find it, and registers the ops once torch's module has run. It then takes itself off
sys.meta_path and puts torch's own loader back on the module.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import warnings


def register_ops() -> None:
    """Register the ops now (imports torch)."""
    from . import ops  # noqa: F401  (registering them is what importing the package does)
    from .export import onnx_hook

    onnx_hook.install()  # plain torch.onnx.export finds the op's translation (export/onnx_hook.py)


def install() -> None:
    """Register the ops now if torch is imported, else as soon as it is."""
    torch = sys.modules.get("torch")
    if torch is not None:
        if not getattr(getattr(torch, "__spec__", None), "_initializing", False):
            _register_or_warn()
        return  # torch is being imported and imports celldsl itself: its caller registers nothing
    if not any(isinstance(f, _AfterTorch) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterTorch())


def _register_or_warn() -> None:
    try:
        register_ops()
    except Exception as e:  # never break `import torch`; say why the ops are missing
        from .lang.errors import CellWarning

        warnings.warn(f"celldsl could not register its torch ops ({type(e).__name__}: {e}); saved "
                      "torch.export programs that use them will not load", CellWarning, stacklevel=2)


class _AfterTorch(importlib.abc.MetaPathFinder):
    """Finds nothing itself: for `torch`, returns the ordinary spec with a loader that registers the
    ops after torch's module has run."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "torch":
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec("torch")
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _RegisteringLoader(spec.loader)
        return spec


class _RegisteringLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        module.__spec__.loader = module.__loader__ = self.loader  # torch's own loader from here on
        self.loader.exec_module(module)
        _register_or_warn()
