"""What every matrix-memory loop checks before it runs (`run(x, states, params, sizes, lengths)`):
the tensors' count and shapes against the sizes, the sizes themselves, and the lengths. The C loop
reads raw memory at the sizes' strides, so a state or size that disagrees with the tensors would read
or write out of bounds; the torch loop would broadcast a parameter of the wrong shape into a number.
Shared by the torch, cpu and triton matrix loops (a target never imports another)."""

from __future__ import annotations

import torch

from ..lang.errors import CellTensorError
from ..lang.tensors import TensorIR


def check_run(ir: TensorIR, x, states, params, sizes: dict, lengths):
    """x, with its padding (the steps past each sequence's length) zeroed: never read, as a
    PackedSequence's, where a NaN would otherwise reach the parameters' gradients (0 * NaN). Before that,
    CellTensorError (a ValueError and a RuntimeError, as torch's shape errors) unless x is [T >= 1, N,
    sizes[input]], the states and parameters are the cell's, in its order, of the shapes the sizes give,
    and lengths is None or N integers in [0, T]."""
    where = f"cell {ir.name!r}"
    needed = ["heads", ir.inputs[0], *ir.widths]
    bad = {w: sizes.get(w) for w in needed
           if not isinstance(sizes.get(w), int) or isinstance(sizes.get(w), bool) or sizes[w] < 1}
    if bad:
        raise CellTensorError(f"{where}: sizes must give {', '.join(needed)} as positive integers, got {bad}")
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[2] != sizes[ir.inputs[0]]:
        got = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise CellTensorError(f"{where}: x must be [T, N, {sizes[ir.inputs[0]]}], got {got}")
    T, N = x.shape[0], x.shape[1]
    if T == 0:
        raise CellTensorError("Expected sequence length to be larger than 0 in RNN")
    for what, names, given, lead in (("state", ir.states, states, [N]), ("parameter", ir.params, params, [])):
        if len(given) != len(names):
            raise CellTensorError(f"{where} takes {len(names)} {what}(s) ({', '.join(names)}), "
                                  f"got {len(given)}")
        for name, t in zip(names, given, strict=True):
            want = [*lead, *ir.param_shape(name, sizes)]
            if not isinstance(t, torch.Tensor) or list(t.shape) != want:
                got = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise CellTensorError(f"{where}: {what} {name} must be {want} ({'N, ' if lead else ''}heads, "
                                      f"rows, cols without the 1 axes), got {got}")
    if lengths is not None:
        if not isinstance(lengths, torch.Tensor) or lengths.dim() != 1 or lengths.shape[0] != N \
                or lengths.dtype == torch.bool or lengths.is_floating_point() or lengths.is_complex():
            got = f"{lengths.dtype} {list(lengths.shape)}" if isinstance(lengths, torch.Tensor) else \
                type(lengths).__name__
            raise CellTensorError(f"{where}: lengths must be {N} integers (one per sequence), got {got}")
        if N and (int(lengths.min()) < 0 or int(lengths.max()) > T):
            raise CellTensorError(f"{where}: every length must be in [0, T = {T}], got {lengths.tolist()}")
        t = torch.arange(T, device=x.device)[:, None, None]
        x = torch.where(t < lengths.to(x.device)[None, :, None], x, 0)
    return x
