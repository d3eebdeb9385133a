"""AST -> IR: name resolution, semantic checks and SymPy expressions for one step of the cell.

Every intermediate is inlined, so each next-state expression is written in *leaf* symbols only:
inputs, previous states, vector/scalar parameters and one symbol per matrix product `W @ operand`.
Cell text is data: SymPy objects are built node by node from the tree, never from strings.
"""

from __future__ import annotations

import difflib
import math
import warnings
from dataclasses import dataclass, field

import sympy as sp

from . import ast
from .errors import CellError, CellWarning, Loc, Source, warning_text
from .functions import FUNCTIONS

H = "H"  # the size of every value of the step except expressions of inputs only


def symbol(name: str) -> sp.Symbol:
    return sp.Symbol(name, real=True)


@dataclass
class Param:
    name: str
    kind: str  # "matrix" | "vector" | "scalar"
    loc: Loc
    group: str | None = None
    operand_size: str | None = None  # matrices: "H" or the name of the input they read
    init: ast.InitValue | None = None
    used: bool = False


@dataclass(frozen=True)
class Product:
    """`param @ operand`: one block of rows of a concatenated GEMM."""

    symbol: sp.Symbol
    param: str
    operand: sp.Expr
    loc: Loc


@dataclass
class CellIR:
    name: str
    doc: str | None
    cite: str | None
    source: Source
    inputs: list[str]
    states: list[str]  # declared states, then one extra state per prev(v), in order of first use
    declared_states: int
    output: str  # name of a state (its new value) or of an intermediate
    output_expr: sp.Expr
    params: dict[str, Param]
    groups: dict[str, list[str]]  # stored tensors holding several parameters, rows in this order
    new_states: dict[str, sp.Expr]  # state -> its value at the end of the step, in leaf symbols
    products: dict[sp.Symbol, Product]
    needs_hidden_size: dict[str, Loc] = field(default_factory=dict)  # input -> a use that needs I == H
    locations: dict[str, Loc] = field(default_factory=dict)


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
        self.in_progress: list[str] = []
        self.products: dict[tuple[str, sp.Expr], Product] = {}
        self.prev_states: dict[str, str] = {}  # intermediate -> carried state name
        self.needs_hidden: dict[str, Loc] = {}
        self.used_defs: set[str] = set()

    def error(self, message: str, loc: Loc | None) -> CellError:
        return CellError(message, self.src, loc)

    # ---- declarations ------------------------------------------------------------------------

    def declare(self) -> None:
        m = self.m
        if not m.inputs:
            raise self.error("the cell declares no input; add a line such as 'input x'", Loc(1, 1))
        if not m.states:
            raise self.error("the cell declares no state; add a line such as 'state h'", Loc(1, 1))
        taken: dict[str, tuple[str, Loc]] = {}

        def claim(name: ast.Name, what: str) -> None:
            if name.text in FUNCTIONS or name.text == "prev":
                raise self.error(f"'{name.text}' is a function name and cannot name a {what}", name.loc)
            if name.text in taken:
                other, loc = taken[name.text]
                raise self.error(
                    f"'{name.text}' is declared twice (as {other} on line {loc.line}, and here as {what})",
                    name.loc,
                )
            taken[name.text] = (what, name.loc)

        for n in m.inputs:
            claim(n, "an input")
        for n in m.states:
            claim(n, "a state")
        for group, _members in m.groups:
            claim(group, "a parameter group")
            self.groups[group.text] = [x.text for x in _members]
        for n, kind, group in m.params:
            claim(n, "a parameter")
            if kind is not None and kind.text not in ("scalar", "vector", "matrix"):
                raise self.error(
                    f"unknown parameter kind '{kind.text}'; expected 'scalar' (vectors and matrices are "
                    "inferred from use)",
                    kind.loc,
                )
            self.params[n.text] = Param(
                n.text, kind.text if kind else "", n.loc, group=group.text if group else None
            )
            self.params[n.text].declared_kind = kind.text if kind else None
        for name, expr in m.definitions:
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
        for name, expr in m.updates:
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
        for s in m.states:
            if s.text not in self.updates:
                raise self.error(
                    f"state '{s.text}' is never updated; add an equation {s.text}' = ...", s.loc
                )
        for names, value in m.inits:
            for n in names:
                if n.text not in self.params and n.text not in self.groups:
                    raise self.error(self._unknown(n.text, "parameter", self.params), n.loc)
                self._check_init(value)
                targets = self.groups.get(n.text, [n.text])
                for t in targets:
                    self.params[t].init = value

    def _check_init(self, v: ast.InitValue) -> None:
        if v.kind == "named" and v.name not in ("zeros", "ones", "orthogonal", "default"):
            raise self.error(
                f"unknown initialiser '{v.name}'; expected a number, zeros, ones, orthogonal, default, "
                "uniform(a) or normal(std)",
                v.loc,
            )
        if v.kind == "call" and v.name not in ("uniform", "normal"):
            raise self.error(f"unknown initialiser '{v.name}(...)'; expected uniform(a) or normal(std)", v.loc)
        if v.kind in ("constant", "call") and not math.isfinite(v.number):
            raise self.error("the initial value must be a finite number", v.loc)

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
            if not math.isfinite(value):
                raise self.error(f"the number {node.text} is too large", node.loc)
            exact = "e" not in node.text.lower() and len(node.text) <= 16
            return (sp.Rational(node.text) if exact else sp.Float(value)), "1"
        if isinstance(node, ast.Var):
            return self.var(node)
        if isinstance(node, ast.NewVar):
            if node.name not in self.states:
                raise self.error(f"'{node.name}' is not a state, so {node.name}' has no meaning", node.loc)
            return self.resolve_new(node.name, node.loc)
        if isinstance(node, ast.Neg):
            value, size = self.expr(node.operand)
            return -value, size
        if isinstance(node, ast.Call):
            return self.call(node)
        if isinstance(node, ast.BinOp):
            if node.op == "@":
                return self.matmul(node)
            (a, sa), (b, sb) = self.expr(node.left), self.expr(node.right)
            size = self.join(sa, sb, node.loc)
            if node.op == "+":
                return a + b, size
            if node.op == "-":
                return a - b, size
            if node.op == "*":
                return a * b, size
            if node.op == "/":
                if b == 0:
                    raise self.error("division by zero", node.loc)
                return a / b, size
            return sp.Pow(a, b), size
        raise AssertionError(f"unexpected node {node!r}")

    def join(self, sa: str, sb: str, loc: Loc) -> str:
        """Size of an elementwise combination; an input meeting an H-wide value needs I == H."""
        if sa == "1":
            return sb
        if sb == "1" or sa == sb:
            return sa
        for s in (sa, sb):
            if s != H:
                self.needs_hidden.setdefault(s, loc)
        return H

    def var(self, node: ast.Var) -> tuple[sp.Expr, str]:
        name = node.name
        if name in self.inputs:
            return symbol(name), name
        if name in self.states:
            return symbol(name), H
        if name in self.params:
            p = self.params[name]
            p.used = True
            if p.declared_kind == "scalar":
                p.kind = "scalar"
                return symbol(name), "1"
            if p.kind == "matrix":
                raise self.error(
                    f"'{name}' is a matrix (applied with @ elsewhere) but is used elementwise here; "
                    f"write {name} @ (...)",
                    node.loc,
                )
            p.kind = "vector"
            return symbol(name), H
        if name in self.defs:
            return self.resolve(name, node.loc)
        if name in self.groups:
            raise self.error(
                f"'{name}' is a parameter group (storage); use its members {', '.join(self.groups[name])}",
                node.loc,
            )
        raise self.error(self._unknown(name, "name", self.names_in_scope()), node.loc)

    def resolve(self, name: str, loc: Loc) -> tuple[sp.Expr, str]:
        if name in self.resolved:
            return self.resolved[name]
        if name in self.in_progress:
            cycle = self.in_progress[self.in_progress.index(name) :] + [name]
            raise self.error(f"cycle among intermediates: {' -> '.join(cycle)}", self.defs[name][0].loc)
        self.in_progress.append(name)
        self.used_defs.add(name)
        result = self.expr(self.defs[name][1])
        self.in_progress.pop()
        self.resolved[name] = result
        return result

    def resolve_new(self, state: str, loc: Loc) -> tuple[sp.Expr, str]:
        key = state + "'"
        if key in self.resolved_new:
            return self.resolved_new[key]
        if key in self.in_progress:
            cycle = self.in_progress[self.in_progress.index(key) :] + [key]
            raise self.error(f"cycle among equations: {' -> '.join(cycle)}", self.updates[state][0].loc)
        self.in_progress.append(key)
        value, size = self.expr(self.updates[state][1])
        self.in_progress.pop()
        if size != H:
            self.needs_hidden.setdefault(size, self.updates[state][0].loc) if size != "1" else None
            size = H
        self.resolved_new[key] = (value, size)
        return value, size

    def call(self, node: ast.Call) -> tuple[sp.Expr, str]:
        if node.func == "prev":
            if len(node.args) != 1 or not isinstance(node.args[0], ast.Var):
                raise self.error("prev takes one name: prev(v) for an intermediate v", node.loc)
            target = node.args[0].name
            if target in self.states:
                raise self.error(
                    f"'{target}' is a state: its previous value is just '{target}'", node.args[0].loc
                )
            if target not in self.defs:
                raise self.error(self._unknown(target, "intermediate", self.defs), node.args[0].loc)
            self.used_defs.add(target)
            carried = self.prev_states.setdefault(target, f"prev({target})")
            return symbol(carried), H
        if node.func not in FUNCTIONS:
            raise self.error(self._unknown(node.func, "function", [*FUNCTIONS, "prev"]), node.loc)
        arity, make = FUNCTIONS[node.func]
        if len(node.args) != arity:
            plural = "argument" if arity == 1 else "arguments"
            raise self.error(
                f"{node.func} takes {arity} {plural}, got {len(node.args)}", node.loc
            )
        args = [self.expr(a) for a in node.args]
        size = args[0][1]
        for _, s in args[1:]:
            size = self.join(size, s, node.loc)
        return make(*(a for a, _ in args)), size

    def matmul(self, node: ast.BinOp) -> tuple[sp.Expr, str]:
        left = node.left
        if not isinstance(left, ast.Var) or left.name not in self.params:
            what = f"'{left.name}'" if isinstance(left, ast.Var) else "this expression"
            raise self.error(
                f"the left side of @ must be a matrix parameter declared with 'param', not {what}", left.loc
            )
        p = self.params[left.name]
        if p.declared_kind == "scalar":
            raise self.error(f"'{p.name}' is declared scalar and cannot be applied with @", left.loc)
        if p.kind == "vector":
            raise self.error(
                f"'{p.name}' is used elementwise elsewhere (a vector) and as a matrix here", left.loc
            )
        operand, size = self.expr(node.right)
        if size == "1":
            raise self.error("the right side of @ must be an input or H-wide value, not a scalar", node.loc)
        if p.operand_size is not None and p.operand_size != size:
            raise self.error(
                f"'{p.name}' is applied to operands of different sizes: {_size_words(p.operand_size)} "
                f"on line {p.first_use.line} and {_size_words(size)} here",
                node.loc,
            )
        if not operand.free_symbols:
            raise self.error("the right side of @ does not depend on any input or state", node.right.loc)
        p.kind, p.used = "matrix", True
        if p.operand_size is None:
            p.operand_size, p.first_use = size, node.loc
        key = (p.name, operand)
        if key not in self.products:
            index = sum(1 for k in self.products if k[0] == p.name)
            sym = symbol(f"{p.name}@{index}" if index else f"{p.name}@")
            self.products[key] = Product(sym, p.name, operand, node.loc)
        return self.products[key].symbol, H

    # ---- the whole cell ----------------------------------------------------------------------

    def build(self) -> CellIR:
        self.declare()
        new_states = {}
        for s in self.m.states:
            new_states[s.text] = self.resolve_new(s.text, s.loc)[0]
        out = self.m.output
        if out is None:
            if len(self.m.states) > 1:
                raise self.error(
                    "the cell has several states; say which is the output, e.g. 'output "
                    f"{self.m.states[0].text}'",
                    self.m.states[0].loc,
                )
            out_name, out_expr = self.m.states[0].text, new_states[self.m.states[0].text]
        elif out.text in self.states:
            out_name, out_expr = out.text, new_states[out.text]
        elif out.text in self.defs:
            out_name = out.text
            out_expr, size = self.resolve(out.text, out.loc)
            if size != H:
                self.needs_hidden.setdefault(size, out.loc)
        else:
            raise self.error(
                self._unknown(out.text, "output (a state or an intermediate)", [*self.states, *self.defs]),
                out.loc,
            )
        # prev(v) states: their next value is v of this step (may create more prev states: loop)
        done: set[str] = set()
        while len(done) < len(self.prev_states):
            for target, carried in list(self.prev_states.items()):
                if carried not in done:
                    new_states[carried] = self.resolve(target, self.defs[target][0].loc)[0]
                    done.add(carried)
        self._check_groups()
        self._warn_unused()
        ir_params = dict(self.params)
        for p in ir_params.values():
            if not p.kind:
                p.kind = "vector"
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
            needs_hidden_size=dict(self.needs_hidden),
            locations={n.text: n.loc for n in [*self.m.inputs, *self.m.states]}
            | {n: p.loc for n, p in self.params.items()},
        )

    def _check_groups(self) -> None:
        for group, members in self.groups.items():
            kinds = {self.params[m].kind or "vector" for m in members if self.params[m].used}
            sizes = {self.params[m].operand_size for m in members if self.params[m].used}
            if len(kinds) > 1 or len(sizes) > 1:
                first = self.params[members[0]]
                raise self.error(
                    f"parameter group '{group}' mixes parameters of different kinds or shapes; a group is "
                    "stored as one tensor, so its members must have the same shape",
                    first.loc,
                )

    def _warn_unused(self) -> None:
        for p in self.params.values():
            if not p.used:
                warnings.warn(
                    warning_text(f"parameter '{p.name}' is never used", self.src, p.loc),
                    CellWarning,
                    stacklevel=4,
                )
        for name, (n, _expr) in self.defs.items():
            if name not in self.used_defs:
                warnings.warn(
                    warning_text(f"'{name}' is defined but never used", self.src, n.loc),
                    CellWarning,
                    stacklevel=4,
                )
        for n in self.m.inputs:
            if not any(
                sp.Symbol(n.text, real=True) in e.free_symbols
                for e in [*self.resolved.values(), *self.resolved_new.values()]
                for e in [e[0]]
            ) and not any(
                symbol(n.text) in p.operand.free_symbols for p in self.products.values()
            ):
                warnings.warn(
                    warning_text(f"input '{n.text}' is never used", self.src, n.loc), CellWarning, stacklevel=4
                )


def _size_words(size: str) -> str:
    return "H-wide values" if size == H else f"input '{size}'"


def _stem(filename: str) -> str:
    base = filename.replace("\\", "/").rsplit("/", 1)[-1]
    return base[:-5] if base.endswith(".cell") else base


def build_ir(module: ast.Module, source: Source) -> CellIR:
    """Check a parsed cell and express one step of it in SymPy."""
    return _Builder(module, source).build()
