"""The values of a matrix-memory cell that depend on no state, evaluated by torch for every step at once
(rows = T * N, step-major: row t * N + n is sequence n at step t), differentiated by autograd.

Why: a compiled loop (the C and Triton targets) holds one step of its inputs, so it cannot read
`prev(v, k)`, the value of v k steps before. Everything that depends on a prev() but on no state
(Mamba's causal conv taps and what follows them: SiLU, the low-rank Δ, B, C; RWKV-6's data-dependent
lerps and the projections of the mixed inputs) is computed here before the loop, and the loop reads it
per step as it reads the input's projections; its gradient comes back from the loop per step and
autograd sends it on to the input and the parameters. What would be a matrix per step (an outer
product of two input-dependent vectors, diag of one) stays in the loop, one matrix at a time.

Shared by the cpu and triton targets (a target never imports another); the torch target hoists every
stateless value in its own generated module (targets/torch/emit_matrix.py) with the same shift.
Sequences are right-padded, so every sequence starts at step 0: prev() reads 0 before a sequence's
first step and never reaches another sequence (a padded step's values are computed and then ignored).
"""

from __future__ import annotations

import functools
import operator

import sympy as sp
import torch
import torch.nn.functional as F

from ..lang.tensors import ONE, TensorIR


def hoisted(ir: TensorIR) -> list[bool]:
    """Per node: computed here, not in the loop: a prev() and every value that depends on one, while it
    depends on no state and neither it nor anything it reads is a matrix per step."""
    moving, per_step, cheap, shifted = [], [], [], []
    for node in ir.nodes:
        moving.append(node.op == "state" or any(moving[j] for j in node.args))
        per_step.append(node.op in ("input", "shift") or any(per_step[j] for j in node.args))
        matrix = node.kind.rows != ONE and node.kind.cols != ONE
        cheap.append(not moving[-1] and not (per_step[-1] and matrix) and all(cheap[j] for j in node.args))
        shifted.append(node.op == "shift" or any(shifted[j] for j in node.args))
    return [c and s for c, s in zip(cheap, shifted, strict=True)]


def unhoisted_shift(ir: TensorIR) -> int | None:
    """The first prev() that cannot be hoisted (of a value that is, or reads, a matrix per step), or None."""
    up = hoisted(ir)
    return next((i for i, n in enumerate(ir.nodes) if n.op == "shift" and not up[i]), None)


def as4(ir: TensorIR, name: str, t: torch.Tensor) -> torch.Tensor:
    """A parameter as stored ([heads, ...] or shared) as [1, heads or 1, rows, cols]."""
    k = ir.kinds[name]
    shape = [1, *t.shape] if k.head else [1, 1, *t.shape]
    if k.rows == ONE:
        shape.insert(2, 1)
    if k.cols == ONE:
        shape.insert(3, 1)
    return t.reshape(shape)


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b on [rows or 1, heads or 1, r, k] x [.., k, c], one GEMM, never copying a parameter over rows."""
    if a.shape[0] == 1 and b.shape[0] > 1 and b.shape[1] == 1 and b.shape[3] == 1:
        # W @ x for every step and head: one [rows, k] x [k, heads * r] GEMM whose result is already
        # [rows, heads, r, 1] in memory (an einsum's batched product leaves it permuted: a copy)
        h, r, k = a.shape[1:4]
        # (b reshaped, not indexed: b[:, 0, :, 0]'s backward zero-fills a buffer and copies into it)
        return (b.reshape(b.shape[0], k) @ a[0].reshape(h * r, k).T).view(b.shape[0], h, r, 1)
    if a.shape[0] == 1 and b.shape[0] > 1 and b.shape[1] == 1:
        return torch.einsum("hrk,nkc->nhrc", a[0], b[:, 0])
    h = max(a.shape[1], b.shape[1])
    a, b = a.expand(a.shape[0], h, *a.shape[2:]), b.expand(b.shape[0], h, *b.shape[2:])
    if a.shape[0] == 1 and b.shape[0] > 1:
        return torch.einsum("hrk,nhkc->nhrc", a[0], b)
    if b.shape[0] == 1 and a.shape[0] > 1:
        return torch.einsum("nhrk,hkc->nhrc", a, b[0])
    return a @ b


def shift(v: torch.Tensor, k: int, n: int, rows: int) -> torch.Tensor:
    """prev(v, k) on step-major rows: k steps back is k * n rows back, zeros before the first step."""
    v = v.expand(rows, *v.shape[1:])
    return torch.cat([torch.zeros_like(v[:k * n]), v[:max(rows - k * n, 0)]])[:rows]


def evaluate(ir: TensorIR, wanted, x: torch.Tensor, params: list, dims: dict[str, int]) -> dict:
    """{node: value} for the wanted nodes (and what they read), each [T * N or 1, heads or 1, rows,
    cols]; x [T, N, I], params as4's, dims every width (the input's too)."""
    need = set(wanted)
    for i in range(len(ir.nodes) - 1, -1, -1):
        if i in need:
            need.update(ir.nodes[i].args)
    like = dict(dtype=x.dtype, device=x.device)
    p = dict(zip(ir.params, params, strict=True))
    rows, n = x.shape[0] * x.shape[1], x.shape[1]
    vals: dict = {}
    for i in sorted(need):
        node = ir.nodes[i]
        a = [vals[j] for j in node.args]
        if node.op == "input":
            v = x.reshape(-1, x.shape[-1])[:, None, :, None]
        elif node.op == "param":
            v = p[node.name]
        elif node.op == "const":
            v = torch.full((1, 1, 1, 1), float(node.value), **like)
        elif node.op == "size":
            v = torch.full((1, 1, 1, 1), float(dims[node.name]), **like)
        elif node.op == "eye":
            v = torch.eye(dims[node.name], **like)[None, None] if node.name else None
        elif node.op in ("pointwise", "scale"):  # scale: a broadcast product (lang/tensors.py)
            symbols = sp.symbols(f"a0:{len(node.args)}", real=True)
            v = _value(node.expr, dict(zip(symbols, a, strict=True)))
            v = v if isinstance(v, torch.Tensor) else torch.full((1, 1, 1, 1), float(v), **like)
        elif node.op == "matmul":
            v = matmul(a[0], a[1])
        elif node.op == "transpose":
            v = a[0].transpose(-1, -2)
        elif node.op in ("sum", "mean"):
            v = getattr(a[0], node.op)((-2, -1), keepdim=True)
        elif node.op in ("max", "min"):
            v = getattr(a[0], f"a{node.op}")((-2, -1), keepdim=True)
        elif node.op == "diag":
            v = torch.diag_embed(a[0][..., 0])
        elif node.op == "shift":
            v = shift(a[0], int(node.value), n, rows)
        else:
            raise AssertionError(node.op)
        vals[i] = v
    return {i: vals[i] for i in wanted}


def _tensor(v, like: torch.Tensor) -> torch.Tensor:
    return v if isinstance(v, torch.Tensor) else torch.full_like(like, float(v))


def _first(*args) -> torch.Tensor:
    return next(a for a in args if isinstance(a, torch.Tensor))


def _maximum(a, b):  # the gradient goes to the larger one, to the first on ties (functions.maximum)
    t = _first(a, b)
    a, b = _tensor(a, t), _tensor(b, t)
    return torch.where(b > a, b, a)


def _minimum(a, b):
    t = _first(a, b)
    a, b = _tensor(a, t), _tensor(b, t)
    return torch.where(b < a, b, a)


def _mod(a, b):  # as written (lang/functions.mod), as the C, Triton and ONNX printers compute it
    return a - b * torch.floor(a / b)


def _where(c, a, b):
    t = _first(c, a, b)
    return torch.where(_tensor(c, t) != 0, _tensor(a, t), _tensor(b, t))


def _compare(op):
    def f(a, b):
        t = _first(a, b)
        return op(_tensor(a, t), _tensor(b, t)).to(t.dtype)
    return f


TORCH = {  # the cell language's functions (lang/functions.py) on tensors, by class name
    "sigmoid": torch.sigmoid, "tanh": torch.tanh, "exp": torch.exp, "log": torch.log, "sin": torch.sin,
    "cos": torch.cos, "relu": torch.relu, "softplus": F.softplus, "logsigmoid": F.logsigmoid,
    "Abs": torch.abs, "sign": torch.sign, "floor": torch.floor, "mod": _mod,
    "step": lambda v: (v > 0).to(v.dtype), "maximum": _maximum, "minimum": _minimum, "where": _where,
    "less": _compare(operator.lt), "less_equal": _compare(operator.le),
}


def _value(e: sp.Expr, env: dict):
    """A pointwise node's SymPy expression on tensors (walked, never printed and executed)."""
    if e.is_Symbol:
        return env[e]
    if e.is_Number or isinstance(e, sp.NumberSymbol):
        return float(e)
    args = [_value(a, env) for a in e.args]
    if isinstance(e, sp.Add):
        return functools.reduce(operator.add, args)
    if isinstance(e, sp.Mul):
        return functools.reduce(operator.mul, args)
    if isinstance(e, sp.Pow):
        return args[0] ** args[1]
    name = type(e).__name__
    if name not in TORCH:
        raise NotImplementedError(f"no torch form for {name} in a hoisted value")
    return TORCH[name](*args)
