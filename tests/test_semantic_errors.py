"""Semantic errors and warnings: each bad cell gives `file:line:col: error: message` pointing at the
culprit, as a CellError; unused names warn. One table, text -> message fragment and position.

A row fails if its check is removed: the fragment is specific to that check and the position is the
one it reports (without the check, the cell compiles, or fails elsewhere, or recurses forever).
"""

import warnings

import pytest

from celldsl import compile_cell
from celldsl.lang.errors import CellError, CellWarning, Source
from celldsl.lang.ir import MAX_DEPTH, MAX_SIZE, build_ir
from celldsl.lang.syntax import parse
from celldsl.plan import build_plan

HDR = "cell t\ninput x\nstate h\n"  # the first statement after it is on line 4
HDR_W = HDR + "param W, b\n"  # ... on line 5


def compile_text(text: str, filename: str = "bad.cell"):
    """The front end as compile_cell runs it, without the disk cache."""
    source = Source(text, filename)
    return build_plan(build_ir(parse(text, filename), source))


def _chain(n: int, body: str) -> str:
    """n intermediates a1..an, each `body` of the previous one."""
    lines = ["a0 = h"] + [f"a{i} = {body.format(p=f'a{i - 1}')}" for i in range(1, n + 1)]
    return "\n".join(lines) + "\n"


CASES = [
    # names
    ("undefined-name", HDR + "h' = tanh(y) + x\n", "unknown name 'y'", 4, 11),
    ("undefined-name-suggests", HDR + "h' = tanh(hh) + x\n", "unknown name 'hh'; did you mean 'h'?", 4, 11),
    ("state-never-updated", "cell t\ninput x\nstate h, c\noutput h\nh' = h + x\n",
     "state 'c' is never updated; add an equation c' = ...", 3, 10),
    ("intermediate-assigned-twice", HDR + "a = h\na = x\nh' = a\n",
     "'a' is assigned twice (first on line 4)", 5, 1),
    ("state-assigned-twice", HDR + "h' = h\nh' = x\n", "'h'' is assigned twice (first on line 4)", 5, 1),
    ("declared-twice", "cell t\ninput x\nstate x\n",
     "'x' is declared twice (as an input on line 2, and here as a state)", 3, 7),
    ("input-assigned", HDR + "x = h\nh' = x\n", "'x' is an input (line 2) and cannot be assigned", 4, 1),
    ("state-assigned-without-prime", HDR + "h = x\n",
     "'h' is a state (line 3) and cannot be assigned; write h' = ... for its next value", 4, 1),
    ("prime-on-intermediate", HDR + "a' = h\nh' = h + x\n",
     "'a' is not a state, so it has no next value a'", 4, 1),
    ("prime-read-of-non-state", HDR + "h' = q' + x\n", "'q' is not a state, so q' has no meaning", 4, 6),
    ("function-name-assigned", HDR + "tanh = h\nh' = x\n",
     "'tanh' is a function name and cannot be assigned", 4, 1),
    ("function-name-declared", HDR + "param sigmoid\nh' = x\n",
     "'sigmoid' is a function name and cannot name a parameter", 4, 7),
    ("group-used-as-value", HDR + "param G = [A, B]\nh' = G * h + A * B + x\n",
     "'G' is a parameter group", 5, 6),
    # cycles
    ("cycle-of-intermediates", HDR + "a = b + x\nb = a * h\nh' = a\n",
     "cycle among intermediates: a -> b -> a", 4, 1),
    ("self-reference", HDR + "a = a + x\nh' = a\n", "cycle among intermediates: a -> a", 4, 1),
    ("cycle-of-new-states", "cell t\ninput x\nstate h, c\noutput h\nh' = c' + x\nc' = h'\n",
     "cycle among equations: h' -> c' -> h'", 5, 1),
    # functions
    ("unknown-function", HDR + "h' = tanhh(h) + x\n", "unknown function 'tanhh'; did you mean 'tanh'?", 4, 6),
    ("too-few-arguments", HDR + "h' = max(h) + x\n", "max takes 2 arguments, got 1", 4, 6),
    ("too-many-arguments", HDR + "h' = tanh(h, x)\n", "tanh takes 1 argument, got 2", 4, 6),
    ("prev-of-state", HDR + "h' = prev(h) + x\n", "'h' is a state: its previous value is just 'h'", 4, 11),
    ("prev-of-unknown", HDR + "h' = prev(q) + x\n", "unknown intermediate 'q'", 4, 11),
    ("prev-of-expression", HDR + "h' = prev(h + x)\n", "prev takes a name", 4, 6),
    # matrices and sizes
    ("operands-of-different-sizes", HDR_W + "h' = W @ x + W @ h\n",
     "'W' is applied to operands of different sizes: input 'x' on line 5 and H-wide values here", 5, 14),
    ("matrix-used-elementwise", HDR_W + "h' = W @ h + W * h + x\n",
     "'W' is a matrix (applied with @ on line 5) but is used elementwise here", 5, 14),
    ("vector-used-as-matrix", HDR_W + "h' = W * h + W @ h + x\n",
     "'W' is used elementwise on line 5 (a vector) and as a matrix here", 5, 14),
    ("left-of-at-not-a-parameter", HDR_W + "h' = h @ x\n",
     "the left side of @ must be a matrix parameter", 5, 6),
    ("power-does-not-take-at", HDR_W + "h' = h ^ W @ x\n",
     "the left side of @ must be a matrix parameter", 5, 6),
    ("declared-matrix-used-elementwise", HDR + "param A : matrix\nh' = A * h + x\n",
     "'A' is a matrix (declared so) but is used elementwise here", 5, 6),
    ("declared-vector-applied-with-at", HDR + "param v : vector\nh' = v @ h + x\n",
     "'v' is declared a vector and cannot be applied with @", 5, 6),
    ("scalar-applied-with-at", HDR + "param a : scalar\nh' = a @ h + x\n", "'a' is declared scalar", 5, 6),
    ("at-on-a-number", HDR_W + "h' = W @ 2 + x\n",
     "the right side of @ must be an input or a vector-wide value", 5, 6),
    ("at-on-parameters-only", HDR_W + "h' = W @ b + h + x\n",
     "the right side of @ depends on parameters only", 5, 10),
    ("group-mixes-shapes", HDR + "param G = [A, c]\nh' = A @ h + c * h + x\n",
     "parameter group 'G' mixes shapes (A is H x H, c is a vector of width H)", 4, 12),
    ("chained-input-projections", HDR_W + "param V\nh' = V @ tanh(W @ x) + h\n",
     "two chained input projections", 6, 6),
    # declarations
    ("no-cell-at-all", "# nothing but a comment\n", "the file holds no cell", 1, 1),
    ("no-input", "cell t\nstate h\nh' = h\n", "the cell declares no input", 1, 1),
    ("no-state", "cell t\ninput x\n", "the cell declares no state", 1, 1),
    ("input-declared-twice", "cell t\ninput x, x\nstate h\nh' = h + x\n", "'x' is declared twice", 2, 10),
    ("several-states-no-output", "cell t\ninput x\nstate h, c\nh' = c + x\nc' = h\n",
     "the cell has several states; say which is the output", 3, 7),
    ("unknown-output", HDR + "output q\nh' = h + x\n",
     "unknown output (a state or an intermediate) 'q'", 4, 8),
    ("unknown-parameter-kind", HDR + "param a : vektor\nh' = a * h + x\n",
     "unknown parameter kind 'vektor'", 4, 11),
    ("init-of-unknown-parameter", HDR_W + "init V = zeros\nh' = W @ x + b\n", "unknown parameter 'V'", 5, 6),
    ("unknown-initialiser", HDR_W + "init W = glorot\nh' = W @ x + b\n",
     "unknown initialiser 'glorot'", 5, 10),
    ("unknown-initialiser-call", HDR_W + "init W = xavier(2)\nh' = W @ x + b\n",
     "unknown initialiser 'xavier(...)'", 5, 10),
    # constants
    ("division-by-zero", HDR + "h' = h / (1 - 1) + x\n", "division by zero", 4, 11),
    ("division-by-a-zero-intermediate", HDR + "z = 1 - 1\nh' = h / z + x\n",
     "division by zero: 'z' is zero (it is divided by on line 5)", 4, 1),
    ("log-of-zero", HDR + "h' = h * log(0) + x\n", "this constant is not a finite number", 4, 10),
    ("sqrt-of-negative", HDR + "h' = h * sqrt(-4) + x\n", "this constant is not a real number", 4, 10),
    ("fractional-power-of-negative", HDR + "h' = h * (-8) ^ 0.5 + x\n",
     "this constant is not a real number", 4, 10),
    ("zero-to-negative-power", HDR + "h' = h * 0 ^ -1 + x\n",
     "this constant is 0 to a negative power", 4, 10),
    ("number-too-large", HDR + "h' = h * 1e999 + x\n", "the number 1e999 is too large", 4, 10),
    ("constant-too-large", HDR + "h' = h * 10 ^ 400 + x\n", "this constant is too large", 4, 10),
    ("tower-of-powers", HDR + "h' = h * 2 ^ 2 ^ 2 ^ 2 ^ 2 ^ 2 + x\n", "this constant is too large", 4, 14),
    ("product-too-large", HDR + "h' = h * 1e200 * 1e200 + x\n", "this constant is too large", 4, 6),
    ("coefficient-too-large", HDR + "a = h * 1e200\nh' = a * 1e200 + x\n",
     "h' has a coefficient that is not a finite number below 1e300", 5, 1),
    # resource limits after inlining intermediates
    ("too-deep-after-inlining", HDR + _chain(MAX_DEPTH, "tanh({p})") + f"h' = a{MAX_DEPTH} + x\n",
     f"'a{MAX_DEPTH}' is nested {MAX_DEPTH + 1} levels deep once intermediates are put in", 4 + MAX_DEPTH, 1),
    ("too-large-after-inlining", HDR + _chain(14, "{p} * ({p} + 1)") + "h' = a14 + x\n",
     f"operations once intermediates are put in (the limit is {MAX_SIZE})", 4 + 11, 1),
    # an unused equation is still checked
    ("unused-equation-checked", HDR + "a = foo(h)\nh' = h + x\n", "unknown function 'foo'", 4, 5),
]  # fmt: skip


@pytest.mark.parametrize(
    ("text", "fragment", "line", "column"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_semantic_error_message_and_position(text, fragment, line, column):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CellWarning)
        with pytest.raises(CellError) as info:
            compile_text(text)
    err = info.value
    assert fragment in err.message
    assert (err.filename, err.line, err.column) == ("bad.cell", line, column)
    first, shown, caret = str(err).splitlines()
    assert first == f"bad.cell:{line}:{column}: error: {err.message}"
    assert shown == "    " + text.splitlines()[line - 1].expandtabs(1)
    assert caret.index("^") == 4 + column - 1


def test_caret_underlines_the_whole_culprit():
    with pytest.raises(CellError) as info:
        compile_text(HDR_W + "h' = W @ x + W @ h\n")
    assert str(info.value).splitlines()[2] == "    " + " " * 13 + "^~~~~"


# ---- input size == hidden size (reported when a layer is built) ---------------------------------

NEEDS_I_EQ_H = [
    # (cell, line, column of the input-sized operand that meets H-wide values)
    ("mut1", 21, 33),  # the x of tanh(x) in h' = tanh(W_hh @ (r * h) + tanh(x) + b) * z + ...
    ("mut2", 20, 13),  # x in r = sigmoid(x + W_hr @ h + b_r)
    ("sru", 27, 24),  # x in h = r * c' + (1 - r) * x
]


@pytest.mark.parametrize(("cell", "line", "column"), NEEDS_I_EQ_H)
def test_input_size_must_equal_hidden_size_where_the_equations_need_it(cell, line, column):
    compiled = compile_cell(cell)
    compiled.check_sizes(5, 5)  # equal sizes: fine
    with pytest.raises(CellError) as info:
        compiled.check_sizes(3, 5)
    err = info.value
    assert "needs input_size == hidden_size (got input_size=3, hidden_size=5)" in err.message
    assert (err.line, err.column) == (line, column)
    assert err.filename.endswith(f"{cell}.cell")


def test_layer_reports_input_size_mismatch_at_the_use():
    from celldsl import Recurrent

    with pytest.raises(CellError, match=r"mut1\.cell:21:33: error: input 'x' is used elementwise"):
        Recurrent("mut1", 3, 5)


def test_sizes_of_other_cells_are_free():
    compile_cell("lstm").check_sizes(3, 5)
    assert compile_cell("lstm").ir.needs_hidden_size == {}


def test_input_size_use_through_an_intermediate_and_prev():
    ir = compile_text(HDR + "a = x * 2\nh' = prev(a) + h\n").ir
    assert ir.needs_hidden_size["x"].line == 4  # a's value, carried as prev(a), is I wide and meets h
    ir = compile_text(HDR + "output o\na = x * 2\no = prev(a)\nh' = h\n").ir
    assert ir.widths["prev(a)"] == ir.widths["o"] == "x" and ir.needs_hidden_size == {}  # a state I wide
    ir = compile_text(HDR + "output o\no = x * 2\nh' = h\n").ir
    assert ir.widths["o"] == "x" and ir.needs_hidden_size == {}  # the output `o` is I wide: no condition


# ---- warnings ---------------------------------------------------------------------------------

WARNINGS = [
    ("unused-parameter", HDR_W + "h' = tanh(W @ x + h)\n", "parameter 'b' is never used", 4, 10),
    ("unused-intermediate", HDR + "a = h * 2\nh' = h + x\n", "'a' is defined but never used", 4, 1),
    ("only-used-by-unused", HDR + "a = h * 2\nb = a + 1\nh' = h + x\n",
     "'a' is defined but never used", 4, 1),
    ("unused-input", HDR + "h' = tanh(h)\n", "input 'x' is never used", 2, 7),
]


@pytest.mark.parametrize(
    ("text", "fragment", "line", "column"), [w[1:] for w in WARNINGS], ids=[w[0] for w in WARNINGS]
)
def test_warning_message_and_position(text, fragment, line, column):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compile_text(text)
    texts = [str(w.message) for w in caught if issubclass(w.category, CellWarning)]
    hits = [t for t in texts if fragment in t]
    assert len(hits) == 1, texts
    assert hits[0].startswith(f"bad.cell:{line}:{column}: warning: ")
    assert hits[0].splitlines()[2].index("^") == 4 + column - 1


def test_used_names_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error", CellWarning)
        compile_text(HDR_W + "a = tanh(W @ x + b)\nh' = a * prev(a) + h\n")


def test_unused_equation_leaves_no_trace_in_the_plan():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CellWarning)
        plan = compile_text(HDR_W + "param V\nunused = V @ h + tanh(x)\nh' = tanh(W @ x + b) + h\n")
    assert [g.params for g in plan.hoisted] == [("W",)]
    assert plan.gemms == []
    assert plan.ir.needs_hidden_size == {}


def test_cached_compile_repeats_the_warnings(tmp_path, monkeypatch):
    monkeypatch.setenv("CELLDSL_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "w.cell"
    path.write_text(HDR_W + "h' = tanh(W @ x + h)\n")
    for _ in range(2):  # cold, then from the cache
        with pytest.warns(CellWarning, match="parameter 'b' is never used"):
            compile_cell(path)


# ---- every error at once, in text order -----------------------------------------------------------


def test_every_independent_error_is_reported_in_text_order():
    """The issue's case (an unknown function on line 7, an undefined name on line 8: only line 8 was
    reported) and more: declarations, initialisers and equations each report their own error; an
    equation that reads a failed one says nothing more."""
    text = (
        "input x\nstate h, c\noutput h\nparam W, U, b\nparam K : blah\ninit b = normal(-1)\n"
        "a = tanhh(W @ x)\nq = undefined_name + h\nd = a * 2\nh' = tanh(U @ h + b) + d\nc' = c * q\n"
    )
    with pytest.raises(CellError) as info:
        compile_text(text)
    err = info.value
    got = [(e.line, e.column) for e in err.errors]
    assert got == [(5, 11), (6, 10), (7, 5), (8, 5)]  # nothing for d, h', c': they read a and q
    assert [e.message.split(";")[0] for e in err.errors] == [
        "unknown parameter kind 'blah'", "the standard deviation must not be negative, got -1",
        "unknown function 'tanhh'", "unknown name 'undefined_name'",
    ]  # fmt: skip
    assert str(err).count(": error: ") == 4 and str(err).startswith("bad.cell:5:11: error: ")
    assert (err.line, err.column) == (5, 11)


def test_every_syntax_error_is_reported_one_per_statement():
    text = "input x\nstate h\nparam W, U\na = tanh(W @ x +)\nb = (x * * 2)\nh' = tanh(U @ h + a + b\n"
    with pytest.raises(CellError) as info:
        compile_text(text)
    assert [(e.line, e.column) for e in info.value.errors] == [(4, 17), (5, 10), (6, 24)]
    assert "the '(' on line 6, column 10 is never closed" in info.value.errors[2].message


def test_a_flood_of_errors_stops_at_twenty():
    text = "input x\nstate h\n" + "".join(f"a{i} = q{i}\n" for i in range(100)) + "h' = h\n"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CellWarning)
        with pytest.raises(CellError) as info:
            compile_text(text)
    assert len(info.value.errors) == 20 and info.value.errors[0].line == 3
