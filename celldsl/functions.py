"""Activation functions as SymPy functions whose derivatives are written in terms of themselves.

`sigmoid(x).diff(x)` is `sigmoid(x)*(1 - sigmoid(x))`, so after CSE the backward reuses the forward's
activations instead of recomputing exponentials. Every backend prints these by name (see printers).
"""

from __future__ import annotations

import sympy as sp


class sigmoid(sp.Function):  # noqa: N801 - named as written in cell files
    nargs = 1

    def fdiff(self, argindex=1):
        return self * (1 - self)


class relu(sp.Function):  # noqa: N801
    nargs = 1

    def fdiff(self, argindex=1):
        return step(self.args[0])


class softplus(sp.Function):  # noqa: N801
    nargs = 1

    def fdiff(self, argindex=1):
        return sigmoid(self.args[0])


class logsigmoid(sp.Function):  # noqa: N801
    nargs = 1

    def fdiff(self, argindex=1):
        return sigmoid(-self.args[0])


class step(sp.Function):  # noqa: N801
    """1 where the argument is > 0, else 0: the derivative of relu and of max/min."""

    nargs = 1

    def fdiff(self, argindex=1):
        return sp.Integer(0)


class maximum(sp.Function):  # noqa: N801
    """Elementwise max of two values; the gradient goes to the larger one (to the first on ties)."""

    nargs = 2

    def fdiff(self, argindex=1):
        a, b = self.args
        return step(b - a) if argindex == 2 else 1 - step(b - a)


class minimum(sp.Function):  # noqa: N801
    nargs = 2

    def fdiff(self, argindex=1):
        a, b = self.args
        return step(a - b) if argindex == 2 else 1 - step(a - b)


def _sqrt(x):
    return sp.sqrt(x)


# name in a cell file -> (arity, SymPy constructor)
FUNCTIONS = {
    "sigmoid": (1, sigmoid),
    "σ": (1, sigmoid),
    "tanh": (1, sp.tanh),
    "relu": (1, relu),
    "exp": (1, sp.exp),
    "log": (1, sp.log),
    "softplus": (1, softplus),
    "logsigmoid": (1, logsigmoid),
    "abs": (1, sp.Abs),
    "sqrt": (1, _sqrt),
    "max": (2, maximum),
    "min": (2, minimum),
}
