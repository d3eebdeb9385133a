"""The zoo as the tests see it.

Most zoo cells build as `Recurrent(cell, I, H)` and run on one input with H-wide states: the
zoo-wide tests (references, gradcheck, gradgradcheck, the Triton interpreter) take those, GENERIC.
The others need something a generic test does not give, and their own tests run each of them the
same ways (its reference on every backend, packed and bidirectional, gradcheck): SPECIAL names the
reason and the file. MATRIX are the matrix-memory cells (a matrix state per head, run by
MatrixRecurrent, no plan, no kernels/ file): tests/test_matrix_cells.py, test_matrix_zoo.py,
test_matrix_cpu.py, test_triton_matrix.py and test_matrix_fuzz.py run each against its einsum
reference (tests/matrix_references.py). SHAPED are ordinary cells with shaped parameters (a rank-R
bottleneck: one head on the matrix path, no plan, no kernels/ file): tests/test_lowrank_cells.py
runs each against a loop of its paper's equations. tests/test_zoo_partition.py checks that these lists cover
the zoo and that each named file names its cells.
"""

from pathlib import Path

CELLS = Path(__file__).resolve().parents[1] / "cells"
ZOO = sorted(p.stem for p in CELLS.glob("*.cell"))
MATRIX = ["deltanet", "gated_deltanet", "gla", "hgrn2", "m2rnn", "mamba", "mlstm", "rwkv6"]
SHAPED = ["flstm"]
ELEMENTWISE = [c for c in ZOO if c not in MATRIX + SHAPED]  # a plan, a kernels/ file, every backend
SPECIAL = {  # stem -> (why a generic test cannot build it, the test file that runs it)
    "lstm_proj": ("a declared width: sizes={'P': ...}", "test_language2.py"),
    "slstm_heads": ("a hidden size that divides by its 4 heads", "test_language2.py"),
    "phased_lstm": ("an extra input: the time stamps t", "test_language2.py"),
    "lru": ("a declared width: sizes={'P': ...}, and I == H", "test_matrix_zoo.py"),
    "chrono_lstm": ("the size its init reads: sizes={'T_max': ...}", "test_matrix_zoo.py"),
}
GENERIC = [c for c in ELEMENTWISE if c not in SPECIAL]
# the sizes= an elementwise zoo cell needs beyond (I, H), for the zoo-wide tests that build every
# ELEMENTWISE cell (lru also needs I == H: its ir.needs_hidden_size says so)
LAYER_ARGS = {
    "lstm_proj": {"sizes": {"P": 3}},
    "lru": {"sizes": {"P": 3}},
    "chrono_lstm": {"sizes": {"T_max": 20}},
}
