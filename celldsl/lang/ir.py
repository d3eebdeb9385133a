"""AST -> IR: name resolution, semantic checks and SymPy expressions for one step of the cell.

Every intermediate is inlined, so each next-state expression is written in *leaf* symbols only:
inputs, previous states, vector/scalar parameters and one symbol per matrix product `W @ operand`.
Cell text is data: SymPy objects are built node by node from the tree, never from strings.
"""

from __future__ import annotations

import difflib
import math
import re
import warnings
from dataclasses import dataclass, field, replace

import sympy as sp

from . import ast
from .errors import CellError, CellWarning, Loc, Source, raise_all, warning_text
from .functions import CONSTANTS, FUNCTIONS, REDUCTIONS, Reduction, evaluate, less, less_equal
from .inits import InitReads, check_init_expr
from .widths import BROADCAST, Widths, width_words

H = "H"  # the size of every value of the step except expressions of inputs only
COMPARISONS = ("<", "<=", ">", ">=")
NAME = re.compile(r"(?!\d)\w+")  # as grammars/cell.lark spells a name
MAX_CONSTANT = 1e300  # beyond this a constant overflows float64 arithmetic
FLOAT32_MAX = 3.4028234663852886e38
# init values must give finite float32 parameters: uniform(a) draws from [-a, a) (torch needs 2a finite),
# normal(std) draws values many std from 0
INIT_LIMITS = {"constant": FLOAT32_MAX, "uniform": FLOAT32_MAX / 2, "normal": FLOAT32_MAX / 100}
# Resource guards: the backward is derived symbolically, and SymPy recurses over expressions and
# costs time that grows with their size. Zoo cells reach depth 12 and 102 nodes.
MAX_DEPTH = 60  # nesting depth of one value after inlining intermediates
MAX_SIZE = 5000  # nodes of one value after inlining intermediates (shared subexpressions counted each time)
# distinct nodes of the whole step (every next state, the output, every GEMM operand): what compiling
# costs grows with it (the derived backward and the C kernels are linear in it). The zoo's largest
# cell has 150; at the bound `check` takes seconds and the C kernels compile in under 30 s.
MAX_STEP_NODES = 6000
MAX_ERRORS = 20  # a file stops being checked after this many errors
MAX_SHIFT = 64  # prev(x, k): how far back an input may be read


def symbol(name: str) -> sp.Symbol:
    return sp.Symbol(name, real=True)


def generated(name: str) -> sp.Symbol:
    """A symbol the compiler makes (a GEMM operand, a CSE temporary): its name starts with '%', which
    no name in a cell file can hold, so it can never be a user's symbol. The other generated symbols
    are just as apart: products `W@`, `W@1`, carried `prev(v)`, gradients `grad[h']`."""
    return sp.Symbol("%" + name, real=True)


def generated_symbols(prefix: str):
    """%t0, %t1, ...: an endless supply of generated symbols (for sp.cse)."""
    return sp.numbered_symbols("%" + prefix, real=True)


@dataclass
class Param:
    name: str
    kind: str  # "matrix" | "vector" | "scalar"
    loc: Loc
    group: str | None = None
    operand_size: str | None = None  # matrices: the width of the values it reads (its columns)
    init: ast.InitValue | None = None
    used: bool = False
    declared_kind: str | None = None  # "scalar" when declared so; other kinds are inferred
    first_use: Loc | None = None  # matrices: where the operand size was fixed
    rows: str | None = None  # matrices: the width of what it gives (its rows); vectors: their width
    heads: int | None = None  # `heads(n)`: a block-diagonal matrix of n square blocks


@dataclass(frozen=True)
class MatrixTerm:
    """coef * W (or its transpose, or the identity "eye") in a combination `(W - Wᵀ - g * eye) @ h`."""

    coef: sp.Expr  # a number, or an expression of scalar parameters
    matrix: str  # a matrix parameter, or EYE
    transposed: bool = False


EYE = "eye"


@dataclass(frozen=True)
class Product:
    """`param @ operand`: one block of rows of a concatenated GEMM. For a combination of matrices
    (`(W - Wᵀ) @ h`), `param` is its display name and `terms` its parts; the layer builds the
    weight from them once per call, and autograd takes its gradient through them."""

    symbol: sp.Symbol
    param: str
    operand: sp.Expr
    loc: Loc
    rows: str = "H"  # the product's width
    cols: str = "H"  # the operand's width
    terms: tuple[MatrixTerm, ...] | None = None
    heads: int | None = None  # a block-diagonal matrix of this many blocks (targets/gemm.py)


@dataclass
class CellIR:
    name: str
    doc: str | None
    cite: str | None
    source: Source
    inputs: list[str]
    states: list[str]  # declared states, then one extra state per prev(v), in order of first use
    declared_states: int
    output: str  # name of a state (its new value) or of an intermediate; without an `output` line the
    # (only) state
    output_expr: sp.Expr
    params: dict[str, Param]
    groups: dict[str, list[str]]  # stored tensors holding several parameters, rows in this order
    new_states: dict[str, sp.Expr]  # state -> its value at the end of the step, in leaf symbols
    products: dict[sp.Symbol, Product]
    widths: dict[str, str] = field(default_factory=dict)  # state, input, vector -> its width (widths.py)
    shifted: dict[str, tuple[str, int]] = field(default_factory=dict)  # "prev(x)" -> (input x, steps back)
    # mean(v) -> (v's width, every place in the text that writes it, in text order)
    reduced: dict[sp.Basic, tuple[str, tuple[Loc, ...]]] = field(default_factory=dict)
    same_widths: dict[tuple[str, str], Loc] = field(default_factory=dict)  # must be equal at run time
    locations: dict[str, Loc] = field(default_factory=dict)
    output_declared: bool = True  # False: no `output` line, so the output is the cell's one state
    init_sizes: tuple[str, ...] = ()  # sizes only init expressions read (chrono's T_max): the layer's sizes=

    @property
    def needs_hidden_size(self) -> dict[str, Loc]:
        """input -> a use that needs its size == H (the constraints between an input and H)."""
        return {
            a if b == H else b: loc
            for (a, b), loc in self.same_widths.items()
            if H in (a, b) and ({a, b} - {H}) <= set(self.inputs)
        }

    def width(self, name: str) -> str:
        return self.widths[name]


class _Builder:
    def __init__(self, module: ast.Module, source: Source):
        self.m = module
        self.src = source
        self.inputs = {n.text: n for n in module.inputs}
        self.states = {n.text: n for n in module.states}
        self.params: dict[str, Param] = {}
        self.groups: dict[str, list[str]] = {}
        self.defs: dict[str, tuple[ast.Name, object]] = {}
        self.updates: dict[str, tuple[ast.Name, object]] = {}
        self.resolved: dict[str, tuple[sp.Expr, str]] = {}  # intermediate -> (expr, size)
        self.resolved_new: dict[str, tuple[sp.Expr, str]] = {}
        self.products: dict[tuple[str, sp.Expr], Product] = {}
        self.prev_states: dict[str, str] = {}  # intermediate -> carried state name
        self.prev_uses: dict[str, Loc] = {}  # intermediate -> its first prev(...) in the text
        self.shifted: dict[str, tuple[str, int]] = {}  # "prev(x)" -> (input, k): earlier inputs read
        self.shift_uses: dict[str, Loc] = {}  # "prev(x)" -> its first use in the text
        self.reduced: dict[sp.Basic, tuple[str, list[Loc]]] = {}  # mean(v) -> (v's width class, places)
        self.widths = Widths(list(self.inputs))
        self.width_of: dict[str, str] = {}  # input or state -> its width (declared, or H / its name)
        self.constants: set[sp.Expr] = set()  # values that are numbers (folded and checked)
        self.sizes: dict[sp.Basic, tuple[int, int]] = {}  # memo of measure()
        self.applications: dict[str, int] = {}  # matrix -> index of its last product symbol
        self.step_nodes: set[sp.Basic] = set()  # distinct nodes of what the step computes (count_step)
        self.errors: list[CellError] = []  # every problem found, reported together (raise_all)
        self.failed: set[str] = set()  # equations that failed or read one that did
        self.poisoned: set[str] = set()  # names whose declaration failed
        self.init_reads: dict[str, InitReads] = {}  # init line's name -> what its expression reads

    def error(self, message: str, loc: Loc | None) -> CellError:
        return CellError(message, self.src, loc)

    # ---- declarations ------------------------------------------------------------------------

    def declare(self) -> None:
        """Names, kinds and equations of the file. Each problem is reported (`attempt`) and the rest
        is still checked; a name whose declaration failed is `poisoned`, so its uses say nothing more."""
        m = self.m
        if not (m.name or m.inputs or m.states or m.params or m.definitions or m.updates):
            raise self.error(
                "the file holds no cell; a cell needs at least 'input x', 'state h' and an equation h' = ...",
                Loc(1, 1),
            )
        if not m.inputs:
            self.report(self.error("the cell declares no input; add a line such as 'input x'", Loc(1, 1)))
        if not m.states:
            self.report(self.error("the cell declares no state; add a line such as 'state h'", Loc(1, 1)))
        taken: dict[str, tuple[str, Loc]] = {}

        def claim(name: ast.Name, what: str) -> None:
            if name.text in FUNCTIONS or name.text == "prev":
                raise self.error(f"'{name.text}' is a function name and cannot name {what}", name.loc)
            if name.text in taken:
                other, loc = taken[name.text]
                raise self.error(
                    f"'{name.text}' is declared twice (as {other} on line {loc.line}, and here as {what})",
                    name.loc,
                )
            taken[name.text] = (what, name.loc)

        for n in m.inputs:
            self.attempt(claim, n, "an input")
        misdeclared = {n.text for n in m.states if not self.attempt(claim, n, "a state")}
        for n in [*m.inputs, *m.states]:
            self.attempt(self._declare_width, n)
        for group, members in m.groups:
            if self.attempt(claim, group, "a parameter group"):
                self.groups[group.text] = [x.text for x in members]
        for n, kind, group in m.params:
            if not self.attempt(self._declare_param, n, kind, group, claim) and n.text not in self.params:
                self.poisoned.add(n.text)
        for name, expr in m.definitions:
            if not self.attempt(self._declare_definition, name, expr, taken):
                self.poisoned.add(name.text)
                misdeclared.add(name.text)  # `h = ...` for a state h: no second error that h' is missing
        for name, expr in m.updates:
            self.attempt(self._declare_update, name, expr)
        for s in m.states:
            if s.text not in self.updates and s.text not in misdeclared:
                self.report(
                    self.error(f"state '{s.text}' is never updated; add an equation {s.text}' = ...", s.loc)
                )
        for names, value in m.inits:
            for n in names:
                self.attempt(self._declare_init, n, value)

    def _declare_width(self, n: ast.Name) -> None:
        """An input's width is its own name (its size is the layer's input size) unless declared `: 1`;
        a state's is H unless declared (`state h : P`, or `: 1` for one value per sequence)."""
        is_input = n.text in self.inputs
        default = n.text if is_input else H
        declared = self.m.widths.get(n.text)
        self.width_of.setdefault(n.text, default)
        if declared is None:
            return
        if declared.text == "1":
            self.width_of[n.text] = "row"
        elif is_input or not NAME.fullmatch(declared.text):
            what = (
                "an input's width is the size the layer is given, so only ': 1' (one value per "
                "sequence) can be declared"
                if is_input
                else "a width is a name such as P, or 1"
            )
            raise self.error(f"'{declared.text}' cannot be a width here; {what}", declared.loc)
        else:
            self.width_of[n.text] = declared.text

    def _declare_param(self, n: ast.Name, kind: ast.ParamKind | None, group: ast.Name | None, claim) -> None:
        claim(n, "a parameter")
        group_name = group.text if group else None
        p = self.params[n.text] = Param(n.text, "", n.loc, group=group_name)
        if kind is None:
            return
        word, count = kind.name.text, kind.count
        if word == "heads" and count is not None:
            heads = float(count)
            if heads != int(heads) or heads < 1:
                raise self.error(
                    f"heads({count}): the number of heads is a positive whole number", kind.name.loc
                )
            p.declared_kind, p.heads = "matrix", int(heads)
        elif word in ("scalar", "vector", "matrix") and count is None:
            p.declared_kind = word
        else:
            raise self.error(
                f"unknown parameter kind '{word}{f'({count})' if count else ''}'; expected 'scalar', "
                "'vector', 'matrix' or 'heads(n)' (only scalars must be declared: vectors and matrices are "
                "inferred from use)",
                kind.name.loc,
            )

    def _declare_definition(self, name: ast.Name, expr, taken: dict) -> None:
        if name.text in taken and name.text not in self.defs:
            what, loc = taken[name.text]
            hint = f"; write {name.text}' = ... for its next value" if what == "a state" else ""
            raise self.error(
                f"'{name.text}' is {what} (line {loc.line}) and cannot be assigned{hint}", name.loc
            )
        if name.text in self.defs:
            first = self.defs[name.text][0].loc
            raise self.error(f"'{name.text}' is assigned twice (first on line {first.line})", name.loc)
        if name.text in FUNCTIONS or name.text == "prev":
            raise self.error(f"'{name.text}' is a function name and cannot be assigned", name.loc)
        self.defs[name.text] = (name, expr)

    def _declare_update(self, name: ast.Name, expr) -> None:
        if name.text not in self.states:
            raise self.error(
                f"'{name.text}' is not a state, so it has no next value {name.text}'; declare it with "
                f"'state {name.text}' or write '{name.text} = ...'",
                name.loc,
            )
        if name.text in self.updates:
            first = self.updates[name.text][0].loc
            raise self.error(f"'{name.text}'' is assigned twice (first on line {first.line})", name.loc)
        self.updates[name.text] = (name, expr)

    def _declare_init(self, n: ast.Name, value: ast.InitValue) -> None:
        if n.text not in self.params and n.text not in self.groups:
            raise self.error(self._unknown(n.text, "parameter", self.params), n.loc)
        if value.kind == "named" and value.name in self.params:  # init b_i = b_f: a parameter's value
            value = ast.InitValue("expr", None, None, value.loc, ast.Var(value.name, value.loc))
        self._check_init(value)
        if value.kind == "expr":
            declared = {w.text for w in self.m.widths.values() if isinstance(w, ast.Name)}
            reads = check_init_expr(
                value.expr, params=self.params, initialised={p for p, v in self.params.items() if v.init},
                widths={H, "I", *self.inputs, *declared}, error=self.error)
            self.init_reads[n.text] = reads
        for t in self.groups.get(n.text, [n.text]):
            first = self.params[t].init
            if first is not None:
                what = f"'{t}'" + (f" (in group '{n.text}')" if n.text != t else "")
                raise self.error(f"{what} is initialised twice (first on line {first.loc.line})", n.loc)
            self.params[t].init = value

    # ---- reporting every problem -----------------------------------------------------------------

    def report(self, err: CellError) -> None:
        self.errors.extend(err.errors)
        if len(self.errors) >= MAX_ERRORS:  # as compilers stop: what follows is mostly noise
            raise _Stop

    def attempt(self, fn, *args) -> bool:
        """Run one check; a CellError is reported, not raised, so the next independent check runs."""
        try:
            fn(*args)
            return True
        except CellError as err:
            self.report(err)
            return False

    def _check_init(self, v: ast.InitValue) -> None:
        if v.kind == "named" and v.name not in ("zeros", "ones", "orthogonal", "default"):
            raise self.error(
                f"unknown initialiser '{v.name}'; expected a number, zeros, ones, orthogonal, default, "
                "uniform(a) or normal(std)",
                v.loc,
            )
        if v.kind == "call" and v.name not in ("uniform", "normal"):
            raise self.error(
                f"unknown initialiser '{v.name}(...)'; expected uniform(a) or normal(std)", v.loc
            )
        if v.kind in ("constant", "call") and not math.isfinite(v.number):
            raise self.error("the initial value must be a finite number", v.loc)
        if v.kind == "call" and v.number < 0:
            what = "the half-width a of uniform(a)" if v.name == "uniform" else "the standard deviation"
            raise self.error(f"{what} must not be negative, got {v.number:g}", v.loc)
        limit = INIT_LIMITS.get(v.name if v.kind == "call" else v.kind)
        if limit is not None and abs(v.number) > limit:
            raise self.error(
                f"{v.number:g} is too large for an initial value here (at most {limit:.3g}): parameters are "
                "float32 by default, whose largest number is 3.4e38",
                v.loc,
            )

    def _unknown(self, name: str, what: str, pool) -> str:
        close = difflib.get_close_matches(name, list(pool), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return f"unknown {what} '{name}'{hint}"

    # ---- expressions -------------------------------------------------------------------------

    def names_in_scope(self):
        return [*self.inputs, *self.states, *self.params, *self.defs]

    def expr(self, node) -> tuple[sp.Expr, str]:
        """SymPy expression and size ('H', an input's name, or '1' for scalars) of an AST node."""
        if isinstance(node, ast.Num):
            value = float(node.text)
            if not math.isfinite(value) or abs(value) > MAX_CONSTANT:
                raise self.error(f"the number {node.text} is too large", node.loc)
            exact = "e" not in node.text.lower() and len(node.text) <= 16
            number = sp.Rational(node.text) if exact else sp.Float(value)
            self.constants.add(number)
            return number, "1"
        if isinstance(node, ast.Var):
            return self.var(node)
        if isinstance(node, ast.NewVar):
            if node.name not in self.states:
                raise self.error(f"'{node.name}' is not a state, so {node.name}' has no meaning", node.loc)
            return self.resolve_new(node.name)
        if isinstance(node, ast.Neg):
            value, size = self.expr(node.operand)
            return self.fold(-value, value in self.constants, node.loc), size
        if isinstance(node, ast.Call):
            return self.call(node)
        if isinstance(node, ast.BinOp):
            if node.op == "@":
                return self.matmul(node)
            if node.op in COMPARISONS:
                return self.compare(node)
            if node.op == "^":
                (a, sa), (b, sb) = self.expr(node.left), self.expr(node.right)
                size = self.join([(sa, node.left.loc), (sb, node.right.loc)])
                if a in self.constants and b in self.constants:
                    return self.constant_power(a, b, node.loc), size
                return sp.Pow(a, b), size
            return self.chain(node)
        raise AssertionError(f"unexpected node {node!r}")

    def compare(self, node: ast.BinOp) -> tuple[sp.Expr, str]:
        """a < b (a > b is b < a): 1 where it holds, else 0."""
        (a, sa), (b, sb) = self.expr(node.left), self.expr(node.right)
        size = self.join([(sa, node.left.loc), (sb, node.right.loc)])
        if node.op in (">", ">="):
            a, b = b, a
        make = less if node.op in ("<", ">") else less_equal
        return self.fold(make(a, b), a in self.constants and b in self.constants, node.loc), size

    def chain(self, node: ast.BinOp) -> tuple[sp.Expr, str]:
        """a + b - c * d ...: the left spine of + - * / is walked in a loop, not recursively, and each
        run of + - (or * /) becomes one SymPy Add (Mul), so a sum of thousands of terms costs linear
        time and no stack (syntax.py's depth check does not count that spine)."""
        spine = []
        while isinstance(node, ast.BinOp) and node.op in "+-*/":
            spine.append(node)
            node = node.left
        first, size = self.expr(node)
        left_loc, group, terms = node.loc, None, [first]
        for n in reversed(spine):
            b, sb = self.expr(n.right)
            size = self.join([(size, left_loc), (sb, n.right.loc)])
            if n.op == "/" and b == 0:
                divisor = n.right
                if isinstance(divisor, ast.Var) and divisor.name in self.defs:  # the definition is the cause
                    name = self.defs[divisor.name][0]
                    raise self.error(
                        f"division by zero: '{divisor.name}' is zero (it is divided by on line "
                        f"{divisor.loc.line})",
                        name.loc,
                    )
                raise self.error("division by zero", divisor.loc)
            op_group = "+" if n.op in "+-" else "*"
            if group is not None and op_group != group:
                terms = [self.combine(group, terms, left_loc)]
            group = op_group
            if n.op == "-":
                b = self.fold(-b, b in self.constants, n.right.loc)
            elif n.op == "/":
                b = self.fold(1 / b, b in self.constants, n.right.loc)
            terms.append(b)
            left_loc = n.loc
        return self.combine(group, terms, left_loc), size

    def combine(self, group: str | None, terms: list[sp.Expr], loc: Loc) -> sp.Expr:
        """One Add or Mul of a run of terms; its constant terms are folded (and checked) first."""
        if group is None:
            return terms[0]
        op = sp.Add if group == "+" else sp.Mul
        consts = [t for t in terms if t in self.constants]
        others = [t for t in terms if t not in self.constants]
        if len(consts) > 1:
            consts = [self.fold(op(*consts), True, loc)]
        return self.fold(op(*consts, *others), not others, loc)

    def fold(self, value: sp.Expr, const: bool, loc: Loc) -> sp.Expr:
        """A constant must be a finite real number (log(0), sqrt(-1), 1e200^2 are errors); constants
        that are not rational are folded to a float, so every backend prints a plain number."""
        if not const:
            return value
        try:
            number = evaluate(value)
        except OverflowError:
            raise self.error("this constant is too large (it overflows float64)", loc) from None
        except ZeroDivisionError:
            raise self.error(
                "this constant is not a finite number (division by zero or log(0)?)", loc
            ) from None
        except (ValueError, TypeError):
            raise self.error(
                "this constant is not a real number (the log or a root of a negative number?)", loc
            ) from None
        if abs(number) > MAX_CONSTANT:
            raise self.error("this constant is too large", loc)
        if not value.is_Rational:
            value = sp.Float(number)
        self.constants.add(value)
        return value

    def constant_power(self, a: sp.Expr, b: sp.Expr, loc: Loc) -> sp.Expr:
        """a ^ b of two constants, sized up in floating point before SymPy computes it exactly
        (2 ^ 10000000000 would take SymPy minutes)."""
        try:
            approx = math.pow(float(a), float(b))
        except OverflowError:
            raise self.error("this constant is too large", loc) from None
        except (ValueError, ZeroDivisionError):
            what = "0 to a negative power" if a == 0 else "not a real number"
            raise self.error(f"this constant is {what}", loc) from None
        exact = a.is_Rational and b.is_Integer and abs(b) <= 64
        return self.fold(sp.Pow(a, b) if exact else sp.Float(approx), True, loc)

    def join(self, parts: list[tuple[str, Loc]]) -> str:
        """The width of an elementwise combination (widths.py): unknowns are fixed by it, and two named
        widths meeting (an input and H) must be equal at run time, checked at the place they met."""
        return self.widths.join(parts)

    def var(self, node: ast.Var) -> tuple[sp.Expr, str]:
        name = node.name
        if name in self.inputs or name in self.states:
            return symbol(name), self.widths.named(self.width_of.get(name, H), node.loc)
        if name in self.params:
            p = self.params[name]
            p.used = True
            if p.declared_kind == "scalar":
                p.kind = "scalar"
                return symbol(name), "1"
            if p.kind == "matrix" or p.declared_kind == "matrix":
                where = f"applied with @ on line {p.first_use.line}" if p.first_use else "declared so"
                raise self.error(
                    f"'{name}' is a matrix ({where}) but is used elementwise here; write {name} @ (...)",
                    node.loc,
                )
            p.kind = "vector"
            p.first_use = p.first_use or node.loc
            p.rows = p.rows or self.widths.unknown(name)
            return symbol(name), p.rows
        if name in self.defs:
            return self.resolve(name)
        if name in self.poisoned:
            raise _Skip(name)
        if name in CONSTANTS:
            return self.fold(CONSTANTS[name], True, node.loc), "1"
        if name in self.groups:
            raise self.error(
                f"'{name}' is a parameter group (storage); use its members {', '.join(self.groups[name])}",
                node.loc,
            )
        raise self.error(self._unknown(name, "name", self.names_in_scope()), node.loc)

    def resolve(self, name: str) -> tuple[sp.Expr, str]:
        """The value of intermediate `name`. `build` resolves equations in dependency order (see
        `order`, which also reports cycles), so what this reads is resolved already."""
        if name in self.resolved:
            return self.resolved[name]
        if name in self.failed:
            raise _Skip(name)
        value, size = self.expr(self.defs[name][1])
        self.check_cost(value, f"'{name}'", self.defs[name][0].loc)
        self.resolved[name] = (value, size)
        return value, size

    def resolve_new(self, state: str) -> tuple[sp.Expr, str]:
        key = state + "'"
        if key in self.resolved_new:
            return self.resolved_new[key]
        if key in self.failed or state not in self.updates:
            raise _Skip(key)
        name, node = self.updates[state]
        value, size = self.expr(node)
        self.check_cost(value, f"{state}'", name.loc)
        self.count_step(value, name.loc)
        width = self.widths.named(self.width_of.get(state, H), name.loc)
        if width == "row" and size not in BROADCAST:  # unify would make the state's "row" a class name
            raise self.error(
                f"'{state}' is declared ': 1' (one value per sequence), but {state}' here has "
                f"{width_words(self.widths.resolve(size), list(self.inputs))}; reduce it to one value with "
                "mean(...) or sum(...)",
                node.loc,
            )
        if size not in BROADCAST:
            width = self.widths.unify(width, size, node.loc)
        self.resolved_new[key] = (value, width)
        return value, width

    def check_cost(self, value: sp.Expr, what: str, loc: Loc) -> None:
        """Refuse values too deep or too large for SymPy to differentiate in reasonable time."""
        size, depth = self.measure(value)
        if depth > MAX_DEPTH:
            raise self.error(
                f"{what} is nested {depth} levels deep once intermediates are put in (the limit is "
                f"{MAX_DEPTH}); the derivative of so deep an expression is not built",
                loc,
            )
        if size > MAX_SIZE:
            raise self.error(
                f"{what} has {size} operations once intermediates are put in (the limit is {MAX_SIZE}); "
                "the derivative of so large an expression is not built",
                loc,
            )
        for atom in value.atoms():  # e.g. h * 1e200 * 1e200 written over two intermediates
            if atom.is_number and not _plain_number(atom):
                raise self.error(f"{what} has a coefficient that is not a finite number below 1e300", loc)

    def measure(self, value: sp.Expr) -> tuple[int, int]:
        """(tree size, depth) of a SymPy expression, memoised over shared subexpressions."""
        memo = self.sizes
        stack = [(value, False)]
        while stack:
            node, ready = stack.pop()
            if node in memo:
                continue
            if ready:
                kids = [memo[a] for a in node.args]
                memo[node] = (1 + sum(k[0] for k in kids), 1 + max((k[1] for k in kids), default=0))
            else:
                stack.append((node, True))
                stack.extend((a, False) for a in node.args if a not in memo)
        return memo[value]

    def call(self, node: ast.Call) -> tuple[sp.Expr, str]:
        if node.func == "prev":
            if not node.args or not isinstance(node.args[0], ast.Var):
                raise self.error(
                    "prev takes a name: prev(v) for an intermediate or input v, prev(x, k) for "
                    "an input k steps back",
                    node.loc,
                )
            target = node.args[0].name
            if target in self.inputs:
                return self.prev_input(node, target)
            if len(node.args) != 1:
                raise self.error(
                    f"prev({target}, k) reaches back k steps for inputs only; '{target}' is not an "
                    "input (write prev(prev_v) with an intermediate for two steps)",
                    node.loc,
                )
            if target in self.states:
                raise self.error(
                    f"'{target}' is a state: its previous value is just '{target}'", node.args[0].loc
                )
            if target not in self.defs:
                raise self.error(self._unknown(target, "intermediate", self.defs), node.args[0].loc)
            carried = self.prev_states.setdefault(target, f"prev({target})")
            first = self.prev_uses.get(target)
            if first is None or (node.loc.line, node.loc.column) < (first.line, first.column):
                self.prev_uses[target] = node.loc  # the carried states come in the order the text uses them
            return symbol(carried), self.widths.unknown(carried)
        if node.func not in FUNCTIONS:
            raise self.error(self._unknown(node.func, "function", [*FUNCTIONS, "prev"]), node.loc)
        arity, make = FUNCTIONS[node.func]
        if len(node.args) != arity:
            plural = "argument" if arity == 1 else "arguments"
            raise self.error(f"{node.func} takes {arity} {plural}, got {len(node.args)}", node.loc)
        args = [self.expr(a) for a in node.args]
        if node.func in REDUCTIONS:
            return self.reduction(node, make, *args[0])
        size = self.join([(s, a.loc) for (_, s), a in zip(args, node.args, strict=True)])
        if node.func == "where" and args[0][0] in self.constants:  # a constant condition picks a branch
            return args[1][0] if args[0][0] != 0 else args[2][0], size
        const = all(a in self.constants for a, _ in args)
        return self.fold(make(*(a for a, _ in args)), const, node.loc), size

    def reduction(self, node: ast.Call, make, value: sp.Expr, width: str) -> tuple[sp.Expr, str]:
        """mean(v), sum(v): one value per row (width "row"); layernorm(v): v's width. v must have a
        width to reduce over (not a number, a scalar or one value per row)."""
        if width in BROADCAST:
            raise self.error(
                f"{node.func}(...) reduces over the elements of a vector-wide value; this one is "
                f"{'a constant or scalar' if width == '1' else 'one value per sequence'}",
                node.args[0].loc,
            )
        result = make(value)
        for r in sorted(result.atoms(Reduction), key=sp.default_sort_key):
            places = self.reduced.setdefault(r, (width, []))[1]
            if node.loc not in places:
                places.append(node.loc)
        return result, (width if node.func == "layernorm" else "row")

    def prev_input(self, node: ast.Call, target: str) -> tuple[sp.Expr, str]:
        """prev(x) or prev(x, k): input x of k steps before, zero at the first k steps of a sequence
        (a shifted read of x; the GEMMs that read it are still hoisted out of the loop)."""
        k = 1
        if len(node.args) > 2:
            raise self.error("prev takes one or two arguments: prev(x) or prev(x, k)", node.loc)
        if len(node.args) == 2:
            value, _ = self.expr(node.args[1])
            if value not in self.constants or not value.is_Integer or not 1 <= int(value) <= MAX_SHIFT:
                raise self.error(
                    f"k in prev(x, k) must be a whole number from 1 to {MAX_SHIFT}", node.args[1].loc
                )
            k = int(value)
        name = f"prev({target})" if k == 1 else f"prev({target}, {k})"
        self.shifted[name] = (target, k)
        first = self.shift_uses.get(name)
        if first is None or (node.loc.line, node.loc.column) < (first.line, first.column):
            self.shift_uses[name] = node.loc
        return symbol(name), self.widths.named(self.width_of.get(target, target), node.loc)

    def matmul(self, node: ast.BinOp) -> tuple[sp.Expr, str]:
        """`M @ v`: M is a matrix parameter, its transpose (`Wᵀ`, `W^T`), the identity (`eye`, `I`), or
        a sum of those times numbers and scalar parameters (`(W - Wᵀ - gamma * eye) @ h`)."""
        terms = self.matrix_terms(node.left)
        operand, size = self.expr(node.right)
        if size in BROADCAST:
            raise self.error(
                "the right side of @ must be an input or a vector-wide value, not a scalar or "
                "one value per sequence",
                node.loc,
            )
        if not any(s.name not in self.params for s in operand.free_symbols):
            raise self.error(
                "the right side of @ depends on parameters only; apply a matrix to a value computed from "
                "the input or the state",
                node.right.loc,
            )
        self.check_cost(operand, "the right side of @", node.right.loc)
        out = None
        for term in terms:
            if term.matrix == EYE:
                reads, gives = size, size
            else:
                p = self.params[term.matrix]
                p.kind, p.used = "matrix", True
                p.rows = p.rows or self.widths.unknown(p.name + ".rows")
                if p.operand_size is None:
                    p.operand_size, p.first_use = self.widths.unknown(p.name + ".cols"), node.loc
                reads, gives = (p.rows, p.operand_size) if term.transposed else (p.operand_size, p.rows)
                if not self.widths.same(reads, size):
                    raise self.error(
                        f"'{p.name}' is applied to operands of different sizes: "
                        f"{width_words(self.widths.resolve(reads), list(self.inputs))} on line "
                        f"{p.first_use.line} and "
                        f"{width_words(self.widths.resolve(size), list(self.inputs))} here",
                        node.loc,
                    )
            if out is not None and not self.widths.same(out, gives):
                raise self.error(
                    "the matrices of this combination have different numbers of rows", node.left.loc
                )
            out = gives
        plain = len(terms) == 1 and terms[0].coef == 1 and not terms[0].transposed and terms[0].matrix != EYE
        heads = {self.params[t.matrix].heads for t in terms if t.matrix != EYE}
        if not plain and heads - {None}:
            raise self.error(
                "a matrix with heads cannot be scaled, transposed or combined with others; apply it alone",
                node.left.loc,
            )
        name = terms[0].matrix if plain else _combination_name(terms)
        key = (name, operand)
        if key not in self.products:
            index = self.applications[name] = self.applications.get(name, -1) + 1
            sym = symbol(f"{name}@{index}" if index else f"{name}@")
            self.products[key] = Product(
                sym,
                name,
                operand,
                node.loc,
                rows=out,
                cols=size,
                terms=None if plain else tuple(terms),
                heads=self.params[name].heads if plain else None,
            )
            self.count_step(operand, node.loc)
        return self.products[key].symbol, out

    def matrix_terms(self, node) -> list[MatrixTerm]:
        """The left side of @ as a sum of coef * matrix terms, like terms merged, in a canonical order."""
        merged: dict[tuple[str, bool], sp.Expr] = {}
        for term in self._terms(node, sp.Integer(1)):
            key = (term.matrix, term.transposed)
            merged[key] = merged.get(key, sp.Integer(0)) + term.coef
        terms = [MatrixTerm(coef, m, t) for (m, t), coef in sorted(merged.items()) if coef != 0]
        if not terms:
            raise self.error("this combination of matrices is zero", node.loc)
        return terms

    def _terms(self, node, coef: sp.Expr) -> list[MatrixTerm]:
        if isinstance(node, ast.Var):
            return [self._matrix_leaf(node, coef)]
        if (
            isinstance(node, ast.BinOp)
            and node.op == "^"
            and isinstance(node.right, ast.Var)
            and node.right.name == "T"
            and "T" not in self.names_in_scope()
            and isinstance(node.left, ast.Var)
        ):
            leaf = self._matrix_leaf(node.left, coef)
            return [MatrixTerm(coef, leaf.matrix, not leaf.transposed)]
        if isinstance(node, ast.Neg):
            return self._terms(node.operand, -coef)
        if isinstance(node, ast.BinOp) and node.op in "+-":
            right = self._terms(node.right, -coef if node.op == "-" else coef)
            return self._terms(node.left, coef) + right
        if isinstance(node, ast.BinOp) and node.op in "*/":
            # papers write the coefficient first (gamma * eye, beta * (M - Mᵀ)): the right factor is the
            # matrix when it can be one
            sides = (
                [(node.right, node.left), (node.left, node.right)]
                if node.op == "*"
                else [(node.left, node.right)]
            )
            for matrix, scale in sides:
                if self._mentions_matrix(matrix):
                    value = self._scalar_coefficient(scale)
                    return self._terms(matrix, coef * (1 / value if node.op == "/" else value))
        if isinstance(node, ast.Call) and node.func not in FUNCTIONS and node.func != "prev":
            raise self.error(self._unknown(node.func, "function", [*FUNCTIONS, "prev"]), node.loc)
        raise self.error(
            "the left side of @ must be a matrix parameter, its transpose (Wᵀ or W^T), eye, or a sum of "
            "those times numbers or scalar parameters; not this expression",
            node.loc,
        )

    def _matrix_leaf(self, node: ast.Var, coef: sp.Expr) -> MatrixTerm:
        name, transposed = node.name, False
        if name not in self.names_in_scope() and name.endswith("ᵀ") and name[:-1] in self.params:
            name, transposed = name[:-1], True
        if name in ("eye", "I") and name not in self.names_in_scope():
            return MatrixTerm(coef, EYE)
        if name in self.poisoned:
            raise _Skip(name)
        if name not in self.params:
            what = (
                f"'{name}'" if name in self.names_in_scope() else self._unknown(name, "matrix", self.params)
            )
            raise self.error(
                f"the left side of @ must be a matrix parameter declared with 'param', not {what}", node.loc
            )
        p = self.params[name]
        if p.declared_kind == "scalar":
            raise self.error(f"'{p.name}' is declared scalar and cannot be applied with @", node.loc)
        if p.declared_kind == "vector":
            raise self.error(f"'{p.name}' is declared a vector and cannot be applied with @", node.loc)
        if p.kind == "vector":
            raise self.error(
                f"'{p.name}' is used elementwise on line {p.first_use.line} (a vector) and as a matrix here",
                node.loc,
            )
        if p.heads is not None and transposed:
            raise self.error(f"'{p.name}' has heads: its transpose is not supported", node.loc)
        return MatrixTerm(coef, name, transposed)

    def _mentions_matrix(self, node) -> bool:
        stack = [node]
        while stack:
            n = stack.pop()
            if isinstance(n, ast.Var):
                name = n.name.removesuffix("ᵀ") if n.name not in self.names_in_scope() else n.name
                if name in ("eye", "I") and name not in self.names_in_scope():
                    return True
                p = self.params.get(name)
                if (
                    p is not None
                    and p.declared_kind not in ("scalar", "vector")
                    and p.kind not in ("scalar", "vector")
                ):
                    return True
            stack.extend(ast.children(n))
        return False

    def _scalar_coefficient(self, node) -> sp.Expr:
        value, size = self.expr(node)
        scalars_only = all(
            self.params.get(s.name) is not None and self.params[s.name].kind == "scalar"
            for s in value.free_symbols
        )
        if size != "1" or not scalars_only:
            raise self.error(
                "a matrix may be scaled by a number or a scalar parameter only (declare it with "
                "'param NAME : scalar')",
                node.loc,
            )
        if value == 0:
            raise self.error("a matrix scaled by zero", node.loc)
        return value

    # ---- evaluation order ----------------------------------------------------------------------

    def dependencies(self) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
        """For each equation (intermediate `a` or next state `s'`): the equations its value needs,
        and the ones it uses (those plus the targets of prev(...), which need no same-step value)."""
        needs: dict[str, list[str]] = {}
        uses: dict[str, list[str]] = {}
        equations = [(n, e) for n, (_, e) in self.defs.items()]
        equations += [(s + "'", e) for s, (_, e) in self.updates.items()]
        for key, expr in equations:
            need, prevs, stack = [], [], [expr]
            while stack:
                node = stack.pop()
                if isinstance(node, ast.Var) and node.name in self.defs:
                    need.append(node.name)
                elif isinstance(node, ast.NewVar) and node.name in self.updates:
                    need.append(node.name + "'")
                elif isinstance(node, ast.Call) and node.func == "prev":
                    prevs.extend(a.name for a in node.args if isinstance(a, ast.Var) and a.name in self.defs)
                else:
                    stack.extend(reversed(ast.children(node)))
            needs[key] = list(dict.fromkeys(need))
            uses[key] = list(dict.fromkeys(need + prevs))
        return needs, uses

    def order(self, roots: list[str], needs: dict[str, list[str]]) -> list[str]:
        """Equations reachable from `roots`, each after those it needs (iterative depth-first search,
        so a 10,000-line chain of intermediates cannot overflow the stack); a cycle is an error."""
        mark: dict[str, int] = {}  # 1: on the current path, 2: done
        done: list[str] = []
        for root in roots:
            if root in mark:
                continue
            mark[root], path, stack = 1, [root], [iter(needs[root])]
            while stack:
                nxt = next(stack[-1], None)
                if nxt is None:
                    stack.pop()
                    key = path.pop()
                    mark[key] = 2
                    done.append(key)
                elif mark.get(nxt) == 1:
                    cycle = path[path.index(nxt) :] + [nxt]
                    kind = "equations" if any(k.endswith("'") for k in cycle) else "intermediates"
                    loc = self.updates[nxt[:-1]][0].loc if nxt.endswith("'") else self.defs[nxt][0].loc
                    raise self.error(f"cycle among {kind}: {' -> '.join(cycle)}", loc)
                elif nxt not in mark:
                    mark[nxt] = 1
                    path.append(nxt)
                    stack.append(iter(needs[nxt]))
        return done

    def evaluate(self, keys: list[str]) -> None:
        """Evaluate equations in order; one that fails is reported and marked failed, and the equations
        that read it are skipped (their errors would only repeat it)."""
        for key in keys:
            try:
                if key.endswith("'"):
                    self.resolve_new(key[:-1])
                else:
                    self.resolve(key)
            except _Skip:
                self.failed.add(key)
            except CellError as err:
                self.report(err)
                self.failed.add(key)

    # ---- the whole cell ----------------------------------------------------------------------

    def build(self) -> CellIR:
        try:
            return self._build()
        except _Stop:
            raise_all(self.errors)
            raise

    def _build(self) -> CellIR:
        self.declare()
        out = self.m.output
        if out is None and len(self.m.states) > 1:
            self.report(
                self.error(
                    "the cell has several states; say which is the output, e.g. 'output "
                    f"{self.m.states[0].text}'",
                    self.m.states[0].loc,
                )
            )
        if out is not None and out.text not in self.states and out.text not in self.defs:
            if out.text not in self.poisoned:
                self.report(
                    self.error(
                        self._unknown(
                            out.text, "output (a state or an intermediate)", [*self.states, *self.defs]
                        ),
                        out.loc,
                    )
                )
            out = None
        needs, uses = self.dependencies()
        roots = [s.text + "'" for s in self.m.states if s.text in self.updates]
        if out is not None and out.text in self.defs:
            roots.append(out.text)
        used = _reachable(roots, uses)  # what the step's results reach, through prev(...) too
        try:
            self.evaluate(self.order([k for k in roots + list(self.defs) if k in used], needs))
            # every equation is checked, also unused ones, but an unused one leaves no trace in the IR
            kept = (self.widths.snapshot(), dict(self.products), dict(self.prev_states), dict(self.shifted))
            self.evaluate(self.order([d for d in self.defs if d not in used], needs))
            self.widths.restore(kept[0])
            self.products, self.prev_states, self.shifted = dict(kept[1]), dict(kept[2]), dict(kept[3])
        except CellError as cycle:  # the evaluation order is meaningless past a cycle
            self.report(cycle)
        raise_all(self.errors)

        new_states = {s.text: self.resolved_new[s.text + "'"][0] for s in self.m.states}
        if out is None or out.text in self.states:
            out_name = self.m.states[0].text if out is None else out.text
            out_expr = new_states[out_name]
        else:
            out_name = out.text
            out_expr, size = self.resolved[out.text]
            self.count_step(out_expr, out.loc)
            self.width_of[out_name] = H if size == "1" else size  # numbers and scalars: as wide as a state
        # prev(v) states, in the order the text first uses them: their next value is v of this step, so
        # their width is v's
        self.prev_states = dict(
            sorted(
                self.prev_states.items(),
                key=lambda kv: (self.prev_uses[kv[0]].line, self.prev_uses[kv[0]].column),
            )
        )
        for target, carried in self.prev_states.items():
            value, size = self.resolved[target]
            self.width_of[carried] = self.widths.unknown(carried)
            if size not in BROADCAST:
                self.widths.unify(self.width_of[carried], size, self.defs[target][0].loc)
            new_states[carried] = value
        self._settle_unused()
        widths = self._resolve_widths()
        self.attempt(self._check_groups)
        ir_params = dict(self.params)
        for p in ir_params.values():
            if not p.kind:
                p.kind = "vector"
            if p.init is not None and p.init.name == "orthogonal" and p.kind != "matrix":
                self.report(
                    self.error(f"orthogonal initialises a matrix, but '{p.name}' is a {p.kind}", p.init.loc)
                )
        for target, reads in self.init_reads.items():  # an init expression reads values of its shape
            for t in self.groups.get(target, [target]):
                for name, loc in reads.params:
                    kind, other = ir_params[t].kind, ir_params[name].kind
                    if other != "scalar" and other != kind:
                        self.report(self.error(
                            f"'{t}' is a {kind}, but its init expression reads '{name}', a {other}; an init "
                            "expression reads values of its shape or scalars", loc))
        raise_all(self.errors)
        self._warn_unused(used, [*new_states.values(), out_expr])
        return CellIR(
            name=self.m.name.text if self.m.name else _stem(self.src.filename),
            doc=self.m.doc,
            cite=self.m.cite,
            source=self.src,
            inputs=list(self.inputs),
            states=[*self.states, *self.prev_states.values()],
            declared_states=len(self.states),
            output=out_name,
            output_expr=out_expr,
            params=ir_params,
            groups=dict(self.groups),
            new_states=new_states,
            products={p.symbol: p for p in self.products.values()},
            widths=widths,
            output_declared=self.m.output is not None,
            init_sizes=tuple(dict.fromkeys(w for r in self.init_reads.values() for w in r.sizes)),
            shifted=dict(self.shifted),
            reduced={
                r: (self.widths.resolve(w), tuple(sorted(locs, key=lambda loc: (loc.line, loc.column))))
                for r, (w, locs) in self.reduced.items()
            },
            same_widths={pair: loc for pair, loc in self._constraints().items()},
            locations={n.text: n.loc for n in [*self.m.inputs, *self.m.states]}
            | {n: p.loc for n, p in self.params.items()} | {n: self.shift_uses[n] for n in self.shifted},
        )

    def count_step(self, value: sp.Expr, loc: Loc) -> None:
        """Add a next state's, the output's or a GEMM operand's distinct nodes to the step's; refuse the
        equation that takes the step past MAX_STEP_NODES (many large equations, each under MAX_SIZE)."""
        todo = [value]
        while todo:
            e = todo.pop()
            if e not in self.step_nodes:
                self.step_nodes.add(e)
                todo.extend(e.args)
        if len(self.step_nodes) > MAX_STEP_NODES:
            raise self.error(
                f"with this the step has {len(self.step_nodes)} distinct operations once intermediates are "
                f"put in (the limit is {MAX_STEP_NODES}); the derivative and kernels of so large a cell are "
                "not built",
                loc,
            )

    def _resolve_widths(self) -> dict[str, str]:
        """Give every width its final name (an unknown nothing fixed is H): parameters' rows and
        columns, products', and the widths of inputs, states and vectors, returned by name."""
        resolve = self.widths.resolve
        for p in self.params.values():
            if p.rows is not None:
                p.rows = resolve(p.rows)
            if p.operand_size is not None:
                p.operand_size = resolve(p.operand_size)
        self.products = {
            k: replace(v, rows=resolve(v.rows), cols=resolve(v.cols)) for k, v in self.products.items()
        }
        widths = {n: resolve(w) for n, w in self.width_of.items()}
        widths.update({n: p.rows for n, p in self.params.items() if p.kind == "vector"})
        return widths

    def _settle_unused(self) -> None:
        """A parameter no equation reads (a warning) still gets a shape, so that a layer stores it (its
        gradient is zero): its group's shape, else its declared kind (a vector if undeclared) of width
        H, as a parameter read only by an unused equation gets."""
        for p in self.params.values():
            if p.used:
                continue
            mates = [self.params[m] for m in self.groups.get(p.group, []) if self.params[m].used]
            if mates:
                q = mates[0]
                p.kind, p.rows, p.operand_size, p.heads = q.kind, q.rows, q.operand_size, q.heads
            else:
                p.kind = p.declared_kind or "vector"
                p.rows = None if p.kind == "scalar" else H
                p.operand_size = H if p.kind == "matrix" else None

    def _constraints(self) -> dict[tuple[str, str], Loc]:
        return {pair: loc for pair, loc in self.widths.constraints.items() if pair[0] != pair[1]}

    def _check_groups(self) -> None:
        for group, members in self.groups.items():
            used = [self.params[m] for m in members if self.params[m].used]
            shapes = {(p.kind or "vector", p.rows, p.operand_size, p.heads) for p in used}
            if len(shapes) > 1:
                what = ", ".join(f"{p.name} {_shape_words(p)}" for p in used)
                raise self.error(
                    f"parameter group '{group}' mixes shapes ({what}); a group is stored as one tensor, so "
                    "its members must have the same shape",
                    self.params[members[0]].loc,
                )

    def _warn_unused(self, used: set[str], results: list[sp.Expr]) -> None:
        for p in self.params.values():
            if not p.used:
                warnings.warn(
                    warning_text(f"parameter '{p.name}' is never used", self.src, p.loc),
                    CellWarning,
                    stacklevel=4,
                )
        for name, (n, _expr) in self.defs.items():
            if name not in used:
                warnings.warn(
                    warning_text(f"'{name}' is defined but never used", self.src, n.loc),
                    CellWarning,
                    stacklevel=4,
                )
        leaves: set[sp.Symbol] = set()
        for e in [*results, *(p.operand for p in self.products.values())]:
            leaves |= e.free_symbols
        read = {symbol(target) for target, _k in self.shifted.values()}  # prev(x) reads x
        for n in self.m.inputs:
            if symbol(n.text) not in leaves and symbol(n.text) not in read:
                text = warning_text(f"input '{n.text}' is never used", self.src, n.loc)
                warnings.warn(text, CellWarning, stacklevel=4)


class _Skip(Exception):  # noqa: N818 - not an error: the equation reads one whose error was reported
    """Raised where an equation reads a name whose own equation or declaration already failed."""


class _Stop(Exception):  # noqa: N818
    """Raised when MAX_ERRORS errors are reported: the file is not checked further."""


def _reachable(roots: list[str], edges: dict[str, list[str]]) -> set[str]:
    seen, stack = set(roots), list(roots)
    while stack:
        for nxt in edges[stack.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return seen


def _plain_number(atom: sp.Basic) -> bool:
    try:
        return abs(float(atom)) <= MAX_CONSTANT
    except (TypeError, ValueError, OverflowError):
        return False


def _shape_words(p: Param) -> str:
    if p.kind == "matrix":
        return f"is {p.rows} x {p.operand_size}" + (f" in {p.heads} heads" if p.heads else "")
    return "is a scalar" if p.kind == "scalar" else f"is a vector of width {p.rows}"


def _combination_name(terms: list[MatrixTerm]) -> str:
    """How a combination of matrices is shown (and named in the plan): `(W - Wᵀ - 0.01*eye)`."""
    parts = []
    for t in terms:
        matrix = t.matrix + ("ᵀ" if t.transposed else "")
        coef = repr(float(t.coef)) if t.coef.is_Number else sp.sstr(t.coef)
        text = matrix if t.coef == 1 else f"-{matrix}" if t.coef == -1 else f"{coef}*{matrix}"
        parts.append(text)
    return "(" + " + ".join(parts).replace("+ -", "- ") + ")"


def _stem(filename: str) -> str:
    """The cell's name when the file has no `cell NAME` line: the file's stem if it is a name the
    language could spell, else "cell" (a file name may hold quotes, spaces, control characters)."""
    base = filename.replace("\\", "/").rsplit("/", 1)[-1]
    base = base[:-5] if base.endswith(".cell") else base
    return base if NAME.fullmatch(base) else "cell"


def build_ir(module: ast.Module, source: Source) -> CellIR:
    """Check a parsed cell and express one step of it in SymPy."""
    return _Builder(module, source).build()
