"""The torch meaning of a matrix-memory cell (lang/tensors.py): its step as batched matmuls, and the
backward as a reverse-time recurrence for the states' gradients (dC), not autograd through the loop.

Every value is a tensor [N, heads or 1, rows, cols]. The forward keeps the state before every step;
the backward walks time backwards, recomputes step t's values from the state before it, and sends the
gradients back through the step's nodes: a pointwise node by its SymPy derivatives, a broadcast by a
sum back to the operand's shape, `A @ B` by `dY @ Bᵀ` and `Aᵀ @ dY`, a sum by a broadcast. Parameter
gradients add up over the steps. First-order gradients only (the Function is once_differentiable).
"""

from __future__ import annotations

import sympy as sp
import torch
import torch.nn.functional as F

from ...lang import functions as fn
from ...lang.tensors import ONE, TensorIR

_UNARY = {
    fn.sigmoid: torch.sigmoid, fn.tanh: torch.tanh, fn.exp: torch.exp, fn.log: torch.log, fn.relu: torch.relu,
    fn.softplus: F.softplus, fn.logsigmoid: F.logsigmoid, fn.floor: torch.floor, sp.Abs: torch.abs,
    sp.sign: torch.sign, sp.log: torch.log, sp.exp: torch.exp,
}


def _tensor(v, like):
    return v if isinstance(v, torch.Tensor) else torch.full_like(like, float(v))


def evaluate(expr: sp.Expr, env: dict, like: torch.Tensor):
    """A SymPy expression of the IR (its symbols bound in env) on tensors."""
    if expr.is_Symbol:
        return env[expr]
    if expr.is_Number or isinstance(expr, sp.NumberSymbol):
        return float(expr)
    args = [evaluate(a, env, like) for a in expr.args]
    if isinstance(expr, sp.Add):
        out = args[0]
        for a in args[1:]:
            out = out + a
        return out
    if isinstance(expr, sp.Mul):
        out = args[0]
        for a in args[1:]:
            out = out * a
        return out
    if isinstance(expr, sp.Pow):
        base, power = args
        if not isinstance(base, torch.Tensor):
            base = _tensor(base, like if not isinstance(power, torch.Tensor) else power)
        return torch.pow(base, power)
    kind = type(expr)
    if kind in _UNARY:
        return _UNARY[kind](_tensor(args[0], like))
    a = [_tensor(x, like) for x in args]
    if kind is fn.step:
        return (a[0] > 0).to(like.dtype)
    if kind is fn.maximum:
        return torch.maximum(a[0], a[1])
    if kind is fn.minimum:
        return torch.minimum(a[0], a[1])
    if kind is fn.less:
        return (a[0] < a[1]).to(like.dtype)
    if kind is fn.less_equal:
        return (a[0] <= a[1]).to(like.dtype)
    if kind is fn.where:
        return torch.where(a[0] != 0, a[1], a[2])
    if kind is fn.mod:
        return torch.remainder(a[0], a[1])
    raise NotImplementedError(f"no torch meaning for {kind.__name__}")


def sum_to(g: torch.Tensor, shape) -> torch.Tensor:
    """The backward of a broadcast: g summed over the axes where `shape` has 1."""
    dims = [i for i, (a, b) in enumerate(zip(g.shape, shape, strict=True)) if b == 1 and a != 1]
    return g.sum(dims, keepdim=True) if dims else g


class MatrixLoop:
    """Forward and backward of one matrix-memory cell over [T, N, I] inputs, on plain torch."""

    def __init__(self, ir: TensorIR):
        self.ir = ir
        self.symbols = {}

    # ---- shapes ---------------------------------------------------------------------------------

    def as4(self, name: str, t: torch.Tensor, batch: bool) -> torch.Tensor:
        """A stored state or parameter as [N or 1, heads, rows, cols]."""
        k = self.ir.kinds[name]
        shape = list(t.shape) if batch else [1, *t.shape]
        if k.rows == ONE:
            shape.insert(2, 1)
        if k.cols == ONE:
            shape.insert(3, 1)
        return t.reshape(shape)

    # ---- one step -------------------------------------------------------------------------------

    def step(self, x: torch.Tensor, states: list[torch.Tensor], params: list[torch.Tensor], sizes: dict):
        """Every node's value at one step: x [N, I], states and params as [N or 1, heads, r, c]."""
        ir, vals = self.ir, []
        leaves = {**dict(zip(ir.states, states, strict=True)), **dict(zip(ir.params, params, strict=True))}
        like = x
        for node in ir.nodes:
            if node.op == "input":
                v = x[:, None, :, None]
            elif node.op in ("state", "param"):
                v = leaves[node.name]
            elif node.op == "const":
                v = torch.full((1, 1, 1, 1), node.value, dtype=x.dtype, device=x.device)
            elif node.op == "size":
                v = torch.full((1, 1, 1, 1), float(sizes[node.name]), dtype=x.dtype, device=x.device)
            elif node.op == "eye":
                n = sizes.get(node.name, 0)
                v = torch.eye(n, dtype=x.dtype, device=x.device)[None, None] if node.kind.rows != "?" else None
            elif node.op == "pointwise":
                env = {sp.Symbol(f"a{i}", real=True): vals[a] for i, a in enumerate(node.args)}
                v = evaluate(node.expr, env, vals[node.args[0]])
                v = _tensor(v, like[:1, None, :1, None])
            elif node.op == "matmul":
                v = vals[node.args[0]] @ vals[node.args[1]]
            elif node.op == "transpose":
                v = vals[node.args[0]].transpose(-1, -2)
            elif node.op == "sum":
                v = vals[node.args[0]].sum((-2, -1), keepdim=True)
            elif node.op == "mean":
                v = vals[node.args[0]].mean((-2, -1), keepdim=True)
            elif node.op == "diag":
                v = torch.diag_embed(vals[node.args[0]][..., 0])
            else:
                raise AssertionError(node.op)
            vals.append(v)
        return vals

    def step_backward(self, vals, grads: dict[int, torch.Tensor], x, sizes):
        """Reverse mode through one step: grads maps node -> its adjoint; returns every node's adjoint."""
        ir = self.ir
        adj = dict(grads)
        for i in range(len(ir.nodes) - 1, -1, -1):
            g = adj.get(i)
            node = ir.nodes[i]
            if g is None or not node.args:
                continue

            def send(a, d):
                d = sum_to(d, vals[a].shape) if d.dim() == vals[a].dim() else d
                adj[a] = adj[a] + d if a in adj else d

            if node.op == "pointwise":
                env = {sp.Symbol(f"a{k}", real=True): vals[a] for k, a in enumerate(node.args)}
                for k, a in enumerate(node.args):
                    if ir.nodes[a].op in ("const", "size", "eye"):
                        continue
                    local = node.grads[k]
                    if local == 0:
                        continue
                    d = evaluate(local, env, vals[a])
                    d = g * d
                    d = d.expand(torch.broadcast_shapes(d.shape, vals[a].shape)) if d.dim() == vals[a].dim() else d
                    send(a, d)
            elif node.op == "matmul":
                a, b = node.args
                if ir.nodes[a].op != "eye":
                    send(a, g @ vals[b].transpose(-1, -2))
                if ir.nodes[b].op != "eye":
                    send(b, vals[a].transpose(-1, -2) @ g)
            elif node.op == "transpose":
                send(node.args[0], g.transpose(-1, -2))
            elif node.op in ("sum", "mean"):
                v = vals[node.args[0]]
                d = g.expand(*g.shape[:2], *v.shape[2:])
                if node.op == "mean":
                    d = d / (v.shape[-1] * v.shape[-2])
                send(node.args[0], d)
            elif node.op == "diag":
                send(node.args[0], torch.diagonal(g, dim1=-2, dim2=-1)[..., None])
        return adj

    # ---- the sequence ---------------------------------------------------------------------------

    def forward(self, x, states, params, sizes):
        """x [T, N, I]; states as stored ([N, heads, ...]); params as stored. -> (outputs [T, N, heads*r],
        final states, the state before every step)."""
        ir = self.ir
        s4 = [self.as4(n, s, True) for n, s in zip(ir.states, states, strict=True)]
        p4 = [self.as4(n, p, False) for n, p in zip(ir.params, params, strict=True)]
        outs, saved = [], []
        for t in range(x.shape[0]):
            saved.append(s4)
            vals = self.step(x[t], s4, p4, sizes)
            s4 = [vals[ir.new_state[n]].expand_as(s) for n, s in zip(ir.states, s4, strict=True)]
            out = vals[ir.output_node]
            outs.append(out.expand(x.shape[1], sizes["heads"], *out.shape[2:]).reshape(x.shape[1], -1))
        finals = [s.reshape(st.shape) for s, st in zip(s4, states, strict=True)]
        return torch.stack(outs), finals, saved

    def backward(self, x, saved, params, sizes, d_out, d_finals):
        ir = self.ir
        p4 = [self.as4(n, p, False) for n, p in zip(ir.params, params, strict=True)]
        leaves = {n.name: i for i, n in enumerate(ir.nodes) if n.op in ("state", "param", "input")}
        d_state = [self.as4(n, d, True) for n, d in zip(ir.states, d_finals, strict=True)]
        d_params = [torch.zeros_like(p) for p in p4]
        dx = torch.zeros_like(x)
        N, heads = x.shape[1], sizes["heads"]
        for t in range(x.shape[0] - 1, -1, -1):
            vals = self.step(x[t], saved[t], p4, sizes)
            grads = {}
            for n, d in zip(ir.states, d_state, strict=True):
                i = ir.new_state[n]
                grads[i] = grads[i] + d if i in grads else d
            if d_out is not None:
                out, o = vals[ir.output_node], ir.output_node
                g_out = d_out[t].reshape(N, heads, *out.shape[2:])
                grads[o] = grads[o] + g_out if o in grads else g_out
            for i in grads:
                grads[i] = sum_to(grads[i], vals[i].shape)
            adj = self.step_backward(vals, grads, x[t], sizes)
            d_state = [sum_to(adj[leaves[n]], saved[t][k].shape).expand_as(saved[t][k])
                       if leaves[n] in adj else torch.zeros_like(saved[t][k])
                       for k, n in enumerate(ir.states)]
            for k, n in enumerate(ir.params):
                if leaves[n] in adj:
                    d_params[k] += sum_to(adj[leaves[n]], p4[k].shape)
            name = ir.inputs[0]
            if leaves[name] in adj:
                dx[t] += sum_to(adj[leaves[name]], (N, 1, x.shape[2], 1)).reshape(N, -1)
        return dx, d_state, d_params

    def run(self, x, states, params, sizes):
        """(outputs [T, N, heads * width], final states) with the derived backward."""
        out = _Function.apply(self, sizes, len(states), x, *states, *params)
        return out[0], tuple(out[1:])


class _Function(torch.autograd.Function):
    @staticmethod
    def forward(ctx, loop, sizes, n_states, x, *tensors):
        states, params = list(tensors[:n_states]), list(tensors[n_states:])
        out, finals, saved = loop.forward(x, states, params, sizes)
        ctx.loop, ctx.sizes, ctx.saved, ctx.shapes = loop, sizes, saved, [s.shape for s in states]
        ctx.save_for_backward(x, *params)
        return (out, *finals)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_out, *d_finals):
        x, *params = ctx.saved_tensors
        d_finals = [d if d is not None else torch.zeros(shape, dtype=x.dtype, device=x.device)
                    for d, shape in zip(d_finals, ctx.shapes, strict=True)]
        dx, d_state, d_params = ctx.loop.backward(x, ctx.saved, params, ctx.sizes, d_out, d_finals)
        d_state = [d.reshape(shape) for d, shape in zip(d_state, ctx.shapes, strict=True)]
        d_params = [d.reshape(p.shape) for d, p in zip(d_params, params, strict=True)]
        return (None, None, None, dx, *d_state, *d_params)
