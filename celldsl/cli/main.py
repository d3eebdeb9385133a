"""The `celldsl` command: `check`, `explain` and `list` here; `train`/`compare` (labs) and `compile`
(Triton) register themselves.

    celldsl check cells/*.cell       # exit 0 if every file compiles (warnings are printed), else 1
    celldsl check mut1 gru           # zoo cells by name
    celldsl explain cells/lstm.cell  # the plan: shapes, GEMMs per stage, forward, backward, FLOPs
    celldsl explain cells/lstm.cell --sizes N=16,H=768   # ... and the Triton schedule at those sizes
    celldsl list                     # the zoo: name and doc line of every shipped cell

A bad cell file prints `file:line:col: error: message`, the line and a caret on stderr; any other
error is one line, `celldsl: error: ...` (exit code 1; 2 for a usage error), never a traceback (set
CELLDSL_DEBUG=1 to get one).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

from ..compiler import compile_cell
from ..lang.errors import CellError, CellWarning, printable
from ..resources import zoo_file, zoo_names


def _cell_path(name: str) -> Path:
    """A file path; a bare zoo name ("lstm") when no such file exists."""
    path = Path(name)
    if not path.exists() and os.sep not in name and zoo_file(name) is not None:
        return zoo_file(name)
    return path


def _compile(name: str):
    """Compile one file -> (CompiledCell or None, warnings as text, error as text or None)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CellWarning)
        try:
            compiled, error = compile_cell(_cell_path(name)), None
        except CellError as err:
            compiled, error = None, str(err)
        except Exception as err:  # noqa: BLE001 - a compiler bug still gets a message, not a traceback
            if os.environ.get("CELLDSL_DEBUG"):
                raise
            compiled = None
            error = (
                f"{printable(name)}: internal error: {type(err).__name__}: {printable(str(err))} (this is a "
                "bug in celldsl; "
                "CELLDSL_DEBUG=1 shows the traceback)"
            )
    notes = list(dict.fromkeys(str(w.message) for w in caught if issubclass(w.category, CellWarning)))
    return compiled, notes, error


def run_check(args: argparse.Namespace) -> int:
    failed = 0
    for name in args.files:
        compiled, notes, error = _compile(name)
        for note in notes:
            print(note, file=sys.stderr)
        if error is not None:
            print(error, file=sys.stderr)
            failed += 1
        elif not args.quiet:
            print(f"{printable(name)}: ok")
    if failed and len(args.files) > 1:
        print(f"{failed} of {len(args.files)} files have errors", file=sys.stderr)
    return 1 if failed else 0


def run_explain(args: argparse.Namespace) -> int:
    compiled, notes, error = _compile(args.file)
    for note in notes:
        print(note, file=sys.stderr)
    if error is not None:
        print(error, file=sys.stderr)
        return 1
    from .explain import explain

    print(explain(compiled, args.sizes))
    return 0


def run_list(args: argparse.Namespace) -> int:
    """One line per zoo cell, sorted: its name (what Recurrent and `celldsl check` accept) and doc line,
    cells with matrix states marked (`explain` names their backends)."""
    from ..lang.syntax import parse
    from ..lang.tensors import has_heads, is_matrix_cell

    paths = [zoo_file(name) for name in zoo_names()]
    width = max(len(p.stem) for p in paths)
    for path in paths:
        if args.names and not args.elementwise:
            print(path.stem)
            continue
        module = parse(path.read_text(encoding="utf-8"), str(path))
        in_matrix_path = is_matrix_cell(module)
        if args.elementwise:  # the names `celldsl compile` takes (kernels/ holds exactly these)
            if not in_matrix_path:
                print(path.stem)
            continue
        matrix = in_matrix_path and has_heads(module)  # shaped parameters alone are no matrix state
        mark = "[matrix state] " if matrix else ""  # `explain` says which backends run it
        print(f"{path.stem:{width}s}  {mark}{module.doc or ''}")
    return 0


COMPILER_COMMANDS = ("check", "explain", "compile", "list")


def _sizes(text: str) -> dict:
    from ..targets.triton.choice import parse_sizes

    try:
        return parse_sizes(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The full parser; for a compiler command alone, without the labs' commands (they import torch,
    about a second of start-up that `celldsl check` does not need)."""
    parser = argparse.ArgumentParser(
        prog="celldsl",
        description="A compiler for recurrent cells: equations in a .cell file -> fused kernels and "
        "torch layers.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser(
        "check", help="validate cell files", description="Compile each file; print its errors and warnings."
    )
    p.add_argument("files", nargs="+", metavar="FILE", help=".cell files (or zoo names such as lstm)")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing for files without errors")
    p.set_defaults(func=run_check)
    p = sub.add_parser(
        "explain",
        help="show the compiled plan of a cell",
        description="Inputs, states, parameter shapes, the GEMMs of every stage, the fused forward, the "
        "size of the derived backward, FLOPs per step and the recurrence kind.",
    )
    p.add_argument("file", metavar="FILE", help="a .cell file (or a zoo name such as lstm)")
    p.add_argument("--sizes", type=_sizes, metavar="N=16,H=768",
                   help="batch N and hidden size H (optionally T=steps, dtype=bfloat16): show the launch of "
                   "every Triton schedule and the compiler's choice")
    p.set_defaults(func=run_explain)
    p = sub.add_parser("list", help="list the zoo's cells", description="The cells shipped with celldsl, "
                       "by the name Recurrent(...) and `celldsl check` accept, with their doc lines.")
    p.add_argument("--names", action="store_true", help="names only, one per line")
    p.add_argument("--elementwise", action="store_true", help="names only, of the cells without matrix "
                   "states (those `celldsl compile` takes)")
    p.set_defaults(func=run_list)

    if command not in COMPILER_COMMANDS:
        from ..labs import cli as labs_cli

        labs_cli.register(sub)
    from ..export import cli as export_cli
    from . import compile as triton_cli

    triton_cli.register(sub)
    export_cli.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(errors="backslashreplace")  # a cell's doc string may not fit the locale
        except (AttributeError, ValueError):
            pass
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv[0] if argv else None).parse_args(argv)  # a usage error exits with 2
    try:
        return args.func(args)
    except BrokenPipeError:  # `celldsl explain x | head`: stop quietly, as Python's docs advise
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as err:  # noqa: BLE001 - every error the user sees is one line (see error_line)
        if os.environ.get("CELLDSL_DEBUG"):
            raise
        print(error_line(err), file=sys.stderr)
        return 1


def error_line(err: Exception) -> str:
    """What `celldsl` prints for an error that reached it: a cell file's located error as it is; a
    refused cache, a file that cannot be read or written (OSError) and a refused value (ValueError) as
    `celldsl: error: ...`; anything else is a bug, said so."""
    if isinstance(err, CellError):
        return str(err)
    if isinstance(err, OSError | ValueError):
        text = str(err)
        if isinstance(err, OSError) and err.strerror and type(err).__str__ is OSError.__str__:
            text = f"{err.filename}: {err.strerror}" if err.filename else err.strerror  # no "[Errno 2]"
        return f"celldsl: error: {printable(text)}"
    return (f"celldsl: internal error: {type(err).__name__}: {printable(str(err))} (this is a bug in "
            "celldsl; CELLDSL_DEBUG=1 shows the traceback)")


if __name__ == "__main__":
    sys.exit(main())
