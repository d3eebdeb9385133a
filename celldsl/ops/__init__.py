"""The target-free op: the time loop of any cell on any target as one torch.library op.

    op.py        celldsl::cell_sequence and celldsl::cell_sequence_backward, their fake kernels and
                 `call` (the implementation without the dispatcher where nothing else could see it)
    autograd.py  their gradients (first order fused, higher orders through the generated torch code)
                 and the op's autograd registration
    batching.py  their vmap rules
    function.py  a cell's key -> its compiled cell and the loop of a backend (asked of the target)
    matrix_op.py celldsl::matrix_sequence and its backward: the matrix path's loop (nn/matrix.py)

`run` is what the layers call. Importing this package registers the autograd and vmap rules.
"""

from __future__ import annotations

import torch

from . import batching, matrix_op  # noqa: F401  (register the vmap rules, celldsl::matrix_sequence)
from .autograd import CellSequence
from .op import infer, refuse_tangents


def run(cell_key: str, backend: str, x, states, params, batch_sizes=None):
    """(out, final states) of one direction of one layer: differentiable to any order, traceable by
    torch.compile, and under torch.func transforms (vmap, grad, jacrev)."""
    refuse_tangents([x, *states, *params], "celldsl's cell op (a layer, Recurrent, a Cell)")
    traced = torch._C._get_tracing_state() is not None  # jit.trace: the op itself (its own autograd)
    if torch.is_grad_enabled() and not traced and any(t.requires_grad for t in (x, *states, *params)):
        result = CellSequence.apply(cell_key, backend, len(states), batch_sizes, x, *states, *params)
    else:  # nothing to differentiate: the op alone (vmap still reaches its batching rule), or in
        # plain eager the loop without the backward's intermediates (op.infer)
        result = infer(cell_key, backend, x, list(states), list(params), batch_sizes)
    return result[0], list(result[1 : 1 + len(states)])
