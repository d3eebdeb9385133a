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

from ..functions import rowmean, rowsum
from .model import ExportCell, ExportError

OPSET = 17
DTYPES = {"f32": np.float32, "f64": np.float64}

# cell function -> ONNX operator of one argument (the rest are built in OnnxPrinter._function)
UNARY = {"sigmoid": "Sigmoid", "tanh": "Tanh", "exp": "Exp", "log": "Log", "relu": "Relu", "Abs": "Abs",
         "sign": "Sign", "floor": "Floor"}
BUILT = ("softplus", "logsigmoid", "step", "maximum", "minimum", "less", "less_equal", "where", "mod",
         "sqrt", "pow", "rowmean", "rowsum")


class Graph:
    """Nodes of one ONNX graph with fresh value names and cached constants."""

    def __init__(self, dtype: str, counter: list[int]):
        self.np_type = DTYPES[dtype]
        self.nodes = []
        self.counter = counter  # shared by the main graph and the body: names never meet
        self.consts: dict[tuple, str] = {}

    def fresh(self) -> str:
        self.counter[0] += 1
        return f"v{self.counter[0]}"

    def node(self, op: str, inputs: list[str], **attrs) -> str:
        from onnx import helper

        out = self.fresh()
        self.nodes.append(helper.make_node(op, inputs, [out], **attrs))
        return out

    def const(self, value, integer: bool = False) -> str:
        """A constant: a float scalar of the graph's dtype, or (integer) an int64 vector."""
        from onnx import helper, numpy_helper

        key = (integer, tuple(value) if integer else float(value))
        if key not in self.consts:
            array = numpy_helper.from_array(np.array(value, dtype=np.int64 if integer else self.np_type))
            out = self.fresh()
            self.nodes.append(helper.make_node("Constant", [], [out], value=array))
            self.consts[key] = out
        return self.consts[key]

    def columns(self, value: str, start: int, stop: int) -> str:
        """value[:, start:stop]."""
        return self.node("Slice", [value, self.const([start], True), self.const([stop], True),
                                   self.const([1], True)])


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
            return self._cast(g.node("Greater", [args[0], g.const(0.0)]))
        if name in ("maximum", "minimum"):
            return g.node("Max" if name == "maximum" else "Min", args)
        if name in ("less", "less_equal"):
            return self._cast(g.node("Less" if name == "less" else "LessOrEqual", args))
        if name == "where":
            nonzero = g.node("Not", [g.node("Equal", [args[0], g.const(0.0)])])
            return g.node("Where", [nonzero, args[1], args[2]])
        if name == "mod":  # torch.remainder: a - b floor(a / b)
            a, b = args
            return g.node("Sub", [a, g.node("Mul", [b, g.node("Floor", [g.node("Div", [a, b])])])])
        if name == "sqrt":
            return g.node("Sqrt", args)
        if isinstance(e, rowmean):
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


def _rows(w: torch.Tensor) -> int:
    return w.shape[0] if w.dim() == 2 else w.shape[0] * w.shape[1] * w.shape[2]


class _Builder:
    def __init__(self, cell: ExportCell, dtype: str):
        self.cell, self.dtype = cell, dtype
        self.np_type = DTYPES[dtype]
        self.counter = [0]
        self.initializers = []

    def weight(self, array: np.ndarray) -> str:
        from onnx import numpy_helper

        name = f"w{len(self.initializers)}"
        array = np.ascontiguousarray(array, dtype=self.np_type)
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def gemm(self, g: Graph, v: str, w: torch.Tensor, name: str) -> str:
        """v [N, K] @ W.T -> [N, rows]; heads: block-diagonal per head (runtime/gemm.py)."""
        if w.dim() == 2:
            return g.node("MatMul", [v, name])
        G, NH, dh, _ = w.shape
        heads = g.node("Transpose", [g.node("Reshape", [v, g.const([0, NH, dh], True)])], perm=[1, 0, 2])
        prod = g.node("MatMul", [heads, name])  # [NH, N, G dh]
        prod = g.node("Reshape", [prod, g.const([NH, -1, G, dh], True)])
        prod = g.node("Transpose", [prod], perm=[1, 2, 0, 3])  # [N, G, NH, dh]
        return g.node("Reshape", [prod, g.const([0, G * NH * dh], True)])

    def gemm_weight(self, w: torch.Tensor) -> str:
        if w.dim() == 2:
            return self.weight(w.t().numpy())
        G, NH, dh, _ = w.shape  # W'[h, d, g dh + e] = W[g, h, e, d]
        return self.weight(w.permute(1, 3, 0, 2).reshape(NH, dh, G * dh).numpy())

    def body(self):
        """The Scan body: (graph, the names of its state inputs, its scan inputs)."""
        from onnx import helper

        cell, plan, ir, sizes = self.cell, self.cell.plan, self.cell.ir, self.cell.sizes
        g = Graph(self.dtype, self.counter)
        elem = helper.np_dtype_to_tensor_dtype(np.dtype(self.np_type))
        states = [g.fresh() for _ in ir.states]
        x_t = g.fresh()
        shifts = {name: g.fresh() for name in ir.shifted}
        inputs = [helper.make_tensor_value_info(s, elem, ["N", w]) for s, w in
                  zip(states, cell.state_widths(), strict=True)]
        inputs.append(helper.make_tensor_value_info(x_t, elem, ["N", cell.input_size]))
        inputs += [helper.make_tensor_value_info(v, elem, ["N", cell.input_size]) for v in shifts.values()]
        values: dict[str, str] = dict(zip(ir.states, states, strict=True))
        for name, c in cell.columns.items():
            whole = (c.start, c.stop) == (0, cell.input_size)
            values[name] = x_t if whole else g.columns(x_t, c.start, c.stop)
        for name, (source, _k) in ir.shifted.items():
            c = cell.columns[source]
            values[name] = shifts[name] if (c.start, c.stop) == (0, cell.input_size) else \
                g.columns(shifts[name], c.start, c.stop)
        vec = [n for n, p in ir.params.items() if p.kind == "vector"]
        sca = [n for n, p in ir.params.items() if p.kind == "scalar"]
        values |= {n: self.weight(v.numpy()) for n, v in zip(vec, cell.vectors, strict=True)}
        values |= {n: self.weight(v.numpy()) for n, v in zip(sca, cell.scalars, strict=True)}
        hoisted_w = [self.gemm_weight(w) for w in cell.hoisted_w]
        step_w = [self.gemm_weight(w) for w in cell.step_w]
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

        def products(gemm, out, w):
            if len(gemm.products) == 1:
                values[gemm.products[0].name] = out
                return
            at = 0
            for p, width in zip(gemm.products, gemm.widths, strict=True):
                values[p.name] = g.columns(out, at, at + sizes[width])
                at += sizes[width]

        for pw in plan.hoist_pointwise:
            run(pw)
        for gemm, w, name in zip(plan.hoisted, cell.hoisted_w, hoisted_w, strict=True):
            products(gemm, self.gemm(g, values[gemm.operand.name], w, name), w)
        for k in range(plan.num_stages + 1):
            for gemm, w, name in zip(plan.gemms, cell.step_w, step_w, strict=True):
                if gemm.stage == k:
                    products(gemm, self.gemm(g, values[gemm.operand.name], w, name), w)
            for pw in plan.pointwise_of_stage(k):
                run(pw)
        outs = []
        news = [values[s + "'"] for s in ir.states]
        result = news[ir.states.index(ir.output)] if ir.output in ir.states else values[ir.output]
        for v, w in [*zip(news, cell.state_widths(), strict=True), (result, cell.output_width())]:
            name = g.node("Identity", [v])
            outs.append(helper.make_tensor_value_info(name, elem, ["N", w]))
        graph = helper.make_graph(g.nodes, "step", inputs, outs)
        return graph, len(shifts)

    def model(self):
        from onnx import helper

        cell, ir = self.cell, self.cell.ir
        body, n_shifted = self.body()
        g = Graph(self.dtype, self.counter)
        elem = helper.np_dtype_to_tensor_dtype(np.dtype(self.np_type))
        states = [f"state_in_{k}" for k in range(len(ir.states))]
        inputs = [helper.make_tensor_value_info("x", elem, ["T", "N", cell.input_size])]
        inputs += [helper.make_tensor_value_info(s, elem, ["N", w])
                   for s, w in zip(states, cell.state_widths(), strict=True)]
        scan_in = ["x"]
        for _name, (_source, k) in ir.shifted.items():  # prev(x, k): x k steps back, 0 before the first
            shape = g.node("Concat", [g.const([k], True), g.node("Shape", ["x"], start=1)], axis=0)
            zeros = g.node("ConstantOfShape", [shape], value=_tensor(np.zeros(1, self.np_type)))
            steps = g.node("Shape", ["x"], start=0, end=1)
            padded = g.node("Concat", [zeros, "x"], axis=0)
            scan_in.append(g.node("Slice", [padded, g.const([0], True), steps, g.const([0], True)]))
        outs = [f"state_out_{k}" for k in range(len(ir.states))] + ["out"]
        from onnx import helper as h

        g.nodes.append(h.make_node("Scan", states + scan_in, outs, body=body, num_scan_inputs=1 + n_shifted))
        outputs = [h.make_tensor_value_info(s, elem, ["N", w])
                   for s, w in zip(outs[:-1], cell.state_widths(), strict=True)]
        outputs.append(h.make_tensor_value_info("out", elem, ["T", "N", cell.output_width()]))
        graph = h.make_graph(g.nodes, "celldsl", inputs, outputs, initializer=self.initializers)
        model = h.make_model(graph, opset_imports=[h.make_opsetid("", OPSET)], producer_name="celldsl")
        model.doc_string = (f"celldsl cell {ir.name}: states {', '.join(ir.states)} "
                            f"(state_in_k / state_out_k in this order), output {ir.output}")
        return model


def _tensor(array: np.ndarray):
    from onnx import numpy_helper

    return numpy_helper.from_array(array)


def onnx_model(cell: ExportCell, dtype: str = "f32"):
    """The checked onnx.ModelProto of one layer of the cell."""
    import onnx

    model = _Builder(cell, dtype).model()
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
