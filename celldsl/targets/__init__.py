"""The targets: a plan -> generated code -> a running time loop, one folder per target.

    torch/   the generated torch module (every cell, every device; differentiable to any order)
    c/       C kernels built with the system compiler, the native time loop, the CPU GEMM choice
    triton/  Triton kernels and the GPU schedules (graphed, persistent, fused_step, time_loop, scan)

Shared by all of them: loop.py (the time loop over any target's pointwise functions), gemm.py (the
loop's GEMMs), printers.py (identifiers and Python text for the emitters). Everything else asks a
target through `target(name)` and the interface in base.py; adding a target is adding a folder with
a `TARGET` and a line here.
"""

from __future__ import annotations

from .base import Target

NAMES = ("torch", "cpu", "triton")  # the backend names, as the layers take them


def target(name: str) -> Target:
    """The target of a backend name: "torch", "cpu" (the C target) or "triton"."""
    if name == "torch":
        from .torch import TARGET
    elif name == "cpu":
        from .c import TARGET
    elif name == "triton":
        from .triton import TARGET
    else:
        raise ValueError(f"backend must be one of {sorted(NAMES)}, got {name!r}")
    return TARGET


def refuse_matrix(ir, backend: str) -> None:
    """The cpu and triton targets do not run matrix-memory cells yet: a CellError at the first matrix
    state (or the first state) saying so, never a wrong run."""
    from ..lang.errors import CellError

    if backend not in NAMES:
        raise ValueError(f"backend must be one of {sorted(NAMES)}, got {backend!r}")
    first = next((s for s in ir.states if ir.kinds[s].rows != "1" and ir.kinds[s].cols != "1"), ir.states[0])
    raise CellError(f"the {backend} backend does not run matrix states yet (state '{first}' is "
                    f"{ir.kinds[first].words()}); use backend='torch'", ir.source, ir.state_locs[first])


def matrix_loop(compiled):
    """The loop of a matrix-memory cell: the torch target's (targets/torch/matrix.py), the only one."""
    from .torch import TARGET

    return TARGET.matrix_loop(compiled)


def triton_matrix_loop(compiled):
    """The opt-in Triton loop of a matrix-memory cell (targets/triton/matrix_loop.py); CellError at
    what its emitter cannot express."""
    from .triton.matrix_loop import TritonMatrixLoop

    return TritonMatrixLoop(compiled.ir)
