"""A matrix-memory cell's IR (lang/tensors.py) -> a Triton module in the style of fused_recurrent.

One program per (sequence, head, value block) keeps every state as a register tile over all T steps
(value_width: the rows of a width no node couples, split into blocks; else one block); every node of
the IR is one line on [rows, cols] tiles padded to powers of two (zeros outside the real widths, so
products and sums read no padding). The pointwise nodes are printed with the Triton target's printer
(emit_pointwise.TritonPrinter) from their SymPy expressions, their gradients from the SymPy
derivatives the IR already holds. The forward stores the states every CKPT steps; the backward walks
the checkpoints in reverse, recomputes each segment's states into a per-program scratch of CKPT
matrices and runs the step's reverse mode over the segment backwards: memory grows with T / CKPT,
never with T matrices. No name from the cell reaches the source: widths, states and parameters are
numbered in the IR's order.
"""

from __future__ import annotations

import sympy as sp

from ...lang.errors import CellError
from ...lang.tensors import ONE, TensorIR
from ..matrix_hoist import hoisted, unhoisted_shift
from ..printers import python_text
from .emit_pointwise import TritonPrinter

FIXED = ("const", "size", "eye")  # nodes without a gradient


def widths(ir: TensorIR) -> list[str]:
    """Every width a tile axis can have (the input's name included), in a fixed order: D0, D1, ..."""
    names = {w for n in ir.nodes for w in (n.kind.rows, n.kind.cols) if w not in (ONE, "?")}
    return sorted(names)


def refuse(ir: TensorIR) -> None:
    """A located CellError for what this emitter cannot express (nothing is generated for it)."""
    for s in ir.states:
        if not ir.kinds[s].head:
            raise CellError(f"the triton matrix schedule keeps one state per (sequence, head); state '{s}' "
                            "is not per head: declare it 'per head' or use backend='torch'",
                            ir.source, ir.state_locs[s])
    shift = unhoisted_shift(ir)
    if shift is not None:
        raise CellError("the triton matrix schedule cannot run prev() of a value that is, or reads, a matrix "
                        "per step (hoisted before the loop it would be T matrices); use backend='torch'",
                        ir.source, ir.nodes[shift].loc)
    for node in ir.nodes:
        if node.op not in ("input", "state", "param", "const", "size", "eye", "pointwise", "scale", "matmul",
                           "transpose", "sum", "mean", "max", "min", "diag", "shift"):
            raise CellError(f"the triton matrix schedule cannot express '{node.op}'; use backend='torch'",
                            ir.source, node.loc)


def split_blocker(ir: TensorIR, w: str) -> int | None:
    """The first node that couples the value blocks of width w (None: none does, the split is valid).
    Conservative: a node with w on both axes (a w x w tile mixes rows), a product contracting over w, a
    reduction of a tile with a w axis, and any node whose operand has a w axis that it has not."""
    for i, node in enumerate(ir.nodes):
        k = node.kind
        if node.op == "eye" and k.rows == "?":
            continue  # never emitted (a resolved copy is read)
        axes = (k.rows, k.cols)
        if "?" in axes or axes == (w, w):
            return i
        args = [ir.nodes[j].kind for j in node.args]
        if node.op == "matmul" and args[0].cols == w:
            return i
        if node.op in ("sum", "mean", "max", "min") and any(w in (a.rows, a.cols) for a in args):
            return i
        if w not in axes and any(w in (a.rows, a.cols) for a in args):
            return i
    return None


def value_width(ir: TensorIR) -> str | None:
    """The width whose rows the states split into independent blocks (one program per block), or None
    (one program keeps the whole state). Tried in the states' order, rows before columns: the first
    width of a state that no node couples (split_blocker); never the input's width."""
    tried = []
    for s in ir.states:
        k = ir.kinds[s]
        for w in (k.rows, k.cols):
            if w not in (ONE, "?", ir.inputs[0]) and w not in tried:
                tried.append(w)
                if split_blocker(ir, w) is None:
                    return w
    return None


def given(ir: TensorIR) -> list[int]:
    """The hoisted nodes (matrix_hoist.hoisted: a prev() and what depends on it but on no state) that
    the kernels read per step, as [T * N, heads, rows, cols] tensors q{j}, their gradients dq{j}."""
    up = hoisted(ir)
    return sorted({j for i, n in enumerate(ir.nodes) if not up[i] for j in n.args if up[j]})


class _Tiles:
    """Names of the tile axes: width w is D{j} wide, padded to B{j}, indexed by i{j}, masked by m{j}."""

    def __init__(self, ir: TensorIR):
        self.index = {w: j for j, w in enumerate(widths(ir))}
        self.split = value_width(ir)  # this width's axis holds the program's block vb of B{j} indices

    def owned(self, kind) -> str:
        """The store mask of a tile: a tile without the split axis is the same in every block, so
        block 0 alone stores it (and alone seeds its adjoint)."""
        if self.split is not None and self.split in (kind.rows, kind.cols):
            return self.mask(kind)
        return f"({self.mask(kind)} & first)"

    def axis(self, w: str) -> tuple[str, str, str]:
        if w == ONE:
            return "1", "one_i", "one_m"
        j = self.index[w]
        return f"D{j}", f"i{j}", f"m{j}"

    def block(self, w: str) -> str:
        return "1" if w == ONE else f"B{self.index[w]}"

    def offs(self, kind) -> str:
        _, ri, _ = self.axis(kind.rows)
        cd, ci, _ = self.axis(kind.cols)
        return f"({ri}[:, None] * {cd} + {ci}[None, :])"

    def mask(self, kind) -> str:
        _, _, rm = self.axis(kind.rows)
        _, _, cm = self.axis(kind.cols)
        return f"({rm}[:, None] & {cm}[None, :])"

    def numel(self, kind) -> str:
        return f"({self.axis(kind.rows)[0]} * {self.axis(kind.cols)[0]})"

    def shape(self, kind) -> str:
        return f"({self.block(kind.rows)}, {self.block(kind.cols)})"


def _symbols(node) -> list:
    return list(sp.symbols(f"a0:{len(node.args)}", real=True))


def _names(ir: TensorIR, tiles: _Tiles) -> dict:
    return {"state": {s: j for j, s in enumerate(ir.states)},
            "param": {p: j for j, p in enumerate(ir.params)},
            "input": tiles.axis(ir.inputs[0])}


def _forward_lines(ir: TensorIR, tiles: _Tiles) -> list[str]:
    """One step: v{i} for every node, from the states s{j}, the input row at step t and the hoisted
    values q{j} at that row (the hoisted nodes the kernel does not read are not computed)."""
    idx = _names(ir, tiles)
    up, read = hoisted(ir), set(given(ir))
    lines = []
    for i, node in enumerate(ir.nodes):
        k = node.kind
        a = [f"v{j}" for j in node.args]
        if node.op == "eye" and k.rows == "?":
            continue  # an identity whose size came later: a resolved copy is the one read
        if up[i] and i not in read:
            continue
        m = tiles.mask(k) if k.rows != "?" else None
        if i in read:
            at = f"q{i}_ptr + (xrow * H + h) * {tiles.numel(k)} + {tiles.offs(k)}"
            e = f"tl.load({at}, mask={m}, other=0.0).to(COMPUTE)"
        elif node.op == "input":
            at = f"x_ptr + xrow * {idx['input'][0]} + {tiles.offs(k)}"
            e = f"tl.load({at}, mask={m}, other=0.0).to(COMPUTE)"
        elif node.op == "state":
            e = f"s{idx['state'][node.name]}"
        elif node.op == "param":
            j = idx["param"][node.name]
            head = f"h * {tiles.numel(k)} + " if k.head else ""
            e = f"tl.load(p{j}_ptr + {head}{tiles.offs(k)}, mask={m}, other=0.0).to(COMPUTE)"
        elif node.op == "const":
            e = f"tl.full((1, 1), {float(node.value)!r}, COMPUTE)"
        elif node.op == "size":
            e = f"tl.full((1, 1), {tiles.axis(node.name)[0]}, COMPUTE)"
        elif node.op == "eye":
            _, ri, _ = tiles.axis(k.rows)
            e = f"tl.where({m} & ({ri}[:, None] == {ri}[None, :]), 1.0, 0.0).to(COMPUTE)"
        elif node.op in ("pointwise", "scale"):  # scale: a (B, 1) or (1, B) tile broadcasts
            names = {s: f"v{j}" for s, j in zip(_symbols(node), node.args, strict=True)}
            e = f"tl.where({m}, {TritonPrinter(names).doprint(node.expr)}, 0.0).to(COMPUTE)"
        elif node.op == "matmul":
            e = f"tl.reduce({a[0]}[:, :, None] * {a[1]}[None, :, :], 1, combine_add)"
        elif node.op == "transpose":
            e = f"tl.trans({a[0]})"
        elif node.op in ("sum", "mean"):
            e = _total(a[0])
            if node.op == "mean":
                e += f" / {tiles.numel(ir.nodes[node.args[0]].kind)}"
        elif node.op in ("max", "min"):
            inner = ir.nodes[node.args[0]].kind
            pad = "-float('inf')" if node.op == "max" else "float('inf')"
            e = _total(f"tl.where({tiles.mask(inner)}, {a[0]}, {pad})", f"combine_{node.op}")
        elif node.op == "diag":
            _, ri, _ = tiles.axis(k.rows)
            e = f"tl.where({ri}[:, None] == {ri}[None, :], {a[0]}, 0.0)"
        else:
            raise AssertionError(node.op)
        lines.append(f"v{i} = {e}")
    return lines


def _total(expr: str, combine: str = "combine_add") -> str:
    """A tile reduced over all its elements to a (1, 1) tile. tl.reduce with the module's own combine
    functions, not tl.sum: the standard library's jit functions exist in the mode triton was first
    imported in only (see helpers.add)."""
    return f"tl.reduce(tl.reduce({expr}, 1, {combine}, keep_dims=True), 0, {combine}, keep_dims=True)"


def _sum_to(expr: str, node_kind, arg_kind) -> str:
    """The backward of a broadcast: an operand of one column (row) of a node of several gets its gradient
    summed over the columns (rows): a (1, 1) operand the sum of all of it, a scale node's vector its
    rows' (columns') sums."""
    if arg_kind.scalar and not node_kind.scalar:
        return _total(expr)
    for axis, (a, n) in ((1, (arg_kind.cols, node_kind.cols)), (0, (arg_kind.rows, node_kind.rows))):
        if a == ONE and n != ONE:
            expr = f"tl.reduce({expr}, {axis}, combine_add, keep_dims=True)"
    return expr


def _backward_lines(ir: TensorIR, tiles: _Tiles, seeded: set[int]) -> tuple[list[str], set[int]]:
    """Reverse mode through one step: g{i} is node i's adjoint; `seeded` nodes already hold one.
    Returns the lines and the nodes that end with an adjoint."""
    have = set(seeded)
    lines = []

    def add(j: int, contrib: str) -> None:
        if ir.nodes[j].op in FIXED:
            return
        lines.append(f"g{j} = g{j} + {contrib}" if j in have else f"g{j} = {contrib}")
        have.add(j)

    up = hoisted(ir)
    for i in range(len(ir.nodes) - 1, -1, -1):
        node = ir.nodes[i]
        if i not in have or not node.args or up[i]:  # a hoisted value's gradient goes back to torch
            continue
        k, g = node.kind, f"g{i}"
        if node.op in ("pointwise", "scale"):
            names = {s: f"v{j}" for s, j in zip(_symbols(node), node.args, strict=True)}
            printer = TritonPrinter(names)
            for d, j in zip(node.grads, node.args, strict=True):
                if d == 0 or ir.nodes[j].op in FIXED:
                    continue
                contrib = f"tl.where({tiles.mask(k)}, {g} * ({printer.doprint(d)}), 0.0)"
                add(j, _sum_to(contrib, k, ir.nodes[j].kind))
        elif node.op == "matmul":
            j0, j1 = node.args
            add(j0, f"tl.reduce({g}[:, None, :] * v{j1}[None, :, :], 2, combine_add)")
            add(j1, f"tl.reduce(v{j0}[:, :, None] * {g}[:, None, :], 0, combine_add)")
        elif node.op == "transpose":
            add(node.args[0], f"tl.trans({g})")
        elif node.op in ("sum", "mean"):
            j = node.args[0]
            inner = ir.nodes[j].kind
            scale = f" / {tiles.numel(inner)}" if node.op == "mean" else ""
            add(j, f"tl.where({tiles.mask(inner)}, {g}{scale}, 0.0)")
        elif node.op in ("max", "min"):  # to the elements that reach it, shared evenly on ties
            j = node.args[0]
            inner = ir.nodes[j].kind
            lines.append(f"hit{i} = tl.where({tiles.mask(inner)} & (v{j} == v{i}), 1.0, 0.0).to(COMPUTE)")
            add(j, f"{g} * hit{i} / {_total(f'hit{i}')}")
        elif node.op == "diag":
            j = node.args[0]
            _, ri, _ = tiles.axis(k.rows)
            on_diagonal = f"tl.where({ri}[:, None] == {ri}[None, :], {g}, 0.0)"
            add(j, f"tl.reduce({on_diagonal}, 1, combine_add, keep_dims=True)")
    return lines, have


def _prologue(ir: TensorIR, tiles: _Tiles) -> list[str]:
    lines = ["n = tl.program_id(0)", "h = tl.program_id(1)", "vb = tl.program_id(2)", "nh = n * H + h",
             "nhb = nh * NV + vb",
             "one_i = tl.arange(0, 1)", "one_m = one_i < 1", "length = tl.load(len_ptr + n)",
             "first = (one_i[:, None] + vb) == 0"]  # a (1, 1) mask: block 0
    for w, j in tiles.index.items():
        start = f"vb * B{j} + " if w == tiles.split else ""
        lines += [f"i{j} = {start}tl.arange(0, B{j})", f"m{j} = i{j} < D{j}"]
    return lines


def _state_at(ir: TensorIR, tiles: _Tiles, j: int, base: str) -> str:
    k = ir.kinds[ir.states[j]]
    return f"{base} + {tiles.offs(k)}"


def _constexprs(tiles: _Tiles) -> list[str]:
    return [f"D{j}: tl.constexpr" for j in tiles.index.values()] + [
        f"B{j}: tl.constexpr" for j in tiles.index.values()] + ["COMPUTE: tl.constexpr"]


def _forward_kernel(ir: TensorIR, tiles: _Tiles) -> str:
    S, P = len(ir.states), len(ir.params)
    params = (["x_ptr", "len_ptr", "out_ptr"] + [f"s{j}_in_ptr" for j in range(S)]
              + [f"s{j}_out_ptr" for j in range(S)]
              + [f"c{j}_ptr" for j in range(S)] + [f"p{j}_ptr" for j in range(P)]
              + [f"q{i}_ptr" for i in given(ir)]
              + ["T", "N", "H", "NV", "CKPT", "NC"] + _constexprs(tiles))
    body = _prologue(ir, tiles)
    for j, s in enumerate(ir.states):
        k = ir.kinds[s]
        body.append(f"s{j} = tl.load({_state_at(ir, tiles, j, f's{j}_in_ptr + nh * {tiles.numel(k)}')}, "
                    f"mask={tiles.mask(k)}, other=0.0).to(COMPUTE)")
    out = ir.nodes[ir.output_node].kind
    loop = ["live = t < length", "xrow = t * N + n", "if t % CKPT == 0:"]
    for j, s in enumerate(ir.states):  # the state before step t, every CKPT steps
        k = ir.kinds[s]
        at = f"c{j}_ptr + (nh * NC + t // CKPT) * {tiles.numel(k)}"
        loop.append(f"    tl.store({_state_at(ir, tiles, j, at)}, s{j}.to(c{j}_ptr.dtype.element_ty), "
                    f"mask={tiles.owned(k)})")
    loop += _forward_lines(ir, tiles)
    for j, s in enumerate(ir.states):
        k = ir.kinds[s]
        loop.append(f"s{j} = tl.where({tiles.mask(k)} & live, v{ir.new_state[s]}, s{j})")
    at = f"out_ptr + (xrow * H + h) * {tiles.numel(out)} + {tiles.offs(out)}"
    loop.append(f"tl.store({at}, tl.where(live, v{ir.output_node}, 0.0).to(out_ptr.dtype.element_ty), "
                f"mask={tiles.owned(out)})")
    body.append("for t in range(0, T):")
    body += [f"    {line}" for line in loop]
    for j, s in enumerate(ir.states):
        k = ir.kinds[s]
        at = _state_at(ir, tiles, j, f"s{j}_out_ptr + nh * {tiles.numel(k)}")
        body.append(f"tl.store({at}, s{j}.to(s{j}_out_ptr.dtype.element_ty), mask={tiles.owned(k)})")
    return _function("matrix_forward_kernel", params, body)


def _backward_kernel(ir: TensorIR, tiles: _Tiles) -> str:
    S, P = len(ir.states), len(ir.params)
    params = (["x_ptr", "len_ptr", "dout_ptr", "dx_ptr"] + [f"c{j}_ptr" for j in range(S)]
              + [f"w{j}_ptr" for j in range(S)] + [f"ds{j}_ptr" for j in range(S)]
              + [f"dso{j}_ptr" for j in range(S)]
              + [f"p{j}_ptr" for j in range(P)] + [f"dp{j}_ptr" for j in range(P)]
              + [f"q{i}_ptr" for i in given(ir)] + [f"dq{i}_ptr" for i in given(ir)]
              + ["T", "N", "H", "NV", "CKPT", "NC"] + _constexprs(tiles))
    body = _prologue(ir, tiles)
    for j, s in enumerate(ir.states):  # d_s{j}: the gradient of the state after the step being undone
        k = ir.kinds[s]
        at = _state_at(ir, tiles, j, f"ds{j}_ptr + nh * {tiles.numel(k)}")
        body.append(f"d_s{j} = tl.load({at}, mask={tiles.owned(k)}, other=0.0).to(COMPUTE)")
    for j, p in enumerate(ir.params):
        body.append(f"d_p{j} = tl.full({tiles.shape(ir.kinds[p])}, 0.0, COMPUTE)")
    fwd = _forward_lines(ir, tiles)
    # 1. recompute the segment's states from its checkpoint into the scratch w{j}
    seg = ["t0 = c * CKPT", "L = tl.minimum(CKPT, T - t0)"]
    for j, s in enumerate(ir.states):
        k = ir.kinds[s]
        at = _state_at(ir, tiles, j, f"c{j}_ptr + (nh * NC + c) * {tiles.numel(k)}")
        seg.append(f"s{j} = tl.load({at}, mask={tiles.mask(k)}, other=0.0).to(COMPUTE)")
    rec = ["t = t0 + j", "live = t < length", "xrow = t * N + n"]
    for j, s in enumerate(ir.states):
        k = ir.kinds[s]
        at = _state_at(ir, tiles, j, f"w{j}_ptr + (nhb * CKPT + j) * {tiles.numel(k)}")
        rec.append(f"tl.store({at}, s{j}.to(w{j}_ptr.dtype.element_ty), mask={tiles.mask(k)})")
    rec += fwd
    for j, s in enumerate(ir.states):
        k = ir.kinds[s]
        rec.append(f"s{j} = tl.where({tiles.mask(k)} & live, v{ir.new_state[s]}, s{j})")
    seg.append("for j in range(0, L):")
    seg += [f"    {line}" for line in rec]
    seg.append("tl.debug_barrier()")
    # 2. the segment backwards: step t's values from the state before it, then its reverse mode
    rev = ["j = L - 1 - jj", "t = t0 + j", "live = t < length", "xrow = t * N + n"]
    for j, s in enumerate(ir.states):
        k = ir.kinds[s]
        at = _state_at(ir, tiles, j, f"w{j}_ptr + (nhb * CKPT + j) * {tiles.numel(k)}")
        # a finished sequence's step runs on zeros: its gradients are exact zeros (0 * inf = NaN)
        rev.append(f"s{j} = tl.where(live, tl.load({at}, mask={tiles.mask(k)}, other=0.0).to(COMPUTE), 0.0)")
    rev += fwd
    seeded: set[int] = set()
    out = ir.output_node
    ko = ir.nodes[out].kind
    at = f"dout_ptr + (xrow * H + h) * {tiles.numel(ko)} + {tiles.offs(ko)}"
    # tl.where, not `* on`: 0 * inf is NaN (an inf gradient carried past a step or a padded one)
    rev.append(f"g{out} = tl.where(live, tl.load({at}, mask={tiles.owned(ko)}, other=0.0).to(COMPUTE), 0.0)")
    seeded.add(out)
    for j, s in enumerate(ir.states):
        i = ir.new_state[s]
        seed = _sum_to(f"tl.where(live, d_s{j}, 0.0)", ir.kinds[s], ir.nodes[i].kind)
        rev.append(f"g{i} = g{i} + {seed}" if i in seeded else f"g{i} = {seed}")
        seeded.add(i)
    back, have = _backward_lines(ir, tiles, seeded)
    rev += back
    leaf = {n.name: i for i, n in enumerate(ir.nodes) if n.op in ("state", "param", "input")}
    for j, s in enumerate(ir.states):  # a finished sequence's state passes through its padded steps
        i = leaf[s]
        step = f"tl.where({tiles.mask(ir.kinds[s])}, g{i}, 0.0)" if i in have else "0.0"
        rev.append(f"d_s{j} = tl.where(live, {step}, d_s{j})")
    for j, p in enumerate(ir.params):
        if leaf[p] in have:
            rev.append(f"d_p{j} = d_p{j} + tl.where(live, g{leaf[p]}, 0.0)")
    for i in given(ir):  # a hoisted value's gradient at this step (0 on padded steps)
        if i in have:
            ki = ir.nodes[i].kind
            at = f"dq{i}_ptr + ((xrow * H + h) * NV + vb) * {tiles.numel(ki)} + {tiles.offs(ki)}"
            value = f"tl.where(live, g{i}, 0.0)"  # a padded step's values may be NaN (zero states)
            rev.append(f"tl.store({at}, {value}.to(dq{i}_ptr.dtype.element_ty), mask={tiles.mask(ki)})")
    xi = leaf[ir.inputs[0]]
    kx = ir.nodes[xi].kind
    at = f"dx_ptr + ((xrow * H + h) * NV + vb) * {tiles.axis(kx.rows)[0]} + {tiles.offs(kx)}"
    value = f"tl.where(live, g{xi}, 0.0)" if xi in have else f"tl.full({tiles.shape(kx)}, 0.0, COMPUTE)"
    rev.append(f"tl.store({at}, {value}.to(dx_ptr.dtype.element_ty), mask={tiles.mask(kx)})")
    seg.append("for jj in range(0, L):")
    seg += [f"    {line}" for line in rev]
    seg.append("tl.debug_barrier()")
    body.append("for cc in range(0, NC):")
    body.append("    c = NC - 1 - cc")
    body += [f"    {line}" for line in seg]
    for j, s in enumerate(ir.states):
        k = ir.kinds[s]
        at = _state_at(ir, tiles, j, f"dso{j}_ptr + nhb * {tiles.numel(k)}")
        body.append(f"tl.store({at}, d_s{j}.to(dso{j}_ptr.dtype.element_ty), mask={tiles.mask(k)})")
    for j, p in enumerate(ir.params):
        k = ir.kinds[p]
        at = f"dp{j}_ptr + nhb * {tiles.numel(k)} + {tiles.offs(k)}"
        body.append(f"tl.store({at}, d_p{j}.to(dp{j}_ptr.dtype.element_ty), mask={tiles.mask(k)})")
    return _function("matrix_backward_kernel", params, body)


def _function(name: str, params: list[str], body: list[str]) -> str:
    lines = ["@triton.jit", f"def {name}(", *[f"    {p}," for p in params], "):"]
    lines += [f"    {line}" for line in body]
    return "\n".join(lines) + "\n"


KERNELS = ("matrix_forward_kernel", "matrix_backward_kernel")


def matrix_triton_source(ir: TensorIR) -> str:
    """The generated module: a forward and a backward kernel (CellError for what it cannot express)."""
    refuse(ir)
    tiles = _Tiles(ir)
    doc = python_text(f"Triton kernels of the matrix-memory cell {ir.name} (generated by celldsl; "
                      "targets/triton/matrix_emit.py). Widths in order: D0, D1, ... as the host passes them.",
                      lines=True)
    header = (f'"""{doc}\n"""\n\nimport triton\nimport triton.language as tl\n\n'
              "from celldsl.targets.triton.module import shared_helpers\n\nlib = shared_helpers()\n")
    keep = "propagate_nan=tl.PropagateNan.ALL"  # a NaN wins, as in torch.amax / amin
    combine = ("@triton.jit\ndef combine_add(a, b):\n    return a + b\n\n\n"
               f"@triton.jit\ndef combine_max(a, b):\n    return tl.maximum(a, b, {keep})\n\n\n"
               f"@triton.jit\ndef combine_min(a, b):\n    return tl.minimum(a, b, {keep})\n")
    return "\n\n".join([header, combine, _forward_kernel(ir, tiles), _backward_kernel(ir, tiles)])
