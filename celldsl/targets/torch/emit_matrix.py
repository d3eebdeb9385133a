"""A matrix-memory cell's IR (lang/tensors.py) -> a Python module of plain torch: its step and the step's
derived backward, one line per node (v0, v1, ...). Values are [N, heads or 1, rows, cols] tensors, so
`@` is a batched matmul. No name from the cell reaches the source: states, parameters and widths are
passed as lists in the IR's order (python_text puts the cell's name in the docstring only)."""

from __future__ import annotations

from ...lang.tensors import TensorIR
from ..printers import python_text
from .emit import HEADER, TorchPrinter

MATRIX_HELPERS = '''

def _sum_to(d, like):  # the backward of a broadcast: d summed over the axes where `like` has 1
    d = d.expand(torch.broadcast_shapes(d.shape, like.shape))
    dims = [i for i, (a, b) in enumerate(zip(d.shape, like.shape)) if b == 1 and a != 1]
    return d.sum(dims, keepdim=True) if dims else d


def _mm(a, b, like=None):  # a @ b on [N or 1, heads or 1, r, k] x [N or 1, heads or 1, k, c], never
    # copying an operand over the other's rows; with `like` of one row, also summed over the rows
    h = max(a.shape[1], b.shape[1])
    a, b = a.expand(a.shape[0], h, *a.shape[2:]), b.expand(b.shape[0], h, *b.shape[2:])
    rows = like is None or like.shape[0] != 1
    if a.shape[0] == 1 and b.shape[0] == 1:
        return a @ b
    if a.shape[0] == 1:
        if rows:
            return torch.einsum("hrk,nhkc->nhrc", a[0], b)
        return torch.einsum("hrk,nhkc->hrc", a[0], b)[None]
    if b.shape[0] == 1:
        if rows:
            return torch.einsum("nhrk,hkc->nhrc", a, b[0])
        return torch.einsum("nhrk,hkc->hrc", a, b[0])[None]
    return a @ b if rows else torch.einsum("nhrk,nhkc->hrc", a, b)[None]


def _shift(v, k, n, rows):  # prev(v, k): rows are step-major (t * n + sequence), so k steps is k * n rows
    v = v.expand(rows, *v.shape[1:])
    return torch.cat([torch.zeros_like(v[:k * n]), v[:max(rows - k * n, 0)]])[:rows]


def _unshift(d, k, n):  # the backward of _shift: step t's gradient goes to step t - k
    return torch.cat([d[k * n:], torch.zeros_like(d[:k * n])])[:d.shape[0]]


def _add(g, i, d, like):
    d = _sum_to(d, like)
    g[i] = d if g[i] is None else g[i] + d
'''


def size_names(ir: TensorIR) -> list[str]:
    """The widths the step reads as numbers or as the identity's size, in the order `dims` passes them."""
    return sorted({n.name for n in ir.nodes if n.op in ("size", "eye") and n.name})


def varying(ir: TensorIR) -> list[bool]:
    """Per node: does it depend on a state? The others (the input's projections, the parameters' own
    arithmetic) are hoisted: computed for every step at once before the loop, one GEMM per product."""
    out = []
    for node in ir.nodes:
        out.append(node.op == "state" or any(out[j] for j in node.args))
    return out


def matrix_module_source(ir: TensorIR) -> str:
    states = ", ".join(ir.states)
    header = HEADER.format(name=python_text(ir.name),
                           equations=python_text(f"A matrix-memory cell; states {states}.", lines=True))
    moving = varying(ir)
    n = len(ir.nodes)
    hoist = ["def hoist(x, params, dims, n=1):  # x [rows, I]: every step's rows at once, n per step",
             "    like = dict(dtype=x.dtype, device=x.device)"]
    hoist += [f"    {line}" for line in _forward_lines(ir, [not m for m in moving], "x")]
    hoist.append(f"    return [{', '.join('None' if moving[i] else f'v{i}' for i in range(n))}]")
    step = ["def step(h, states):  # h: hoist's values at this step's rows",
            "    like = dict(dtype=states[0].dtype, device=states[0].device)"]
    step += [f"    v{i} = h[{i}]" for i in range(n) if not moving[i]]
    step += [f"    {line}" for line in _forward_lines(ir, moving, None)]
    step.append(f"    return [{', '.join(f'v{i}' for i in range(n))}]")
    parts = [header + MATRIX_HELPERS, "\n".join(hoist), "\n".join(step),
             "\n".join(_backward_lines(ir, moving, "step_backward")),
             "\n".join(_backward_lines(ir, [not m for m in moving], "hoist_backward", "n=1"))]
    return "\n\n\n".join(parts) + "\n"


def _forward_lines(ir: TensorIR, selected: list[bool], x: str | None) -> list[str]:
    dims = {w: j for j, w in enumerate(size_names(ir))}
    state_index = {s: j for j, s in enumerate(ir.states)}
    param_index = {p: j for j, p in enumerate(ir.params)}
    lines = []
    for i, node in enumerate(ir.nodes):
        if not selected[i]:
            continue
        a = [f"v{j}" for j in node.args]
        if node.op == "input":
            e = f"{x}[:, None, :, None]"
        elif node.op == "state":
            e = f"states[{state_index[node.name]}]"
        elif node.op == "param":
            e = f"params[{param_index[node.name]}]"
        elif node.op == "const":
            e = f"torch.full((1, 1, 1, 1), {float(node.value)!r}, **like)"
        elif node.op == "size":
            e = f"torch.full((1, 1, 1, 1), float(dims[{dims[node.name]}]), **like)"
        elif node.op == "eye" and node.name is None:  # an identity before its size was known: unused
            e = "None"
        elif node.op == "eye":
            e = f"torch.eye(dims[{dims[node.name]}], **like)[None, None]"
        elif node.op in ("pointwise", "scale"):  # scale: a broadcast product (lang/tensors.py)
            names = {s: f"v{j}" for s, j in zip(_symbols(node), node.args, strict=True)}
            e = TorchPrinter(names).doprint(node.expr)
        elif node.op == "matmul":
            e = f"_mm({a[0]}, {a[1]})"
        elif node.op == "transpose":
            e = f"{a[0]}.transpose(-1, -2)"
        elif node.op in ("sum", "mean"):
            e = f"{a[0]}.{node.op}((-2, -1), keepdim=True)"
        elif node.op in ("max", "min"):
            e = f"{a[0]}.a{node.op}((-2, -1), keepdim=True)"
        elif node.op == "diag":
            e = f"torch.diag_embed({a[0]}[..., 0])"
        elif node.op == "shift":  # only in hoist: it depends on no state
            e = f"_shift({a[0]}, {int(node.value)}, n, x.shape[0])"
        else:
            raise AssertionError(node.op)
        lines.append(f"v{i} = {e}")
    return lines


def _backward_lines(ir: TensorIR, selected: list[bool], name: str, extra: str = "") -> list[str]:
    """Reverse mode through the selected nodes: g[i] is node i's adjoint (None for zero)."""
    n = len(ir.nodes)
    out = [f"def {name}(vals, grads{', ' + extra if extra else ''}):", "    g = list(grads)",
           f"    {', '.join(f'v{i}' for i in range(n))}, = vals"]
    fixed = {i for i, node in enumerate(ir.nodes) if node.op in ("const", "size", "eye")}
    for i in range(n - 1, -1, -1):
        node = ir.nodes[i]
        if not node.args or not selected[i]:
            continue
        lines = []
        a = [f"v{j}" for j in node.args]
        if node.op in ("pointwise", "scale"):  # _add sums a broadcast operand's gradient to its shape
            names = {s: f"v{j}" for s, j in zip(_symbols(node), node.args, strict=True)}
            printer = TorchPrinter(names)
            for k, j in enumerate(node.args):
                if j in fixed or node.grads[k] == 0:
                    continue
                lines.append(f"_add(g, {j}, g[{i}] * ({printer.doprint(node.grads[k])}), v{j})")
        elif node.op == "matmul":
            j0, j1 = node.args
            if j0 not in fixed:
                lines.append(f"_add(g, {j0}, _mm(g[{i}], {a[1]}.transpose(-1, -2), v{j0}), v{j0})")
            if j1 not in fixed:
                lines.append(f"_add(g, {j1}, _mm({a[0]}.transpose(-1, -2), g[{i}], v{j1}), v{j1})")
        elif node.op == "transpose":
            lines.append(f"_add(g, {node.args[0]}, g[{i}].transpose(-1, -2), v{node.args[0]})")
        elif node.op == "sum":
            lines.append(f"_add(g, {node.args[0]}, g[{i}], v{node.args[0]})")
        elif node.op == "mean":
            j = node.args[0]
            lines.append(f"_add(g, {j}, g[{i}] / (v{j}.shape[-1] * v{j}.shape[-2]), v{j})")
        elif node.op in ("max", "min"):  # to the elements that reach it, shared evenly on ties (as amax)
            j = node.args[0]
            lines.append(f"hit = (v{j} == v{i}).to(v{j}.dtype)")
            lines.append(f"_add(g, {j}, g[{i}] * hit / hit.sum((-2, -1), keepdim=True), v{j})")
        elif node.op == "diag":
            j = node.args[0]
            lines.append(f"_add(g, {j}, torch.diagonal(g[{i}], dim1=-2, dim2=-1)[..., None], v{j})")
        elif node.op == "shift":
            j = node.args[0]
            lines.append(f"_add(g, {j}, _unshift(g[{i}], {int(node.value)}, n), v{j})")
        if lines:
            out.append(f"    if g[{i}] is not None:")
            out += [f"        {line}" for line in lines]
    out.append("    return g")
    return out


def _symbols(node) -> list:
    import sympy as sp

    return list(sp.symbols(f"a0:{len(node.args)}", real=True))
