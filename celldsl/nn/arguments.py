"""Constructor arguments checked as torch.nn.RNNBase checks them: the same exception types (TypeError
for a wrong type, ValueError for a wrong value) and, where torch.nn has the check, its wording."""

from __future__ import annotations

import numbers
import warnings

from ..compiler import CompiledCell

BACKENDS = ("auto", "torch", "cpu", "triton")


def check_layer_arguments(input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
                          backend="auto") -> None:
    if not isinstance(dropout, numbers.Number) or isinstance(dropout, bool) or not 0 <= dropout <= 1:
        raise ValueError(
            "dropout should be a number in range [0, 1] representing the probability of an element being "
            "zeroed"
        )
    if dropout > 0 and num_layers == 1:
        warnings.warn(
            "dropout option adds dropout after all but last recurrent layer, so non-zero dropout expects "
            f"num_layers greater than 1, but got dropout={dropout} and num_layers={num_layers}",
            stacklevel=3,
        )
    for name, value in (("bias", bias), ("batch_first", batch_first)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} should be of type bool, got: {type(value).__name__}")
    for name, value in (("input_size", input_size), ("hidden_size", hidden_size), ("num_layers", num_layers)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name} should be of type int, got: {type(value).__name__}")
        if value <= 0:
            raise ValueError(f"{name} must be greater than zero")
    check_backend(backend)


def check_schedule_argument(compiled: CompiledCell, backend, schedule) -> str | None:
    """`schedule=` of a layer: None, or a Triton schedule that applies to the cell (ValueError, with
    the reason and the schedules that do apply, otherwise)."""
    if schedule is None:
        return None
    if backend not in ("auto", "triton"):
        raise ValueError(f"schedule={schedule!r} is a Triton schedule; backend={backend!r} has none")
    from ..targets import target

    target("triton").check_schedule(compiled.plan, schedule)
    return schedule


def check_backend(backend) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto', 'torch', 'cpu' or 'triton', got {backend!r}")


def size_dict(sizes, what: str, keys: str) -> dict:
    """`sizes=`/`input_sizes=` as a dict, {} for None: anything else (0, a string, a list) is a
    TypeError that says what was expected, never read as no sizes or split into characters."""
    if sizes is None:
        return {}
    if not isinstance(sizes, dict):
        raise TypeError(f"{what} must be a dict {{{keys}: size}}, got {type(sizes).__name__}")
    return sizes


def extra_input_sizes(cell: CompiledCell, sizes) -> dict[str, int]:
    """Check `input_sizes` against the cell's inputs after the first: {name: positive int}. An input
    declared `: 1` (one value per sequence) has size 1 without being given."""
    names = cell.ir.inputs[1:]
    sizes = size_dict(sizes, "input_sizes", "input name")
    ones = {n for n in names if cell.ir.width(n) == "row"}
    for n in ones:
        if sizes.get(n, 1) != 1:
            raise ValueError(f"input {n!r} is declared ': 1' (one value per sequence); "
                             f"input_sizes[{n!r}] must be 1, got {sizes[n]!r}")
    sizes = {n: 1 for n in ones} | dict(sizes)
    unknown = sorted(set(sizes) - set(names))
    missing = [n for n in names if n not in sizes]
    if unknown or missing:
        declared = ", ".join(names) if names else "none"
        raise ValueError(
            f"cell {cell.name!r} declares the inputs {', '.join(cell.ir.inputs)}; input_sizes must give the "
            f"size of each after the first ({declared})"
            + (f"; missing: {', '.join(missing)}" if missing else "")
            + (f"; unknown: {', '.join(unknown)}" if unknown else "")
        )
    for name in names:
        v = sizes[name]
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"input_sizes[{name!r}] must be a positive int, got {v!r}")
    return {n: sizes[n] for n in names}


def declared_width_sizes(cell: CompiledCell, sizes) -> dict[str, int]:
    """Check `sizes` against the widths the cell declares (`state h : P`): {width: positive int}."""
    named = {*cell.ir.widths.values(), *getattr(cell.ir, "init_sizes", ())}
    declared = sorted(named - {"H", "row", *cell.ir.inputs})
    sizes = size_dict(sizes, "sizes", "width")
    unknown = sorted(set(sizes) - set(declared))
    missing = [w for w in declared if w not in sizes]
    if unknown or missing:
        raise ValueError(
            f"cell {cell.name!r} declares the widths {', '.join(declared) or '(none)'}; sizes must give the "
            "size of each" + (f"; missing: {', '.join(missing)}" if missing else "")
            + (f"; unknown: {', '.join(unknown)}" if unknown else "")
        )
    for w in declared:
        v = sizes[w]
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"sizes[{w!r}] must be a positive int, got {v!r}")
    return {w: sizes[w] for w in declared}


def check_first_input(cell: CompiledCell, input_size: int, layer: int = 0) -> None:
    """A first input declared `: 1` (one value per sequence) is 1 wide: the kernels read one value of
    each row of it, so a wider input would be cut silently (cpu) or fail inside them (torch)."""
    first = cell.ir.inputs[0]
    if cell.ir.width(first) != "row" or input_size == 1:
        return
    if layer == 0:
        raise ValueError(f"input {first!r} is declared ': 1' (one value per sequence); input_size must be 1, "
                         f"got {input_size}")
    raise ValueError(f"input {first!r} is declared ': 1' (one value per sequence), but layer {layer} reads "
                     f"the {input_size}-wide output of layer {layer - 1} as its input {first!r}: such a cell "
                     "has one layer (or hidden_size 1)")


def check_heads(cell: CompiledCell, sizes: dict[str, int]) -> None:
    """A matrix with heads(n) splits its rows and columns into n equal blocks: both must divide by n."""
    for name, p in cell.ir.params.items():
        if p.heads and (sizes[p.rows] % p.heads or sizes[p.operand_size] % p.heads):
            raise ValueError(f"parameter {name!r} has {p.heads} heads, so its sizes ({sizes[p.rows]} x "
                             f"{sizes[p.operand_size]}) must divide by {p.heads}")


def check_not_matrix(cell) -> None:
    """Recurrent and Cell run the plan of an elementwise cell; a matrix-memory cell has its own layer."""
    if getattr(cell, "plan", None) is None:
        widths = ", ".join(f"{w!r}: 16" for w in ["heads", *cell.ir.widths])
        raise ValueError(f"cell {cell.name!r} has matrix states (one matrix per head); run it with "
                         f"celldsl.MatrixRecurrent(cell, input_size, sizes={{{widths}}})")
