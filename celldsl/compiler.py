"""The driver: cell text -> AST -> IR -> plan, plus the generated torch module.

`compile_cell("cells/lstm.cell")` (a path, a zoo name, cell text, or an already compiled cell) returns
a `CompiledCell`. Compiling is fast (tens of milliseconds), so a compiled cell is kept in memory for
the process and rebuilt from its text in the next one: nothing compiled is ever unpickled. What the
compiler generates from a cell (the torch module, C kernels, Triton modules) goes to the cache folder
of celldsl/cache.py, under the cell's key (its text, file name and the compiler's own source).
"""

from __future__ import annotations

import json
import os
import warnings
from functools import cached_property
from pathlib import Path

from . import cache
from .files import read_regular
from .lang.errors import CellError, CellWarning, Source, printable
from .lang.syntax import MAX_FILE_BYTES
from .resources import ZOO, zoo_file, zoo_names  # noqa: F401  (ZOO: re-exported, celldsl.compiler.ZOO)

_COMPILED: dict[str, CompiledCell] = {}  # key -> compiled cell, for this process
_RECORDED: set[Path] = set()  # the cell.json files this process wrote (or found up to date)


class CompiledSource:
    """What every compiled cell holds: its IR, cache key and diagnostics (warnings found when
    compiling, kept so cache hits repeat them)."""

    def __init__(self, ir, key: str, diagnostics: list[str]):
        self.ir, self.key, self.diagnostics = ir, key, diagnostics

    def __reduce__(self):
        """Pickled as its source (file name and text), compiled again when unpickled: a pickled layer
        never carries a plan of another compiler version."""
        return (compile_source, (self.ir.source.filename, self.ir.source.text))

    @property
    def name(self) -> str:
        return self.ir.name

    @property
    def states(self) -> list[str]:
        return self.ir.states


class CompiledCell(CompiledSource):
    """A cell ready to run: its plan, its generated torch code, and helpers for the layers."""

    def __init__(self, plan, key: str, diagnostics: list[str]):
        super().__init__(plan.ir, key, diagnostics)
        self.plan = plan

    def sizes(self, input_size: int, hidden_size: int, extra_sizes: dict | None = None,
              widths: dict | None = None) -> dict[str, int]:
        """The size of every width the cell uses (widths.py): H, each input's, each declared width's.
        input_size is the first input's, extra_sizes the other inputs' by name, widths the declared
        widths' (`state h : P` needs widths={"P": ...})."""
        sizes = {"H": hidden_size, "row": 1, self.ir.inputs[0]: input_size}
        sizes.update({n: (extra_sizes or {}).get(n, hidden_size) for n in self.ir.inputs[1:]})
        declared = sorted({*(w for w in self.ir.widths.values() if w not in sizes),
                           *(w for w in getattr(self.ir, "init_sizes", ()) if w not in sizes)})
        missing = [w for w in declared if w not in (widths or {})]
        if missing:
            example = ", ".join(repr(w) + ": 16" for w in missing)
            raise ValueError(f"cell {self.name!r} declares the width(s) {', '.join(missing)}; "
                             f"give their sizes, e.g. sizes={{{example}}}")
        sizes.update({w: widths[w] for w in declared})
        return sizes

    def check_sizes(self, input_size: int, hidden_size: int, extra_sizes: dict | None = None,
                    widths: dict | None = None, layer: int = 0) -> None:
        """Widths the equations make equal (MUT1's tanh(x) needs I == H) must have equal sizes; say so at
        the place they meet. `layer` > 0: the first input is the previous layer's output."""
        sizes = self.sizes(input_size, hidden_size, extra_sizes, widths)
        first = self.ir.inputs[0]

        def words(w: str) -> tuple[str, str]:
            if w == "H":
                return "H-wide values", "hidden_size"
            if w == first:
                return f"input '{w}'", "input_size"
            if w in self.ir.inputs:
                return f"input '{w}'", f"input_sizes[{w!r}]"
            return f"{w}-wide values", f"sizes[{w!r}]"

        for (a, b), loc in self.ir.same_widths.items():
            if sizes[a] == sizes[b]:
                continue
            x, y = (b, a) if a == "H" or (b != "H" and b in self.ir.inputs) else (a, b)  # H, inputs last
            (wx, nx), (wy, ny) = words(x), words(y)
            used = "is used elementwise with" if x in self.ir.inputs else "meet"
            context = ""
            if layer > 0 and first in (a, b):
                context = (f"; layer {layer} reads the {input_size}-wide output of layer {layer - 1} as its "
                           f"input '{first}'")
            raise CellError(
                f"{wx} {used} {wy} here, so this cell needs {nx} == {ny} (got {nx}={sizes[x]}, "
                f"{ny}={sizes[y]}){context}",
                self.ir.source,
                loc,
            )

    @cached_property
    def torch_module(self):
        """The generated torch module (targets/torch/), imported from its file in the cache."""
        from .targets import target

        return target("torch").load(self)

    @cached_property
    def torch_loop(self):
        from .targets import target

        return target("torch").loop(self)

    @cached_property
    def triton_loop(self):
        """The same time loop, with each stage's pointwise step a fused Triton kernel, replayed from
        CUDA graphs on CUDA tensors (the host's launches, not the GPU, bound a step otherwise)."""
        from .targets import target

        return target("triton").loop(self)

    @cached_property
    def cpu_loop(self):
        """The time loop with each stage's pointwise step compiled to C (the torch loop when no C
        compiler is available)."""
        from .targets import target

        return target("cpu").loop(self)

    def loop(self, backend: str):
        """The time loop for a resolved backend name: "torch", "cpu" or "triton"."""
        loops = {"torch": "torch_loop", "cpu": "cpu_loop", "triton": "triton_loop"}
        if backend not in loops:
            raise ValueError(f"backend must be one of {sorted(loops)}, got {backend!r}")
        return getattr(self, loops[backend])

    def explain(self) -> str:
        from .cli.explain import explain

        return explain(self)


class CompiledMatrixCell(CompiledSource):
    """A matrix-memory cell (lang/tensors.py): its IR and the loops that run it (torch, cpu, and the
    opt-in triton loop); what a target cannot run is refused with a located reason."""

    @cached_property
    def torch_loop(self):
        from .targets import matrix_loop

        return matrix_loop(self)

    def loop(self, backend: str):
        """torch's loop, the C target's ("cpu"; "auto": C on CPU float tensors, else torch); "triton":
        the opt-in generated Triton loop (CellError at what its emitter cannot express)."""
        from .targets import refuse_matrix, target

        if backend == "torch":
            return self.torch_loop
        if backend in ("cpu", "auto"):
            return target("cpu").matrix_loop(self, self.torch_loop if backend == "auto" else None)
        if backend == "triton":  # opt-in: "auto" never picks it (targets/triton/matrix_loop.py)
            from .targets import triton_matrix_loop

            return triton_matrix_loop(self)
        refuse_matrix(self.ir, backend)

    def explain(self) -> str:
        ir = self.ir
        what, states = "a matrix-memory cell", "states (per head):"
        if not ir.heads:  # one head (lang/tensors.py): its states are the layer's vectors, no heads
            what, states = "a cell with shaped parameters (one head; H is hidden_size)", "states:"
        lines = [f"cell {ir.name}: {what}", f"  file: {printable(ir.source.filename)}",
                 "", "inputs:", *[f"  {x}  [{x}]" for x in ir.inputs], states]
        lines += [f"  {s}  [{ir.kinds[s].words().removesuffix(' per head' * (not ir.heads))}]"
                  for s in ir.states]
        lines += ["parameters:", *[f"  {p}  [{ir.kinds[p].words()}]" for p in ir.params]]
        lines += ["backends: torch (the einsum loop), cpu (the fused C loop; targets/c/matrix_loop.py), "
                  "triton (opt-in: backend='triton')"]
        return "\n".join(lines)


def _read(cell) -> Source:
    """A path (str or Path), a zoo name ("lstm"), cell text (str) or raw bytes -> Source.

    A str without a newline is a path or a zoo name (no cell fits on one line)."""
    if isinstance(cell, str) and "\n" not in cell:
        if not os.path.exists(cell) and zoo_file(cell) is not None:
            cell = zoo_file(cell)
        elif os.path.exists(cell) or cell.endswith(".cell"):
            cell = Path(cell)
        else:
            zoo = ", ".join(zoo_names())
            raise CellError(
                f"no file '{printable(cell)}' and no zoo cell of that name (the zoo: {zoo})",
                Source("", cell),
            )
    if isinstance(cell, Path):
        return _decode(read_cell_file(cell), str(cell))
    if isinstance(cell, bytes):
        return _decode(cell, "<cell>")
    if isinstance(cell, str):
        return Source(cell.removeprefix("\ufeff"), "<cell>")
    raise TypeError(f"cell must be a path, cell text or a CompiledCell, not {type(cell).__name__}")


def read_cell_file(path: Path) -> bytes:
    """The bytes of a cell file, at most MAX_FILE_BYTES of them (a device or a huge file is an error)."""
    try:  # a FIFO or a device is refused before it is read (a FIFO without a writer never ends)
        data = read_regular(path, MAX_FILE_BYTES + 1)
    except OSError as err:
        raise CellError(f"cannot read {printable(str(path))}: {err.strerror}", Source("", str(path))) \
            from None
    if len(data) > MAX_FILE_BYTES:
        raise CellError(f"the file is larger than {MAX_FILE_BYTES >> 10} kB; a cell file is a few lines of "
                        "equations", Source("", str(path)))
    return data


def _decode(data: bytes, filename: str) -> Source:
    try:
        return Source(data.decode("utf-8").removeprefix("\ufeff"), filename)  # an editor's BOM is no error
    except UnicodeDecodeError:
        from .lang.syntax import parse

        parse(data, filename)  # raises a CellError that points at the first bad byte
        raise AssertionError("unreachable") from None


def compile_cell(cell, *, use_cache: bool = True) -> CompiledCell | CompiledMatrixCell:
    """Compile a cell file (path), zoo name or cell text, or pass a CompiledCell through.

    use_cache=False compiles again even when this process compiled the same text before."""
    if isinstance(cell, CompiledCell | CompiledMatrixCell):
        return cell
    return _compiled(_read(cell), use_cache)


def compile_source(filename: str, text: str) -> CompiledCell:
    """Compile cell text that came from the file `filename` (the name appears in its messages)."""
    return _compiled(Source(text, filename), use_cache=True)


def _compiled(source: Source, use_cache: bool) -> CompiledCell:
    key = cache.key(source.filename, source.text)
    compiled = _COMPILED.get(key) if use_cache else None
    if compiled is not None:
        for text in compiled.diagnostics:  # a compile in memory repeats its warnings, as a fresh one would
            warnings.warn(text, CellWarning, stacklevel=3)
    else:
        compiled = _compile(source, key)
    if use_cache:
        _COMPILED[key] = compiled
        _record_source(source, key)
    return compiled


def _record_source(source: Source, key: str) -> None:
    """Keep the text of a compiled cell under its key, so that a fresh process that meets only the key
    (a torch.compile graph, an unpickled layer) can compile it again: see `compile_key`."""
    try:
        path = cache.root() / key / "cell.json"
        if path not in _RECORDED:
            cache.write_if_changed(path, json.dumps({"filename": source.filename, "text": source.text}))
            _RECORDED.add(path)
    except OSError:
        pass  # costs only the ability to find the cell by key in another process


def compile_key(key: str) -> CompiledCell | None:
    """The compiled cell with this key: from memory, else compiled again from the text recorded in the
    cache (verified: the text must give the same key). None when neither has it."""
    if key in _COMPILED:
        return _COMPILED[key]
    try:
        record = json.loads(cache.read_trusted(cache.root() / key / "cell.json").decode("utf-8"))
        source = Source(record["text"], record["filename"])
    except cache.UnsafeCacheError:
        raise
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(source.text, str) or not isinstance(source.filename, str) or \
            cache.key(source.filename, source.text) != key:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CellWarning)
        compiled = _compile(source, key)
    _COMPILED[key] = compiled
    return compiled


def _compile(source: Source, key: str) -> CompiledCell | CompiledMatrixCell:
    from .lang.ir import build_ir
    from .lang.syntax import parse
    from .lang.tensors import build_tensor_ir, is_matrix_cell
    from .plan import build_plan

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CellWarning)
        module = parse(source.text, source.filename)
        if is_matrix_cell(module):
            ir, plan = build_tensor_ir(module, source), None
        else:
            ir = build_ir(module, source)
            plan = build_plan(ir)
    diagnostics = [str(w.message) for w in caught if issubclass(w.category, CellWarning)]
    for text in diagnostics:
        warnings.warn(text, CellWarning, stacklevel=3)
    if plan is None:
        return CompiledMatrixCell(ir, key, diagnostics)
    return CompiledCell(plan, key, diagnostics)
