"""SymPy -> source text. A target is a table from function name to its spelling, nothing more."""

from __future__ import annotations

import builtins
import keyword
import re

import sympy as sp
from sympy.printing.str import StrPrinter

PYTHON_RESERVED = frozenset(keyword.kwlist) | frozenset(keyword.softkwlist) | frozenset(dir(builtins))


def identifier(name: str, taken: set[str], suffix: str = "") -> str:
    """A valid, unique ASCII identifier for a symbol name such as `W_f@`, `grad[c']`, `prev(i)`, `%t3`.

    `taken` holds what the scope already uses: the target's reserved words (keywords, builtins, the
    generated code's own names, seeded by the emitter) and every identifier handed out before, so a
    user's name can never become a keyword, shadow a helper or meet a generated name. ASCII only:
    Python folds identifiers with NFKC, which would make distinct Unicode names one. A `suffix`
    ("_ptr", "_stride") always ends the result, after any number that makes it unique."""
    base = name.replace("'", "_new").replace("@", "_mm")
    base = re.sub(r"\W", "_", base, flags=re.ASCII).strip("_") or "v"
    if base[0].isdigit():
        base = "v" + base
    candidate, i = base + suffix, 1
    while candidate in taken:
        i += 1
        candidate = f"{base}_{i}{suffix}"
    taken.add(candidate)
    return candidate


def python_text(text: str, lines: bool = False) -> str:
    """Text safe inside a generated Python docstring (lines=True keeps line breaks) or comment: printable
    ASCII without backslashes or double quotes; anything else becomes '?'. Cell names and equations
    reach generated source only this way (file names never do)."""
    return "".join(c if (" " <= c <= "~" and c not in '\\"') or (lines and c == "\n") else "?" for c in text)


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
