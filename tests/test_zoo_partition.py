"""tests/zoo.py's lists cover the zoo: every cells/<name>.cell is an elementwise cell the zoo-wide tests
build (GENERIC), one with a reason and its own test file (SPECIAL), a matrix-memory cell that its
own test files run (MATRIX), or an ordinary cell with shaped parameters (SHAPED,
test_lowrank_cells.py). A new cell cannot slip past the zoo-wide tests unnoticed."""

from pathlib import Path

import pytest
from zoo import CELLS, ELEMENTWISE, GENERIC, LAYER_ARGS, MATRIX, SHAPED, SPECIAL, ZOO

from celldsl import compile_cell
from celldsl.compiler import CompiledMatrixCell
from celldsl.resources import zoo_names

TESTS = Path(__file__).resolve().parent
MATRIX_FILES = ["test_matrix_cells.py", "test_matrix_cpu.py", "test_triton_matrix.py", "test_matrix_fuzz.py"]


def test_the_lists_partition_the_zoo():
    assert ZOO == zoo_names() == sorted(p.stem for p in CELLS.glob("*.cell"))
    assert sorted(GENERIC + list(SPECIAL) + MATRIX + SHAPED) == ZOO
    assert not set(GENERIC) & set(SPECIAL) and not set(SPECIAL) & set(MATRIX + SHAPED)
    assert set(ELEMENTWISE) == set(ZOO) - set(MATRIX + SHAPED) and set(LAYER_ARGS) <= set(ELEMENTWISE)


def test_matrix_is_exactly_the_cells_with_matrix_states():
    matrix_path = sorted(c for c in ZOO if isinstance(compile_cell(c), CompiledMatrixCell))
    assert MATRIX == [c for c in matrix_path if compile_cell(c).ir.heads]
    assert SHAPED == [c for c in matrix_path if not compile_cell(c).ir.heads]


@pytest.mark.parametrize("cell", SHAPED)
def test_each_shaped_cell_is_run_by_test_lowrank_cells(cell):
    assert f"{cell}.cell" in (TESTS / "test_lowrank_cells.py").read_text(encoding="utf-8")


@pytest.mark.parametrize("cell", sorted(SPECIAL))
def test_each_special_cell_is_run_by_the_file_it_names(cell):
    reason, file = SPECIAL[cell]
    assert reason and f'"{cell}"' in (TESTS / file).read_text(encoding="utf-8")


@pytest.mark.parametrize("cell", MATRIX)
def test_each_matrix_cell_has_a_reference_test(cell):
    """Each is compared with its einsum reference (test_matrix_cells.py's CELLS, with the REFERENCES
    of tests/matrix_layers.py, or the zoo file's rwkv6/mamba tests) and fuzzed (test_matrix_fuzz.py
    takes MATRIX)."""
    texts = {f: (TESTS / f).read_text(encoding="utf-8") for f in [*MATRIX_FILES, "test_matrix_zoo.py"]}
    assert f'"{cell}"' in texts["test_matrix_cells.py"] + texts["test_matrix_zoo.py"]
    assert "MATRIX" in texts["test_matrix_fuzz.py"]
