"""The driver: cell text -> AST -> IR -> plan, cached on disk, plus the generated torch module.

`compile_cell("cells/lstm.cell")` (a path, cell text, or an already compiled cell) returns a
`CompiledCell`. Compiled plans are cached under $CELLDSL_CACHE (default ~/.cache/celldsl) keyed by
the text, the file name and the compiler version; writes are atomic and a corrupt entry is rebuilt.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import pickle
import tempfile
import warnings
from functools import cached_property
from pathlib import Path

from .errors import CellError, CellWarning, Source
from .resources import ZOO, zoo_names

COMPILER_VERSION = "0.1.0-10"  # bump when the plan or the emitted code changes


def cache_dir() -> Path:
    root = os.environ.get("CELLDSL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "celldsl")
    return Path(root)


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class CompiledCell:
    """A cell ready to run: its plan, its generated torch code, and helpers for the layers."""

    def __init__(self, plan, key: str, diagnostics: list[str]):
        self.plan = plan
        self.ir = plan.ir
        self.key = key
        self.diagnostics = diagnostics  # warnings found when compiling (kept so cache hits repeat them)

    def __getstate__(self):
        state = dict(self.__dict__)
        for lazy in ("torch_module", "torch_loop", "triton_loop", "cpu_loop"):
            state.pop(lazy, None)
        return state

    @property
    def name(self) -> str:
        return self.ir.name

    @property
    def states(self) -> list[str]:
        return self.ir.states

    def check_sizes(self, input_size: int, hidden_size: int, extra_sizes: dict | None = None) -> None:
        """The cell's equations may need an input's size == hidden size (MUT1's tanh(x)); say so clearly.
        input_size is the first input's; extra_sizes those of the other inputs, by name."""
        first = self.ir.inputs[0]
        for name, loc in self.ir.needs_hidden_size.items():
            size = input_size if name == first else (extra_sizes or {}).get(name, hidden_size)
            if size != hidden_size:
                what = "input_size" if name == first else f"input_sizes[{name!r}]"
                raise CellError(
                    f"input '{name}' is used elementwise with H-wide values here, so this cell needs "
                    f"{what} == hidden_size (got {what}={size}, hidden_size={hidden_size})",
                    self.ir.source,
                    loc,
                )

    @cached_property
    def torch_module(self):
        from .emit.torch_source import torch_module_source

        path = cache_dir() / self.key / "torch_cell.py"
        source = torch_module_source(self.plan)
        try:
            if not path.exists() or path.read_text() != source:
                _atomic_write(path, source.encode())
        except OSError:  # an unwritable cache: the module still needs a file to live in
            path = Path(tempfile.mkdtemp(prefix="celldsl-")) / "torch_cell.py"
            path.write_text(source)
        spec = importlib.util.spec_from_file_location(f"celldsl_generated_{self.key[:16]}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    @cached_property
    def torch_loop(self):
        from .runtime.torch_loop import TorchLoop

        return TorchLoop(self.plan, self.torch_module)

    @cached_property
    def triton_loop(self):
        """The same time loop, with each stage's pointwise step a fused Triton kernel, replayed from
        CUDA graphs on CUDA tensors (the host's launches, not the GPU, bound a step otherwise)."""
        from .runtime.cuda_graph import GraphedLoop
        from .runtime.torch_loop import TorchLoop
        from .runtime.triton_module import load_triton_module

        return GraphedLoop(TorchLoop(self.plan, load_triton_module(self)))

    @cached_property
    def cpu_loop(self):
        """The time loop with each stage's pointwise step compiled to C (the torch loop when no C
        compiler is available)."""
        from .runtime.cpu_fused import cpu_loop

        return cpu_loop(self)

    def loop(self, backend: str):
        """The time loop for a resolved backend name: "torch", "cpu" or "triton"."""
        loops = {"torch": "torch_loop", "cpu": "cpu_loop", "triton": "triton_loop"}
        if backend not in loops:
            raise ValueError(f"backend must be one of {sorted(loops)}, got {backend!r}")
        return getattr(self, loops[backend])

    def explain(self) -> str:
        from .explain import explain

        return explain(self)


def _read(cell) -> Source:
    """A path (str or Path), a zoo name ("lstm"), cell text (str) or raw bytes -> Source.

    A str without a newline is a path or a zoo name (no cell fits on one line)."""
    if isinstance(cell, str) and "\n" not in cell:
        if not os.path.exists(cell) and (ZOO / f"{cell}.cell").exists():
            cell = ZOO / f"{cell}.cell"
        elif os.path.exists(cell) or cell.endswith(".cell"):
            cell = Path(cell)
        else:
            zoo = ", ".join(zoo_names())
            raise CellError(
                f"no file '{cell}' and no zoo cell of that name (the zoo: {zoo})", Source("", cell)
            )
    if isinstance(cell, Path):
        try:
            data = cell.read_bytes()
        except OSError as err:
            raise CellError(f"cannot read {cell}: {err.strerror}", Source("", str(cell))) from None
        return _decode(data, str(cell))
    if isinstance(cell, bytes):
        return _decode(cell, "<cell>")
    if isinstance(cell, str):
        return Source(cell.removeprefix("\ufeff"), "<cell>")
    raise TypeError(f"cell must be a path, cell text or a CompiledCell, not {type(cell).__name__}")


def _decode(data: bytes, filename: str) -> Source:
    try:
        return Source(data.decode("utf-8").removeprefix("\ufeff"), filename)  # an editor's BOM is no error
    except UnicodeDecodeError:
        from .syntax import parse

        parse(data, filename)  # raises a CellError that points at the first bad byte
        raise AssertionError("unreachable") from None


def compile_cell(cell, *, use_cache: bool = True) -> CompiledCell:
    """Compile a cell file (path), cell text, or pass a CompiledCell through."""
    if isinstance(cell, CompiledCell):
        return cell
    source = _read(cell)
    key = hashlib.sha256(
        "\0".join([COMPILER_VERSION, source.filename, source.text]).encode("utf-8", "surrogatepass")
    ).hexdigest()[:32]
    entry = cache_dir() / key / "plan.pkl"
    if use_cache:
        try:
            compiled = pickle.loads(entry.read_bytes())
            if isinstance(compiled, CompiledCell) and compiled.key == key:
                for text in compiled.diagnostics:
                    warnings.warn(text, CellWarning, stacklevel=2)
                return compiled
        except Exception:  # noqa: BLE001 - a missing, corrupt or foreign cache entry is rebuilt, never fatal
            pass
    compiled = _compile(source, key)
    if use_cache:
        try:
            _atomic_write(entry, pickle.dumps(compiled))
        except OSError:
            pass  # a read-only cache only costs speed
    return compiled


def _compile(source: Source, key: str) -> CompiledCell:
    from .ir import build_ir
    from .plan import build_plan
    from .syntax import parse

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CellWarning)
        module = parse(source.text, source.filename)
        ir = build_ir(module, source)
        plan = build_plan(ir)
    diagnostics = [str(w.message) for w in caught if issubclass(w.category, CellWarning)]
    for text in diagnostics:
        warnings.warn(text, CellWarning, stacklevel=3)
    return CompiledCell(plan, key, diagnostics)
