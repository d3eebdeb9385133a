"""Glue between the registered ops (ops/op.py) and a cell's time loop (targets/loop.py).

The ops' schemas carry only tensors, ints and strings, so a cell travels as its cache key: `register`
records the compiled cell under that key and `loop_for(key, backend)` finds its loop again.
Parameters travel as one flat list: hoisted GEMM weights, step GEMM weights, vectors, scalars.
"""

from __future__ import annotations

import torch

_CELLS: dict = {}  # cache key -> CompiledCell, for every cell a layer was built from in this process


def register(cell, key: str | None = None) -> None:
    """Make `cell` reachable from the ops by its key (layers call this when built or unpickled), or by
    `key`: the key a saved program recorded, which another celldsl version computes differently
    (celldsl/export/programs.py)."""
    _CELLS.setdefault(cell.key if key is None else key, cell)


def cell_for(key: str):
    cell = _CELLS.get(key)
    if cell is None:  # e.g. a compiled graph replayed in a fresh process: compile it again from its text
        from ..compiler import compile_key

        cell = compile_key(key)
        if cell is None:
            raise ValueError(
                f"no compiled cell with key {key!r} in this process; build the layer (or call "
                "celldsl.ops.function.register(compile_cell(...))) before running it"
            )
        register(cell)
    return cell


def loop_for(key: str, backend: str):
    """The loop of a backend ("torch", "cpu", "triton") or of a target's schedule ("triton:persistent",
    ...), asked of the target (celldsl/targets/)."""
    name, _, schedule = backend.partition(":")
    if schedule:
        from ..targets import target

        return target(name).loop(cell_for(key), schedule)
    return cell_for(key).loop(backend)


def split_params(loop, params):
    """Flat parameter list -> (hoisted weights, step weights, vectors, scalars) of `loop`."""
    counts = (len(loop.hoisted), len(loop.gemms), len(loop.vectors), len(loop.scalars))
    if len(params) != sum(counts):
        raise ValueError(
            f"the cell takes {sum(counts)} parameter tensors (hoisted weights, step weights, vectors, "
            f"scalars: {counts}), got {len(params)}"
        )
    out, i = [], 0
    for n in counts:
        out.append(list(params[i : i + n]))
        i += n
    return out


def unaliased(outputs: list[torch.Tensor], inputs: list) -> list[torch.Tensor]:
    """Clone any output that shares memory with an input or an earlier output (custom ops may not
    return aliases; a generated pointwise function may pass an argument straight through), and hand
    back a view of a private buffer (`buf.view(T, N, H)`) as a plain tensor over the same memory:
    autograd marks a view returned by an autograd.Function as one of "multiple views", and then
    refuses in-place writes on it (`out[-1].zero_()`, `GRUCell(x).relu_()`), which torch.nn allows."""
    seen = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor) and t.numel()}
    fresh = []
    for t in outputs:
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if ptr is not None and ptr in seen:
            t = t.clone()
            ptr = t.untyped_storage().data_ptr()
        if ptr is not None:
            seen.add(ptr)
        fresh.append(_not_a_view(t))
    return fresh


def _not_a_view(t: torch.Tensor) -> torch.Tensor:
    """`t` itself, or (a view) a new tensor over the same memory that autograd does not see as a view.
    Only the op's implementations call this, on tensors they made: nothing else holds their base."""
    if not t._is_view() or t.requires_grad:
        return t
    return t.new_empty(0).set_(t.untyped_storage(), t.storage_offset(), t.shape, t.stride())
