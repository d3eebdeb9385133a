"""The widths of a step's values: which values have the same length, how many rows a matrix has.

A width is a name. "H" is the hidden size. A state may declare its own (`state h : P`), and an input's
width is named after the input (its size is the layer's input_size, or input_sizes[name]). Two
widths broadcast over any other: "1" (a number or a scalar parameter) and "row" (one value per
sequence: a mean over a vector's elements, an input or state declared `: 1`).

Inference works on classes of values that must have one width, as type inference does: every use
of an input or state is a class with that name (and its place in the file), a vector parameter's
width and a matrix's rows and columns are classes without a name until their uses give them one,
and an elementwise operation merges the classes of its operands. A class nothing names is H.

Two named widths that meet elementwise (MUT1's tanh(x) next to the state: the input's width meets H)
must be equal when the layer is built. `constraints` keeps, for each such pair, the first place in
the text where the less usual width (the input's) entered, and CompiledCell.check_sizes raises
there when the sizes given differ; the merged class is named by the usual one (H before a declared
width before an input's).
"""

from __future__ import annotations

import itertools

from .errors import Loc

BROADCAST = ("1", "row")
H = "H"


class Widths:
    def __init__(self, inputs: list[str]):
        self.inputs = set(inputs)
        self.parent: dict[str, str] = {}
        self.name: dict[str, str] = {}  # class root -> its width name, once it has one
        self.origin: dict[str, Loc | None] = {}  # class root -> where that name entered
        self.constraints: dict[tuple[str, str], Loc | None] = {}
        self._fresh = itertools.count()

    def named(self, width: str, loc: Loc | None) -> str:
        """A value of a named width (a use of an input or state) at `loc`."""
        if width in BROADCAST:
            return width
        cls = f"?{next(self._fresh)}"
        self.parent[cls], self.name[cls], self.origin[cls] = cls, width, loc
        return cls

    def unknown(self, key: str) -> str:
        """The one class of `key` (a vector's width, a matrix's rows or columns, a carried state)."""
        cls = "?" + key
        self.parent.setdefault(cls, cls)
        return cls

    def find(self, cls: str) -> str:
        root = cls
        while self.parent.get(root, root) != root:
            root = self.parent[root]
        while cls != root:  # path compression
            cls, self.parent[cls] = self.parent[cls], root
        return root

    def unify(self, a: str, b: str, loc: Loc | None = None) -> str:
        """Merge two classes; two different names become a constraint (see the module docstring)."""
        a, b = self.find(a), self.find(b)
        if a == b:
            return a
        na, nb = self.name.get(a), self.name.get(b)
        if na is not None and nb is not None and na != nb:
            keep, other = (a, b) if self._rank(na) <= self._rank(nb) else (b, a)
            pair = tuple(sorted((na, nb)))
            where = self.origin.get(other) or loc
            first = self.constraints.get(pair)
            if first is None or (
                where is not None and (where.line, where.column) < (first.line, first.column)
            ):
                self.constraints[pair] = where  # the first place in the text where they meet
        else:
            keep, other = (a, b) if na is not None or nb is None else (b, a)
        self.parent[other] = keep
        return keep

    def same(self, a: str, b: str) -> bool:
        """Merge two classes if their names agree: False for two different names (a matrix applied to
        values of two widths is an error, not a condition on the sizes)."""
        na, nb = self.name.get(self.find(a)), self.name.get(self.find(b))
        if na is not None and nb is not None and na != nb:
            return False
        self.unify(a, b)
        return True

    def _rank(self, width: str) -> tuple[bool, bool, str]:
        return (width != H, width in self.inputs, width)

    def join(self, parts: list[tuple[str, Loc]]) -> str:
        """The class of an elementwise combination of values of these classes (each with its place)."""
        named = [(w, loc) for w, loc in parts if w not in BROADCAST]
        if not named:
            return "row" if any(w == "row" for w, _ in parts) else "1"
        result = named[0][0]
        for cls, loc in named[1:]:
            result = self.unify(result, cls, loc)
        return result

    def resolve(self, cls: str) -> str:
        """The width of a class: its name, or H when nothing named it."""
        if cls in BROADCAST or not cls.startswith("?"):
            return cls
        return self.name.get(self.find(cls), H)

    def snapshot(self):
        return dict(self.parent), dict(self.name), dict(self.origin), dict(self.constraints)

    def restore(self, snapshot) -> None:
        self.parent, self.name, self.origin, self.constraints = (dict(part) for part in snapshot)


def width_words(width: str, inputs: list[str]) -> str:
    """A width as messages say it."""
    if width == H:
        return "H-wide values"
    if width == "row":
        return "one value per sequence"
    if width in inputs:
        return f"input '{width}'"
    return f"{width}-wide values"
