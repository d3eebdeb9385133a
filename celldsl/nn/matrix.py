"""`MatrixRecurrent`: the layer of a matrix-memory cell (mLSTM, GLA, DeltaNet; lang/tensors.py), and
`MatrixCell`: one step of it (what `celldsl.Cell` builds for such a cell).

Layers, directions, batch_first and PackedSequence as torch.nn.LSTM. Parameters are named as the cell
names them plus torch's `_l{layer}` (and `_reverse`), stored [heads, rows, cols] without "1" axes
(W_q : (K, x) per head is [heads, K, I]; b_i : 1 per head is [heads]; a matrix the heads share,
W_a1 : (R, x), is [R, I]). backend="auto" runs the C target's fused loop on CPU float32/float64
tensors (targets/c/matrix_loop.py) and the torch target's loop otherwise; backend="triton" (opt-in,
never "auto") runs the generated Triton kernels (targets/triton/matrix_loop.py). Eager calls run the loop
itself; anything else (torch.export, torch.compile, torch.jit.trace) sees it as one call of the op
celldsl::matrix_sequence per layer and direction (ops/matrix_op.py); torch.jit.script compiles the
copies of nn/script_matrix.py.

A cell with shaped parameters and no `per head` (ir.heads False: a low-rank bottleneck, a chained input
projection) runs here as one head, with torch.nn.RNN's conventions: H is hidden_size, its states are
[L * D, N, H] (no heads axis; `state m : 1` is [L * D, N, 1]), and a single state is returned as a
tensor, not a tuple of one.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from ..compiler import CompiledMatrixCell, compile_cell
from ..lang.errors import CellError, CellTensorError
from ..ops import matrix_op
from ..ops.function import register
from ..ops.op import plain_eager, refuse_tangents
from .arguments import check_layer_arguments, size_dict
from .inits import init_value
from .script_matrix import prepare_layer, prepare_step


class PicklesAsText:
    """torch.save of a matrix layer or cell, loadable with torch.load(weights_only=True): the pickled
    state is tensors, numbers, strings and the compiled cell (which pickles as compile_source(file name,
    text), see celldsl.safe_globals); its IR and loop object are rebuilt from it on load."""

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in ("ir", "loop")}

    def __setstate__(self, state):
        super().__setstate__(state)
        self.ir, self.loop = self.compiled.ir, self.compiled.loop(self.backend)
        register(self.compiled)  # reachable from the ops again (matrix_sequence names it by key)


class MatrixRecurrent(PicklesAsText, nn.Module):
    """forward(x, state=None) -> (output, final states).

    x: [T, N, I] ([N, T, I] with batch_first), [T, I] unbatched (its states without the N axis, as
    torch.nn's) or a PackedSequence; output [T, N, D * heads * width of the output] (D = 2 if
    bidirectional), packed like x. state: a tuple in the order of the cell's
    `state` line, each [L * D, N, heads, rows, cols] without its "1" axes (C : (V, K) per head is
    [L * D, N, heads, V, K]); zeros when None. sizes: every width the cell declares, and "heads" (a
    cell without heads: "H" and its declared widths; its states have no heads axis)."""

    def __init__(self, cell, input_size: int, sizes: dict[str, int], *, num_layers: int = 1,
                 bidirectional: bool = False, batch_first: bool = False, backend: str = "auto",
                 device=None, dtype=None):
        super().__init__()
        sizes = size_dict(sizes, "sizes", "width")
        if not isinstance(batch_first, bool):  # torch.nn.RNNBase's check
            raise TypeError(f"batch_first should be of type bool, got: {type(batch_first).__name__}")
        compiled = compile_cell(cell)
        if not isinstance(compiled, CompiledMatrixCell):
            raise ValueError(f"cell {compiled.name!r} has no matrix state; use celldsl.Recurrent")
        self.compiled, self.ir = compiled, compiled.ir
        register(compiled)  # the op (torch.export, TorchScript) finds the cell by its key
        if not self.ir.heads:  # one head, and the layout of torch.nn.RNN's states (see the module)
            if sizes.get("heads", 1) != 1:
                raise ValueError(f"cell {self.ir.name!r} has no 'per head' values; it runs as one head, so "
                                 f"sizes has no 'heads' (got {sizes['heads']!r})")
            sizes = {**sizes, "heads": 1}
        needed = ["heads", *self.ir.widths, *self.ir.init_sizes]
        missing = [w for w in needed if w not in sizes]
        if missing:
            raise ValueError(f"cell {self.ir.name!r} needs the sizes {', '.join(map(repr, missing))}, e.g. "
                             f"sizes={{{', '.join(repr(w) + ': 4' for w in needed)}}}")
        bad = {w: v for w, v in sizes.items() if not isinstance(v, int) or isinstance(v, bool) or v < 1}
        for name, value in (("input_size", input_size), ("num_layers", num_layers)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                bad[name] = value
        if bad:
            raise ValueError(f"sizes, input_size and num_layers must be positive integers, got {bad}")
        self.input_size, self.num_layers = input_size, num_layers
        self.num_directions = 2 if bidirectional else 1
        self.bidirectional, self.batch_first = bidirectional, batch_first
        self.loop = compiled.loop(backend)  # auto: the C loop on CPU tensors; CellError for triton
        self.backend = backend
        out = self.ir.nodes[self.ir.output_node].kind
        width = next((w for w in (out.rows, out.cols) if w != "1"), "1")
        self.output_size = sizes["heads"] * (1 if width == "1" else sizes.get(width, input_size))
        first = self.ir.inputs[0]
        self.layer_sizes = [{**sizes, first: input_size if k == 0 else self.output_size * self.num_directions}
                            for k in range(num_layers)]
        self.size_codes = [matrix_op.encode_sizes(s) for s in self.layer_sizes]  # the op's `sizes`
        for k in range(num_layers):
            for d in range(self.num_directions):
                for name, p in new_parameters(self.ir, self.layer_sizes[k], device, dtype).items():
                    self.register_parameter(self.param_name(name, k, d), p)

    def __prepare_scriptable__(self):
        """torch.jit.script calls this first: a copy sharing the parameters whose scripted forward calls
        the op celldsl::matrix_sequence (nn/script_matrix.py)."""
        return prepare_layer(self)

    @staticmethod
    def param_name(name: str, layer: int, direction: int) -> str:
        return f"{name}_l{layer}" + ("_reverse" if direction else "")

    def _check_state(self, state: tuple, shapes: list[tuple]) -> None:
        if not all(isinstance(s, torch.Tensor) for s in state):
            raise TypeError("the state must be a tensor (one-state cells) or a tuple of "
                            f"{len(shapes)} tensors ({', '.join(self.ir.states)}), got "
                            f"{[type(s).__name__ for s in state]}")
        if len(state) != len(shapes) or any(tuple(s.shape) != sh
                                            for s, sh in zip(state, shapes, strict=False)):
            raise ValueError(f"state must be {len(shapes)} tensor(s) of shapes {shapes}, got "
                             f"{[tuple(s.shape) for s in state]}")

    def _batched_state(self, state, shapes: list[tuple]):
        """An unbatched call's states (no N axis, checked against `shapes`) with N = 1 put back. A
        batched state is torch.nn's RuntimeError for an unbatched input's hx (CellTensorError)."""
        given = tuple(state) if isinstance(state, tuple | list) else (state,)
        if all(isinstance(s, torch.Tensor) for s in given) and len(given) == len(shapes) and \
                any(s.dim() != len(sh) for s, sh in zip(given, shapes, strict=True)):
            raise CellTensorError(f"For unbatched 2-D input, the states should have no batch axis: shapes "
                                  f"{shapes}, got {[tuple(s.shape) for s in given]}")
        self._check_state(given, shapes)
        return tuple(s.unsqueeze(1) for s in given)

    def cell(self, layer: int = 0, direction: int = 0) -> MatrixCell:
        """Layer `layer`'s one-step MatrixCell (direction 1: the reverse one) whose parameters are this
        layer's own Parameter objects: training either trains both."""
        if layer not in range(self.num_layers) or direction not in range(self.num_directions):
            raise IndexError(f"this layer has {self.num_layers} layer(s) and {self.num_directions} "
                             f"direction(s), got layer={layer}, direction={direction}")
        params = {n: getattr(self, self.param_name(n, layer, direction)) for n in self.ir.params}
        return MatrixCell.sharing(self.compiled, self.layer_sizes[layer], self.backend, params)

    def forward(self, x, state=None):
        packed = isinstance(x, PackedSequence)
        unbatched = isinstance(x, torch.Tensor) and x.dim() == 2  # [T, I], states without N: torch.nn's
        lengths, given = None, x
        if packed:
            refuse_packed_export(self.ir.name)
            x, lengths = pad_packed_sequence(x)
        elif unbatched:
            x = x.unsqueeze(1)
        elif self.batch_first and isinstance(x, torch.Tensor):
            x = x.transpose(0, 1)
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.input_size:
            got = tuple(given.shape) if isinstance(given, torch.Tensor) else type(given).__name__
            raise ValueError(f"x must be [T, N, {self.input_size}] ([N, T, {self.input_size}] with "
                             f"batch_first), [T, {self.input_size}] unbatched, or a PackedSequence, "
                             f"got {got}")
        N, LD = x.shape[1], self.num_layers * self.num_directions
        inner = [self.ir.state_shape(s, self.layer_sizes[0]) for s in self.ir.states]  # loops': [heads, ..]
        shapes = [(LD, N, *(sh if self.ir.heads else sh[1:] or (1,))) for sh in inner]  # no heads: [H], [1]
        if state is None:
            state = tuple(x.new_zeros(s) for s in shapes)
        elif unbatched:
            state = self._batched_state(state, [sh[:1] + sh[2:] for sh in shapes])
        state = tuple(state) if isinstance(state, tuple | list) else (state,)
        self._check_state(state, shapes)
        # every parameter, not the first: a bias of another dtype would promote the loop's values
        weight = next((p for p in self.parameters() if p.dtype != x.dtype or p.device != x.device), None)
        for name, s in zip(self.ir.states, state, strict=True):  # one dtype and device, as torch.nn's
            if s.dtype != x.dtype or s.device != x.device:
                raise CellTensorError(f"state {name} is {s.dtype} on {s.device} but the input is {x.dtype} "
                                      f"on {x.device}: the states must have the input's dtype and device")
        if weight is not None and (weight.dtype != x.dtype or weight.device != x.device):
            raise CellTensorError(f"input is {x.dtype} on {x.device} but the parameters are {weight.dtype} "
                                  f"on {weight.device}. Convert the input (x.to({weight.dtype})) or the "
                                  f"model (model.to({x.dtype}))")
        finals = [[] for _ in self.ir.states]
        for k in range(self.num_layers):
            outs = []
            for d in range(self.num_directions):
                i = k * self.num_directions + d
                params = [getattr(self, self.param_name(n, k, d)) for n in self.ir.params]
                seq = x if d == 0 else _reverse(x, lengths)
                init = [s[i].reshape(N, *sh) for s, sh in zip(state, inner, strict=True)]
                out, last = run_loop(self, seq, init, params, self.layer_sizes[k], self.size_codes[k],
                                     lengths)
                outs.append(out if d == 0 else _reverse(out, lengths))
                for f, s, sh in zip(finals, last, shapes, strict=True):
                    f.append(s.reshape(sh[1:]))
            x = outs[0] if len(outs) == 1 else torch.cat(outs, -1)
        finals = tuple(torch.stack(f) for f in finals)
        if packed:
            x = pack_padded_sequence(x, lengths, enforce_sorted=False)
        elif unbatched:
            x, finals = x.squeeze(1), tuple(f.squeeze(1) for f in finals)
        elif self.batch_first:
            x = x.transpose(0, 1)
        if not self.ir.heads and len(finals) == 1:
            return x, finals[0]
        return x, finals


class MatrixCell(PicklesAsText, nn.Module):
    """One step of a matrix-memory cell: `celldsl.Cell(cell, input_size, hidden_size, sizes=...)`.

    forward(input, state=None) -> (output, new states): input [N, I] or [I] unbatched; state a tuple in
    the order of the cell's `state` line (a lone tensor for a one-state cell), each [N, heads, rows,
    cols] without its "1" axes ([heads, rows, cols] unbatched), zeros when None; output [N, hidden_size]
    ([hidden_size]); the new states always a tuple, as MatrixRecurrent returns them. sizes default as
    in celldsl.Recurrent (heads = 1, every width = hidden_size / heads). The step is the layer's loop
    over T = 1 (torch, cpu or triton), so it gives one step of MatrixRecurrent's numbers and its
    derived backward. Parameters are named as the cell names them (W_q, b_i, ...)."""

    def __init__(self, cell, input_size: int, hidden_size: int, bias: bool = True, backend: str = "auto",
                 device=None, dtype=None, input_sizes=None, sizes=None):
        super().__init__()
        check_layer_arguments(input_size, hidden_size, bias=bias, backend=backend)
        compiled = compile_cell(cell)
        if not isinstance(compiled, CompiledMatrixCell):
            raise ValueError(f"cell {compiled.name!r} has no matrix state; use celldsl.Cell")
        for name, given in (("bias=False", bias is False), ("input_sizes", bool(input_sizes))):
            if given:
                raise ValueError(f"cell {compiled.name!r} has matrix states; its Cell does not take {name} "
                                 "yet")
        sizes = {**matrix_sizes(compiled.ir, hidden_size, sizes), compiled.ir.inputs[0]: input_size}
        self._setup(compiled, sizes, backend)
        if self.hidden_size != hidden_size:
            raise ValueError(f"cell {compiled.name!r}: its output is heads x its width = {self.hidden_size} "
                             f"wide with these sizes, but hidden_size is {hidden_size}; give "
                             f"hidden_size={self.hidden_size}")
        for name, p in new_parameters(self.ir, sizes, device, dtype).items():
            self.register_parameter(name, p)

    def _setup(self, compiled, sizes: dict[str, int], backend: str) -> None:
        shift = next((n for n in compiled.ir.nodes if n.op == "shift"), None)
        if shift is not None:  # prev(x) of a step would read zeros, not the last step's input: refused
            raise CellError("a one-step Cell cannot run prev(): it reads earlier steps' inputs, which a step "
                            "does not carry yet; run the sequence with celldsl.Recurrent", compiled.ir.source,
                            shift.loc)
        self.compiled, self.ir, self.sizes, self.backend = compiled, compiled.ir, dict(sizes), backend
        register(compiled)  # the op (torch.export, TorchScript) finds the cell by its key
        self.size_code = matrix_op.encode_sizes(self.sizes)  # the op's `sizes`
        self.loop = compiled.loop(backend)  # auto: the C loop on CPU tensors; CellError for what cannot run
        self.input_size = sizes[self.ir.inputs[0]]
        out = self.ir.nodes[self.ir.output_node].kind
        width = next((w for w in (out.rows, out.cols) if w != "1"), "1")
        self.hidden_size = sizes["heads"] * (1 if width == "1" else sizes[width])
        self.state_shapes = [tuple(self.ir.state_shape(s, sizes)) for s in self.ir.states]

    @classmethod
    def sharing(cls, compiled, sizes: dict[str, int], backend: str, parameters: dict) -> MatrixCell:
        """A MatrixCell whose parameters are the given ones, not copies (MatrixRecurrent.cell(k))."""
        step = cls.__new__(cls)
        nn.Module.__init__(step)
        step._setup(compiled, sizes, backend)
        for name in step.ir.params:
            step.register_parameter(name, parameters[name])
        return step

    def forward(self, input, state=None):
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"MatrixCell: input must be a Tensor, got {type(input).__name__}")
        if input.dim() not in (1, 2):
            raise CellTensorError(f"MatrixCell: Expected input to be 1D or 2D, got {input.dim()}D instead")
        unbatched = input.dim() == 1
        x = input[None] if unbatched else input
        params = [getattr(self, n) for n in self.ir.params]
        # every parameter, not the first: a bias of another dtype would promote the step's values
        self._check_input(x, next((p for p in params if p.dtype != x.dtype or p.device != x.device),
                                  params[0] if params else None))
        states = self._states(state, x, unbatched)
        out, finals = run_loop(self, x[None], states, params, self.sizes, self.size_code, None)
        if unbatched:
            return out[0, 0], tuple(f[0] for f in finals)
        return out[0], tuple(finals)

    def _check_input(self, x: torch.Tensor, weight) -> None:
        """torch.nn's cell checks and wording: the input's width, dtype and device."""
        if x.shape[1] != self.input_size:
            raise CellTensorError(f"input has inconsistent input_size: got {x.shape[1]} expected "
                                  f"{self.input_size}")
        if weight is not None and x.dtype != weight.dtype:
            raise CellTensorError(f"MatrixCell input dtype ({x.dtype}) does not match weight dtype "
                                  f"({weight.dtype}). Convert input: input.to({weight.dtype}), or convert "
                                  f"model: model.to({x.dtype})")
        if weight is not None and x.device != weight.device:
            raise CellTensorError("Input and parameter tensors are not at the same device, found input "
                                  f"tensor at {x.device} and parameter tensor at {weight.device}")

    def _states(self, state, x: torch.Tensor, unbatched: bool) -> list[torch.Tensor]:
        """The caller's states as [N, heads, rows, cols] tensors (zeros when None), each checked."""
        names, N = self.ir.states, x.shape[0]
        if state is None:
            return [x.new_zeros(N, *shape) for shape in self.state_shapes]
        if isinstance(state, torch.Tensor) and len(names) == 1:
            state = (state,)
        if not isinstance(state, tuple | list) or not all(isinstance(s, torch.Tensor) for s in state):
            raise TypeError(f"MatrixCell: the state must be a tuple of {len(names)} tensors "
                            f"({', '.join(names)}), got {type(state).__name__}")
        if len(state) != len(names):
            raise CellTensorError(f"cell {self.ir.name!r} carries {len(names)} state(s) "
                                  f"({', '.join(names)}): expected {len(names)} state tensor(s), got "
                                  f"{len(state)}")
        checked = []
        for name, s, shape in zip(names, state, self.state_shapes, strict=True):
            want = shape if unbatched else (N, *shape)
            if s.dim() != len(want):
                kind = "unbatched 1-D" if unbatched else "batched 2-D"
                raise CellTensorError(f"For {kind} input, state {name} should be {len(want)}-D {list(want)} "
                                      f"but got {s.dim()}-D {list(s.shape)}")
            if not unbatched and s.shape[0] != N:
                raise CellTensorError(f"Input batch size {N} doesn't match state {name} batch size "
                                      f"{s.shape[0]}")
            if tuple(s.shape) != tuple(want):
                raise CellTensorError(f"state {name} has inconsistent shape: got {list(s.shape)}, expected "
                                      f"{list(want)} (heads, rows, cols without the 1 axes)")
            if s.dtype != x.dtype or s.device != x.device:
                raise CellTensorError(f"state {name} is {s.dtype} on {s.device} but the input is {x.dtype} "
                                      f"on {x.device}: the states must have the input's dtype and device")
            checked.append(s[None] if unbatched else s)
        return checked

    def __prepare_scriptable__(self):
        """torch.jit.script calls this first: a copy sharing the parameters whose scripted forward calls
        the op celldsl::matrix_sequence (nn/script_matrix.py)."""
        return prepare_step(self)

    def extra_repr(self) -> str:
        sizes = {k: v for k, v in self.sizes.items() if k != self.ir.inputs[0]}
        s = f"{self.ir.name!r}, {self.input_size}, {self.hidden_size}, sizes={sizes}"
        return s + (f", backend={self.backend!r}" if self.backend != "auto" else "")


def new_parameters(ir, sizes: dict[str, int], device=None, dtype=None) -> dict[str, nn.Parameter]:
    """One layer and direction's parameters by the cell's names: U(-1/sqrt(cols), 1/sqrt(cols)), then
    the cell's `init` lines in text order."""
    params = {}
    for name in ir.params:
        shape = ir.param_shape(name, sizes)
        bound = 1 / math.sqrt(shape[-1] if len(shape) > 1 else 1)
        params[name] = nn.Parameter(torch.empty(shape, device=device, dtype=dtype).uniform_(-bound, bound))
    initialise(ir, params, sizes)
    return params


@torch.no_grad()
def initialise(ir, views: dict[str, torch.Tensor], sizes: dict[str, int]) -> None:
    """The cell's `init` lines, in text order, on one layer and direction's parameters."""
    sizes = {"I": sizes[ir.inputs[0]], **sizes}
    for name, init in ir.inits.items():
        view = views[name]
        if init.kind == "expr":
            view.copy_(init_value(init.expr, view, sizes, views, f"parameter {name!r}"))
        elif init.kind == "constant":
            view.fill_(init.number)
        elif init.kind == "call" and init.name == "uniform":
            view.uniform_(-init.number, init.number)
        elif init.kind == "call":
            view.normal_(0.0, init.number)
        elif init.name in ("zeros", "ones"):
            view.fill_(float(init.name == "ones"))


def run_loop(module, x, states, params, sizes: dict[str, int], code: str, lengths):
    """(out, final states) of one layer and direction: the loop itself where nothing but autograd could
    see the call (ops.op.plain_eager: eager training keeps the loop's own speed), else the registered
    op celldsl::matrix_sequence, which torch.export, torch.compile and torch.jit.trace see as one call."""
    refuse_tangents([x, *states, *params], f"cell {module.ir.name!r}")
    if plain_eager([x, *states, *params, lengths]):
        return module.loop.run(x, states, params, sizes, lengths)
    if torch._C._are_functorch_transforms_active():  # no vmap rule for the op, no functorch autograd
        raise RuntimeError(f"cell {module.ir.name!r}: torch.func transforms (vmap, grad, jacrev, jvp, ...) "
                           "do not run matrix-path layers yet; use torch.autograd.grad, or a Python loop in "
                           "place of vmap (torch.func.functional_call alone works)")
    return matrix_op.call(module.compiled.key, module.backend, x, states, params, code, lengths)


def refuse_packed_export(cell: str) -> None:
    """A PackedSequence under torch.export: refused, as for the elementwise layers (its lengths are data
    the exported program cannot guard on)."""
    if torch.compiler.is_exporting():
        raise RuntimeError(f"cell {cell!r}: a PackedSequence is not exported (its lengths are data); export "
                           "the padded [T, N, I] input and run each length as its own call")


def _reverse(x: torch.Tensor, lengths) -> torch.Tensor:
    """Each sequence of x [T, N, F] reversed within its own length (padding stays at the end)."""
    if lengths is None:
        return x.flip(0)
    T = x.shape[0]
    t = torch.arange(T)[:, None]
    index = torch.where(t < lengths[None, :], lengths[None, :] - 1 - t, t).to(x.device)
    return x.gather(0, index[..., None].expand_as(x))


def matrix_sizes(ir, hidden_size: int, sizes: dict | None) -> dict[str, int]:
    """The sizes of a matrix-memory cell built by celldsl.Recurrent(cell, input_size, hidden_size): what
    `sizes` gives ("heads", K, V, ...); "heads" defaults to 1 and every other width to hidden_size /
    heads, so the output (heads x its width) is hidden_size wide unless `sizes` says otherwise."""
    sizes = dict(size_dict(sizes, "sizes", "width"))
    if not ir.heads:
        return plain_sizes(ir, hidden_size, sizes)
    unknown = sorted(set(sizes) - {"heads", *ir.widths, *ir.init_sizes})
    if unknown:
        raise ValueError(f"cell {ir.name!r} has the sizes heads, {', '.join(ir.widths) or '(no widths)'}; "
                         f"unknown: {', '.join(unknown)}")
    heads = sizes.setdefault("heads", 1)
    if not isinstance(heads, int) or isinstance(heads, bool) or heads < 1 or hidden_size % heads:
        raise ValueError(f"sizes['heads'] must be a positive int that divides hidden_size {hidden_size}, "
                         f"got {heads!r}")
    for w in ir.widths:
        sizes.setdefault(w, hidden_size // heads)
    missing = [s for s in ir.init_sizes if s not in sizes]
    if missing:  # a size only an init line reads (chrono's T_max): nothing to derive it from
        raise ValueError(f"cell {ir.name!r} needs sizes={{{', '.join(repr(s) + ': ...' for s in missing)}}}: "
                         f"its init lines read {', '.join(missing)}, which does not follow from hidden_size")
    return sizes


def plain_sizes(ir, hidden_size: int, sizes: dict) -> dict[str, int]:
    """The sizes of a cell without heads: H is hidden_size and every other width is given, as an
    elementwise cell's declared widths are (no default: a rank R has no natural value)."""
    if "H" in sizes or "heads" in sizes:
        name = "H" if "H" in sizes else "heads"
        raise ValueError(f"cell {ir.name!r} has no 'per head' values: it runs as one head and H is "
                         f"hidden_size; sizes has no {name!r}")
    declared = [w for w in dict.fromkeys([*ir.widths, *ir.init_sizes]) if w != "H"]
    unknown = sorted(set(sizes) - set(declared))
    if unknown:
        raise ValueError(f"cell {ir.name!r} has the sizes {', '.join(declared) or '(none)'} (H is "
                         f"hidden_size); unknown: {', '.join(unknown)}")
    missing = [w for w in declared if w not in sizes]
    if missing:
        raise ValueError(f"cell {ir.name!r} declares the width(s) {', '.join(missing)}; give their sizes, "
                         f"e.g. sizes={{{', '.join(repr(w) + ': 16' for w in missing)}}}")
    return {**sizes, "heads": 1, "H": hidden_size}


def matrix_recurrent(cell, input_size: int, hidden_size: int, *, num_layers: int = 1, bias: bool = True,
                     batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                     backend: str = "auto", device=None, dtype=None, input_sizes=None, sizes=None,
                     schedule=None) -> MatrixRecurrent:
    """celldsl.Recurrent for a matrix-memory cell: a MatrixRecurrent whose output is hidden_size wide
    (checked); the arguments a matrix layer does not have yet are refused, not ignored."""
    # torch.nn's checks and errors (dropout and bias are refused below unless they are the defaults)
    check_layer_arguments(input_size, hidden_size, num_layers, bias, batch_first, backend=backend)
    compiled = compile_cell(cell)
    refused = {"bias": bias is not True, "dropout": dropout != 0, "input_sizes": bool(input_sizes),
               "schedule": schedule is not None}
    for name, bad in refused.items():
        if bad:
            raise ValueError(f"cell {compiled.name!r} has matrix states; its layer does not take {name}= yet")
    layer = MatrixRecurrent(compiled, input_size, matrix_sizes(compiled.ir, hidden_size, sizes),
                            num_layers=num_layers, bidirectional=bidirectional, batch_first=batch_first,
                            backend=backend, device=device, dtype=dtype)
    if compiled.ir.heads and layer.output_size != hidden_size:  # one head: the output's width is its own
        raise ValueError(f"cell {compiled.name!r}: its output is heads x its width = {layer.output_size} "
                         f"wide with these sizes, but hidden_size is {hidden_size}; give "
                         f"hidden_size={layer.output_size}")
    layer.hidden_size = hidden_size
    return layer
