"""Constructor arguments checked as torch.nn.RNNBase checks them: the same exception types (TypeError
for a wrong type, ValueError for a wrong value) and, where torch.nn has the check, its wording."""

from __future__ import annotations

import numbers
import warnings

from .compiler import CompiledCell

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


def check_backend(backend) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto', 'torch', 'cpu' or 'triton', got {backend!r}")


def extra_input_sizes(cell: CompiledCell, sizes) -> dict[str, int]:
    """Check `input_sizes` against the cell's inputs after the first: {name: positive int}."""
    names = cell.ir.inputs[1:]
    sizes = {} if sizes is None else sizes
    if not isinstance(sizes, dict):
        raise TypeError(f"input_sizes must be a dict {{input name: size}}, got {type(sizes).__name__}")
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
