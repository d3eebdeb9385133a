"""`MatrixRecurrent`: the layer of a matrix-memory cell (mLSTM, GLA, DeltaNet; lang/tensors.py).

One layer, one direction, [T, N, I] inputs. Parameters are named as the cell names them and stored
[heads, rows, cols] without "1" axes (W_q : (K, x) per head is [heads, K, I]; b_i : 1 per head is
[heads]; a matrix the heads share, W_a1 : (R, x), is [R, I]). Only the torch target runs these cells: backend="auto" picks it on every device (the cpu
and triton targets decline every matrix-memory cell, so there is nothing to choose), and
backend="cpu" or "triton" raises the located CellError of targets.refuse_matrix.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..compiler import CompiledMatrixCell, compile_cell


class MatrixRecurrent(nn.Module):
    """forward(x [T, N, I], state=None) -> (output [T, N, heads * width of the output], final states);
    state: a tuple in the order of the cell's `state` line, each [N, heads, rows, cols] without its
    "1" axes (C : (V, K) per head is [N, heads, V, K]); zeros when None."""

    def __init__(self, cell, input_size: int, sizes: dict[str, int], *, backend: str = "auto",
                 device=None, dtype=None):
        super().__init__()
        compiled = compile_cell(cell)
        if not isinstance(compiled, CompiledMatrixCell):
            raise ValueError(f"cell {compiled.name!r} has no matrix state; use celldsl.Recurrent")
        self.compiled, self.ir = compiled, compiled.ir
        missing = [w for w in ["heads", *self.ir.widths] if w not in sizes]
        if missing:
            raise ValueError(f"cell {self.ir.name!r} needs the sizes {', '.join(map(repr, missing))}, e.g. "
                             f"sizes={{{', '.join(repr(w) + ': 4' for w in ['heads', *self.ir.widths])}}}")
        bad = {w: v for w, v in sizes.items() if not isinstance(v, int) or isinstance(v, bool) or v < 1}
        if bad:
            raise ValueError(f"sizes must be positive integers, got {bad}")
        if not isinstance(input_size, int) or input_size < 1:
            raise ValueError(f"input_size must be a positive integer, got {input_size!r}")
        self.input_size = input_size
        self.sizes = {**sizes, self.ir.inputs[0]: input_size}
        backend = "torch" if backend == "auto" else backend
        self.loop = compiled.loop(backend)  # CellError for cpu and triton
        for name in self.ir.params:
            shape = self.ir.param_shape(name, self.sizes)
            fan = shape[-1] if len(shape) > 1 else 1
            bound = 1 / math.sqrt(fan)
            p = torch.empty(shape, device=device, dtype=dtype).uniform_(-bound, bound)
            self.register_parameter(name, nn.Parameter(p))

    def forward(self, x: torch.Tensor, state=None):
        if x.dim() != 3 or x.shape[-1] != self.input_size:
            raise ValueError(f"x must be [T, N, {self.input_size}], got shape {tuple(x.shape)}")
        N = x.shape[1]
        shapes = [(N, *self.ir.state_shape(s, self.sizes)) for s in self.ir.states]
        if state is None:
            state = tuple(x.new_zeros(s) for s in shapes)
        state = tuple(state) if isinstance(state, tuple | list) else (state,)
        if len(state) != len(shapes) or any(tuple(s.shape) != sh for s, sh in zip(state, shapes, strict=False)):
            raise ValueError(f"state must be {len(shapes)} tensor(s) of shapes {shapes}, got "
                             f"{[tuple(s.shape) for s in state]}")
        params = [getattr(self, n) for n in self.ir.params]
        return self.loop.run(x, list(state), params, self.sizes)
