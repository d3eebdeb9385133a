"""Algebraic rewrites of a matrix-memory cell's IR before the C loop is emitted: the same values,
fewer operations. The backward is derived from the rewritten IR, so it stays consistent with it.

- A product with the identity minus (or plus) a scaled outer product, `A @ (I - c u wᵀ)` (the delta
  rule's `S @ (I - β k kᵀ)`), is computed as `A - c (A u) wᵀ`, and `(I - c u wᵀ) @ A` as
  `A - u (c (wᵀ A))`: O(rows x cols) per step instead of a rows x K x K product.
- A pointwise node equal to an earlier one (the same operands and expression) is that node: the
  cell's `exp(dA) * h + (exp(dA) - 1) / A * ...` computes the exponential once, and differentiates it once.
- Then the nodes nothing reads any more are dropped (the leaves stay: torch hoists them by node).
"""

from __future__ import annotations

import dataclasses

import sympy as sp

from ...lang.tensors import ONE, Kind, Node, TensorIR

SHARE = True  # equal pointwise nodes merged (Mamba's exp(dA), written twice); a switch for A/B timing
SPLIT = True  # split_output on (a switch for A/B timing)
LEAF_OPS = ("input", "state", "param", "const", "size", "eye")


def _symbols(n: int):
    return sp.symbols(f"a0:{n}", real=True)


def _pointwise(args: list[int], expr: sp.Expr, kind: Kind, loc) -> Node:
    syms = _symbols(len(args))
    return Node("pointwise", tuple(args), kind, loc, expr=expr, grads=tuple(sp.diff(expr, s) for s in syms))


class _Rewriter:
    def __init__(self, ir: TensorIR):
        self.old = ir.nodes
        self.nodes: list[Node] = []
        self.remap: dict[int, int] = {}

    def add(self, node: Node) -> int:
        self.nodes.append(node)
        return len(self.nodes) - 1

    def low_rank(self, p: int):
        """Node p as `I + c * (u @ wᵀ)`: (the outer product's node, c, {symbol in c: its one-number
        node}), old indices; None when it is not of that form."""
        node = self.old[p]
        if node.op != "pointwise" or node.kind.rows == ONE or node.kind.cols == ONE:
            return None
        syms = _symbols(len(node.args))
        eyes = [k for k, j in enumerate(node.args) if self.old[j].op == "eye"]
        if len(eyes) != 1:
            return None
        rest = sp.expand(node.expr - syms[eyes[0]])
        if rest.has(syms[eyes[0]]):
            return None
        return self.scaled_outer(rest, node.args)

    def scaled_outer(self, expr: sp.Expr, args: tuple, depth: int = 0):
        """expr (in a0, a1, ... standing for the nodes args) as c * (u @ wᵀ), c a product of numbers
        and one-number nodes, the outer product perhaps inside further such pointwise nodes."""
        syms = _symbols(len(args))
        mats = [k for k, j in enumerate(args) if expr.has(syms[k]) and not self.old[j].kind.scalar]
        if len(mats) != 1 or depth > 8:
            return None
        k = mats[0]
        coef = sp.simplify(expr / syms[k])
        if coef.has(syms[k]) or sp.simplify(expr - coef * syms[k]) != 0:
            return None
        names = {syms[m]: sp.Dummy() for m in range(len(args)) if coef.has(syms[m])}
        coef = coef.xreplace(names)
        scalars = {d: args[m] for m, d in ((syms.index(s), d) for s, d in names.items())}
        j = args[k]
        if self.is_outer(j):
            return j, coef, scalars
        inner = self.old[j]
        if inner.op != "pointwise" or (inner.kind.rows, inner.kind.cols) != (self.old[args[k]].kind.rows,
                                                                            self.old[args[k]].kind.cols):
            return None
        found = self.scaled_outer(inner.expr, inner.args, depth + 1)
        if found is None:
            return None
        outer, c2, s2 = found
        return outer, coef * c2, {**scalars, **s2}

    def is_outer(self, j: int) -> bool:
        n = self.old[j]
        return (n.op == "matmul" and self.old[n.args[0]].kind.cols == ONE
                and n.kind.rows != ONE and n.kind.cols != ONE)

    def scaled(self, vec: int, coef: sp.Expr, scalars, loc) -> int:
        """coef * vec (new indices), a node only when coef is not 1."""
        if coef == 1:
            return vec
        dummies = sorted(scalars, key=str)
        args = [vec, *[self.remap[scalars[d]] for d in dummies]]
        syms = _symbols(len(args))
        expr = coef.xreplace({d: syms[k + 1] for k, d in enumerate(dummies)}) * syms[0]
        return self.add(_pointwise(args, expr, self.nodes[vec].kind, loc))

    def matmul(self, i: int, node: Node) -> int | None:
        """A @ (I + c u wᵀ) -> A + (c (A u)) wᵀ;  (I + c u wᵀ) @ A -> A + u (c (wᵀ A))."""
        a, b = node.args
        head = node.kind.head
        for side, other, lr in ((b, a, "right"), (a, b, "left")):
            found = self.low_rank(side)
            if found is None:
                continue
            outer, coef, scalars = found
            u, wt = (self.remap[j] for j in self.old[outer].args)
            A = self.remap[other]
            ka = self.nodes[A].kind
            if lr == "right":  # A (V x K) @ u (K x 1): V x 1
                au = self.add(Node("matmul", (A, u), Kind(ka.rows, ONE, head), node.loc))
                left, right = self.scaled(au, coef, scalars, node.loc), wt
            else:  # wᵀ (1 x K) @ A (K x C): 1 x C
                wa = self.add(Node("matmul", (wt, A), Kind(ONE, ka.cols, head), node.loc))
                left, right = u, self.scaled(wa, coef, scalars, node.loc)
            prod = self.add(Node("matmul", (left, right), node.kind, node.loc))
            s0, s1 = _symbols(2)
            return self.add(_pointwise([A, prod], s0 + s1, node.kind, node.loc))
        return None

    def run(self, ir: TensorIR) -> TensorIR:
        seen: dict = {}  # a pointwise node's (args, expr, kind) -> its new index: computed once
        for i, node in enumerate(self.old):
            new = self.matmul(i, node) if node.op == "matmul" else None
            if new is None:
                args = tuple(self.remap[j] for j in node.args)
                key = (args, node.expr, node.kind) if node.op == "pointwise" and SHARE else None
                new = seen.get(key) if key is not None else None
                if new is None:
                    new = self.add(dataclasses.replace(node, args=args))
                    if key is not None:
                        seen[key] = new
            self.remap[i] = new
        new_state = {s: self.remap[i] for s, i in ir.new_state.items()}
        return self.pruned(ir, new_state, self.remap[ir.output_node])

    def pruned(self, ir: TensorIR, new_state: dict[str, int], output: int) -> TensorIR:
        live = {*new_state.values(), output}
        for i in range(len(self.nodes) - 1, -1, -1):
            if i in live:
                live.update(self.nodes[i].args)
        keep = [i for i, n in enumerate(self.nodes) if i in live or n.op in LEAF_OPS]
        index = {old: new for new, old in enumerate(keep)}
        nodes = [dataclasses.replace(self.nodes[i], args=tuple(index[j] for j in self.nodes[i].args))
                 for i in keep]
        return dataclasses.replace(ir, nodes=nodes, new_state={s: index[i] for s, i in new_state.items()},
                                   output_node=index[output])


def split_output(ir: TensorIR) -> tuple[TensorIR, str | None]:
    """An output `W @ v` (W a parameter, v a vector the loop computes) as (ir whose output is v, W's
    name): torch then applies W to every step's v at once, one GEMM, instead of a matrix-vector product
    per step in the loop forward and two in its backward (Mamba's out_proj). (ir, None) otherwise."""
    node = ir.nodes[ir.output_node]
    if node.op != "matmul" or not SPLIT:
        return ir, None
    w, v = (ir.nodes[j] for j in node.args)
    if (w.op != "param" or w.kind.rows == ONE or w.kind.cols == ONE or v.kind.cols != ONE
            or v.kind.rows == ONE or v.op in LEAF_OPS or not v.kind.head and w.kind.head):
        return ir, None
    r = _Rewriter(ir)
    r.nodes = list(ir.nodes)
    return r.pruned(ir, dict(ir.new_state), node.args[1]), w.name


def rewrite(ir: TensorIR) -> TensorIR:
    """ir with the products above rewritten and the unread nodes dropped (a new IR; ir is unchanged)."""
    return _Rewriter(ir).run(ir)
