"""Plain `torch.onnx.export(model, args)` of a model holding celldsl layers, with no translation table.

torch's exporter (dynamo=True, the default) builds its registry of ONNX translations afresh for every
export from torch's own table of ATen translations (`torch.onnx._internal.exporter._torchlib.
_torchlib_registry`) plus the caller's `custom_translation_table`; torch has no public way for a
library to add to it. celldsl adds its translations of celldsl::cell_sequence and
celldsl::matrix_sequence (torch_onnx.py) to that
private table through its own decorator (`onnx_impl`), as soon as torch imports the module (never
importing it itself: onnxscript is slow to import and optional). If a later torch moves it, nothing
breaks at import: the plain call then fails as before and `translation_table()` still works; the
tests (tests/test_export_torch_onnx.py) say so at once.

The legacy TorchScript exporter (dynamo=False) gets, through its public
`torch.onnx.register_custom_op_symbolic`, a translation that refuses with the reason and the way
that works, instead of its "unrecognized namespace" error.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

OP = "celldsl::cell_sequence"
MATRIX_OP = "celldsl::matrix_sequence"  # the matrix path's op (one layer, one direction)
REGISTRY = "torch.onnx._internal.exporter._torchlib._torchlib_registry"
REGISTRATION = "torch.onnx._internal.exporter._registration"  # imports REGISTRY, which imports it back
_DONE: set[str] = set()


def install() -> None:
    """Register both translations now for the modules torch has imported, else when it imports them."""
    for name in (REGISTRATION, REGISTRY, "torch.onnx"):
        if _loaded(name):
            _register(name)
        elif not any(isinstance(f, _After) and f.name == name for f in sys.meta_path):
            sys.meta_path.insert(0, _After(name))


def _loaded(name: str) -> bool:
    module = sys.modules.get(name)
    return module is not None and not getattr(getattr(module, "__spec__", None), "_initializing", False)


def translate(key, backend, x, states, params, batch_sizes=None):
    """The exporter's call of celldsl::cell_sequence: torch_onnx.cell_sequence, imported on first use
    (the exporter matches the op's arguments to these parameter names)."""
    from .torch_onnx import cell_sequence

    return cell_sequence(key, backend, x, states, params, batch_sizes)


def translate_matrix(key, backend, x, states, params, sizes, lengths=None):
    """The exporter's call of celldsl::matrix_sequence: torch_onnx.matrix_sequence (parameter names as
    the op's schema names them)."""
    from .torch_onnx import matrix_sequence

    return matrix_sequence(key, backend, x, states, params, sizes, lengths)


def legacy_refusal(g, *args):
    """torch.onnx.export(..., dynamo=False) meeting a celldsl layer: the reason and what works."""
    from .model import ExportError

    raise ExportError(
        "celldsl layers do not export with the legacy TorchScript-based ONNX exporter (dynamo=False): it "
        "would need their time loop as an ONNX Scan built inside its JIT graph. Use torch.onnx.export(model, "
        "args) with dynamo=True (the default; it needs onnxscript), or `celldsl export CELL --onnx FILE`")


def _register(name: str) -> None:
    """After module `name` has run: the legacy refusal (torch.onnx), or the translation once both
    modules of the circular pair REGISTRATION / REGISTRY have finished."""
    if name in (REGISTRY, REGISTRATION):
        if not all(_loaded(m) or m == name for m in (REGISTRY, REGISTRATION)):  # `name` has just run
            return  # the other one finishes later and calls this again
        name = REGISTRY
    if name in _DONE:
        return
    _DONE.add(name)
    try:
        import torch

        from .. import ops  # noqa: F401  (the op must exist before it is named)

        if name == REGISTRY:
            registry = sys.modules[REGISTRY]
            registry.onnx_impl(torch.ops.celldsl.cell_sequence.default, no_compile=True)(translate)
            if hasattr(torch.ops.celldsl, "matrix_sequence"):  # the matrix path's op, where defined
                op = torch.ops.celldsl.matrix_sequence.default
                registry.onnx_impl(op, no_compile=True)(translate_matrix)
        else:
            torch.onnx.register_custom_op_symbolic(OP, legacy_refusal, 1)
            if hasattr(torch.ops.celldsl, "matrix_sequence"):
                torch.onnx.register_custom_op_symbolic(MATRIX_OP, legacy_refusal, 1)
    except Exception as e:  # never break torch's import: the plain call then fails as torch makes it fail
        import warnings

        from ..lang.errors import CellWarning

        warnings.warn(f"celldsl could not register its ONNX translation with {name} "
                      f"({type(e).__name__}: {e}); "
                      "pass custom_translation_table=celldsl.export.torch_onnx.translation_table() to "
                      "torch.onnx.export", CellWarning, stacklevel=2)


class _After(importlib.abc.MetaPathFinder):
    """Finds nothing itself: for module `name`, the ordinary spec with a loader that registers once
    the module has run (as celldsl/torch_hook.py does for torch)."""

    def __init__(self, name: str):
        self.name = name

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name:
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _Loader(spec.loader, fullname)
        return spec


class _Loader(importlib.abc.Loader):
    def __init__(self, loader, name: str):
        self.loader, self.name = loader, name

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        module.__spec__.loader = module.__loader__ = self.loader
        self.loader.exec_module(module)
        _register(self.name)
