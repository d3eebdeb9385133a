"""Load a compiled cell's generated Triton module from a real file (triton.jit reads the source back).

A zoo cell uses kernels/<stem>.py when that file holds exactly what the compiler emits now; any other
cell (or a stale file) is written to a content-addressed file under the cache directory. Modules are
imported by file path, never exec'd from strings, once per (file, interpreter mode): `@triton.jit`
decides at import whether it builds interpreter functions, so each call picks the import that
matches TRITON_INTERPRET at call time (the CPU interpreter when it is "1").
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

from ... import cache
from ...resources import KERNELS

HELPERS = Path(__file__).resolve().with_name("helpers.py")

_LOADED: dict[tuple[str, str, bool], object] = {}
_LOCK = threading.RLock()  # reentrant: importing a generated file imports the shared helpers


def interpreting() -> bool:
    """True when Triton kernels run on the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def module_path(compiled, source: str | None = None) -> Path:
    """Where the generated source of `compiled` lives: kernels/<stem>.py if it is current, else the cache."""
    from .emit import triton_module_source

    if source is None:
        source = triton_module_source(compiled.plan)
    stem = Path(compiled.ir.source.filename).stem
    zoo_file = KERNELS / f"{stem}.py"
    if stem and zoo_file.is_file():
        try:
            if zoo_file.read_text(encoding="utf-8") == source:
                return zoo_file
        except OSError:
            pass
    digest = hashlib.sha256(source.encode("utf-8")).hexdigest()[:32]
    name = stem if stem.isidentifier() else "cell"
    path = cache.root() / "triton" / digest / f"{name}.py"
    cache.write_if_changed(path, source)
    return path


def shared_helpers():
    """targets/triton/helpers.py (activations, launch helpers) in the mode of TRITON_INTERPRET now: a
    generated file calls this when it is imported, so its kernels call helpers of their own mode."""
    return import_module(HELPERS, "shared-helpers", interpreting())


def load_triton_module(compiled) -> TritonModule:
    """The generated Triton functions of a CompiledCell (`stage{k}_forward`/`_backward`, `hoist_*`)."""
    from .emit import triton_module_source

    source = triton_module_source(compiled.plan)
    return TritonModule(module_path(compiled, source), hashlib.sha256(source.encode("utf-8")).hexdigest())


class TritonModule:
    """The host functions of one generated file, each importing the file in the mode of the call:
    interpreted while TRITON_INTERPRET=1, compiled otherwise. A CompiledCell keeps its loop (and so
    this object) for the process, so the mode cannot be fixed when the loop is built."""

    def __init__(self, path: Path, digest: str):
        self.path, self.digest = path, digest

    def module(self, interpret: bool | None = None):
        """The imported file; `interpret` defaults to the current TRITON_INTERPRET."""
        return import_module(self.path, self.digest, interpreting() if interpret is None else interpret)

    def __getattr__(self, name: str):
        if not (name.startswith("stage") or name.startswith("hoist_")):
            raise AttributeError(name)
        if not hasattr(self.module(), name):
            raise AttributeError(f"{self.path} has no function {name}")

        def call(*args):
            return getattr(self.module(), name)(*args)

        call.__name__ = call.__qualname__ = name
        return call


def import_module(path: Path, digest: str, interpret: bool):
    """Import a generated file once per (file, content, mode). `@triton.jit` reads TRITON_INTERPRET
    when the file is imported, so the variable is set to the wanted mode for the import only."""
    key = (str(path), digest, interpret)
    module = _LOADED.get(key)
    if module is not None:
        return module
    with _LOCK:
        module = _LOADED.get(key)
        if module is None:
            stem = "helpers" if path == HELPERS else digest[:16]
            name = f"celldsl_triton_{stem}_{'interpreted' if interpret else 'compiled'}"
            before = os.environ.get("TRITON_INTERPRET")
            os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
            try:
                module = _import(path, name)
            finally:
                if before is None:
                    del os.environ["TRITON_INTERPRET"]
                else:
                    os.environ["TRITON_INTERPRET"] = before
            _LOADED[key] = module
    return module


def _import(path: Path, name: str):
    return cache.import_file(path, name)  # from the source only: no .pyc is written or read
