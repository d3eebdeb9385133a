"""kernels/<stem>.py is exactly what the compiler emits now for every elementwise zoo cell, and nothing
else lives there: regenerate with the command in FIX when this fails. The matrix-memory cells
(tests/zoo.py: MATRIX) have no kernels/ file: `celldsl compile` refuses them, and their opt-in Triton
kernels are generated when a layer first runs (tests/test_triton_matrix.py)."""

from zoo import ELEMENTWISE, MATRIX

from celldsl.compiler import ZOO, compile_cell
from celldsl.targets.triton.emit import triton_module_source
from celldsl.targets.triton.module import KERNELS

FIX = "regenerate with: celldsl compile $(celldsl list --elementwise) -o kernels/"


def test_every_zoo_cell_has_a_current_kernel_file():
    stale, missing = [], []
    for cell in [ZOO / f"{name}.cell" for name in ELEMENTWISE]:
        path = KERNELS / f"{cell.stem}.py"
        if not path.is_file():
            missing.append(path.name)
        elif path.read_text(encoding="utf-8") != triton_module_source(compile_cell(cell).plan):
            stale.append(path.name)
    assert not missing, f"missing in kernels/: {missing}; {FIX}"
    assert not stale, f"stale in kernels/: {stale}; {FIX}"


def test_no_kernel_file_without_a_cell():
    cells = set(ELEMENTWISE)
    assert not set(MATRIX) & {p.stem for p in KERNELS.glob("*.py")}
    orphans = sorted(p.name for p in KERNELS.glob("*.py") if p.stem not in cells)
    assert not orphans, f"kernels/ files with no cells/<stem>.cell: {orphans}; delete them"


def test_the_same_cell_given_any_way_emits_the_same_file(tmp_path, monkeypatch):
    """The header names `cells/<x>.cell` whether the cell was given by path, absolute path or zoo
    name, so kernels/ does not depend on the working directory."""
    texts = {triton_module_source(compile_cell(c).plan) for c in ("lstm", str(ZOO / "lstm.cell"))}
    monkeypatch.chdir(ZOO.parent)
    texts.add(triton_module_source(compile_cell("cells/lstm.cell").plan))
    assert len(texts) == 1
