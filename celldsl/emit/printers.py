"""SymPy -> source text. A target is a table from function name to its spelling, nothing more."""

from __future__ import annotations

import re

import sympy as sp
from sympy.printing.str import StrPrinter


def identifier(name: str, taken: set[str]) -> str:
    """A valid, unique Python identifier for a symbol name such as `W_f@`, `grad[c']`, `prev(i)`."""
    base = name.replace("'", "_new").replace("@", "_mm")
    base = re.sub(r"\W", "_", base, flags=re.ASCII).strip("_") or "v"
    if base[0].isdigit():
        base = "v" + base
    candidate, i = base, 1
    while candidate in taken:
        i += 1
        candidate = f"{base}_{i}"
    taken.add(candidate)
    return candidate


class TargetPrinter(StrPrinter):
    """Prints expressions with the target's function spellings; constants always as floats."""

    functions: dict[str, str] = {}

    def __init__(self, names: dict[sp.Symbol, str]):
        super().__init__({"order": "none"})
        self.names = names

    def _print_Symbol(self, expr):
        return self.names[expr]

    def _print_Function(self, expr):
        name = type(expr).__name__
        if name not in self.functions:
            raise NotImplementedError(f"no spelling for {name} in {type(self).__name__}")
        return self.functions[name].format(*[self._print(a) for a in expr.args])

    _print_tanh = _print_exp = _print_log = _print_sign = _print_Abs = _print_Function

    def _print_Rational(self, expr):
        return repr(float(expr))

    _print_Float = _print_Rational

    def _print_Integer(self, expr):
        return f"{int(expr)}.0"

    def _print_Half(self, expr):
        return "0.5"

    def _print_Pow(self, expr, rational=False):
        base, exp = expr.args
        b = self.parenthesize(base, 100)  # always bracket the base
        if exp.is_Integer and 1 <= int(exp) <= 4:
            return "(" + "*".join([b] * int(exp)) + ")"
        if exp.is_Integer and -4 <= int(exp) <= -1:
            return "(1.0/(" + "*".join([b] * -int(exp)) + "))"
        if exp == sp.Rational(1, 2):
            return self.functions["sqrt"].format(self._print(base))
        if exp == -sp.Rational(1, 2):
            return "(1.0/" + self.functions["sqrt"].format(self._print(base)) + ")"
        return self.functions["pow"].format(self._print(base), self._print(exp))
