"""Init expressions: `init b_f = log(uniform(1, T_max - 1))`, `init b_i = -b_f`.

An `init` line's value is either one of the fixed forms (a number, zeros, ones, orthogonal, default,
uniform(a), normal(std)) or an expression built from random draws of the parameter's shape
(`uniform(a, b)`, `uniform(a)`, `normal(std)`, `normal(mean, std)`), numbers, `pi` and `e`, the
elementwise functions of the language, sizes (H, I, an input's name, a declared width, or a name the
layer is given in `sizes=`, such as chrono's T_max) and parameters initialised on an earlier line.
This module checks one such expression and says what it reads; nn/parameters.py computes it with torch
(never eval: the expression is walked node by node).
"""

from __future__ import annotations

from dataclasses import dataclass

from . import ast
from .errors import CellError, Loc
from .functions import CONSTANTS, FUNCTIONS, REDUCTIONS

DRAWS = {"uniform": (1, 2), "normal": (1, 2)}  # random draws of the parameter's shape: their arities
USAGE = {"uniform": "uniform(a): U(-a, a); uniform(a, b): U(a, b)",
         "normal": "normal(std) or normal(mean, std)"}
OPERATORS = ("+", "-", "*", "/", "^")


@dataclass(frozen=True)
class InitReads:
    params: tuple[tuple[str, Loc], ...]  # parameters read, in text order
    sizes: tuple[str, ...]  # size names read that are no width of the cell: the layer's sizes= gives them


def check_init_expr(expr, *, params: dict, initialised: set[str], widths: set[str], error) -> InitReads:
    """Check an init expression; `error(message, loc)` makes the CellError raised at the first problem.
    params: every parameter (name -> anything); initialised: those an earlier init line sets; widths:
    the size names the cell has (H, I, inputs, declared widths)."""
    reads: list[tuple[str, Loc]] = []
    sizes: list[str] = []
    draws = [0]

    def walk(e) -> None:
        if isinstance(e, ast.Num):
            return
        if isinstance(e, ast.Neg):
            walk(e.operand)
            return
        if isinstance(e, ast.BinOp):
            if e.op not in OPERATORS:
                raise error(
                    f"'{e.op}' is not allowed in an init expression (use + - * / ^ and functions)", e.loc
                )
            walk(e.left)
            walk(e.right)
            return
        if isinstance(e, ast.Var):
            if e.name in params:
                if e.name not in initialised:
                    raise error(
                        f"the init expression reads parameter '{e.name}', which no earlier init line "
                        f"sets; initialise '{e.name}' on a line above this one",
                        e.loc,
                    )
                reads.append((e.name, e.loc))
            elif e.name in widths or e.name in CONSTANTS:
                pass
            elif e.name.isidentifier():
                if e.name not in sizes:
                    sizes.append(e.name)
            return
        if isinstance(e, ast.Call):
            if e.func in DRAWS:
                lo, hi = DRAWS[e.func]
                if not lo <= len(e.args) <= hi:
                    raise error(
                        f"{e.func}() in an init expression takes 1 or 2 arguments "
                        f"({USAGE[e.func]}), "
                        f"got {len(e.args)}",
                        e.loc,
                    )
                draws[0] += 1
            elif e.func not in FUNCTIONS or e.func in REDUCTIONS:
                known = sorted({*FUNCTIONS, *DRAWS} - set(REDUCTIONS))
                raise error(
                    f"unknown function '{e.func}' in an init expression (known: {', '.join(known)})", e.loc
                )
            elif len(e.args) != FUNCTIONS[e.func][0]:
                arity = FUNCTIONS[e.func][0]
                raise error(f"{e.func}() takes {arity} argument{'s' * (arity > 1)}, got {len(e.args)}", e.loc)
            for a in e.args:
                walk(a)
            return
        if isinstance(e, ast.NewVar):
            raise error(
                f"'{e.name}'' is a next state; an init expression reads sizes, numbers, draws and parameters",
                e.loc,
            )
        raise error("this is not allowed in an init expression", getattr(e, "loc", None))

    walk(expr)
    return InitReads(tuple(reads), tuple(sizes))


def init_error(source):
    """An `error(message, loc)` for check_init_expr that makes CellErrors of `source`."""
    return lambda message, loc: CellError(message, source, loc)
