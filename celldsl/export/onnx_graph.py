"""One layer of a cell as an ONNX model: the time loop is a `Scan`, its body the cell's step printed
as ONNX operators from the SymPy IR (the CSE'd pointwise stages of the plan, as the torch, C and Triton
printers print them) and the plan's GEMM groups as MatMuls.

The model (opset 17): inputs `x` [T, N, I] (the cell's inputs side by side, as the op takes them) and
`state_in_0`, `state_in_1`, ... [N, width] (the cell's `state` line, prev(...) states included);
outputs `out` [T, N, width of the output] and `state_out_0`, ... T and N are dynamic. Weights are
initializers of the main graph that the Scan body reads from its outer scope. Value names are
generated (`v12`); the cell's text reaches the model only as its doc string.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import sympy as sp
import torch

from ..lang.functions import rowmean, rowsum
from .model import ExportCell, ExportError

OPSET = 17
DTYPES = {"f32": np.float32, "f64": np.float64}

# cell function -> ONNX operator of one argument (the rest are built in OnnxPrinter._function)
UNARY = {"sigmoid": "Sigmoid", "tanh": "Tanh", "exp": "Exp", "log": "Log", "relu": "Relu", "Abs": "Abs",
         "sign": "Sign", "floor": "Floor", "sin": "Sin", "cos": "Cos"}
BUILT = ("softplus", "logsigmoid", "step", "maximum", "minimum", "less", "less_equal", "where", "mod",
         "sqrt", "pow", "rowmean", "rowsum")


class Graph:
    """Nodes of one ONNX graph (protobuf) with fresh value names and cached constants. The printer and
    the builder see only `node`, `const`, `input`, `output` and `finish`: IRGraph (torch_onnx.py) is
    the same interface over onnx_ir, for torch.onnx.export's translation of the layers' op."""

    opset = OPSET

    def __init__(self, dtype: str, counter: list[int]):
        self.np_type = DTYPES[dtype]
        self.nodes = []
        self.inputs, self.outputs = [], []
        self.counter = counter  # shared by the main graph and the body: names never meet
        self.consts: dict[tuple, object] = {}

    def fresh(self) -> str:
        self.counter[0] += 1
        return f"v{self.counter[0]}"

    def node(self, op: str, inputs: list, outputs: int = 1, **attrs):
        """The output of a new node (a list of them when outputs > 1)."""
        from onnx import helper

        outs = [self.fresh() for _ in range(outputs)]
        self.nodes.append(helper.make_node(op, inputs, outs, **attrs))
        return outs if outputs > 1 else outs[0]

    def tensor(self, array: np.ndarray):
        """A tensor attribute's value."""
        from onnx import numpy_helper

        return numpy_helper.from_array(array)

    def const(self, value, integer: bool = False):
        """A constant: a float scalar of the graph's dtype, or (integer) an int64 vector."""
        key = (integer, tuple(value) if integer else float(value))
        if key not in self.consts:
            array = np.array(value, dtype=np.int64 if integer else self.np_type)
            self.consts[key] = self.node("Constant", [], value=self.tensor(array))
        return self.consts[key]

    def columns(self, value, start: int, stop: int):
        """value[:, start:stop]."""
        return self.node("Slice", [value, self.const([start], True), self.const([stop], True),
                                   self.const([1], True)])

    def input(self, shape: list, name: str | None = None):
        from onnx import helper

        name = name or self.fresh()
        self.inputs.append(helper.make_tensor_value_info(name, self.elem(), shape))
        return name

    def output(self, value, shape: list, name: str | None = None) -> None:
        from onnx import helper

        if name is None:
            name = self.node("Identity", [value])
        self.outputs.append(helper.make_tensor_value_info(name, self.elem(), shape))

    def elem(self) -> int:
        from onnx import helper

        return helper.np_dtype_to_tensor_dtype(np.dtype(self.np_type))

    def finish(self, name: str, initializers=()):
        from onnx import helper

        return helper.make_graph(self.nodes, name, self.inputs, self.outputs, initializer=list(initializers))


class OnnxPrinter:
    """SymPy -> ONNX nodes of a Graph: `value(expr)` is the name of the value computed."""

    def __init__(self, graph: Graph, names: dict[sp.Symbol, str], where: str):
        self.g = graph
        self.names = names
        self.where = where  # for messages: the cell and the stage
        self.memo: dict[sp.Basic, str] = {}

    def value(self, expr) -> str:
        expr = sp.sympify(expr)
        if expr in self.memo:
            return self.memo[expr]
        out = self._value(expr)
        self.memo[expr] = out
        return out

    def _value(self, e) -> str:
        g = self.g
        if isinstance(e, sp.Symbol):
            return self.names[e]
        if e.is_Number:
            return g.const(float(e))
        if isinstance(e, sp.Add):
            plus = [a for a in e.args if not _negated(a)]
            minus = [-a for a in e.args if _negated(a)]
            acc = self.value(plus[0]) if plus else g.node("Neg", [self.value(minus.pop(0))])
            for a in plus[1:]:
                acc = g.node("Add", [acc, self.value(a)])
            for a in minus:
                acc = g.node("Sub", [acc, self.value(a)])
            return acc
        if isinstance(e, sp.Mul):
            coef, rest = e.as_coeff_Mul()
            if coef == -1:
                return g.node("Neg", [self.value(rest)])
            acc = None
            for a in e.args:
                v = self.value(a)
                acc = v if acc is None else g.node("Mul", [acc, v])
            return acc
        if isinstance(e, sp.Pow):
            return self._pow(*e.args)
        if isinstance(e, sp.Function):
            return self._function(type(e).__name__, e)
        raise ExportError(f"{self.where}: the ONNX printer cannot print {type(e).__name__} "
                          f"({sp.sstr(e)[:80]})")

    def _pow(self, base, exp) -> str:
        g, b = self.g, self.value(base)
        if exp.is_Integer and 1 <= abs(int(exp)) <= 4:
            acc = b
            for _ in range(abs(int(exp)) - 1):
                acc = g.node("Mul", [acc, b])
            return acc if exp > 0 else g.node("Reciprocal", [acc])
        if exp == sp.Rational(1, 2):
            return g.node("Sqrt", [b])
        if exp == -sp.Rational(1, 2):
            return g.node("Reciprocal", [g.node("Sqrt", [b])])
        return g.node("Pow", [b, self.value(exp)])

    def _function(self, name: str, e) -> str:
        g = self.g
        args = [self.value(a) for a in e.args]
        if name in UNARY:
            return g.node(UNARY[name], args)
        if name == "softplus":  # torch's threshold: x above 20 is returned as is
            x = args[0]
            soft = g.node("Add", [g.node("Max", [x, g.const(0.0)]), self._log1p_exp_minus_abs(x)])
            return g.node("Where", [g.node("Greater", [x, g.const(20.0)]), x, soft])
        if name == "logsigmoid":  # min(x, 0) - log(1 + exp(-|x|)), as torch computes it
            x = args[0]
            return g.node("Sub", [g.node("Min", [x, g.const(0.0)]), self._log1p_exp_minus_abs(x)])
        if name == "step":
            return self._cast(g.node("Not", [g.node("LessOrEqual", [args[0], g.const(0.0)])]))  # 1 at NaN
        if name in ("maximum", "minimum"):
            return g.node("Max" if name == "maximum" else "Min", args)
        if name in ("less", "less_equal"):
            return self._cast(g.node("Less" if name == "less" else "LessOrEqual", args))
        if name == "where":
            nonzero = g.node("Not", [g.node("Equal", [args[0], g.const(0.0)])])
            return g.node("Where", [nonzero, args[1], args[2]])
        if name == "mod":  # as written, a - b floor(a / b), as every backend computes it
            a, b = args
            return g.node("Sub", [a, g.node("Mul", [b, g.node("Floor", [g.node("Div", [a, b])])])])
        if name == "sqrt":
            return g.node("Sqrt", args)
        if isinstance(e, rowmean):
            if g.opset >= 18:  # the axes became an input
                return g.node("ReduceMean", [args[0], g.const([-1], True)], keepdims=1)
            return g.node("ReduceMean", args, axes=[-1], keepdims=1)
        if isinstance(e, rowsum):
            return g.node("ReduceSum", [args[0], g.const([-1], True)], keepdims=1)
        raise ExportError(f"{self.where}: the ONNX printer has no operator for the function {name!r}")

    def _log1p_exp_minus_abs(self, x: str) -> str:
        """log(1 + exp(-|x|)): never overflows. (ONNX's Softplus has no double kernel in onnxruntime.)"""
        g = self.g
        small = g.node("Exp", [g.node("Neg", [g.node("Abs", [x])])])
        return g.node("Log", [g.node("Add", [g.const(1.0), small])])

    def _cast(self, value: str) -> str:
        from onnx import TensorProto

        to = TensorProto.FLOAT if self.g.np_type == np.float32 else TensorProto.DOUBLE
        return self.g.node("Cast", [value], to=to)


def _negated(e) -> bool:
    return isinstance(e, sp.Mul) and e.as_coeff_Mul()[0] == -1


class StepBuilder:
    """The Scan over a cell's steps, on a graph backend: `scan(main, x, states, weights)` adds the
    prev(x) shifts and the Scan node to `main` and returns (final states, out)."""

    def __init__(self, cell: ExportCell, dtype: str, graph_class=Graph, counter=None):
        self.cell, self.dtype, self.graph_class = cell, dtype, graph_class
        self.counter = counter if counter is not None else [0]

    @staticmethod
    def gemm(g, v, w: torch.Tensor, weight):
        """v [N, K] @ W.T -> [N, rows] with `weight` as `gemm_layout` lays it out; heads: block-diagonal
        per head (targets/gemm.py)."""
        if w.dim() == 2:
            return g.node("MatMul", [v, weight])
        G, NH, dh, _ = w.shape
        heads = g.node("Transpose", [g.node("Reshape", [v, g.const([0, NH, dh], True)])], perm=[1, 0, 2])
        prod = g.node("MatMul", [heads, weight])  # [NH, N, G dh]
        prod = g.node("Reshape", [prod, g.const([NH, -1, G, dh], True)])
        prod = g.node("Transpose", [prod], perm=[1, 2, 0, 3])  # [N, G, NH, dh]
        return g.node("Reshape", [prod, g.const([0, G * NH * dh], True)])

    @staticmethod
    def gemm_layout(g, w: torch.Tensor, value):
        """A GEMM weight as the op holds it -> the layout `gemm` multiplies by: W.T [K, rows]; with heads
        [NH, dh, G dh], W'[h, d, g dh + e] = W[g, h, e, d]."""
        if w.dim() == 2:
            return g.node("Transpose", [value], perm=[1, 0])
        G, NH, dh, _ = w.shape
        return g.node("Reshape", [g.node("Transpose", [value], perm=[1, 3, 0, 2]),
                                  g.const([NH, dh, G * dh], True)])

    def body(self, weights: list):
        """The Scan body reading `weights` (the op's flat list, GEMM weights in `gemm_layout`) from the
        outer scope: (graph, number of prev(x) scan inputs)."""
        cell, plan, ir, sizes = self.cell, self.cell.plan, self.cell.ir, self.cell.sizes
        g = self.graph_class(self.dtype, self.counter)
        states = [g.input(["N", w]) for w in cell.state_widths()]
        x_t = g.input(["N", cell.input_size])
        shifts = {name: g.input(["N", cell.input_size]) for name in ir.shifted}
        values: dict = dict(zip(ir.states, states, strict=True))
        for name, c in cell.columns.items():
            whole = (c.start, c.stop) == (0, cell.input_size)
            values[name] = x_t if whole else g.columns(x_t, c.start, c.stop)
        for name, (source, _k) in ir.shifted.items():
            c = cell.columns[source]
            values[name] = shifts[name] if (c.start, c.stop) == (0, cell.input_size) else \
                g.columns(shifts[name], c.start, c.stop)
        nh, ng = len(plan.hoisted), len(plan.gemms)
        hoisted_w, step_w = weights[:nh], weights[nh:nh + ng]
        vec = [n for n, p in ir.params.items() if p.kind == "vector"]
        sca = [n for n, p in ir.params.items() if p.kind == "scalar"]
        values |= dict(zip(vec + sca, weights[nh + ng:], strict=True))
        rows = g.node("Shape", [x_t], start=0, end=1)

        def run(pw):
            where = f"cell {ir.name!r}, {pw.name}"
            names = {}
            for s in pw.inputs:
                if s.name not in values:
                    raise ExportError(f"{where}: reads {s.name!r}, which the ONNX export does not place")
                names[s] = values[s.name]
            printer = OnnxPrinter(g, names, where)
            for t, e in pw.forward_temps:
                names[t] = printer.value(e)
            for (name, _), r in zip(pw.outputs, pw.forward_results, strict=True):
                if not sp.sympify(r).free_symbols:  # a constant: [N, width] of it, as torch.full_like
                    shape = g.node("Concat", [rows, g.const([sizes[pw.width]], True)], axis=0)
                    values[name] = g.node("Expand", [printer.value(r), shape])
                else:
                    values[name] = printer.value(r)

        def products(gemm, out):
            if len(gemm.products) == 1:
                values[gemm.products[0].name] = out
                return
            at = 0
            for p, width in zip(gemm.products, gemm.widths, strict=True):
                values[p.name] = g.columns(out, at, at + sizes[width])
                at += sizes[width]

        for pw in plan.hoist_pointwise:
            run(pw)
        for gemm, w, weight in zip(plan.hoisted, cell.hoisted_w, hoisted_w, strict=True):
            products(gemm, self.gemm(g, values[gemm.operand.name], w, weight))
        for k in range(plan.num_stages + 1):
            for gemm, w, weight in zip(plan.gemms, cell.step_w, step_w, strict=True):
                if gemm.stage == k:
                    products(gemm, self.gemm(g, values[gemm.operand.name], w, weight))
            for pw in plan.pointwise_of_stage(k):
                run(pw)
        news = [values[s + "'"] for s in ir.states]
        result = news[ir.states.index(ir.output)] if ir.output in ir.states else values[ir.output]
        for v, w in [*zip(news, cell.state_widths(), strict=True), (result, cell.output_width())]:
            g.output(v, ["N", w])
        return g.finish("step"), len(shifts)

    def scan(self, main, x, states: list, weights: list, outputs: list | None = None):
        """Add the time loop to graph `main`: x [T, N, I], states [N, width] each, the op's flat
        weights as the op holds them -> (final states, out [T, N, width])."""
        cell, ir, plan = self.cell, self.cell.ir, self.cell.plan
        n_gemms = len(plan.hoisted) + len(plan.gemms)
        ws = [*cell.hoisted_w, *cell.step_w]
        laid = [self.gemm_layout(main, w, v) for w, v in zip(ws, weights[:n_gemms], strict=True)]
        body, n_shifted = self.body(laid + list(weights[n_gemms:]))
        scan_in = [x]
        for _name, (_source, k) in ir.shifted.items():  # prev(x, k): x k steps back, 0 before the first
            shape = main.node("Concat", [main.const([k], True), main.node("Shape", [x], start=1)], axis=0)
            zeros = main.node("ConstantOfShape", [shape], value=main.tensor(np.zeros(1, main.np_type)))
            steps = main.node("Shape", [x], start=0, end=1)
            padded = main.node("Concat", [zeros, x], axis=0)
            scan_in.append(main.node("Slice", [padded, main.const([0], True), steps, main.const([0], True)]))
        n = len(ir.states) + 1
        if outputs is not None:  # protobuf: the model's output names
            from onnx import helper

            main.nodes.append(helper.make_node("Scan", [*states, *scan_in], outputs, body=body,
                                               num_scan_inputs=1 + n_shifted))
            outs = outputs
        else:
            outs = main.node("Scan", [*states, *scan_in], outputs=n, body=body, num_scan_inputs=1 + n_shifted)
            outs = outs if n > 1 else [outs]
        return list(outs[:-1]), outs[-1]

    def model(self):
        """The standalone model: weights as initializers, inputs x and state_in_k."""
        from onnx import helper, numpy_helper

        cell, ir = self.cell, self.cell.ir
        main = Graph(self.dtype, self.counter)
        x = main.input(["T", "N", cell.input_size], "x")
        states = [main.input(["N", w], f"state_in_{k}") for k, w in enumerate(cell.state_widths())]
        initializers, weights = [], []
        for k, (_label, w) in enumerate(cell.weights()):
            weights.append(f"w{k}")
            array = np.ascontiguousarray(w.numpy(), main.np_type)
            initializers.append(numpy_helper.from_array(array, f"w{k}"))
        outs = [f"state_out_{k}" for k in range(len(ir.states))] + ["out"]
        self.scan(main, x, states, weights, outs)
        for name, w in zip(outs[:-1], cell.state_widths(), strict=True):
            main.output(name, ["N", w], name)
        main.output("out", ["T", "N", cell.output_width()], "out")
        graph = main.finish("celldsl", initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                  producer_name="celldsl")
        model.doc_string = (f"celldsl cell {ir.name}: states {', '.join(ir.states)} "
                            f"(state_in_k / state_out_k in this order), output {ir.output}")
        return model


def onnx_model(cell: ExportCell, dtype: str = "f32"):
    """The checked onnx.ModelProto of one layer of the cell."""
    import onnx

    model = StepBuilder(cell, dtype).model()
    onnx.checker.check_model(model)
    return model


def write_onnx(cell: ExportCell, path: str | Path, dtype: str = "f32") -> Path:
    import onnx

    model = onnx_model(cell, dtype)
    path = Path(path)
    if path.parent != Path(""):
        path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path
