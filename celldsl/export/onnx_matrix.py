"""One layer, one direction of a matrix-memory cell (lang/tensors.py) as an ONNX model: the values that
depend on no state (the input's projections, prev(...) shifts, the parameters' own arithmetic) are
computed before the loop for every step at once, the rest is a `Scan` whose body is the cell's step,
one ONNX operator or a few per IR node: `@` a MatMul, `ᵀ` a Transpose, sum/mean/max/min a Reduce*,
diag(a) a Where on the identity, pointwise nodes (and scale nodes, the IR's `diag(a) @ S`: a broadcast
Mul) printed from their SymPy expressions by onnx_graph's printer.

Values are tensors [N, heads or 1, rows, cols] in the loop (as targets/torch/matrix.py runs them) and
[T, N, heads or 1, rows, cols] before it (a parameter-only value [1, heads or 1, rows, cols]). The
model (opset 17): input `x` [T, N, I] and `state_in_k` [N, heads, rows, cols] without the "1" axes
(the states as the loop takes them: `MatrixRecurrent`'s [L * D, N, ...] at one layer and direction;
a cell without heads keeps a heads axis of 1); outputs `out` [T, N, heads * width] and
`state_out_k`. T and N are dynamic. Names are generated (`v12`); the cell's text reaches the model
only as its doc string. What the printer cannot express is a CellError at the cell's line.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import sympy as sp
import torch

from ..lang.errors import CellError
from ..lang.tensors import ONE, Kind, TensorIR
from ..targets.torch.emit_matrix import varying
from .model import ExportError
from .onnx_graph import OPSET, Graph, OnnxPrinter


class MatrixBuilder:
    """The Scan of a matrix-memory cell on a graph backend (Graph: protobuf; torch_onnx.IRGraph:
    onnx_ir). `scan(main, x, states, params)` adds the loop to `main`; `model(params)` is standalone."""

    def __init__(self, ir: TensorIR, sizes: dict[str, int], dtype: str, graph_class=Graph, counter=None):
        self.ir, self.dtype, self.graph_class = ir, dtype, graph_class
        self.sizes = dict(sizes)
        self.counter = counter if counter is not None else [0]
        self.moving = varying(ir)

    # ---- static shapes -------------------------------------------------------------------------

    def width(self, w: str) -> int:
        if w == ONE:
            return 1
        if w not in self.sizes:
            raise ExportError(f"cell {self.ir.name!r}: no size for the width {w!r} (sizes: "
                              f"{', '.join(sorted(self.sizes))})")
        return self.sizes[w]

    def dims(self, kind: Kind) -> list[int]:
        """[heads or 1, rows, cols] of a value of this kind."""
        return [self.sizes["heads"] if kind.head else 1, self.width(kind.rows), self.width(kind.cols)]

    def stored(self, name: str) -> list[int]:
        """A state's shape per sequence as the loop takes it (or a parameter's as stored)."""
        return list(self.ir.param_shape(name, self.sizes))

    def refuse(self, node, message: str):
        raise CellError(f"the ONNX export cannot print this: {message}", self.ir.source, node.loc)

    # ---- the nodes both graphs print -----------------------------------------------------------

    def const4(self, g, array: np.ndarray, cache: dict, key):
        if key not in cache:
            cache[key] = g.node("Constant", [], value=g.tensor(np.ascontiguousarray(array, g.np_type)))
        return cache[key]

    def leaf_const(self, g, node, cache):
        """const, size, eye: 4-D constants [1, 1, rows, cols]."""
        if node.op == "const":
            return self.const4(g, np.full((1, 1, 1, 1), float(node.value)), cache, ("c", float(node.value)))
        if node.op == "size":
            v = float(self.width(node.name))
            return self.const4(g, np.full((1, 1, 1, 1), v), cache, ("c", v))
        d = self.width(node.name)
        return self.const4(g, np.eye(d)[None, None], cache, ("eye", d))

    def reduce(self, g, op: str, v):
        if op in ("ReduceMax", "ReduceMin"):  # onnxruntime's drop a NaN at some places; torch.amax not
            nans = self.reduce(g, "ReduceSum", g.node("Where", [g.node("IsNaN", [v]), v, g.const(0.0)]))
            return g.node("Where", [g.node("IsNaN", [nans]), nans, self.plain_reduce(g, op, v)])
        return self.plain_reduce(g, op, v)

    def plain_reduce(self, g, op: str, v):
        if op == "ReduceSum" or g.opset >= 18:  # ReduceSum's axes are an input from opset 13, the rest's 18
            return g.node(op, [v, g.const([-2, -1], True)], keepdims=1)
        return g.node(op, [v], axes=[-2, -1], keepdims=1)

    def emit(self, g, i: int, args: list, cache: dict):
        """Node i of an operation (not a leaf) on its arguments' (value, rank) -> (value, rank)."""
        node = self.ir.nodes[i]
        rank = max((r for _, r in args), default=4)
        a = [v for v, _ in args]
        if node.op in ("pointwise", "scale"):  # scale: a Mul whose vector broadcasts (lang/tensors.py)
            symbols = sp.symbols(f"a0:{len(a)}", real=True)
            printer = OnnxPrinter(g, dict(zip(symbols, a, strict=True)), f"cell {self.ir.name!r}")
            try:
                out = printer.value(node.expr)
            except ExportError as err:
                self.refuse(node, str(err))
            if not sp.sympify(node.expr).free_symbols:  # a number: as a 4-D constant
                out = g.node("Reshape", [out, g.const([1, 1, 1, 1], True)])
                rank = 4
            return out, rank
        if node.op == "matmul":
            return g.node("MatMul", a), rank
        if node.op == "transpose":
            perm = [0, 1, 3, 2] if rank == 4 else [0, 1, 2, 4, 3]
            return g.node("Transpose", a, perm=perm), rank
        if node.op in ("sum", "mean", "max", "min"):
            return self.reduce(g, "Reduce" + node.op.capitalize(), a[0]), rank
        if node.op == "diag":  # [.., r, 1] where I[r, r] is 1, else 0 (a Mul by I: 0 * inf = NaN off it)
            eye = self.const4(g, np.eye(self.width(node.kind.rows))[None, None], cache,
                              ("eye", self.width(node.kind.rows)))
            return g.node("Where", [g.node("Equal", [eye, g.const(1.0)]), a[0], g.const(0.0)]), rank
        self.refuse(node, f"the operation {node.op!r} has no ONNX spelling here")

    # ---- before the loop: every step at once ---------------------------------------------------

    def hoist(self, main, x, params4: list, needed: list[int]) -> dict:
        """The values of the nodes in `needed` that depend on no state: node -> (value, rank 5 [T, N,
        h, r, c] when it reads the input, else 4 [1, h, r, c])."""
        ir, memo, cache = self.ir, {}, {}
        param_at = {p: k for k, p in enumerate(ir.params)}

        def value(i):
            if i in memo:
                return memo[i]
            node = ir.nodes[i]
            if node.op == "input":
                shape = main.const([0, 0, 1, self.width(node.kind.rows), 1], True)
                out = (main.node("Reshape", [x, shape]), 5)
            elif node.op == "param":
                out = (params4[param_at[node.name]], 4)
            elif node.op in ("const", "size", "eye"):
                out = (self.leaf_const(main, node, cache), 4)
            elif node.op == "shift":
                out = (self.shift(main, x, *value(node.args[0]), int(node.value)), 5)
            elif node.op == "matmul" and self.projection(node, value(node.args[0]), value(node.args[1])):
                out = (self.project(main, value(node.args[0])[0], value(node.args[1])[0], node), 5)
            else:
                out = self.emit(main, i, [value(j) for j in node.args], cache)
            memo[i] = out
            return out

        for i in needed:
            value(i)
        return memo

    def projection(self, node, a: tuple, b: tuple) -> bool:
        """A parameter-only matrix (rank 4) times an input-dependent vector shared by the heads (rank
        5): one GEMM [T N, k] @ [k, heads rows] for every step (W_q @ x)."""
        kb = self.ir.nodes[node.args[1]].kind
        return a[1] == 4 and b[1] == 5 and not kb.head and kb.cols == ONE and kb.rows != ONE

    def project(self, g, w, v, node):
        """w [1, h, r, k] @ v [T, N, 1, k, 1] -> [T, N, h, r, 1] as one MatMul of v [T, N, k] by wᵀ."""
        a = self.ir.nodes[node.args[0]].kind
        h, r, k = self.dims(a)
        wt = g.node("Transpose", [g.node("Reshape", [w, g.const([h * r, k], True)])], perm=[1, 0])
        flat = g.node("Reshape", [v, g.const([0, 0, k], True)])
        return g.node("Reshape", [g.node("MatMul", [flat, wt]), g.const([0, 0, h, r, 1], True)])

    def shift(self, g, x, v, rank: int, k: int):
        """prev(v, k) over [T, N, ...]: k steps of zeros in front, the last k steps dropped."""
        if rank == 4:  # a parameter-only value: the same at every step
            v = g.node("Expand", [v, g.node("Concat", [g.node("Shape", [x], start=0, end=2),
                                                      g.const([1, 1, 1], True)], axis=0)])
        shape = g.node("Concat", [g.const([k], True), g.node("Shape", [v], start=1)], axis=0)
        zeros = g.node("ConstantOfShape", [shape], value=g.tensor(np.zeros(1, g.np_type)))
        steps = g.node("Shape", [x], start=0, end=1)
        padded = g.node("Concat", [zeros, v], axis=0)
        return g.node("Slice", [padded, g.const([0], True), steps, g.const([0], True)])

    # ---- the loop ------------------------------------------------------------------------------

    def scan(self, main, x, states: list, params: list, outputs: list | None = None):
        """Add the loop to graph `main`: x [T, N, I], the states as the loop takes them, the parameters
        as stored (ir.params order) -> (final states as the loop gives them, out [T, N, width])."""
        ir, moving = self.ir, self.moving
        params4 = [main.node("Reshape", [p, main.const([1, *self.dims(ir.kinds[n])], True)])
                   for n, p in zip(ir.params, params, strict=True)]
        states4 = [main.node("Reshape", [s, main.const([0, *self.dims(ir.kinds[n])], True)])
                   for n, s in zip(ir.states, states, strict=True)]
        results = [*(ir.new_state[s] for s in ir.states), ir.output_node]
        needed = sorted({j for i, n in enumerate(ir.nodes) if moving[i] for j in n.args if not moving[j]}
                        | {i for i in results if not moving[i]})
        hoisted = self.hoist(main, x, params4, needed)
        body, scan_in = self.body(hoisted, results)
        if not scan_in:  # the step reads no input: x still gives the Scan its number of steps
            body.input(["N", self.width(ir.inputs[0])])
            scan_in = [x]
        n = len(ir.states) + 1
        outs = main.node("Scan", [*states4, *scan_in], outputs=n, body=body.finish("step"),
                         num_scan_inputs=len(scan_in))
        outs = outs if n > 1 else [outs]
        finals = [main.node("Reshape", [f, main.const([0, *self.stored(s)], True)])
                  for f, s in zip(outs[:-1], ir.states, strict=True)]
        return finals, outs[-1]

    def body(self, hoisted: dict, results: list[int]):
        """The step graph: states [N, h, r, c], then one scan input per input-dependent hoisted value
        the step reads -> (graph, the outer values to scan)."""
        ir, moving, cache = self.ir, self.moving, {}
        g = self.graph_class(self.dtype, self.counter)
        state_in = [g.input(["N", *self.dims(ir.kinds[s])]) for s in ir.states]
        at = {n.name: i for i, n in enumerate(ir.nodes) if n.op == "state"}
        memo = {at[s]: (v, 4) for s, v in zip(ir.states, state_in, strict=True)}
        scan_in = []

        def value(i):
            if i in memo:
                return memo[i]
            if not moving[i]:
                v, rank = hoisted[i]
                if rank == 5:
                    scan_in.append(v)
                    v = g.input(["N", *self.dims(ir.nodes[i].kind)])
                memo[i] = (v, 4)
                return memo[i]
            memo[i] = self.emit(g, i, [value(j) for j in ir.nodes[i].args], cache)
            return memo[i]

        news = [value(i)[0] for i in results]
        for s, v, s_in in zip(ir.states, news[:-1], state_in, strict=True):
            g.output(g.node("Expand", [v, g.node("Shape", [s_in])]), ["N", *self.dims(ir.kinds[s])])
        out_kind = ir.nodes[ir.output_node].kind
        h, r, c = self.dims(Kind(out_kind.rows, out_kind.cols, True))
        shape = g.node("Concat", [g.node("Shape", [state_in[0]], start=0, end=1), g.const([h, r, c], True)],
                       axis=0)
        out = g.node("Reshape", [g.node("Expand", [news[-1], shape]), g.const([0, h * r * c], True)])
        g.output(out, ["N", h * r * c])
        return g, scan_in

    def output_width(self) -> int:
        k = self.ir.nodes[self.ir.output_node].kind
        h, r, c = self.dims(Kind(k.rows, k.cols, True))
        return h * r * c

    def model(self, params: dict[str, torch.Tensor]):
        """The standalone model: the parameters (by name, as stored) as initializers."""
        from onnx import helper, numpy_helper

        ir = self.ir
        if self.dtype not in ("f32", "f64"):
            raise ExportError(f"cell {ir.name!r}: the ONNX model is 'f32' or 'f64', got {self.dtype!r}")
        needed = ["heads", ir.inputs[0], *ir.widths]
        bad = {w: self.sizes.get(w) for w in needed if not isinstance(self.sizes.get(w), int)
               or isinstance(self.sizes.get(w), bool) or self.sizes[w] < 1}
        if bad:
            raise ExportError(f"cell {ir.name!r}: sizes must give {', '.join(needed)} as positive "
                              f"integers, got {bad}")
        missing = [p for p in ir.params if not isinstance(params.get(p), torch.Tensor)]
        if missing:
            raise ExportError(f"cell {ir.name!r}: params must hold a tensor for each of "
                              f"{', '.join(ir.params)}; missing or not a tensor: {', '.join(missing)}")
        main = Graph(self.dtype, self.counter)
        x = main.input(["T", "N", self.width(ir.inputs[0])], "x")
        states = [main.input(["N", *self.stored(s)], f"state_in_{k}") for k, s in enumerate(ir.states)]
        initializers, weights = [], []
        for k, name in enumerate(ir.params):
            t = params[name].detach().cpu().to(torch.float64)  # numpy has no bfloat16; cast below
            if list(t.shape) != self.stored(name):
                raise ExportError(f"cell {ir.name!r}: parameter {name!r} is {list(t.shape)}, expected "
                                  f"{self.stored(name)}")
            weights.append(f"w{k}")
            array = np.ascontiguousarray(t.numpy(), main.np_type)
            initializers.append(numpy_helper.from_array(array, f"w{k}"))
        finals, out = self.scan(main, x, states, weights)
        for k, (f, s) in enumerate(zip(finals, ir.states, strict=True)):
            main.nodes.append(helper.make_node("Identity", [f], [f"state_out_{k}"]))
            main.output(f"state_out_{k}", ["N", *self.stored(s)], f"state_out_{k}")
        main.nodes.append(helper.make_node("Identity", [out], ["out"]))
        main.output("out", ["T", "N", self.output_width()], "out")
        model = helper.make_model(main.finish("celldsl", initializers),
                                  opset_imports=[helper.make_opsetid("", OPSET)], producer_name="celldsl")
        model.doc_string = (f"celldsl matrix-memory cell {ir.name}: states {', '.join(ir.states)} "
                            f"(state_in_k / state_out_k in this order), output {ir.output}")
        return model


def matrix_onnx_model(ir: TensorIR, sizes: dict[str, int], params: dict[str, torch.Tensor],
                      dtype: str = "f32"):
    """The checked onnx.ModelProto of one layer, one direction of a matrix-memory cell."""
    import onnx

    model = MatrixBuilder(ir, sizes, dtype).model(params)
    onnx.checker.check_model(model)
    return model


def write_matrix_onnx(ir: TensorIR, sizes: dict[str, int], params: dict[str, torch.Tensor], path,
                      dtype: str = "f32") -> Path:
    import onnx

    model = matrix_onnx_model(ir, sizes, params, dtype)
    path = Path(path)
    if path.parent != Path(""):
        path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path
