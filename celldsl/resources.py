"""Where celldsl's data lives: the zoo's cells, the grammar, the zoo's generated Triton kernels.

A source checkout keeps them at the top level (cells/, grammars/, kernels/); an installed wheel
carries them inside the package (pyproject's package-dir mapping puts cells/ at celldsl/cells/ and
so on). importlib.resources finds the installed copy; a checkout falls back to its own folders.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parent.parent


def folder(name: str) -> Path:
    """The data folder `name` ("cells", "grammars" or "kernels")."""
    shipped = files("celldsl") / name
    if shipped.is_dir():
        return Path(str(shipped))
    return CHECKOUT / name


ZOO = folder("cells")
GRAMMAR = folder("grammars") / "cell.lark"
KERNELS = folder("kernels")


def zoo_names() -> list[str]:
    """The zoo's cells by name ("lstm", "mut1", ...), sorted."""
    return sorted(p.stem for p in ZOO.glob("*.cell"))
