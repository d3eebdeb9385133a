"""Syntax errors: each bad text gives `file:line:col: error: <what was expected, in words>`, the source
line and a caret, as a CellError carrying the same line and column.

Every row names the message fragment its check produces and the exact position, so a row fails if
its check is removed (another check would word it differently or point elsewhere, or none fires).
"""

import pytest

from celldsl.lang.errors import CellError
from celldsl.lang.syntax import MAX_NESTING, parse

HDR = "cell t\ninput x\nstate h\nparam W, b\n"  # equations start on line 5

CASES = [
    # (id, text, message fragment, line, column)
    ("missing-operator", HDR + "h' = tanh(W @ x h)\n",
     "unexpected name 'h'; expected an operator, ',' or ')' (is an operator such as '*' or '@' missing?)",
     5, 17),
    ("missing-operator-number", HDR + "h' = h 2\n",
     "unexpected number '2'; expected an operator or the end of the line (is an operator", 5, 8),
    ("unclosed-paren-at-eof", HDR + "h' = tanh(W @ x",
     "unexpected end of file; expected ',' or ')'; the '(' on line 5, column 10 is never closed", 5, 16),
    ("unclosed-paren-next-line", HDR + "h' = tanh(W @ x\nb2 = h\n",
     "unexpected name 'b2'; expected an operator, ',' or ')'", 6, 1),
    ("unclosed-paren-note", HDR + "h' = tanh(W @ x\nb2 = h\n",
     "the '(' on line 5, column 10 is never closed", 6, 1),
    ("unmatched-close", HDR + "h' = tanh(W @ x))\n",
     "unexpected ')'; expected the end of the line; this ')' closes no bracket", 5, 17),
    ("bad-character", HDR + "h' = h $ 2\n", "unexpected character '$'", 5, 8),
    ("control-character", HDR + "h' = h \x07 2\n", "unexpected character U+0007", 5, 8),
    ("unterminated-string", 'cell t\ndoc "no end\n',
     "a string is written between double quotes on one line", 2, 5),
    ("empty-right-side", HDR + "h' =\n", "unexpected end of line; expected an expression", 5, 5),
    ("dangling-operator", HDR + "h' = h +\n", "unexpected end of line; expected an expression", 5, 9),
    ("missing-equals", HDR + "h' tanh(x)\n", "unexpected name 'tanh'; expected '='", 5, 4),
    ("double-prime", HDR + "h'' = h\n", "unexpected '''; expected '='", 5, 3),
    ("string-in-expression", HDR + "h' = \"h\"\n", "unexpected quoted string; expected an expression", 5, 6),
    ("cell-name-is-number", "cell 3\n", "unexpected number '3'; expected a name", 1, 6),
    ("doc-needs-string", "cell t\ndoc hello\n", "unexpected name 'hello'; expected a quoted string", 2, 5),
    ("statement-start", HDR + "= h\n", "unexpected '='; expected a statement", 5, 1),
    ("trailing-comma", "cell t\nstate h,\n", "unexpected end of line; expected a name", 2, 9),
    ("group-unclosed", "cell t\nparam G = [A, B\n", "the '[' on line 2, column 11 is never closed", 2, 16),
    ("init-call-needs-argument", "cell t\ninit W = uniform(\n",
     "unexpected end of file; expected an expression", 2, 18),
    ("param-kind-missing", "cell t\nparam a :\n", "unexpected end of line; expected a name", 2, 10),
    ("header-twice", "cell a\ncell b\n", "'cell' given twice (first on line 1)", 2, 1),
    ("output-twice", HDR + "output h\noutput h\n", "'output' given twice (first on line 5)", 6, 1),
    ("not-utf8", b"cell t\ninput \xff\n", "the file is not valid UTF-8 text", 2, 7),
    ("nul-byte", "cell t\ninput x\x00\n", "the file contains a NUL byte; is it a binary file?", 2, 8),
    ("too-many-parentheses", HDR + "h' = " + "(" * (MAX_NESTING + 5) + "h" + ")" * (MAX_NESTING + 5) + "\n",
     f"parentheses nested more than {MAX_NESTING} deep", 5, 6 + MAX_NESTING),
    ("too-deep-expression", HDR + "h' = " + "-" * (MAX_NESTING + 5) + "h\n",
     f"expression nested more than {MAX_NESTING} levels deep; split it into intermediates",
     5, 6 + MAX_NESTING),
    ("too-deep-calls", HDR + "h' = " + "tanh(-" * 60 + "h" + ")" * 60 + "\n",  # 60 parentheses, 120 levels
     f"expression nested more than {MAX_NESTING} levels deep", 5, 6 + 6 * (MAX_NESTING // 2)),
]  # fmt: skip


@pytest.mark.parametrize(
    ("text", "fragment", "line", "column"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_syntax_error_message_and_position(text, fragment, line, column):
    with pytest.raises(CellError) as info:
        parse(text, "bad.cell")
    err = info.value
    assert fragment in err.message
    assert (err.filename, err.line, err.column) == ("bad.cell", line, column)
    rendered = str(err).splitlines()
    assert rendered[0] == f"bad.cell:{line}:{column}: error: {err.message}"
    # the source line, then a caret under the column
    assert len(rendered) == 3
    assert rendered[2].index("^") - 4 == column - 1


def test_caret_underlines_the_offending_token():
    with pytest.raises(CellError) as info:
        parse(HDR + "h' tanh(x)\n", "bad.cell")
    assert str(info.value).splitlines()[1:] == ["    h' tanh(x)", "       ^~~~"]


def test_tab_counts_as_one_column_and_the_caret_still_lines_up():
    with pytest.raises(CellError) as info:
        parse(HDR + "h' =\th $\n", "bad.cell")
    err = info.value
    assert (err.line, err.column) == (5, 8)
    _, shown, caret = str(err).splitlines()
    assert shown[4:][caret.index("^") - 4] == "$"


def test_equations_may_wrap_inside_parentheses():
    module = parse(HDR + "h' = tanh(W @ x\n    + b)\n")
    assert len(module.updates) == 1


def test_windows_line_endings_parse():
    module = parse((HDR + "h' = tanh(W @ x + b)\n").replace("\n", "\r\n"))
    assert [n.text for n in module.states] == ["h"]


def test_exponent_binds_tighter_than_at_and_takes_a_sign():
    from celldsl.lang import ast

    module = parse(HDR + "h' = h ^ -2 * W @ x\n")
    expr = module.updates[0][1]
    assert isinstance(expr, ast.BinOp) and expr.op == "*"
    assert expr.left.op == "^" and isinstance(expr.left.right, ast.Neg)
    assert expr.right.op == "@"


def test_a_byte_order_mark_is_ignored():
    module = parse(("\ufeff" + HDR + "h' = W @ x\n").encode("utf-8"))
    assert module.name.text == "t"
    with pytest.raises(CellError) as info:
        parse("\ufeff" + HDR + "h' = $\n", "bad.cell")
    assert (info.value.line, info.value.column) == (5, 6)  # columns as an editor shows them


def test_form_feeds_and_line_separators_do_not_shift_line_numbers():
    text = HDR.replace("state h", "state h  # a\u2028comment") + "\fh' = $\n"
    with pytest.raises(CellError) as info:
        parse(text, "bad.cell")
    err = info.value
    assert (err.line, err.column) == (5, 7)
    assert str(err).splitlines()[1] == "    ?h' = $"  # the form feed is shown as '?'
