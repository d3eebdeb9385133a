"""Text -> AST: Lark parses the cell file; syntax errors become `file:line:col: error:` messages."""

from __future__ import annotations

import re
from functools import lru_cache

from lark import Lark, Token, Transformer_NonRecursive, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken

from ..resources import GRAMMAR
from . import ast
from .errors import CellError, Loc, Source, raise_all
from .functions import FUNCTIONS

MAX_NESTING = 100  # parentheses and expression nesting deeper than this are surely not a cell
MAX_FILE_BYTES = 512 << 10  # the zoo's files have 1-2 kB; parsing costs about a second per 200 kB

TOKEN_WORDS = {
    "NAME": "a name",
    "NUMBER": "a number",
    "STRING": 'a quoted string ("...")',
    "_NL": "the end of the line",
    "$END": "the end of the file",
    "SIGN": "a sign",
}


def grammar_text() -> str:
    return GRAMMAR.read_text(encoding="utf-8")


class _SkipNewlinesInBrackets:
    """Post-lexer: an equation may wrap inside ( ) or [ ]; newlines there are not statement ends."""

    always_accept = ("_NL",)

    def process(self, stream):
        depth = 0
        for tok in stream:
            if tok.type in ("LPAR", "LSQB"):
                depth += 1
                if depth > MAX_NESTING:
                    raise _TooDeep(tok)
            elif tok.type in ("RPAR", "RSQB"):
                depth = max(0, depth - 1)
            elif tok.type == "_NL" and depth > 0:
                continue
            yield tok


class _TooDeep(Exception):
    def __init__(self, token):
        self.token = token


@lru_cache(maxsize=2)
def parser(strict: bool = False) -> Lark:
    """The LALR parser of the cell language. strict=True also proves the grammar has no shift/reduce
    conflict and no colliding terminals (interegular; 0.3 s), which tests/test_syntax_errors.py checks
    once; the parser used at run time is the same grammar built without those checks (0.07 s)."""
    return Lark(
        grammar_text(),
        parser="lalr",
        strict=strict,
        propagate_positions=True,
        maybe_placeholders=False,
        postlex=_SkipNewlinesInBrackets(),
    )


def _number(e) -> float | None:
    """The value of a number or a negated number, else None."""
    if isinstance(e, ast.Num):
        return float(e.text)
    if isinstance(e, ast.Neg):
        inner = _number(e.operand)
        return None if inner is None else -inner
    return None


def init_value(e) -> ast.InitValue:
    """An `init` line's value: the fixed forms (a number, zeros, uniform(a), normal(std)) as before;
    anything else is an init expression (`log(uniform(1, T_max - 1))`), checked by the IR."""
    if _number(e) is not None:
        return ast.InitValue("constant", None, _number(e), e.loc)
    if isinstance(e, ast.Var):
        return ast.InitValue("named", e.name, None, e.loc)
    known = e.func in ("uniform", "normal") or e.func not in FUNCTIONS if isinstance(e, ast.Call) else False
    if known and len(e.args) == 1 and _number(e.args[0]) is not None:  # xavier(2): unknown initialiser
        return ast.InitValue("call", e.func, _number(e.args[0]), e.loc)
    return ast.InitValue("expr", None, None, e.loc, e)


def _loc(item) -> Loc:
    if isinstance(item, Token):
        end = item.end_column if item.end_line == item.line else None
        return Loc(item.line, item.column, end)
    meta = item.meta if hasattr(item, "meta") else item
    end = meta.end_column if getattr(meta, "end_line", None) == meta.line else None
    return Loc(meta.line, meta.column, end)


OPERATORS = {
    "STAR",
    "SLASH",
    "AT",
    "POW",
    "COMPARE",
    "__ANON_0",
}  # binary only (+ and - also start an expression)
EXPRESSION_START = {"NAME", "NUMBER", "LPAR", "MINUS", "PLUS"}
KEYWORDS = {"CELL", "DOC", "CITE", "INPUT", "STATE", "OUTPUT", "PARAM", "INIT"}


def _expected_words(expected) -> str:
    """Say what the parser wanted, in words: 'an operator' rather than a list of eight symbols."""
    expected = set(expected)
    words: list[str] = []
    if expected & KEYWORDS:
        words.append("a statement")
        expected -= KEYWORDS | {"NAME"}
    shape = {"NAME", "NUMBER", "LPAR"} <= expected and "MINUS" not in expected  # `param a :`, `state C :`
    if {"NAME", "NUMBER"} <= expected and not shape:
        words.append("an expression")
        expected -= EXPRESSION_START
    elif shape:
        words.append("a name or a shape per head such as (V, K) per head")
        expected -= EXPRESSION_START
    if expected & OPERATORS:
        words.append("an operator")
        # after a name, '(' (a call) and "'" (a next value) are legal too; naming them only confuses
        expected -= OPERATORS | {"PLUS", "MINUS", "LPAR", "PRIME"}
    if "_NL" in expected:
        words.append("the end of the line")
        expected -= {"_NL", "$END"}
    for t in sorted(expected):
        words.append(TOKEN_WORDS.get(t) or _literal(t))
    if not words:
        return "something else"
    return " or ".join(words) if len(words) <= 2 else ", ".join(words[:-1]) + " or " + words[-1]


def _literal(token_type: str) -> str:
    for term in parser().terminals:
        if term.name == token_type:
            return f"'{term.pattern.value}'" if term.pattern.type == "str" else token_type
    return token_type


def _describe(tok: Token) -> str:
    if tok.type == "_NL":
        return "end of line"
    if tok.type == "$END":
        return "end of file"
    if tok.type == "NAME":
        return f"name '{tok.value}'"
    if tok.type == "NUMBER":
        return f"number '{tok.value}'"
    if tok.type == "STRING":
        return "quoted string"
    return f"'{tok.value}'"


def _open_brackets(text: str, end: int) -> list[tuple[str, Loc]]:
    """The brackets still open at offset `end` (outermost first), skipping strings and comments."""
    stack: list[tuple[str, Loc]] = []
    line, line_start = 1, 0
    for m in _BRACKETS.finditer(text, 0, end):
        c = m.group()
        if c == "\n":
            line, line_start = line + 1, m.end()
        elif c in "([":
            stack.append((c, Loc(line, m.start() - line_start + 1)))
        elif c in ")]" and stack:
            stack.pop()
    return stack


_BRACKETS = re.compile(r'"[^"\n]*"|#[^\n]*|[()\[\]\n]')


class _ToAst(Transformer_NonRecursive):
    """Lark tree -> ast nodes (iterative, so thousands of nested parentheses cannot overflow)."""

    def number(self, items):
        return ast.Num(str(items[0]), _loc(items[0]))

    def var(self, items):
        return ast.Var(str(items[0]), _loc(items[0]))

    def new_var(self, items):
        tok = items[0]
        return ast.NewVar(str(tok), Loc(tok.line, tok.column, items[1].end_column))

    @v_args(meta=True)
    def call(self, meta, items):
        # the caret starts at the function's name and underlines the whole call (when on one line)
        name = items[0]
        end = meta.end_column if meta.end_line == name.line else None
        args = tuple(i for i in items[1:] if i is not None)
        return ast.Call(str(name), args, Loc(name.line, name.column, end))

    def _bin(op):  # noqa: N805 - small factory for the binary-operator rules
        @v_args(meta=True)
        def rule(self, meta, items):
            return ast.BinOp(op, items[0], items[-1], _op_loc(items, meta))

        return rule

    add, sub, mul, div, matmul = _bin("+"), _bin("-"), _bin("*"), _bin("/"), _bin("@")
    pow = _bin("^")

    @v_args(meta=True)
    def compare(self, meta, items):
        return ast.BinOp(str(items[1]), items[0], items[2], _loc(meta))

    @v_args(meta=True)
    def neg(self, meta, items):
        return ast.Neg(items[0], _loc(meta))

    def name_list(self, items):
        return [ast.Name(str(t), _loc(t)) for t in items]

    @v_args(meta=True)
    def cell_decl(self, meta, items):
        return ("cell", ast.Name(str(items[0]), _loc(items[0])), _loc(meta))

    @v_args(meta=True)
    def doc_decl(self, meta, items):
        return ("doc", str(items[0])[1:-1], _loc(meta))

    @v_args(meta=True)
    def cite_decl(self, meta, items):
        return ("cite", str(items[0])[1:-1], _loc(meta))

    @v_args(meta=True)
    def input_decl(self, meta, items):
        return ("input", (items[0], items[1] if len(items) > 1 else None), _loc(meta))

    @v_args(meta=True)
    def state_decl(self, meta, items):
        return ("state", (items[0], items[1] if len(items) > 1 else None), _loc(meta))

    def width(self, items):
        return ast.Name(str(items[0]), _loc(items[0]))

    @v_args(meta=True)
    def per_head(self, meta, items):
        return ast.PerHead(str(items[0]), None, _loc(meta))

    @v_args(meta=True)
    def per_head_matrix(self, meta, items):
        return ast.PerHead(str(items[0]), str(items[1]), _loc(meta))

    @v_args(meta=True)
    def shared_matrix(self, meta, items):
        return ast.PerHead(str(items[0]), str(items[1]), _loc(meta), head=False)

    def param_kind(self, items):
        if isinstance(items[0], ast.PerHead):
            return items[0]
        kind = ast.Name(str(items[0]), _loc(items[0]))
        return ast.ParamKind(kind, str(items[1]) if len(items) > 1 else None)

    @v_args(meta=True)
    def output_decl(self, meta, items):
        return ("output", ast.Name(str(items[0]), _loc(items[0])), _loc(meta))

    @v_args(meta=True)
    def param_decl(self, meta, items):
        return ("param", (items[0], items[1] if len(items) > 1 else None), _loc(meta))

    @v_args(meta=True)
    def param_group(self, meta, items):
        return ("group", (ast.Name(str(items[0]), _loc(items[0])), items[1]), _loc(meta))

    @v_args(meta=True)
    def init_decl(self, meta, items):
        return ("init", (items[0], init_value(items[1])), _loc(meta))

    @v_args(meta=True)
    def define(self, meta, items):
        return ("define", (ast.Name(str(items[0]), _loc(items[0])), items[1]), _loc(meta))

    @v_args(meta=True)
    def update(self, meta, items):
        tok = items[0]
        name = ast.Name(str(tok), Loc(tok.line, tok.column, items[1].end_column))
        return ("update", (name, items[2]), _loc(meta))

    def start(self, items):
        return items


def _op_loc(items, meta) -> Loc:
    # Point at the whole expression: the caret marks where the operation starts.
    return _loc(meta)


def _check_depth(expr, source: Source) -> None:
    """Reject absurdly deep expressions before any recursive pass sees them. The left spine of
    + - * / (a + b + c + ...) is walked in a loop by ir.py, so it does not count as nesting."""
    stack = [(expr, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_NESTING:
            raise CellError(
                f"expression nested more than {MAX_NESTING} levels deep; split it into intermediates",
                source,
                node.loc,
            )
        if isinstance(node, ast.BinOp) and node.op in "+-*/":
            left = node.left
            spine = isinstance(left, ast.BinOp) and left.op in "+-*/"
            stack.append((left, depth if spine else depth + 1))
            stack.append((node.right, depth + 1))
        else:
            stack.extend((child, depth + 1) for child in ast.children(node))


def parse(text: str | bytes, filename: str = "<cell>") -> ast.Module:
    """Parse cell text into an `ast.Module`; every syntax problem raises `CellError`."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as err:
            before = text[: err.start]
            line = before.count(b"\n") + 1
            column = err.start - (before.rfind(b"\n") + 1) + 1
            safe = Source(text.decode("utf-8", errors="replace"), filename)
            raise CellError("the file is not valid UTF-8 text", safe, Loc(line, column)) from None
    text = text.removeprefix("\ufeff")  # a byte-order mark some editors write: not part of the cell
    if len(text) > MAX_FILE_BYTES:
        raise CellError(
            f"the file has {len(text)} characters; a cell file may have at most {MAX_FILE_BYTES}",
            Source(text[:1000], filename),
            Loc(1, 1),
        )
    if "\x00" in text:
        before = text[: text.index("\x00")]
        loc = Loc(before.count("\n") + 1, len(before) - (before.rfind("\n") + 1) + 1)
        raise CellError("the file contains a NUL byte; is it a binary file?", Source(text, filename), loc)
    source = Source(text, filename)
    try:
        tree = parser().parse(text)
    except _TooDeep as deep:
        raise CellError(
            f"parentheses nested more than {MAX_NESTING} deep", source, _loc(deep.token)
        ) from None
    except UnexpectedInput as err:
        raise_all(_every_syntax_error(source) or [_syntax_error(err, source)])
    statements = _ToAst().transform(tree)
    return _collect(statements, source)


def _statements(text: str) -> list[tuple[int, str]]:
    """The text cut into statements as the parser reads them: (lines before it, its text with its
    line break). A statement ends at a line break outside ( ) and [ ]; strings and comments hold no
    brackets. An unclosed bracket runs to the end of the file."""
    chunks, depth, start, line, first = [], 0, 0, 0, 0
    for m in _BRACKETS.finditer(text):
        c = m.group()
        if c in "([":
            depth += 1
        elif c in ")]":
            depth = max(0, depth - 1)
        elif c == "\n":
            line += 1
            if depth == 0:
                chunks.append((first, text[start : m.end()]))
                start, first = m.end(), line
    if start < len(text):
        chunks.append((first, text[start:]))
    return chunks


def _every_syntax_error(source: Source) -> list[CellError]:
    """The first syntax error of every statement, so a file with several mistakes gets them all at once
    (the parser itself stops at the first)."""
    errors = []
    for before, chunk in _statements(source.text):
        try:
            parser().parse(chunk)
        except _TooDeep as deep:
            loc = _loc(deep.token)
            errors.append(
                CellError(
                    f"parentheses nested more than {MAX_NESTING} deep",
                    source,
                    Loc(loc.line + before, loc.column, loc.end_column),
                )
            )
        except UnexpectedInput as err:
            errors.append(_syntax_error(err, Source(chunk, source.filename), before, source))
    return errors


def _syntax_error(
    err: UnexpectedInput, source: Source, before: int = 0, full: Source | None = None
) -> CellError:
    """The error of a parse of `source`, reported at its place in `full` (the file), `before` lines on."""
    text = source.text
    full = full or source

    def at(loc: Loc) -> Loc:
        return Loc(loc.line + before, loc.column, loc.end_column)

    if isinstance(err, UnexpectedCharacters):
        char = text[err.pos_in_stream] if err.pos_in_stream < len(text) else "?"
        what = f"character '{char}'" if char.isprintable() else f"character U+{ord(char):04X}"
        hint = "; a string is written between double quotes on one line" if char == '"' else ""
        return CellError(f"unexpected {what}{hint}", full, at(Loc(err.line, err.column)))
    if isinstance(err, UnexpectedEOF):
        tok, expected, pos = None, set(err.expected), len(text)
    else:
        assert isinstance(err, UnexpectedToken)
        tok, expected = err.token, set(err.accepts or err.expected)
        pos = tok.start_pos if tok.type != "$END" and tok.start_pos is not None else len(text)
    if tok is None or tok.type == "$END" or tok.line is None or tok.line < 1:
        lines = source.lines[:-1] if len(source.lines) > 1 and text.endswith("\n") else source.lines
        loc = Loc(len(lines), len(lines[-1]) + 1)
        what = "end of file"
    else:
        loc = Loc(tok.line, tok.column) if tok.type == "_NL" else _loc(tok)
        what = _describe(tok)
    message = f"unexpected {what}; expected {_expected_words(expected)}"
    if tok is not None and tok.type in ("NAME", "NUMBER", "LPAR") and expected & OPERATORS:
        message += " (is an operator such as '*' or '@' missing?)"
    still_open = _open_brackets(text, pos)
    if tok is not None and tok.type in ("RPAR", "RSQB") and not still_open:
        message += f"; this '{tok.value}' closes no bracket"
    if still_open and (still_open[-1][1].line < loc.line or what == "end of file"):
        bracket, where = still_open[-1]
        message += f"; the '{bracket}' on line {where.line + before}, column {where.column} is never closed"
    return CellError(message, full, at(loc))


def _collect(statements, source: Source) -> ast.Module:
    """Group statements by kind, rejecting repeated header statements."""
    module = ast.Module()
    for kind, payload, loc in statements:
        if kind in ("cell", "doc", "cite", "output"):
            if kind in module.seen_headers:
                first = module.seen_headers[kind]
                raise CellError(f"'{kind}' given twice (first on line {first.line})", source, loc)
            module.seen_headers[kind] = loc
        if kind == "cell":
            module.name = payload
        elif kind == "doc":
            module.doc = payload
        elif kind == "cite":
            module.cite = payload
        elif kind in ("input", "state"):
            names, width = payload
            (module.inputs if kind == "input" else module.states).extend(names)
            if width is not None:
                module.widths.update({n.text: width for n in names})
        elif kind == "output":
            module.output = payload
        elif kind == "param":
            names, ptype = payload
            module.params.extend((n, ptype, None) for n in names)
        elif kind == "group":
            group, members = payload
            module.groups.append((group, members))
            module.params.extend((n, None, group) for n in members)
        elif kind == "init":
            module.inits.append(payload)
        elif kind == "define":
            module.definitions.append(payload)
        elif kind == "update":
            module.updates.append(payload)
    for kind, payload, _ in statements:
        if kind in ("define", "update"):
            _check_depth(payload[1], source)
    return module
