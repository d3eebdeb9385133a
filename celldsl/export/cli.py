"""`celldsl export`: one layer of a cell, with its weights, as a standalone C library or an ONNX graph.

    celldsl export lstm --c out/ --input-size 32 --hidden-size 64 --weights layer.pt
    celldsl export cells/gru.cell --onnx gru.onnx --input-size 32 --hidden-size 64 --seed 0
    celldsl export lstm_proj --onnx p.onnx --input-size 8 --hidden-size 16 --sizes P=4 --float64
    celldsl export mlstm --onnx m.onnx --input-size 8 --hidden-size 16 --sizes heads=2,K=4
    celldsl export gla --c out/ --input-size 8 --hidden-size 16 --sizes heads=2

The main CLI calls `register(subparsers)`. Errors print one line `celldsl: error: ...` (a cell file's
errors print as `celldsl check` prints them) and exit 1. docs/deploy.md has the details.
"""

from __future__ import annotations

import argparse
import os
import sys

from ..lang.errors import CellError, printable


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export",
        help="write a cell's forward as a standalone C library or an ONNX graph",
        description="One layer, one direction of CELL (a .cell path or a zoo name) with its weights: from "
        "--weights (a state_dict of celldsl.Recurrent(CELL, I, H), loaded with weights_only=True), "
        "else freshly initialised after torch.manual_seed(--seed). See docs/deploy.md.",
    )
    p.add_argument("cell", metavar="CELL", help="a .cell file or a zoo name such as lstm")
    way = p.add_mutually_exclusive_group(required=True)
    way.add_argument("--c", metavar="DIR", help="write DIR/<name>.c, .h and .bin (the weights)")
    way.add_argument("--onnx", metavar="FILE", help="write an ONNX model (a Scan over the time steps)")
    p.add_argument("--input-size", type=int, required=True, metavar="I", help="the first input's size")
    p.add_argument("--hidden-size", type=int, required=True, metavar="H", help="the hidden size")
    p.add_argument("--weights", metavar="FILE", help="a state_dict saved with torch.save (one layer)")
    p.add_argument("--seed", type=int, default=0, help="the initialisation's seed without --weights (0)")
    p.add_argument("--input-sizes", metavar="ctx=3,...", help="the sizes of the inputs after the first")
    p.add_argument("--sizes", metavar="P=8,...", help="the sizes of the widths the cell declares")
    p.add_argument("--float64", action="store_true", help="double precision (default float32)")
    p.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    from ..compiler import CompiledMatrixCell, compile_cell
    from .model import ExportError, load_cell

    try:
        dtype = "f64" if args.float64 else "f32"
        compiled = compile_cell(_cell_arg(args.cell))
        if isinstance(compiled, CompiledMatrixCell):
            paths = _matrix_export(compiled, args, dtype)
        else:
            cell = load_cell(compiled, args.input_size, args.hidden_size, args.weights, args.seed,
                             args.input_sizes, args.sizes)
            if args.c is not None:
                from .c_library import write_c

                paths = write_c(cell, args.c, dtype)
            else:
                from .onnx_graph import write_onnx

                paths = [write_onnx(cell, args.onnx, dtype)]
    except CellError as err:
        print(str(err), file=sys.stderr)
        return 1
    except (ExportError, OSError) as err:
        text = str(err)
        if isinstance(err, OSError) and err.strerror:  # the file first, no "[Errno 28]"
            text = f"{err.filename}: {err.strerror}" if err.filename else err.strerror
        print(f"celldsl: error: {printable(' '.join(text.split()))}", file=sys.stderr)
        return 1
    for path in paths:
        print(printable(str(path)))
    return 0


def _matrix_export(compiled, args, dtype: str) -> list:
    """`--onnx` (onnx_matrix.py) or `--c` (c_matrix.py) of a matrix-path cell; its layer takes no
    --input-sizes."""
    import torch

    from .model import ExportError, load_matrix_cell

    if args.input_sizes:
        raise ExportError(f"cell {compiled.name!r} has matrix states and reads one input: it takes no "
                          "--input-sizes")
    compiled, sizes, params = load_matrix_cell(compiled, args.input_size, args.hidden_size, args.weights,
                                               args.seed, args.sizes)
    if args.onnx is not None:
        from .onnx_matrix import write_matrix_onnx

        return [write_matrix_onnx(compiled.ir, sizes, params, args.onnx, dtype)]
    from .c_matrix import write_matrix_library

    try:
        return write_matrix_library(compiled, sizes, params, args.c,
                                    torch.float64 if dtype == "f64" else torch.float32)
    except ValueError as err:
        raise ExportError(str(err)) from None


def _cell_arg(name: str):
    """A path, or a zoo name when no such file exists (as `celldsl check` takes them)."""
    from ..resources import zoo_file

    if not os.path.exists(name) and os.sep not in name and zoo_file(name) is not None:
        return zoo_file(name)
    if not os.path.exists(name):
        from .model import ExportError

        raise ExportError(f"{name}: no such file or zoo cell (`celldsl list` shows the zoo)")
    return name
