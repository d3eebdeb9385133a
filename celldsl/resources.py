"""Where celldsl's data lives: the zoo's cells, the grammar, the zoo's generated Triton kernels.

A source checkout keeps them at the top level (cells/, grammars/, kernels/); an installed wheel
carries them inside the package (pyproject's package-dir mapping puts cells/ at celldsl/zoo/,
grammars/ at celldsl/grammars/, kernels/ at celldsl/kernels/). importlib.resources finds the
installed copy; a checkout falls back to its own folders.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parent.parent


def folder(checkout: str, shipped: str) -> Path:
    """A data folder: `shipped` inside the installed package, else `checkout` at the checkout's top."""
    inside = files("celldsl") / shipped
    if inside.is_dir():
        return Path(str(inside))
    return CHECKOUT / checkout


ZOO = folder("cells", "zoo")
GRAMMAR = folder("grammars", "grammars") / "cell.lark"
KERNELS = folder("kernels", "kernels")


def zoo_file(name: str) -> Path | None:
    """The shipped cell of a zoo name ("lstm", "mlstm"), or None. The one resolver of zoo names: every
    zoo cell, elementwise or matrix-memory, is cells/<name>.cell."""
    if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
        return None  # a name, never a path: "matrix/mlstm" or "../x" is not in the zoo
    path = ZOO / f"{name}.cell"
    return path if path.is_file() else None


def zoo_names() -> list[str]:
    """The zoo's cells by name ("lstm", "mut1", ...), sorted."""
    return sorted(p.stem for p in ZOO.glob("*.cell"))
