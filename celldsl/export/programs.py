"""torch.export programs and TorchScript modules that carry their cells: `save_program` and
`load_program`, `save_torchscript` and `load_torchscript`.

A program calls celldsl::cell_sequence (celldsl::matrix_sequence for a matrix-path cell) with a cell's
cache key. The key digests celldsl's own source,
so another celldsl version, or another machine's cache, does not know it (plain `torch.export.load`
then works only where the cache still has the cell). `save_program` writes each cell's file name and
text beside the program (torch.export's extra_files); `load_program` compiles those texts again
and registers them under the recorded keys. The text is parsed, never executed. The TorchScript pair
does the same through torch.jit.save's `_extra_files`.
"""

from __future__ import annotations

import json

import torch

from .. import ops  # noqa: F401  (registers the ops cell_keys looks for)
from ..compiler import compile_source
from ..ops.function import cell_for, register

CELLS_FILE = "celldsl_cells.json"


def cell_keys(program: torch.export.ExportedProgram) -> list[str]:
    """The keys of the cells a program's graph runs, in order of first use."""
    keys = []
    targets = (torch.ops.celldsl.cell_sequence.default, torch.ops.celldsl.cell_sequence_backward.default,
               torch.ops.celldsl.matrix_sequence.default, torch.ops.celldsl.matrix_sequence_backward.default)
    for module in program.graph_module.modules():  # strict export keeps autograd.Functions as subgraphs
        graph = getattr(module, "graph", None)
        for node in graph.nodes if isinstance(graph, torch.fx.Graph) else ():
            if node.op == "call_function" and node.target in targets and node.args[0] not in keys:
                keys.append(node.args[0])
    return keys


def save_program(program: torch.export.ExportedProgram, f, **kwargs) -> None:
    """torch.export.save(program, f, ...) with the text of every cell it runs (CELLS_FILE)."""
    cells = {}
    for key in cell_keys(program):
        source = cell_for(key).ir.source
        cells[key] = {"filename": source.filename, "text": source.text}
    extra = dict(kwargs.pop("extra_files", None) or {})
    extra[CELLS_FILE] = json.dumps(cells)
    torch.export.save(program, f, extra_files=extra, **kwargs)


def load_program(f, **kwargs) -> torch.export.ExportedProgram:
    """torch.export.load(f, ...), then the cells save_program stored, registered under their keys."""
    extra = dict(kwargs.pop("extra_files", None) or {})
    extra[CELLS_FILE] = ""
    program = torch.export.load(f, extra_files=extra, **kwargs)
    _register_cells(extra[CELLS_FILE])
    return program


def _register_cells(text: str) -> None:
    if not text:
        raise ValueError(f"this program was not saved by celldsl.save_program (no {CELLS_FILE} in it)")
    cells = json.loads(text)
    if not isinstance(cells, dict):
        raise ValueError(f"{CELLS_FILE}: expected an object of cells by key")
    for key, record in cells.items():
        if not (isinstance(record, dict) and isinstance(record.get("filename"), str)
                and isinstance(record.get("text"), str)):
            raise ValueError(f"{CELLS_FILE}: the cell under key {key!r} has no file name and text")
        register(compile_source(record["filename"], record["text"]), key=key)


def torchscript_cell_keys(module: torch.jit.ScriptModule) -> list[str]:
    """The keys of the cells a scripted (`_script_key` attributes) or traced (constants in its graphs)
    module runs."""
    keys = []
    for sub in module.modules():
        key = getattr(sub, "_script_key", None)
        graphs = [sub.graph] if hasattr(sub, "graph") else []
        found = [key] if isinstance(key, str) else []
        for graph in graphs:
            for op in ("celldsl::cell_sequence", "celldsl::matrix_sequence"):
                for node in graph.findAllNodes(op):
                    value = node.inputsAt(0).toIValue()
                    if isinstance(value, str):
                        found.append(value)
        keys.extend(k for k in found if k not in keys)
    return keys


def save_torchscript(module: torch.jit.ScriptModule, f) -> None:
    """torch.jit.save(module, f) with the text of every cell it runs (CELLS_FILE)."""
    cells = {}
    for key in torchscript_cell_keys(module):
        source = cell_for(key).ir.source
        cells[key] = {"filename": source.filename, "text": source.text}
    torch.jit.save(module, f, _extra_files={CELLS_FILE: json.dumps(cells)})


def load_torchscript(f, map_location=None) -> torch.jit.ScriptModule:
    """torch.jit.load(f), then the cells save_torchscript stored, registered under their keys."""
    extra = {CELLS_FILE: ""}
    module = torch.jit.load(f, map_location=map_location, _extra_files=extra)
    text = extra[CELLS_FILE]
    _register_cells(text.decode("utf-8") if isinstance(text, bytes) else text)
    return module
