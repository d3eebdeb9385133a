"""torch.onnx.export of models holding celldsl layers: a translation of the op celldsl::cell_sequence
into the same ONNX Scan that `celldsl export --onnx` writes (onnx_graph.py), built from the cell the
op's key names and the weights the op receives as graph values; and of celldsl::matrix_sequence (a
matrix-memory layer's one layer and direction) into onnx_matrix.py's Scan.

    torch.onnx.export(model, (x,), "model.onnx")  # `import celldsl` registered it (onnx_hook.py)
    torch.onnx.export(model, (x,), "model.onnx", dynamo=True,
                      custom_translation_table=celldsl.export.torch_onnx.translation_table())

Needs the `onnxscript` package (torch's exporter does). The translation adds its nodes through the
exporter's tracer (as torch's own translations of control flow do), because a Scan has a variable
number of outputs, which onnxscript's op calls cannot return. Refused: packed sequences (with the
reason, an ExportError).
"""

from __future__ import annotations

from functools import partial

import numpy as np
import torch

from ..ops.function import cell_for, loop_for, split_params
from ..targets.loop import input_columns
from .model import ExportCell, ExportError
from .onnx_graph import OPSET, Graph, StepBuilder
from .onnx_matrix import MatrixBuilder


class IRGraph(Graph):
    """The Graph interface over onnx_ir: values are ir.Value objects, nodes go to `nodes` (the
    exporter's tracer's list for the main graph)."""

    def __init__(self, dtype: str, counter: list[int], nodes: list | None = None, opset: int = OPSET):
        super().__init__(dtype, counter)
        self.opset = opset
        if nodes is not None:
            self.nodes = nodes

    def fresh(self) -> str:
        self.counter[0] += 1
        return f"celldsl_v{self.counter[0]}"  # apart from the exporter's own names

    def node(self, op: str, inputs: list, outputs: int = 1, **attrs):
        import onnx_ir as ir

        attributes = list(ir.convenience.convert_attributes(attrs))
        n = ir.Node("", op, inputs=inputs, attributes=attributes, num_outputs=outputs)
        for v in n.outputs:
            v.name = self.fresh()
        self.nodes.append(n)
        return list(n.outputs) if outputs > 1 else n.outputs[0]

    def tensor(self, array: np.ndarray):
        import onnx_ir as ir

        return ir.tensor(array)

    def _type(self):
        import onnx_ir as ir

        return ir.TensorType(ir.DataType.FLOAT if self.np_type == np.float32 else ir.DataType.DOUBLE)

    def input(self, shape: list, name: str | None = None):
        import onnx_ir as ir

        v = ir.Value(name=name or self.fresh(), shape=ir.Shape(shape), type=self._type())
        self.inputs.append(v)
        return v

    def output(self, value, shape: list, name: str | None = None) -> None:
        self.outputs.append(self.node("Identity", [value]))

    def finish(self, name: str, initializers=()):
        import onnx_ir as ir

        return ir.Graph(self.inputs, self.outputs, nodes=self.nodes, name=name)


def _meta(value) -> torch.Tensor:
    """A meta tensor of an ir.Value's static shape (the weights' and states' sizes are static)."""
    dims = [d if isinstance(d, int) else 1 for d in value.shape]
    return torch.empty(dims, device="meta")


def export_cell(key: str, x, states: list, params: list) -> tuple[ExportCell, str]:
    """The ExportCell of the op's arguments (shapes only) and its dtype ("f32" or "f64")."""
    import onnx_ir as ir

    compiled = cell_for(key)
    dtype = {ir.DataType.FLOAT: "f32", ir.DataType.DOUBLE: "f64"}.get(x.dtype)
    if dtype is None:
        raise ExportError(f"cell {compiled.name!r}: the ONNX export runs float32 or float64, got {x.dtype}")
    loop = loop_for(key, "torch")
    hoisted_w, step_w, vectors, scalars = split_params(loop, [_meta(p) for p in params])
    metas = [_meta(s) for s in states]
    sizes = loop.sizes(metas, vectors, hoisted_w, step_w)
    width = x.shape[-1]
    if not isinstance(width, int):
        raise ExportError(f"cell {compiled.name!r}: the input's feature size must be static")
    columns = input_columns(compiled.plan, width, sizes, hoisted_w)
    cell = ExportCell(compiled, sizes, width, columns, hoisted_w, step_w, vectors, scalars, layer=None)
    return cell, dtype


def cell_sequence(key: str, backend: str, x, states, params, batch_sizes=None):
    """celldsl::cell_sequence as ONNX: [out, *final states] (the op's saved tensors serve its backward
    only; an inference graph never reads them)."""
    from torch.onnx._internal.exporter import _core  # the tracer torch's own control-flow translations use

    if batch_sizes is not None:
        raise ExportError("celldsl layers export to ONNX on padded sequences only, not on a PackedSequence")
    tracer = _core.current_tracer
    if tracer is None:
        raise ExportError("celldsl's ONNX translation runs inside torch.onnx.export(dynamo=True) only")
    cell, dtype = export_cell(key, x, list(states), list(params))
    graph = partial(IRGraph, opset=tracer.opset.version)  # the exporter's opset
    main = graph(dtype, _COUNTER, nodes=tracer.nodes)  # one counter: every layer's names apart
    finals, out = StepBuilder(cell, dtype, graph, _COUNTER).scan(main, x, list(states), list(params))
    return [out, *finals]


def op_sizes(text: str) -> dict[str, int]:
    """The op's sizes string "K=4,V=8,heads=2" -> {"K": 4, ...} (split and int: never evaluated)."""
    out = {}
    for part in filter(None, text.split(",")):
        name, eq, value = part.partition("=")
        if not eq or not value.isdigit():
            raise ExportError(f"celldsl::matrix_sequence: sizes must be NAME=INT pairs joined by ',', got "
                              f"{part!r}")
        out[name] = int(value)
    return out


def matrix_sequence(key: str, backend: str, x, states, params, sizes: str, lengths=None):
    """celldsl::matrix_sequence as ONNX: [out, *final states], the loop of onnx_matrix.py over the
    op's states (as the loop takes them) and parameters (as MatrixRecurrent stores them)."""
    import onnx_ir as ir
    from torch.onnx._internal.exporter import _core

    compiled = cell_for(key)
    if lengths is not None:
        raise ExportError(f"cell {compiled.name!r}: celldsl layers export to ONNX on padded sequences only, "
                          "not on a PackedSequence")
    tracer = _core.current_tracer
    if tracer is None:
        raise ExportError("celldsl's ONNX translation runs inside torch.onnx.export(dynamo=True) only")
    dtype = {ir.DataType.FLOAT: "f32", ir.DataType.DOUBLE: "f64"}.get(x.dtype)
    if dtype is None:
        raise ExportError(f"cell {compiled.name!r}: the ONNX export runs float32 or float64, got {x.dtype}")
    width = x.shape[-1]
    if not isinstance(width, int):
        raise ExportError(f"cell {compiled.name!r}: the input's feature size must be static")
    found = {"heads": 1, **op_sizes(sizes), compiled.ir.inputs[0]: width}
    graph = partial(IRGraph, opset=tracer.opset.version)
    main = graph(dtype, _COUNTER, nodes=tracer.nodes)
    builder = MatrixBuilder(compiled.ir, found, dtype, graph, _COUNTER)
    finals, out = builder.scan(main, x, list(states), list(params))
    return [out, *finals]


_COUNTER = [0]


def translation_table() -> dict:
    """{celldsl's ops: their ONNX translations}, for torch.onnx.export's custom_translation_table
    (celldsl::matrix_sequence where this celldsl defines it)."""
    from .. import ops  # noqa: F401 - registers the ops

    table = {torch.ops.celldsl.cell_sequence.default: cell_sequence}
    if hasattr(torch.ops.celldsl, "matrix_sequence"):
        table[torch.ops.celldsl.matrix_sequence.default] = matrix_sequence
    return table
