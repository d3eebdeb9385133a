"""The functions of the cell language as SymPy functions whose derivatives are written in terms of
themselves, with a float implementation for folding constants.

`sigmoid(x).diff(x)` is `sigmoid(x)*(1 - sigmoid(x))`, so after CSE the backward reuses the forward's
activations instead of recomputing exponentials. Every backend prints these by name (see printers).

tanh, exp and log are celldsl's own classes, not SymPy's: SymPy's evaluate themselves on every
construction (tanh(-x) -> -tanh(x), log(exp(x)) -> x, a search for imaginary coefficients), which
changed the arithmetic a cell wrote and cost a millisecond per node, most of the time of compiling
large cells. Ours are inert: the expression is what the cell file says.
"""

from __future__ import annotations

import math

import sympy as sp


class CellFunction(sp.Function):
    """A function of the cell language: inert (no automatic evaluation), differentiated by `fdiff`,
    evaluated on plain floats by `numeric` when all its arguments are constants."""

    @staticmethod
    def numeric(*args: float) -> float:
        raise NotImplementedError


class sigmoid(CellFunction):  # noqa: N801 - named as written in cell files
    nargs = 1

    def fdiff(self, argindex=1):
        return self * (1 - self)

    @staticmethod
    def numeric(x):
        return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


class tanh(CellFunction):  # noqa: N801
    nargs = 1

    def fdiff(self, argindex=1):
        return 1 - self**2

    numeric = staticmethod(math.tanh)


class exp(CellFunction):  # noqa: N801
    nargs = 1

    def fdiff(self, argindex=1):
        return self

    numeric = staticmethod(math.exp)


class log(CellFunction):  # noqa: N801
    nargs = 1

    def fdiff(self, argindex=1):
        return 1 / self.args[0]

    @staticmethod
    def numeric(x):
        if x == 0:
            raise ZeroDivisionError("log(0) is -inf")
        return math.log(x)


class sin(CellFunction):  # noqa: N801 - LRU's complex diagonal as real and imaginary parts
    nargs = 1

    def fdiff(self, argindex=1):
        return cos(self.args[0])

    numeric = staticmethod(math.sin)


class cos(CellFunction):  # noqa: N801
    nargs = 1

    def fdiff(self, argindex=1):
        return -sin(self.args[0])

    numeric = staticmethod(math.cos)


class relu(CellFunction):  # noqa: N801
    nargs = 1

    def fdiff(self, argindex=1):
        return step(self.args[0])

    @staticmethod
    def numeric(x):
        return max(x, 0.0)


class softplus(CellFunction):  # noqa: N801
    nargs = 1

    def fdiff(self, argindex=1):
        return sigmoid(self.args[0])

    @staticmethod
    def numeric(x):
        return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


class logsigmoid(CellFunction):  # noqa: N801
    nargs = 1

    def fdiff(self, argindex=1):
        return sigmoid(-self.args[0])

    @staticmethod
    def numeric(x):
        return min(x, 0.0) - math.log1p(math.exp(-abs(x)))


class step(CellFunction):  # noqa: N801
    """0 where the argument is <= 0, else 1: the derivative of relu and of max/min. 1 at NaN, as torch's
    relu backward (threshold_backward) passes the gradient through a NaN: a NaN in the input then
    gives the gradients torch.nn gives."""

    nargs = 1

    def fdiff(self, argindex=1):
        return sp.Integer(0)

    @staticmethod
    def numeric(x):
        return 0.0 if x <= 0 else 1.0


class maximum(CellFunction):  # noqa: N801
    """Elementwise max of two values; the gradient goes to the larger one (to the first on ties)."""

    nargs = 2

    def fdiff(self, argindex=1):
        a, b = self.args
        return step(b - a) if argindex == 2 else 1 - less(a, b)

    numeric = staticmethod(max)


class minimum(CellFunction):  # noqa: N801
    nargs = 2

    def fdiff(self, argindex=1):
        a, b = self.args
        return step(a - b) if argindex == 2 else 1 - less(b, a)

    numeric = staticmethod(min)


class less(CellFunction):  # noqa: N801
    """1 where a < b, else 0 (`a < b` and `b > a` in a cell file): flat, so its derivative is 0."""

    nargs = 2

    def fdiff(self, argindex=1):
        return sp.Integer(0)

    @staticmethod
    def numeric(a, b):
        return 1.0 if a < b else 0.0


class less_equal(CellFunction):  # noqa: N801
    """1 where a <= b, else 0 (`a <= b`, `b >= a`)."""

    nargs = 2

    def fdiff(self, argindex=1):
        return sp.Integer(0)

    @staticmethod
    def numeric(a, b):
        return 1.0 if a <= b else 0.0


class where(CellFunction):  # noqa: N801
    """a where the condition is nonzero, else b; the gradient goes to the branch taken."""

    nargs = 3

    def fdiff(self, argindex=1):
        c = self.args[0]
        if argindex == 1:
            return sp.Integer(0)
        return where(c, 1, 0) if argindex == 2 else where(c, 0, 1)

    @staticmethod
    def numeric(c, a, b):
        return a if c != 0 else b


class floor(CellFunction):  # noqa: N801
    nargs = 1

    def fdiff(self, argindex=1):
        return sp.Integer(0)

    numeric = staticmethod(math.floor)


class mod(CellFunction):  # noqa: N801
    """a - b * floor(a / b): the remainder with the sign of b, computed as written by every backend
    (torch.remainder and Python's % differ where a / b rounds to an integer, and for an infinite b)."""

    nargs = 2

    def fdiff(self, argindex=1):
        a, b = self.args
        return sp.Integer(1) if argindex == 1 else -floor(a / b)

    @staticmethod
    def numeric(a, b):
        return a - b * math.floor(a / b)


class Reduction(CellFunction):
    """A reduction over the elements of a value (its width: the hidden units), one value per row that
    broadcasts back over them. Linear, so reverse mode sends an adjoint g back as the same reduction
    of g (plan._ReverseMode): d/dv_k of sum_j g_j * mean(v) is mean(g). Every backend computes it
    within the stage's kernel: a second pass over the row (C), a row per program (Triton)."""

    nargs = 1


class rowmean(Reduction):  # noqa: N801 - `mean(v)` in a cell file
    pass


class rowsum(Reduction):  # noqa: N801 - `sum(v)` in a cell file
    pass


class spread(CellFunction):  # noqa: N801 - made by plan.make_pointwise, never written in a cell file
    """The gradient g of a value of one per row (a `: 1` state's next value, a mean a cell outputs) as it
    enters the backward of a function that runs over W columns: g / W in every column. In that backward
    a sum over the columns gives g back: the gradient of a value broadcast over the columns (a `: 1`
    state read by them) and of a sum over them; and a mean gives g / W, as d mean(v) / d v_j is 1 / W.
    Each backend prints it with its function's width (plan.Pointwise: row outputs)."""

    nargs = 1


LAYERNORM_EPS = 1e-5  # torch.nn.LayerNorm's default


def layernorm(v):
    """(v - mean(v)) / sqrt(mean((v - mean(v))^2) + eps): no affine part (the cell writes its own gain
    and bias as vectors, as Ba et al. do); eps as torch.nn.LayerNorm's."""
    centred = v - rowmean(v)
    return centred / sp.sqrt(rowmean(centred**2) + sp.Float(LAYERNORM_EPS))


def _sqrt(x):
    return sp.sqrt(x)


def _clip(v, lo, hi):
    return minimum(maximum(v, lo), hi)


# name in a cell file -> (arity, SymPy constructor)
FUNCTIONS = {
    "sigmoid": (1, sigmoid),
    "σ": (1, sigmoid),
    "tanh": (1, tanh),
    "relu": (1, relu),
    "exp": (1, exp),
    "log": (1, log),
    "sin": (1, sin),
    "cos": (1, cos),
    "softplus": (1, softplus),
    "logsigmoid": (1, logsigmoid),
    "abs": (1, sp.Abs),
    "sqrt": (1, _sqrt),
    "max": (2, maximum),
    "min": (2, minimum),
    "where": (3, where),
    "mod": (2, mod),
    "floor": (1, floor),
    "clip": (3, _clip),
    "mean": (1, rowmean),
    "sum": (1, rowsum),
    "layernorm": (1, layernorm),
}
REDUCTIONS = ("mean", "sum", "layernorm")  # functions over a value's elements, not elementwise
CONSTANTS = {"pi": sp.pi, "e": sp.E}  # names a cell may use for these when it declares no such name


def evaluate(expr: sp.Expr) -> float:
    """The value of a constant expression in float64, as the kernels would compute it.

    Raises OverflowError (too large for float64), ZeroDivisionError (infinite: 1/0, log(0)) or
    ValueError (not real: log or square root of a negative number)."""
    if expr.is_Number or isinstance(expr, sp.NumberSymbol):
        return float(expr)
    args = [evaluate(a) for a in expr.args]
    if isinstance(expr, sp.Add):
        value = math.fsum(args)
    elif isinstance(expr, sp.Mul):
        value = math.prod(args)
    elif isinstance(expr, sp.Pow):
        if args[0] == 0 and args[1] < 0:
            raise ZeroDivisionError("0 to a negative power")
        value = math.pow(*args)
    elif isinstance(expr, sp.Abs):
        value = abs(args[0])
    elif isinstance(expr, CellFunction):
        value = type(expr).numeric(*args)
    else:
        raise ValueError(f"cannot evaluate {type(expr).__name__}")
    if not math.isfinite(value):
        raise OverflowError("not a finite number")
    return float(value)
