"""Mistakes in matrix-memory cells (lang/tensors.py): each gives `file:line:col: error: message` with a
hint, at the culprit. A row fails if its check is removed (the cell compiles, or fails elsewhere)."""

import warnings

import pytest

from celldsl.lang.errors import CellError, CellWarning, Source
from celldsl.lang.syntax import parse
from celldsl.lang.tensors import build_tensor_ir, is_matrix_cell

HDR = ("cell t\ninput x\nstate S : (V, K) per head\noutput o\nparam W_k, W_q : (K, x) per head\n"
       "param W_v : (V, x) per head\nparam w_b : x per head\nparam b : 1 per head\n"
       "k = W_k @ x\nq = W_q @ x\nv = W_v @ x\n")  # the first statement after it is on line 12
OK = "S' = S + v @ kᵀ\no = S' @ q\n"


def build(text: str):
    return build_tensor_ir(parse(text, "bad.cell"), Source(text, "bad.cell"))


CASES = [
    ("outer-product-written-elementwise", HDR + "S' = S + v * k\no = S' @ q\n",
     "elementwise operation on a V-vector per head and a K-vector per head", 12, 10),
    ("vector-scales-matrix-elementwise", HDR + "a = sigmoid(W_k @ x)\nS' = S * a + v @ kᵀ\no = S' @ q\n",
     "to scale a matrix's rows write diag(a) @ S", 13, 6),
    ("matmul-inner-widths", HDR + "S' = S + v @ kᵀ\no = S' @ v\n",
     "@ needs the left side's columns to match the right side's rows: "
     "a (V, K) matrix per head @ a V-vector", 13, 5),
    ("dot-without-transpose", HDR + "s = k @ q\nS' = s * S\no = S' @ q\n",
     "did you mean a transposed vector on the left (kᵀ @ q)?", 12, 5),
    ("outer-without-transpose", HDR + "S' = S + v @ k\no = S' @ q\n",
     "@ needs the left side's columns", 12, 10),
    ("update-shape", HDR + "S' = v @ qᵀ @ S @ kᵀ\no = S' @ q\n",
     "@ needs the left side's columns", 12, 6),
    ("state-shape-changes", HDR + "S' = S @ k\no = v\n",
     "S' is a V-vector per head, but state 'S' is declared a (V, K) matrix per head", 12, 1),
    ("identity-alone", HDR + "S' = S + 2 * I\no = S' @ q\n", "the identity I is a square matrix", 12, 10),
    ("diag-of-a-matrix", HDR + "S' = diag(S) @ S\no = S' @ q\n", "diag() takes a vector", 12, 6),
    ("number-at", HDR + "S' = 2 @ S\no = S' @ q\n", "write * for a number", 12, 6),
    ("output-a-matrix", HDR.replace("output o", "output S") + "S' = S + v @ kᵀ\n",
     "the output must be a vector per head", 4, 8),
    ("state-without-shape", "cell t\ninput x\nstate S : (V, K) per head\nstate n\nS' = S\nn' = n\noutput S\n",
     "state 'n' needs its shape in a matrix-memory cell", 4, 7),
    ("param-without-shape", HDR.replace("param b : 1 per head", "param b") + OK,
     "parameter 'b' needs its shape in a matrix-memory cell", 8, 7),
    ("input-per-head", HDR.replace("input x", "input x : K per head") + OK,
     "input 'x' is one per sequence, shared by the heads", 2, 11),
    ("unknown-function", HDR + "S' = S + softmax(v) @ kᵀ\no = S' @ q\n",
     "unknown function 'softmax' in a matrix-memory cell", 12, 10),
    ("unknown-name", HDR + "S' = S + u @ kᵀ\no = S' @ q\n", "unknown name 'u'", 12, 10),
    ("cycle", HDR + "a = bb\nbb = a\nS' = S + a * v @ kᵀ\no = S' @ q\n", "depends on itself", 12, 5),
    ("two-inputs", HDR.replace("input x", "input x, ctx") + OK,
     "a matrix-memory cell reads one input for now", 2, 10),
    ("no-state", "cell t\ninput x\nparam b : 1 per head\no = b\noutput o\n",
     "a matrix-memory cell needs a state", 1, 6),
    ("no-update", HDR + "o = S @ q\n", "state 'S' has no update: write S' = ...", 3, 7),
]


@pytest.mark.parametrize(("text", "fragment", "line", "column"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_matrix_cell_errors(text, fragment, line, column):
    with pytest.raises(CellError) as info:
        build(text)
    err = info.value
    assert fragment in err.message, err.message
    assert (err.line, err.column) == (line, column), str(err)
    assert str(err).startswith(f"bad.cell:{line}:{column}: error: ")


def test_every_independent_error_in_text_order():
    text = HDR + "a = v * k\nbb = q * v\nS' = S + v @ kᵀ\no = S' @ q\n"
    with pytest.raises(CellError) as info:
        build(text)
    assert [(e.line, e.column) for e in info.value.errors] == [(12, 5), (13, 6)]


def test_a_matrix_shared_by_the_heads():
    """`param U : (R, x)` (no `per head`) is one matrix for every head: stored [R, I], not per head."""
    ir = build(HDR + "param U : (R, x)\nparam W_r : (K, R) per head\nr = W_r @ (U @ x)\n"
               "S' = S + v @ rᵀ\no = S' @ q\n")
    assert not ir.kinds["U"].head and ir.kinds["W_r"].head
    assert ir.param_shape("U", {"heads": 3, "R": 2, "x": 6}) == (2, 6)
    assert ir.param_shape("W_r", {"heads": 3, "R": 2, "K": 4}) == (3, 4, 2)


def test_a_good_cell_builds_and_is_a_matrix_cell():
    ir = build(HDR + OK)
    assert is_matrix_cell(parse(HDR + OK)) and ir.states == ["S"] and ir.widths == ["K", "V"]
    assert not is_matrix_cell(parse("cell t\ninput x\nstate h\nh' = h\n"))


def test_unused_names_warn_at_their_place():
    text = (HDR.replace("param b : 1 per head", "param b : 1 per head\nparam u : K per head")
            + "a = q * 2\n" + OK)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CellWarning)
        build(text)
    got = [str(w.message).split("\n")[0] for w in caught if issubclass(w.category, CellWarning)]
    assert got == ["bad.cell:7:7: warning: parameter 'w_b' is never used",
                   "bad.cell:8:7: warning: parameter 'b' is never used",
                   "bad.cell:9:7: warning: parameter 'u' is never used",
                   "bad.cell:13:1: warning: 'a' is defined but never used"]
