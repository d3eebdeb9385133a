"""The IR of a matrix-memory cell: every value is a small matrix per head, with named axes.

A value of a matrix-memory cell (mLSTM, GLA, DeltaNet) has a `Kind`: its rows and columns, each a
width name ("K", "V", an input's name) or "1", and whether it is one per head. A K-vector is (K, 1), its
transpose `kᵀ` is (1, K), a state `C : (V, K) per head` is (V, K), a number per head is (1, 1). At run
time every value is a tensor [N, heads or 1, rows, cols], so the operations are few and explicit:

- `pointwise`: elementwise, on operands of one kind or with a (1, 1) operand that broadcasts; its
  SymPy expression (built from the syntax tree, never from text) gives the local derivatives, and the
  backward of the broadcast is a sum back to the operand's shape;
- `matmul` (`@`): rows x inner times inner x cols; `v @ kᵀ` is the outer product, `kᵀ @ q` the dot
  product, `C @ q` and `qᵀ @ S` a matrix times a vector; `diag(a)` and the identity `I` are matrices;
- `transpose` (`kᵀ`), `sum`, `mean`, `max`, `min` (over all of a value's elements: one number per
  head), `diag`;
- `scale`: what a product with `diag(d)` becomes here, once for every printer: `diag(d) @ S` is
  scale(d, S), S's rows scaled by the column d, and `S @ diag(d)` is scale(S, dᵀ), its columns scaled
  by the row dᵀ: a broadcast product a0 * a1 (its `expr` and `grads`, as a pointwise node's; the
  vector's gradient is summed back along the axis it broadcasts over), never a product with a matrix
  of zeros (0 * inf = NaN from every other row, where the paper's Diag(d) S keeps an inf in its row).
  The diag node, then read by no node, is dropped; a diag(d) used as a matrix (`diag(d) + I`, the right
  side of `diag(a) @ diag(b)`, a state) stays a diag node.

`build_tensor_ir` checks the kinds and reports every mistake at its place, with a hint.

A cell with shaped parameters but no `per head` anywhere (`param W_a1 : (R, x)`, a low-rank bottleneck
or a chained input projection in an ordinary cell) is built here too, as one head: a state without a
shape is a vector of the layer's hidden size H (`state h : P`: of width P), and a state's name in a
shape stands for its width (`param U : (h, h)` is H x H). `TensorIR.heads` is False for such a cell.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field

import sympy as sp

from . import ast
from .errors import CellError, CellWarning, Loc, Source, raise_all, warning_text
from .functions import CONSTANTS, FUNCTIONS, REDUCTIONS, evaluate
from .inits import check_init_expr

ONE = "1"
TRANSPOSE = "ᵀ"
MAX_SHIFT = 64  # prev(v, k): how far back, as the elementwise language's prev(x, k)


@dataclass(frozen=True)
class Kind:
    rows: str
    cols: str
    head: bool

    @property
    def scalar(self) -> bool:
        return self.rows == ONE and self.cols == ONE

    def words(self) -> str:
        per = " per head" if self.head else ""
        if self.scalar:
            return f"one number{per}"
        if self.cols == ONE:
            return f"a {self.rows}-vector{per}"
        if self.rows == ONE:
            return f"a transposed {self.cols}-vector{per}"
        return f"a ({self.rows}, {self.cols}) matrix{per}"


@dataclass
class Node:
    op: str  # input | state | param | const | size | eye | pointwise | matmul | transpose | sum | mean | max
    # | min | diag | shift (prev(v, k): args (v,), value k; v depends on no state, so it is hoisted)
    # | scale (a product with diag(d): a0 * a1, one of them a column (row) vector along the other's rows
    # (columns); see _Builder.scale)
    args: tuple
    kind: Kind
    loc: Loc | None
    name: str | None = None
    value: float | None = None
    expr: sp.Expr | None = None  # pointwise: in the symbols a0, a1, ... of its arguments
    grads: tuple = ()  # pointwise: d expr / d a_i


@dataclass
class TensorIR:
    name: str
    source: Source
    inputs: list[str]
    states: list[str]
    state_locs: dict[str, Loc]
    kinds: dict[str, Kind]  # declared states and parameters
    params: list[str]
    output: str
    nodes: list[Node] = field(default_factory=list)
    new_state: dict[str, int] = field(default_factory=dict)  # state -> node of its next value
    output_node: int = 0
    widths: list[str] = field(default_factory=list)  # width names the layer must size
    inits: dict = field(default_factory=dict)  # parameter -> ast.InitValue of its `init` line, text order
    init_sizes: list[str] = field(default_factory=list)  # sizes only init expressions read (from sizes=)
    heads: bool = True  # False: no `per head` in the cell: one head, H is the layer's hidden size

    def param_shape(self, name: str, sizes: dict[str, int]) -> tuple[int, ...]:
        """How a parameter is stored: [heads, rows, cols] without its "1" axes; [rows, cols] when the
        heads share it."""
        k = self.kinds[name]
        return (*[sizes["heads"]] * k.head, *[sizes[w] for w in (k.rows, k.cols) if w != ONE])

    def state_shape(self, name: str, sizes: dict[str, int]) -> tuple[int, ...]:
        """A state per sequence: [heads, rows, cols] without its "1" axes (batch in front at run time)."""
        return self.param_shape(name, sizes)


def is_matrix_cell(module: ast.Module) -> bool:
    """A cell is a matrix-memory cell when it declares any value `per head`."""
    return any(isinstance(w, ast.PerHead) for w in module.widths.values()) or any(  # (R, x) too
        isinstance(kind, ast.PerHead) for _, kind, _ in module.params
    )


def has_heads(module: ast.Module) -> bool:
    """Whether the cell writes `per head` anywhere (else it is one head: an ordinary cell with shapes)."""
    shapes = [*module.widths.values(), *(k for _, k, _ in module.params)]
    return any(isinstance(s, ast.PerHead) and s.head for s in shapes)


class _Builder:
    def __init__(self, module: ast.Module, source: Source):
        self.m, self.source = module, source
        self.errors: list[CellError] = []
        self.inits: dict[str, ast.InitValue] = {}  # parameter -> its init line's value, in text order
        self.init_sizes: list[str] = []  # names only init expressions read: the layer's sizes give them
        self.nodes: list[Node] = []
        self.kinds: dict[str, Kind] = {}
        self.leaf: dict[str, int] = {}
        self.defs = {n.text: (n, e) for n, e in module.definitions}
        self.updates = {n.text: (n, e) for n, e in module.updates}
        self.built: dict[str, int] = {}
        self.building: set[str] = set()
        self.scaled_diags: set[int] = set()  # diag nodes a product read: made scale nodes (see scale)
        self.headed = has_heads(module)
        self.what = "a matrix-memory cell" if self.headed else "a cell with shaped parameters"
        # one head: a state's name in a shape stands for its width (H unless `state h : P` says so)
        self.alias = {} if self.headed else {
            n.text: module.widths[n.text].text if isinstance(module.widths.get(n.text), ast.Name) else "H"
            for n in module.states}
        shapes = [*module.widths.values(), *(k for _, k, _ in module.params)]
        names = {w for s in shapes if isinstance(s, ast.PerHead) for w in (s.rows, s.cols)}
        names |= {k.name.text for _, k, _ in module.params if isinstance(k, ast.ParamKind) and k.count is None
                  and k.name.text not in ("scalar", "vector", "matrix") and k.name.text.isidentifier()}
        names |= set() if self.headed else {"H", *self.alias.values()}
        self.width_names = {self.width(w) for w in names} - {ONE, None, *(n.text for n in module.inputs)}

    def width(self, name: str | None) -> str | None:
        """A width name as written, or the width of the state it names (a cell without heads)."""
        return self.alias.get(name, name)

    def kind_of(self, per: ast.PerHead) -> Kind:
        return Kind(self.width(per.rows), self.width(per.cols) or ONE, per.head)

    def words(self, k: Kind) -> str:
        """k in words; "per head" only where the cell has heads (one head is no head to the user)."""
        return k.words() if self.headed else Kind(k.rows, k.cols, False).words()

    def error(self, message: str, loc: Loc | None) -> None:
        raise CellError(message, self.source, loc)

    def is_width(self, name: str) -> bool:
        """A width name of the cell (K, V, R) or an input's name: `param mu : x` is a shared vector."""
        return self.width(name) in self.width_names or name in {n.text for n in self.m.inputs}

    def shaped_example(self) -> str:
        """Where a cell without heads declared its first shape: why it runs as a cell of shaped values."""
        name, shape = next((n, k) for n, k, _ in self.m.params if isinstance(k, ast.PerHead))
        return (f"this cell declares shapes (line {shape.loc.line}: 'param {name.text} : ({shape.rows}, "
                f"{shape.cols})'), so each parameter declares its own")

    def add(self, node: Node) -> int:
        self.nodes.append(node)
        return len(self.nodes) - 1

    # ---- declarations ------------------------------------------------------------------------

    def declare(self) -> None:
        m = self.m
        if m.name is None:
            self.error("the file must start with 'cell NAME'", Loc(1, 1))
        if len(m.inputs) != 1:
            where = m.inputs[1].loc if m.inputs else (m.name.loc if m.name else Loc(1, 1))
            self.error(f"{self.what} reads one input for now (input x); extra inputs run on "
                       "elementwise cells only", where)
        if not m.states:
            self.error(f"{self.what} needs a state: " + ("'state C : (V, K) per head'" if self.headed
                                                         else "'state h'"), m.name.loc)
        for n in m.inputs:
            w = m.widths.get(n.text)
            if isinstance(w, ast.PerHead):
                self.error(f"input '{n.text}' is one per sequence, shared by the heads; declare it without "
                           "'per head' (its projections are per head: W_q @ x with W_q : (K, I) per head)",
                           w.loc)
            if w is not None:
                self.error(f"{self.what} reads its input '{n.text}' whole; remove ': {w.text}'", w.loc)
            self.kinds[n.text] = Kind(n.text, ONE, False)
            self.leaf[n.text] = self.add(Node("input", (), self.kinds[n.text], n.loc, name=n.text))
        for n in m.states:
            w = m.widths.get(n.text)
            if not self.headed:  # one head: h is an H-vector, `state h : P` a P-vector, `: 1` a number
                width = self.alias[n.text]
                if width != ONE and not width.isidentifier():
                    self.error(f"a width is a name (H, P) or 1, not '{width}'", w.loc)
                self.kinds[n.text] = Kind(width, ONE, True)
                self.leaf[n.text] = self.add(Node("state", (), self.kinds[n.text], n.loc, name=n.text))
                continue
            if not isinstance(w, ast.PerHead):
                self.error(f"state '{n.text}' needs its shape in a matrix-memory cell: 'state {n.text} : "
                           "(V, K) per head' (a matrix), ': K per head' (a vector) or ': 1 per head' (a "
                           "cell without 'per head' anywhere may leave it unshaped: an H-vector)",
                           n.loc if w is None else w.loc)
            self.kinds[n.text] = self.kind_of(w)
            self.leaf[n.text] = self.add(Node("state", (), self.kinds[n.text], n.loc, name=n.text))
        for n, kind, group in m.params:
            if group is not None:
                self.error(f"parameter groups are not supported in {self.what}; declare each "
                           "parameter with its shape", group.loc)
            if isinstance(kind, ast.ParamKind) and kind.count is None and self.is_width(kind.name.text):
                # `param mu_x : x`: one vector shared by the heads (RWKV-6's token-shift mixes); `: h`
                self.kinds[n.text] = Kind(self.width(kind.name.text), ONE, False)
                self.leaf[n.text] = self.add(Node("param", (), self.kinds[n.text], n.loc, name=n.text))
                continue
            if isinstance(kind, ast.ParamKind) and kind.count is None and kind.name.text == "scalar":
                self.kinds[n.text] = Kind(ONE, ONE, False)  # one number, shared by the heads
                self.leaf[n.text] = self.add(Node("param", (), self.kinds[n.text], n.loc, name=n.text))
                continue
            if not isinstance(kind, ast.PerHead) and not self.headed:
                state = m.states[0].text if m.states else "h"
                self.error(f"parameter '{n.text}' needs its shape: {self.shaped_example()}: 'param {n.text} "
                           f": ({state}, {state})' (a matrix; a state's name stands for its width, H), "
                           f"': {state}' (a vector) or ': scalar'", n.loc if kind is None else kind.name.loc)
            if not isinstance(kind, ast.PerHead):
                self.error(f"parameter '{n.text}' needs its shape in a matrix-memory cell: 'param {n.text} "
                           ": (K, I) per head' (a matrix), ': K per head' (a vector) or ': 1 per head'",
                           n.loc if kind is None else kind.name.loc)
            self.kinds[n.text] = self.kind_of(kind)
            self.leaf[n.text] = self.add(Node("param", (), self.kinds[n.text], n.loc, name=n.text))
        seen: dict[str, Loc] = {}
        for n in [*m.inputs, *m.states, *(p for p, _, _ in m.params), *(d for d, _ in m.definitions)]:
            if n.text in seen:
                self.error(f"'{n.text}' is declared twice (first on line {seen[n.text].line})", n.loc)
            seen[n.text] = n.loc
        for w in [*m.widths.values(), *(k for _, k, _ in m.params if isinstance(k, ast.PerHead))]:
            for width in (w.rows, w.cols) if isinstance(w, ast.PerHead) else ():
                if width not in (None, ONE) and not width.isidentifier():
                    self.error(f"a width is a name (K, V) or 1, not '{width}'", w.loc)
        self.declare_inits()

    def declare_inits(self) -> None:
        """`init` lines: the fixed forms (a number, zeros, ones, default, uniform(a), normal(std)) or an init
        expression (lang/inits.py) over the parameters set above, the widths, "heads" and `I`."""
        params = {n.text for n, _, _ in self.m.params}
        for names, value in self.m.inits:
            for n in names:
                if n.text not in params:
                    self.error(f"init of '{n.text}', which is not a parameter of this cell", n.loc)
                if n.text in self.inits:
                    first = self.inits[n.text].loc.line
                    self.error(f"'{n.text}' is initialised twice (first on line {first})", n.loc)
                if value.kind == "named" and value.name in params:  # init b = a: a parameter's value
                    value = ast.InitValue("expr", None, None, value.loc, ast.Var(value.name, value.loc))
                if value.kind == "named" and value.name not in ("zeros", "ones", "default"):
                    self.error(f"unknown initialiser '{value.name}' in {self.what}; expected a "
                               "number, zeros, ones, default, uniform(a), normal(std) or an init expression",
                               value.loc)
                if value.kind == "call" and value.name not in ("uniform", "normal"):
                    self.error(f"unknown initialiser '{value.name}(...)'; expected uniform(a) or normal(std)",
                               value.loc)
                if value.kind in ("constant", "call") and not math.isfinite(value.number):
                    self.error("the initial value must be a finite number", value.loc)
                if value.kind == "call" and value.number < 0:
                    self.error(f"{value.name}'s argument must not be negative, got {value.number:g}",
                               value.loc)
                if value.kind == "expr":
                    reads = check_init_expr(
                        value.expr, params=params, initialised=set(self.inits),
                        widths={*self.width_names, *(i.text for i in self.m.inputs), "I", "heads"},
                        error=lambda message, loc: CellError(message, self.source, loc))
                    mine = self.kinds[n.text]
                    for name, loc in reads.params:
                        other = self.kinds[name]
                        if not other.scalar and other != mine:
                            self.error(f"'{n.text}' is {self.words(mine)}, but its init expression reads "
                                       f"'{name}', {self.words(other)}; an init expression reads values of "
                                       "its shape or numbers", loc)
                    self.init_sizes.extend(w for w in reads.sizes if w not in self.init_sizes)
                self.inits[n.text] = value

    # ---- expressions -------------------------------------------------------------------------

    def value(self, name: str, loc: Loc) -> int:
        if name in self.leaf:
            return self.leaf[name]
        if name in self.defs:
            if name in self.built:
                return self.built[name]
            if name in self.building:
                self.error(f"'{name}' depends on itself", loc)
            self.building.add(name)
            try:
                self.built[name] = self.expr(self.defs[name][1])
            finally:
                self.building.discard(name)
            return self.built[name]
        if name.endswith(TRANSPOSE) and len(name) > 1:
            inner = self.value(name[:-1], loc)
            k = self.nodes[inner].kind
            return self.add(Node("transpose", (inner,), Kind(k.cols, k.rows, k.head), loc))
        if name in self.width_names:  # a width read as a number: the paper's 1 / sqrt(d_k)
            return self.add(Node("size", (), Kind(ONE, ONE, False), loc, name=name))
        if name in ("I", "eye"):
            return self.add(Node("eye", (), Kind("?", "?", False), loc))
        if name in CONSTANTS:
            return self.const(float(CONSTANTS[name]), loc)
        self.error(f"unknown name '{name}'", loc)

    def const(self, value: float, loc: Loc) -> int:
        return self.add(Node("const", (), Kind(ONE, ONE, False), loc, value=value))

    def expr(self, e) -> int:
        if isinstance(e, ast.Num):
            return self.const(float(e.text), e.loc)
        if isinstance(e, ast.Var):
            return self.value(e.name, e.loc)
        if isinstance(e, ast.NewVar):
            if e.name not in self.updates:
                self.error(f"'{e.name}'' is not a state with an update", e.loc)
            if e.name in self.building:
                self.error(f"'{e.name}'' depends on itself", e.loc)
            key = e.name + "'"
            if key not in self.built:
                self.building.add(e.name)
                try:
                    self.built[key] = self.expr(self.updates[e.name][1])
                finally:
                    self.building.discard(e.name)
            return self.built[key]
        if isinstance(e, ast.Neg):
            return self.pointwise(lambda a: -a, [self.expr(e.operand)], e.loc)
        if isinstance(e, ast.BinOp):
            if e.op == "^" and isinstance(e.right, ast.Var) and e.right.name == "T" and "T" not in self.leaf:
                inner = self.expr(e.left)
                k = self.nodes[inner].kind
                return self.add(Node("transpose", (inner,), Kind(k.cols, k.rows, k.head), e.loc))
            if e.op == "@":
                return self.matmul(self.expr(e.left), self.expr(e.right), e.loc)
            ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b,
                   "/": lambda a, b: a / b, "^": lambda a, b: a**b,
                   "<": lambda a, b: FUNCTIONS_LESS[0](a, b), "<=": lambda a, b: FUNCTIONS_LESS[1](a, b),
                   ">": lambda a, b: FUNCTIONS_LESS[0](b, a), ">=": lambda a, b: FUNCTIONS_LESS[1](b, a)}
            return self.pointwise(ops[e.op], [self.expr(e.left), self.expr(e.right)], e.loc)
        if isinstance(e, ast.Call):
            return self.call(e)
        raise AssertionError(type(e))

    def depends_on_state(self, i: int) -> bool:
        stack, seen = [i], set()
        while stack:
            j = stack.pop()
            if j in seen:
                continue
            seen.add(j)
            if self.nodes[j].op == "state":
                return True
            stack.extend(self.nodes[j].args)
        return False

    def prev(self, e: ast.Call) -> int:
        """`prev(v)`, `prev(v, k)`: v of k steps before (0 before the first step), for a value that depends
        on no state (the input, its projections: RWKV-6's token shift, Mamba's causal conv taps)."""
        if len(e.args) not in (1, 2):
            self.error(f"prev() takes 1 or 2 arguments (prev(x), prev(x, k)), got {len(e.args)}", e.loc)
        steps = 1
        if len(e.args) == 2:
            k = e.args[1]
            if not isinstance(k, ast.Num) or not k.text.isdigit() or not 1 <= int(k.text) <= MAX_SHIFT:
                self.error(f"prev(v, k) takes a whole number of steps k from 1 to {MAX_SHIFT}",
                           getattr(k, "loc", e.loc))
            steps = int(k.text)
        a = self.expr(e.args[0])
        if self.depends_on_state(a):
            self.error(f"prev() in {self.what} reads a value that depends on no state (the input or "
                       "its projections); a state's previous value is the state itself", e.loc)
        if self.nodes[a].op in ("const", "size", "eye"):
            self.error("prev() of a constant: write the constant (it is the same at every step)", e.loc)
        return self.add(Node("shift", (a,), self.nodes[a].kind, e.loc, value=steps))

    def call(self, e: ast.Call) -> int:
        if e.func == "prev":
            return self.prev(e)
        if e.func in ("max", "min") and len(e.args) == 1:  # over a value's elements; max(a, b) is elementwise
            a = self.expr(e.args[0])
            return self.add(Node(e.func, (a,), Kind(ONE, ONE, self.nodes[a].kind.head), e.loc))
        if e.func in ("diag", "norm", "sum", "mean"):
            if len(e.args) != 1:
                self.error(f"{e.func}() takes 1 argument, got {len(e.args)}", e.loc)
            a = self.expr(e.args[0])
            k = self.nodes[a].kind
            if e.func == "diag":
                if k.cols != ONE or k.rows == ONE:
                    self.error(f"diag() takes a vector, got {self.words(k)}", e.loc)
                return self.add(Node("diag", (a,), Kind(k.rows, k.rows, k.head), e.loc))
            if e.func == "norm":
                sq = self.pointwise(lambda x: x * x, [a], e.loc)
                total = self.add(Node("sum", (sq,), Kind(ONE, ONE, k.head), e.loc))
                return self.pointwise(sp.sqrt, [total], e.loc)
            return self.add(Node(e.func, (a,), Kind(ONE, ONE, k.head), e.loc))
        if e.func not in FUNCTIONS or e.func in REDUCTIONS:
            known = sorted({*FUNCTIONS, "diag", "norm", "prev"} - {"layernorm"})
            self.error(f"unknown function '{e.func}' in {self.what} (known: {', '.join(known)})", e.loc)
        arity, fn = FUNCTIONS[e.func]
        if len(e.args) != arity:
            self.error(f"{e.func}() takes {arity} argument{'s' * (arity > 1)}, got {len(e.args)}", e.loc)
        return self.pointwise(fn, [self.expr(a) for a in e.args], e.loc)

    def resolve_eye(self, i: int, width: str, loc: Loc) -> int:
        node = self.nodes[i]
        if node.op == "eye" and node.kind.rows == "?":
            return self.add(Node("eye", (), Kind(width, width, False), node.loc, name=width))
        return i

    def pointwise(self, fn, args: list[int], loc: Loc) -> int:
        kinds = [self.nodes[a].kind for a in args]
        shaped = [k for k in kinds if not k.scalar and k.rows != "?"]
        if any(k.rows == "?" for k in kinds):
            if not shaped or shaped[0].rows != shaped[0].cols:
                self.error("the identity I is a square matrix; its size comes from the square matrix it is "
                           "added to (I - β k @ kᵀ) or multiplied with (S @ I)", loc)
            args = [self.resolve_eye(a, shaped[0].rows, loc) for a in args]
            kinds = [self.nodes[a].kind for a in args]
        shape = next((k for k in kinds if not k.scalar), None)
        for k in kinds:
            if not k.scalar and (k.rows, k.cols) != (shape.rows, shape.cols):
                hint = ""
                if shape.cols == ONE and k.cols != ONE or k.cols == ONE and shape.cols != ONE:
                    hint = ("; to scale a matrix's rows write diag(a) @ S, for an outer product v @ kᵀ, "
                            "for a dot product kᵀ @ q")
                elif not self.headed:
                    hint = (f"; widths are names: the {shape.rows}-vector and the {k.rows}-vector "
                            f"are one width only if the parameters that make them say so "
                            f"(in a cell without heads a state's name in a shape stands for its width: "
                            f"W : (h, x) makes an H-vector)")
                self.error(f"elementwise operation on {self.words(shape)} and {self.words(k)}: elementwise "
                           f"operands have one shape, or one of them is one number{hint}", loc)
        head = any(k.head for k in kinds)
        kind = Kind(shape.rows, shape.cols, head) if shape else Kind(ONE, ONE, head)
        symbols = sp.symbols(f"a0:{len(args)}", real=True)
        if all(self.nodes[a].op == "const" for a in args):  # folded: 1 / 16 is a number
            try:
                value = evaluate(fn(*[sp.Float(self.nodes[a].value) for a in args]))
            except (ArithmeticError, ValueError):
                self.error("this constant expression has no finite real value", loc)
            return self.const(value, loc)
        expr = fn(*symbols)
        grads = tuple(sp.diff(expr, s) for s in symbols)
        return self.add(Node("pointwise", tuple(args), kind, loc, expr=expr, grads=grads))

    def matmul(self, a: int, b: int, loc: Loc) -> int:
        ka, kb = self.nodes[a].kind, self.nodes[b].kind
        if ka.rows == "?" and kb.rows == "?":
            self.error("I @ I: the identity's size comes from a matrix it meets", loc)
        if ka.rows == "?":
            a, ka = self.resolve_eye(a, kb.rows, loc), Kind(kb.rows, kb.rows, False)
        if kb.rows == "?":
            b, kb = self.resolve_eye(b, ka.cols, loc), Kind(ka.cols, ka.cols, False)
        if ka.scalar and self.nodes[a].op == "const" or kb.scalar and self.nodes[b].op == "const":
            self.error("@ multiplies matrices and vectors; write * for a number", loc)
        if ka.cols != kb.rows:
            hint = ""
            if ka.cols == ONE and kb.rows != ONE:
                left = "a transposed vector" if ka.rows != ONE else "a vector"
                hint = f"; did you mean {left} on the left (kᵀ @ q)?"
            elif kb.rows == ONE and ka.cols != ONE:
                hint = "; for an outer product write v @ kᵀ"
            self.error(f"@ needs the left side's columns to match the right side's rows: {self.words(ka)} @ "
                       f"{self.words(kb)}{hint}", loc)
        kind = Kind(ka.rows, kb.cols, ka.head or kb.head)
        if self.nodes[a].op == "diag":  # diag(d) @ B: B's rows scaled by the column d
            self.scaled_diags.add(a)
            return self.scale(self.nodes[a].args[0], b, kind, loc)
        if self.nodes[b].op == "diag":  # A @ diag(d): A's columns scaled by the row dᵀ
            self.scaled_diags.add(b)
            d = self.nodes[b].args[0]
            kd = self.nodes[d].kind
            row = self.add(Node("transpose", (d,), Kind(kd.cols, kd.rows, kd.head), loc))
            return self.scale(a, row, kind, loc)
        return self.add(Node("matmul", (a, b), kind, loc))

    def scale(self, a: int, b: int, kind: Kind, loc: Loc) -> int:
        """A product with diag(d) as the broadcast product a * b it is (see `scale` in the module
        docstring): its local derivatives are those of a0 * a1."""
        s0, s1 = sp.symbols("a0:2", real=True)
        return self.add(Node("scale", (a, b), kind, loc, expr=s0 * s1, grads=(s1, s0)))


def _less(a, b):
    from .functions import less

    return less(a, b)


def _less_equal(a, b):
    from .functions import less_equal

    return less_equal(a, b)


FUNCTIONS_LESS = (_less, _less_equal)


def _warn_unused(b: _Builder, results: list[int], source: Source) -> None:
    """A parameter, input or intermediate that no next state and not the output reads: a warning at it."""
    seen, stack = set(), list(results)
    while stack:
        i = stack.pop()
        if i not in seen:
            seen.add(i)
            stack.extend(b.nodes[i].args)
    unused = [(n.loc, f"parameter '{n.text}' is never used") for n, _, _ in b.m.params
              if b.leaf[n.text] not in seen]
    unused += [(n.loc, f"input '{n.text}' is never used") for n in b.m.inputs if b.leaf[n.text] not in seen]
    unused += [(n.loc, f"'{name}' is defined but never used") for name, (n, _) in b.defs.items()
               if b.built.get(name) not in seen]
    for loc, message in sorted(unused, key=lambda u: (u[0].line, u[0].column)):
        warnings.warn(warning_text(message, source, loc), CellWarning, stacklevel=4)


def build_tensor_ir(module: ast.Module, source: Source) -> TensorIR:
    """The matrix-memory IR of a parsed cell (see the module docstring); CellError on any mistake."""
    b = _Builder(module, source)
    b.declare()
    m = module
    states = [n.text for n in m.states]
    locs = {n.text: n.loc for n in m.states}
    missing = [n for n in m.states if n.text not in b.updates]
    if missing:
        raise_all([CellError(f"state '{n.text}' has no update: write {n.text}' = ...", source, n.loc)
                   for n in missing])
    for name, (n, _) in b.updates.items():
        if name not in b.kinds or name not in states:
            b.error(f"'{name}'' updates '{name}', which is not a declared state", n.loc)
    new_state = {}
    for s in states:
        n, e = b.updates[s]
        try:
            i = b.expr(e) if s + "'" not in b.built else b.built[s + "'"]
        except CellError as err:
            b.errors.append(err)
            continue
        b.built[s + "'"] = i
        got, want = b.nodes[i].kind, b.kinds[s]
        if (got.rows, got.cols) != (want.rows, want.cols) and not got.scalar:
            b.errors.append(CellError(f"{s}' is {b.words(got)}, but state '{s}' is declared {b.words(want)}",
                                      source, n.loc))
        new_state[s] = i
    for name, (n, _) in b.defs.items():  # every equation is checked, also one nothing reads
        try:
            b.value(name, n.loc)
        except CellError as err:
            b.errors.append(err)
    unique = {(e.line, e.column, e.message): e for e in b.errors}  # an equation read twice fails once
    raise_all([unique[k] for k in sorted(unique, key=lambda k: (k[0] or 0, k[1] or 0, k[2]))])
    if m.output is None:
        if len(states) != 1:
            b.error("a cell with several states must say which is its output: 'output NAME'", Loc(1, 1))
        output = states[0] + "'"
    else:
        output = m.output.text + ("'" if m.output.text in states else "")
        if output not in b.built and m.output.text not in b.defs:
            b.error(f"output '{m.output.text}' is neither a state nor an intermediate", m.output.loc)
    out = b.built[output] if output in b.built else b.value(m.output.text, m.output.loc)
    ko = b.nodes[out].kind
    if ko.cols != ONE and ko.rows != ONE:
        b.error(f"the output must be a vector per head (the layer concatenates the heads), "
                f"not {b.words(ko)}; read the matrix with a query (C @ q)",
                m.output.loc if m.output else Loc(1, 1))
    _warn_unused(b, [*new_state.values(), out], source)
    used = {w for k in b.kinds.values() for w in (k.rows, k.cols)}
    widths = sorted(used - {ONE, *[n.text for n in m.inputs]})
    nodes, index = _without(b.nodes, b.scaled_diags - {*new_state.values(), out})
    return TensorIR(
        name=m.name.text, source=source, inputs=[n.text for n in m.inputs], states=states, state_locs=locs,
        kinds=b.kinds, params=[n.text for n, _, _ in m.params], output=output, nodes=nodes,
        new_state={s: index[i] for s, i in new_state.items()}, output_node=index[out], widths=widths,
        inits=b.inits, init_sizes=b.init_sizes, heads=b.headed,
    )


def _without(nodes: list[Node], drop: set[int]) -> tuple[list[Node], dict[int, int]]:
    """nodes without those of `drop` that no node reads (a diag(d) only products read: they read d now),
    renumbered; and old index -> new index."""
    read = {j for n in nodes for j in n.args}
    keep = [i for i in range(len(nodes)) if i not in drop or i in read]
    index = {old: new for new, old in enumerate(keep)}
    return [dataclasses.replace(nodes[i], args=tuple(index[j] for j in nodes[i].args)) for i in keep], index
