"""The loop of a matrix-memory cell (lang/tensors.py) on its generated torch module (emit_matrix.py):
the forward over time, and the backward as a reverse-time recurrence for the states' gradients (dC),
not autograd through the loop.

Every value is a tensor [N, heads or 1, rows, cols]. What depends on no state (the input's
projections) is hoisted: computed for all steps at once before the loop, its gradient sent back once
after it. The forward keeps the state before every step;
the backward walks time backwards, recomputes step t's values from the state before it and runs the
step's generated backward: a pointwise node by its SymPy derivatives, a broadcast by a sum back to the
operand's shape, `A @ B` by `dY @ Bᵀ` and `Aᵀ @ dY`, a sum by a broadcast. Parameter gradients add up
over the steps. First-order gradients only (the Function is once_differentiable).
"""

from __future__ import annotations

import torch

from ...lang.tensors import ONE, TensorIR
from ..matrix_args import check_run
from .emit_matrix import size_names


def sum_to(g: torch.Tensor, shape) -> torch.Tensor:
    """The backward of a broadcast: g summed over the axes where `shape` has 1."""
    dims = [i for i, (a, b) in enumerate(zip(g.shape, shape, strict=True)) if b == 1 and a != 1]
    return g.sum(dims, keepdim=True) if dims else g


def _live_rows(v, live: torch.Tensor | None):
    """The rows `live` of a per-sequence value (all of them for None; a value of one row, whole)."""
    return v if live is None or v is None or v.shape[0] == 1 else v[live]


class MatrixLoop:
    """Forward and backward of one matrix-memory cell over [T, N, I] inputs, on plain torch."""

    def __init__(self, ir: TensorIR, module):
        self.ir, self.module = ir, module
        self.size_names = size_names(ir)

    def as4(self, name: str, t: torch.Tensor, batch: bool) -> torch.Tensor:
        """A stored state ([N, heads, ...]) or parameter ([heads, ...]) as [N or 1, heads, rows, cols]."""
        k = self.ir.kinds[name]
        shape = list(t.shape) if batch else [1, *t.shape] if k.head else [1, 1, *t.shape]
        if k.rows == ONE:
            shape.insert(2, 1)
        if k.cols == ONE:
            shape.insert(3, 1)
        return t.reshape(shape)

    @staticmethod
    def masks(x, lengths):
        """Per step, [N, 1, 1, 1]: 1 for the sequences still running (None: every sequence runs)."""
        if lengths is None:
            return [None] * x.shape[0]
        t = torch.arange(x.shape[0], device=x.device)[:, None]
        return list((t < lengths.to(x.device)[None, :]).to(x.dtype)[..., None, None, None])

    def hoisted(self, x, p4, sizes):
        """The values that depend on no state, for every step at once (rows = T * N)."""
        dims = [sizes[w] for w in self.size_names]
        return self.module.hoist(x.reshape(-1, x.shape[-1]), p4, dims, x.shape[1])

    @staticmethod
    def rows(hoisted, t: int, n: int) -> list:
        """Step t's rows of the hoisted values (those with one row, parameters' own arithmetic, whole)."""
        return [v if v is None or v.shape[0] == 1 else v[t * n:(t + 1) * n] for v in hoisted]

    def forward(self, x, states, params, sizes, lengths=None):
        """x [T, N, I]; states and params as stored; lengths [N] (a sequence's state stops at its own
        last step, its outputs after it are 0) or None. -> (outputs [T, N, heads * width], final
        states, the state before every step)."""
        ir, N = self.ir, x.shape[1]
        s4 = [self.as4(n, s, True) for n, s in zip(ir.states, states, strict=True)]
        p4 = [self.as4(n, p, False) for n, p in zip(ir.params, params, strict=True)]
        hoisted = self.hoisted(x, p4, sizes)
        outs, saved = [], []
        for t, mask in enumerate(self.masks(x, lengths)):
            saved.append(s4)
            vals = self.module.step(self.rows(hoisted, t, N), s4)
            new = [vals[ir.new_state[n]].expand_as(s) for n, s in zip(ir.states, s4, strict=True)]
            s4 = new if mask is None else [torch.where(mask > 0, v, s) for s, v in zip(s4, new, strict=True)]
            out = vals[ir.output_node]
            out = out.expand(N, sizes["heads"], *out.shape[2:])
            out = out if mask is None else torch.where(mask > 0, out, 0.0)
            outs.append(out.flatten(1))  # not reshape(N, -1): N may be 0
        finals = [s.reshape(st.shape) for s, st in zip(s4, states, strict=True)]
        return torch.stack(outs), finals, saved

    def backward(self, x, saved, params, sizes, d_out, d_finals, lengths=None):
        """The gradients of x, the initial states and the parameters, walking time backwards; the
        hoisted values' gradients are gathered over the steps and sent back once, for all rows."""
        ir = self.ir
        T, N = x.shape[0], x.shape[1]
        p4 = [self.as4(n, p, False) for n, p in zip(ir.params, params, strict=True)]
        hoisted = self.hoisted(x, p4, sizes)
        G = [None] * len(hoisted)
        leaves = {n.name: i for i, n in enumerate(ir.nodes) if n.op in ("state", "param", "input")}
        d_state = [self.as4(n, d, True) for n, d in zip(ir.states, d_finals, strict=True)]
        heads = sizes["heads"]
        masks = self.masks(x, lengths)
        for t in range(T - 1, -1, -1):
            mask = masks[t]
            # a finished sequence takes no part in a padded step: its reverse mode runs on the live rows
            # only (zero rows there could give 0 * NaN: the norm of a zero state; carried values 0 * inf),
            # and its state's gradient passes through unchanged
            live = None if mask is None else mask.flatten().nonzero().flatten()  # None: every row
            states = [_live_rows(s, live) for s in saved[t]]
            vals = self.module.step([_live_rows(v, live) for v in self.rows(hoisted, t, N)], states)
            grads = [None] * len(vals)
            for name, d in zip(ir.states, d_state, strict=True):
                i = ir.new_state[name]
                d = sum_to(_live_rows(d, live), vals[i].shape)
                grads[i] = d if grads[i] is None else grads[i] + d
            if d_out is not None:
                o = ir.output_node
                g_out = _live_rows(d_out[t].reshape(N, heads, *vals[o].shape[2:]), live)
                g_out = sum_to(g_out, vals[o].shape)
                grads[o] = g_out if grads[o] is None else grads[o] + g_out
            adj = self.module.step_backward(vals, grads)
            d_live = [adj[leaves[name]].expand_as(s) if adj[leaves[name]] is not None else torch.zeros_like(s)
                      for s, name in zip(states, ir.states, strict=True)]
            d_state = d_live if live is None else [kept.expand(N, *d.shape[1:]).index_copy(0, live, d)
                                                   for kept, d in zip(d_state, d_live, strict=True)]
            for i, v in enumerate(hoisted):
                if v is None or adj[i] is None:
                    continue
                if v.shape[0] == 1:
                    G[i] = adj[i] if G[i] is None else G[i] + adj[i]
                else:
                    if G[i] is None:
                        G[i] = torch.zeros_like(v)
                    rows = slice(t * N, (t + 1) * N) if live is None else t * N + live
                    G[i][rows] += adj[i].expand(N if live is None else live.numel(), *v.shape[1:])
        adj = self.module.hoist_backward(hoisted, G, N)
        d_params = [adj[leaves[n]] if adj[leaves[n]] is not None else torch.zeros_like(p)
                    for n, p in zip(ir.params, p4, strict=True)]
        g = adj[leaves[ir.inputs[0]]]
        dx = torch.zeros_like(x) if g is None else g.sum((1, 3)).reshape(x.shape)
        return dx, d_state, d_params

    def run(self, x, states, params, sizes, lengths=None):
        """(outputs [T, N, heads * width], final states) with the derived backward; lengths as forward."""
        x = check_run(self.ir, x, states, params, sizes, lengths)
        out = _Function.apply(self, sizes, lengths, len(states), x, *states, *params)
        return out[0], tuple(out[1:])


class _Function(torch.autograd.Function):
    @staticmethod
    def forward(ctx, loop, sizes, lengths, n_states, x, *tensors):
        states, params = list(tensors[:n_states]), list(tensors[n_states:])
        out, finals, saved = loop.forward(x, states, params, sizes, lengths)
        ctx.loop, ctx.sizes, ctx.saved, ctx.shapes = loop, sizes, saved, [s.shape for s in states]
        ctx.lengths = lengths
        # the initial states too: saved[0] is the caller's tensor, so an in-place edit of it before the
        # backward must fail autograd's version check (as torch.nn.LSTM's hx), not change the gradients
        ctx.save_for_backward(x, *params, *states)
        return (out, *finals)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_out, *d_finals):
        x, *params = ctx.saved_tensors[:len(ctx.saved_tensors) - len(ctx.shapes)]
        d_finals = [d if d is not None else torch.zeros(shape, dtype=x.dtype, device=x.device)
                    for d, shape in zip(d_finals, ctx.shapes, strict=True)]
        dx, d_state, d_params = ctx.loop.backward(x, ctx.saved, params, ctx.sizes, d_out, d_finals,
                                                  ctx.lengths)
        d_state = [d.reshape(shape) for d, shape in zip(d_state, ctx.shapes, strict=True)]
        d_params = [d.reshape(p.shape) for d, p in zip(d_params, params, strict=True)]
        return (None, None, None, None, dx, *d_state, *d_params)
