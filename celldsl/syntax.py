"""Text -> AST: Lark parses the cell file; syntax errors become `file:line:col: error:` messages."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from lark import Lark, Token, Transformer_NonRecursive, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken

from . import ast
from .errors import CellError, Loc, Source

GRAMMAR = Path(__file__).resolve().parent.parent / "grammars" / "cell.lark"
MAX_NESTING = 200  # parentheses and operator chains deeper than this are surely not a cell

TOKEN_WORDS = {
    "NAME": "a name",
    "NUMBER": "a number",
    "STRING": 'a quoted string ("...")',
    "_NL": "the end of the line",
    "$END": "the end of the file",
    "SIGN": "a sign",
}


def _grammar_text() -> str:
    if GRAMMAR.exists():
        return GRAMMAR.read_text()
    from importlib.resources import files  # installed without the source tree

    return (files("celldsl") / "cell.lark").read_text()


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


@lru_cache(maxsize=1)
def parser() -> Lark:
    return Lark(
        _grammar_text(),
        parser="lalr",
        strict=True,
        propagate_positions=True,
        maybe_placeholders=False,
        postlex=_SkipNewlinesInBrackets(),
    )


def _loc(item) -> Loc:
    if isinstance(item, Token):
        end = item.end_column if item.end_line == item.line else None
        return Loc(item.line, item.column, end)
    meta = item.meta if hasattr(item, "meta") else item
    end = meta.end_column if getattr(meta, "end_line", None) == meta.line else None
    return Loc(meta.line, meta.column, end)


OPERATORS = {"PLUS", "MINUS", "STAR", "SLASH", "AT", "POW", "__ANON_0", "PRIME"}


def _expected_words(expected) -> str:
    """Say what the parser wanted, in words: 'an operator' rather than a list of eight symbols."""
    words = set()
    for t in expected:
        if t in OPERATORS or _literal(t) in ("'⊙'",):
            words.add("an operator")
        else:
            words.add(TOKEN_WORDS.get(t) or _literal(t))
    order = sorted(words, key=lambda w: (w.startswith("'"), w))
    return " or ".join(order) if len(order) <= 2 else ", ".join(order[:-1]) + " or " + order[-1]


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
    return f"'{tok.value}'"


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
        return ast.Call(str(items[0]), tuple(i for i in items[1:] if i is not None), _loc(items[0]))

    def _bin(op):  # noqa: N805 - small factory for the binary-operator rules
        @v_args(meta=True)
        def rule(self, meta, items):
            return ast.BinOp(op, items[0], items[-1], _op_loc(items, meta))

        return rule

    add, sub, mul, div, matmul = _bin("+"), _bin("-"), _bin("*"), _bin("/"), _bin("@")
    pow = _bin("^")

    @v_args(meta=True)
    def neg(self, meta, items):
        return ast.Neg(items[0], _loc(meta))

    def name_list(self, items):
        return [ast.Name(str(t), _loc(t)) for t in items]

    def signed_number(self, items):
        return float("".join(str(t) for t in items))

    @v_args(meta=True)
    def init_constant(self, meta, items):
        return ast.InitValue("constant", None, items[0], _loc(meta))

    @v_args(meta=True)
    def init_named(self, meta, items):
        return ast.InitValue("named", str(items[0]), None, _loc(meta))

    @v_args(meta=True)
    def init_call(self, meta, items):
        return ast.InitValue("call", str(items[0]), items[1], _loc(meta))

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
        return ("input", items[0], _loc(meta))

    @v_args(meta=True)
    def state_decl(self, meta, items):
        return ("state", items[0], _loc(meta))

    @v_args(meta=True)
    def output_decl(self, meta, items):
        return ("output", ast.Name(str(items[0]), _loc(items[0])), _loc(meta))

    @v_args(meta=True)
    def param_decl(self, meta, items):
        kind = ast.Name(str(items[1]), _loc(items[1])) if len(items) > 1 else None
        return ("param", (items[0], kind), _loc(meta))

    @v_args(meta=True)
    def param_group(self, meta, items):
        return ("group", (ast.Name(str(items[0]), _loc(items[0])), items[1]), _loc(meta))

    @v_args(meta=True)
    def init_decl(self, meta, items):
        return ("init", (items[0], items[1]), _loc(meta))

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
    """Reject absurdly deep expressions before any recursive pass sees them."""
    stack = [(expr, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_NESTING:
            raise CellError(
                f"expression nested more than {MAX_NESTING} levels deep; split it into intermediates",
                source,
                node.loc,
            )
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
        raise _syntax_error(err, source) from None
    statements = _ToAst().transform(tree)
    return _collect(statements, source)


def _syntax_error(err: UnexpectedInput, source: Source) -> CellError:
    if isinstance(err, UnexpectedCharacters):
        char = source.text[err.pos_in_stream] if err.pos_in_stream < len(source.text) else "?"
        what = repr(char) if char.isprintable() else f"character U+{ord(char):04X}"
        return CellError(f"unexpected {what}", source, Loc(err.line, err.column))
    if isinstance(err, UnexpectedEOF):
        lines = source.text.splitlines() or [""]
        loc = Loc(len(lines), len(lines[-1]) + 1)
        return CellError(f"unexpected end of file; expected {_expected_words(err.expected)}", source, loc)
    assert isinstance(err, UnexpectedToken)
    tok = err.token
    expected = err.expected
    if tok.type == "$END" or tok.line is None or tok.line < 1:
        lines = source.text.splitlines() or [""]
        loc = Loc(len(lines), len(lines[-1]) + 1)
    elif tok.type == "_NL":
        loc = Loc(tok.line, tok.column)
    else:
        loc = _loc(tok)
    hint = ""
    if tok.type in ("NAME", "NUMBER", "LPAR") and "_NL" in expected and "PLUS" in expected:
        hint = " (is an operator such as '*' or '@' missing?)"
    return CellError(f"unexpected {_describe(tok)}; expected {_expected_words(expected)}{hint}", source, loc)


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
        elif kind == "input":
            module.inputs.extend(payload)
        elif kind == "state":
            module.states.extend(payload)
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
    for kind, payload, _loc_ in statements:
        if kind in ("define", "update"):
            _check_depth(payload[1], source)
    return module
