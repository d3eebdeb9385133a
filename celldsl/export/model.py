"""What both exports start from: one compiled cell, its sizes, and one layer's weights in the flat order
of the op (targets/loop.py: hoisted GEMM weights, step GEMM weights, vectors, scalars).

An export is one layer and one direction over a padded, time-major sequence: x [T, N, I] (the
cell's inputs concatenated along the features in declaration order, as the op takes them), the
carried states [N, width] in the order of the cell's `state` line (prev(...) states included), and
out [T, N, width of the output]. The weights come from a layer's state_dict (torch.load with
weights_only=True: the file is data) or from a freshly initialised layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from inspect import signature
from pathlib import Path

import torch

from ..compiler import CompiledCell, CompiledMatrixCell, compile_cell
from ..lang.errors import CellError
from ..nn.parameters import op_params, stores_of
from ..targets.loop import input_columns


class ExportError(ValueError):
    """A cell, a weights file or an argument the export cannot take; the message says where and why."""


@dataclass
class ExportCell:
    compiled: CompiledCell
    sizes: dict[str, int]  # the size of every width (CompiledCell.sizes)
    input_size: int  # I: the columns of the concatenated x
    columns: dict[str, slice]  # each input the step reads -> its columns in x
    hoisted_w: list[torch.Tensor]  # [rows, K] or [G, NH, dh, dh] (heads), as targets/gemm.py takes them
    step_w: list[torch.Tensor]
    vectors: list[torch.Tensor]  # [width]
    scalars: list[torch.Tensor]  # []
    layer: torch.nn.Module  # the Recurrent layer holding these weights (float64)

    @property
    def plan(self):
        return self.compiled.plan

    @property
    def ir(self):
        return self.compiled.ir

    def state_widths(self) -> list[int]:
        return [self.sizes[self.ir.width(s)] for s in self.ir.states]

    def output_width(self) -> int:
        return self.sizes[self.ir.width(self.ir.output)]

    def weights(self) -> list[tuple[str, torch.Tensor]]:
        """Every weight tensor by a descriptive label, in the order of the flat binary file."""
        plan, ir = self.plan, self.ir
        out = [(f"hoisted GEMM [{', '.join(g.params)}] @ {g.operand.name}", w)
               for g, w in zip(plan.hoisted, self.hoisted_w, strict=True)]
        out += [(f"stage {g.stage} GEMM [{', '.join(g.params)}] @ {g.operand.name}", w)
                for g, w in zip(plan.gemms, self.step_w, strict=True)]
        vectors = [n for n, p in ir.params.items() if p.kind == "vector"]
        scalars = [n for n, p in ir.params.items() if p.kind == "scalar"]
        out += [(f"vector {n}", v) for n, v in zip(vectors, self.vectors, strict=True)]
        out += [(f"scalar {n}", v) for n, v in zip(scalars, self.scalars, strict=True)]
        return out


def _sizes_arg(text: str | None, what: str) -> dict[str, int]:
    """"ctx=3,P=8" -> {"ctx": 3, "P": 8}."""
    out = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        name, eq, value = part.partition("=")
        if not eq or not value.strip().isdigit() or int(value) <= 0:
            raise ExportError(f"{what} must be NAME=SIZE,... with positive integer sizes, got "
                              f"{part.strip()!r}")
        if name.strip() in out:
            raise ExportError(f"{what} gives {name.strip()!r} twice")
        out[name.strip()] = int(value)
    return out


def _state_dict(weights) -> dict | None:
    """One layer, one direction's state_dict from a file (torch.load with weights_only=True), or None."""
    if weights is None:
        return None
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise ExportError(f"{weights}: cannot load a state_dict with torch.load(weights_only=True): "
                          f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ExportError(f"{weights}: expected a state_dict (a dict of tensors), got {type(state).__name__}")
    odd = next((k for k in state if not isinstance(k, str)), None)
    if odd is not None:
        raise ExportError(f"{weights}: expected a state_dict (tensors by parameter name), got the key "
                          f"{odd!r}")
    unreal = sorted(k for k, v in state.items() if v.is_complex() or v.dtype == torch.bool)
    if unreal:  # load_state_dict would drop the imaginary part with a warning only
        raise ExportError(f"{weights}: the weights must be real numbers; {unreal[0]} is "
                          f"{str(state[unreal[0]].dtype).removeprefix('torch.')}")
    other = sorted(k for k in state if not k.endswith("_l0"))
    if other:
        raise ExportError(f"{weights}: an export takes one layer and one direction (keys ending _l0); "
                          f"got {', '.join(other[:4])}{'...' if len(other) > 4 else ''}")
    return state



def _float64_layer(compiled, input_size: int, hidden_size: int, seed: int, weights, state, fit, **kwargs):
    """celldsl.Recurrent(compiled, ...) on the torch backend in float64, initialised after
    torch.manual_seed(seed), with `state` (a one-layer state_dict, or None) loaded: the layer both
    loaders read their weights from. Its errors as ExportErrors; `fit(layer)` words the sizes a
    state_dict must fit."""
    from ..nn.layers import Recurrent

    if not -2**63 <= seed < 2**64:  # torch.manual_seed's range; else "Overflow when unpacking long long"
        raise ExportError(f"the seed must be an integer from -2^63 to 2^64 - 1, got {seed}")
    torch.manual_seed(seed)
    try:
        layer = Recurrent(compiled, input_size, hidden_size, dtype=torch.float64, backend="torch", **kwargs)
    except CellError:
        raise
    except (ValueError, TypeError) as err:
        where = "" if str(err).startswith("cell ") else f"cell {compiled.name!r}: "
        raise ExportError(f"{where}{err}") from None
    except RuntimeError as err:  # sizes the memory cannot hold: torch's allocator raises RuntimeError
        raise ExportError(f"cell {compiled.name!r}: cannot build its layer at input size {input_size} and "
                          f"hidden size {hidden_size}: {(str(err).splitlines() or [''])[0]}") from None
    if state is not None:
        try:
            layer.load_state_dict({k: v.to(torch.float64) for k, v in state.items()})
        except RuntimeError as err:
            first = " ".join(str(err).split())
            raise ExportError(f"{weights}: does not fit cell {compiled.name!r} with {fit(layer)}: "
                              f"{first[:400]}") from None
    return layer

def load_matrix_cell(cell, input_size: int, hidden_size: int, weights: str | Path | None = None,
                     seed: int = 0, sizes: str | dict | None = None
                     ) -> tuple[CompiledMatrixCell, dict[str, int], dict[str, torch.Tensor]]:
    """A matrix-memory cell with one layer's weights: (the compiled cell, its sizes, including "heads"
    and the input's name, and the float64 parameters by name as MatrixRecurrent stores them). The
    weights come from `weights` (a state_dict of celldsl.Recurrent(cell, input_size, hidden_size,
    sizes=...) with one layer, one direction: keys ending _l0), else a fresh layer after
    torch.manual_seed(seed)."""

    compiled = compile_cell(cell)
    if not isinstance(compiled, CompiledMatrixCell):
        raise ExportError(f"cell {compiled.name!r} has no matrix state; load it with load_cell")
    if isinstance(sizes, str) or sizes is None:
        sizes = _sizes_arg(sizes, "--sizes")
    state = _state_dict(weights)
    layer = _float64_layer(compiled, input_size, hidden_size, seed, weights, state,
                           lambda layer: f"input size {input_size}, hidden size {hidden_size} and sizes "
                                         f"{layer.layer_sizes[0]}", sizes=sizes or None)
    params = {n: getattr(layer, layer.param_name(n, 0, 0)).detach().clone() for n in compiled.ir.params}
    return compiled, dict(layer.layer_sizes[0]), params


def load_cell(cell, input_size: int, hidden_size: int, weights: str | Path | None = None, seed: int = 0,
              input_sizes: str | dict | None = None, sizes: str | dict | None = None) -> ExportCell:
    """The cell (a path, zoo name, text or CompiledCell) with one layer's weights: from `weights` (a
    state_dict file of celldsl.Recurrent(cell, input_size, hidden_size) with one layer, one
    direction), else freshly initialised after torch.manual_seed(seed)."""

    compiled = compile_cell(cell)
    if isinstance(compiled, CompiledMatrixCell):  # another layout of weights and states
        raise ExportError(f"cell {compiled.name!r} runs on the matrix path: load it with load_matrix_cell "
                          "(`celldsl export --c` and `--onnx` do)")
    if isinstance(input_sizes, str) or input_sizes is None:
        input_sizes = _sizes_arg(input_sizes, "--input-sizes")
    if isinstance(sizes, str) or sizes is None:
        sizes = _sizes_arg(sizes, "--sizes")
    state = _state_dict(weights)
    bias = state is None or any(s.is_bias and f"{s.name}_l0" in state for s in stores_of(compiled)) or \
        not any(s.is_bias for s in stores_of(compiled))
    layer = _float64_layer(compiled, input_size, hidden_size, seed, weights, state,
                           lambda layer: f"input size {input_size} and hidden size {hidden_size}",
                           bias=bias, input_sizes=input_sizes or None, sizes=sizes or None)
    width_sizes = compiled.sizes(input_size, hidden_size, layer.input_sizes, layer.width_sizes)
    tensors = {}
    for store in stores_of(compiled):
        t = getattr(layer, f"{store.name}_l0", None)
        tensors[store.name] = t.detach() if t is not None else torch.zeros(store.shape(width_sizes),
                                                                           dtype=torch.float64)
    # `like` (the identity's dtype) is newer than some checkouts' op_params: pass it where taken
    like = {"like": torch.empty(0, dtype=torch.float64)} if "like" in signature(op_params).parameters else {}
    with torch.no_grad():
        flat = [w.detach().contiguous() for w in op_params(compiled, tensors, width_sizes, **like)]
    plan = compiled.plan
    nh, ng = len(plan.hoisted), len(plan.gemms)
    nv = sum(1 for p in compiled.ir.params.values() if p.kind == "vector")
    hoisted_w, step_w = flat[:nh], flat[nh:nh + ng]
    vectors, scalars = flat[nh + ng:nh + ng + nv], flat[nh + ng + nv:]
    total = input_size + sum(layer.input_sizes.get(n, 0) for n in compiled.ir.inputs[1:]
                             if n in plan.inputs_read())
    columns = input_columns(plan, total, width_sizes, hoisted_w)
    return ExportCell(compiled, width_sizes, total, columns, hoisted_w, step_w, vectors, scalars, layer)
