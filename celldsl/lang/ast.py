"""The syntax tree of a cell file: what the author wrote, with a location on every node."""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import Loc


@dataclass(frozen=True)
class Name:
    text: str
    loc: Loc


# ---- expressions -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Num:
    text: str
    loc: Loc


@dataclass(frozen=True)
class Var:
    """A name read in an expression: input, state (previous value), parameter or intermediate."""

    name: str
    loc: Loc


@dataclass(frozen=True)
class NewVar:
    """`s'`: the value state s takes at the end of this step."""

    name: str
    loc: Loc


@dataclass(frozen=True)
class Call:
    func: str
    args: tuple
    loc: Loc


@dataclass(frozen=True)
class BinOp:
    op: str  # one of + - * / ^ @ < <= > >=
    left: object
    right: object
    loc: Loc


@dataclass(frozen=True)
class Neg:
    operand: object
    loc: Loc


Expr = Num | Var | NewVar | Call | BinOp | Neg


def children(expr) -> tuple:
    if isinstance(expr, BinOp):
        return (expr.left, expr.right)
    if isinstance(expr, Neg):
        return (expr.operand,)
    if isinstance(expr, Call):
        return expr.args
    return ()


# ---- statements --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParamKind:
    """`scalar`, `vector`, `matrix`, or `heads(4)` (the number in parentheses, as written)."""

    name: Name
    count: str | None = None


@dataclass(frozen=True)
class PerHead:
    """`K per head`, `(V, K) per head` or `1 per head`: a value of a matrix-memory cell, one per head.
    rows and cols are width names ("1" for one number); cols is None for a vector."""

    rows: str
    cols: str | None
    loc: Loc
    head: bool = True  # False: `param W : (R, x)`, one matrix shared by the heads


@dataclass(frozen=True)
class InitValue:
    kind: str  # "constant" | "named" | "call" | "expr"
    name: str | None
    number: float | None
    loc: Loc
    expr: object = None  # kind "expr": the expression (uniform(a, b), sizes, parameters above)


@dataclass
class Module:
    """A parsed cell file, statements grouped by kind (order kept within each kind)."""

    name: Name | None = None
    doc: str | None = None
    cite: str | None = None
    inputs: list[Name] = field(default_factory=list)
    states: list[Name] = field(default_factory=list)
    widths: dict[str, Name | PerHead] = field(default_factory=dict)  # state or input -> its declared width
    output: Name | None = None
    # (name, kind, group)
    params: list[tuple[Name, ParamKind | PerHead | None, Name | None]] = field(default_factory=list)
    groups: list[tuple[Name, list[Name]]] = field(default_factory=list)
    inits: list[tuple[list[Name], InitValue]] = field(default_factory=list)
    definitions: list[tuple[Name, object]] = field(default_factory=list)  # intermediates
    updates: list[tuple[Name, object]] = field(default_factory=list)  # s' = expr
    seen_headers: dict[str, Loc] = field(default_factory=dict)
