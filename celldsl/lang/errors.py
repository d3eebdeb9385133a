"""Errors and warnings that point into a cell file: `file:line:col: error: message`, the line, a caret."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property


@dataclass(frozen=True)
class Source:
    """The text of a cell file and the name to show in messages."""

    text: str
    filename: str = "<cell>"

    @cached_property
    def lines(self) -> list[str]:
        """The lines as the parser counts them: split at newlines only (str.splitlines also splits
        at form feeds and U+2028, which would shift every later line number)."""
        return [line.removesuffix("\r") for line in self.text.split("\n")]

    def line(self, lineno: int) -> str:
        lines = self.lines
        return lines[lineno - 1] if 1 <= lineno <= len(lines) else ""

    def __getstate__(self):  # the cached line list is not worth pickling
        return {"text": self.text, "filename": self.filename}

    def __setstate__(self, state):
        object.__setattr__(self, "text", state["text"])
        object.__setattr__(self, "filename", state["filename"])


@dataclass(frozen=True)
class Loc:
    """A position in a cell file (1-based line and column; end_column exclusive)."""

    line: int
    column: int
    end_column: int | None = None


def printable(text: str) -> str:
    """Text safe to print on a terminal: control characters (ESC, BEL, ...), line breaks and lone
    surrogates (undecodable bytes of a file name) are escaped as Python would write them."""
    return "".join(c if c.isprintable() and not 0xD800 <= ord(c) <= 0xDFFF else ascii(c)[1:-1] for c in text)


def render(kind: str, message: str, source: Source | None, loc: Loc | None) -> str:
    """Format a diagnostic the way compilers do, with the offending line and a caret under it."""
    if source is None or loc is None:
        where = f"{printable(source.filename)}: " if source is not None else ""
        return f"{where}{kind}: {message}"
    text = "".join(c if c.isprintable() or c == "\t" else "?" for c in source.line(loc.line)).expandtabs(1)
    width = 1
    if loc.end_column is not None and loc.end_column > loc.column:
        width = loc.end_column - loc.column
    width = max(1, min(width, max(1, len(text) - loc.column + 1)))
    caret = " " * (loc.column - 1) + "^" + "~" * (width - 1)
    return f"{printable(source.filename)}:{loc.line}:{loc.column}: {kind}: {message}\n    {text}\n    {caret}"


class CellError(ValueError):
    """A problem in a cell file. `str(err)` is the full diagnostic; `line`/`column` locate it."""

    def __init__(self, message: str, source: Source | None = None, loc: Loc | None = None):
        self.message = message
        self.source = source
        self.loc = loc
        self.filename = source.filename if source else None
        self.line = loc.line if loc else None
        self.column = loc.column if loc else None
        self.errors = [self]
        super().__init__(render("error", message, source, loc))


class CellErrors(CellError):
    """Several independent problems in one cell file. `errors` holds them in text order; `str()` lists
    every diagnostic, and `line`/`column`/`message` are the first's, so code that handles one
    CellError handles this too."""

    def __init__(self, errors: list[CellError]):
        ordered = sorted(errors, key=lambda e: (e.line or 0, e.column or 0))
        first = ordered[0]
        super().__init__(first.message, first.source, first.loc)
        self.errors = ordered
        self.args = ("\n".join(str(e) for e in ordered),)

    def __str__(self) -> str:
        return self.args[0]


def raise_all(errors: list[CellError]) -> None:
    """Raise the one error, or every error at once (in text order); nothing when there is none."""
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise CellErrors(errors)


class CellWarning(UserWarning):
    """Something legal but probably unintended in a cell file (e.g. an unused parameter)."""


def warning_text(message: str, source: Source | None, loc: Loc | None) -> str:
    return render("warning", message, source, loc)


class CellTensorError(ValueError, RuntimeError):
    """A tensor a layer cannot take (its shape, dtype or device). torch.nn raises RuntimeError for
    these and earlier celldsl raised ValueError; this is both, so code written for either catches it."""
