"""One step of a cell: `Cell` for any cell file, `LSTMCell`/`GRUCell`/`RNNCell` as torch.nn's.

A step is one call of the time-loop op with T = 1, so it runs the layers' fused kernels (no Python
loop over gates) and its backward is the cell's derived backward. Step-by-step decoders (attention,
beam search) call it once per token; `layer.cell(k)` gives layer k's step with the layer's own
parameters.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor, nn

from ..compiler import CompiledMatrixCell, compile_cell
from ..lang.errors import CellError, CellTensorError
from ..ops import run
from ..ops.function import loop_for, register, split_params
from ..ops.op import plain_eager
from .arguments import (
    check_backend,
    check_first_input,
    check_heads,
    check_layer_arguments,
    check_not_matrix,
    declared_width_sizes,
    extra_input_sizes,
)
from .autocasting import autocast_dtype, result_dtype, without_autocast
from .matrix import MatrixCell
from .parameters import checked_shape, initialize, member, op_params, refresh_copies, stores_of
from .prepared import apply_prepared, saved_tensor_hooks, training_layout
from .quantization import WarnsWhenNotQuantized
from .script_any import PreparesStep, extra_inputs
from .scripting import ScriptableCell
from .stack import loop_revision, resolve_backend, zoo_cell

# module -> {under autograd: (key, prepared step or None)} of its last call without and with autograd
# (`_Step._replayed`); kept out of the module's __dict__, so pickling, deepcopy and state_dict never
# see it
_PREPARED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def check_no_shifted_input(compiled) -> None:
    """A one-step Cell cannot read prev(x) of an input: a step carries states, not earlier inputs, so it
    would read zeros at every step, not the input of the step before (MatrixCell refuses it too). A
    layer reads x's rows shifted within each sequence instead."""
    for name in compiled.ir.shifted:
        raise CellError(f"a one-step Cell cannot run {name}: it reads earlier steps' inputs, which a step "
                        "does not carry; run the sequence with celldsl.Recurrent", compiled.ir.source,
                        compiled.ir.locations.get(name))


class _Step:
    """Mixin for an nn.Module with `compiled`, input_size, hidden_size, backend, input_sizes and its
    parameters by store name (weight_ih, ...: torch.nn's cell names); a store it lacks runs as zeros."""

    autocast_keeps_input_dtype = True  # under CPU autocast, as torch.nn.LSTMCell/GRUCell (autocasting.py)
    _distinct_output = True  # forward returns both the output and the states: never one tensor twice

    def _stored(self, like: torch.Tensor, given: dict[str, torch.Tensor] | None = None
                ) -> dict[str, torch.Tensor]:
        """The stored tensors by name; given: some of them in place of the module's (`_full_step`)."""
        tensors, sizes = {}, self._sizes()
        for store in stores_of(self.compiled):
            tensor = given[store.name] if given and store.name in given else getattr(self, store.name, None)
            tensors[store.name] = checked_shape(store.name, tensor, store.shape(sizes), like)
        return tensors

    def _sizes(self) -> dict[str, int]:
        """The size of every width of the cell (CompiledCell.sizes)."""
        return self.compiled.sizes(self.input_size, self.hidden_size, self.input_sizes,
                                   getattr(self, "width_sizes", None))

    def _state_label(self, i: int) -> str:
        return "hidden" if len(self.compiled.states) == 1 else f"hx[{i}]"

    def flatten_parameters(self) -> None:
        """Forget the prepared step (see `_replayed`): the next call makes it again, after all the
        full path's checks. Never needed for the numbers: the prepared step reads the parameters
        live at every call, so any write into them (in place, through `.data`, numpy, ctypes or
        shared memory) is seen at the next call; kept for torch.nn's API."""
        _PREPARED.pop(self, None)

    def _replayed(self, input, given: list[torch.Tensor] | None, layer: tuple | None = None):
        """(output, new states) of a call from the loop's prepared step (kernel arguments bound:
        targets/c/fused.PreparedStep; under autograd PreparedTrainStep, its backward prepared too,
        through nn/prepared.PreparedCall), or None: then the full path runs, with all its checks.
        The step is made by that full path's checks and kept while the call's shapes, dtypes,
        devices, which tensors need a gradient, inference mode, and the parameters (object,
        storage, shape, strides) stay the same, so a call that repeats the last one's signature
        skips the checks it already passed. Both steps read the parameters' values live at every
        call (nothing computed from them is kept), so a write torch does not count (`p.data.mul_()`,
        numpy) is seen as in torch.nn. Without autograd, an op weight that is not a view of a
        parameter is read as its blocks where they are views and the step's products on it are
        row-major (PreparedStep.read_blocks: blocks of several parameters), else computed again
        before every call (`_refresh`: a combination such as W - Wᵀ); under autograd such a cell
        takes the full path.

        layer=(lead, out_lead): a layer's one step (nn/stack.py): input [1, N, I] or [N, 1, I],
        the states [N, H] or [1, N, H]; the new states come shaped lead + (width,), the output
        out_lead + (width,), a tensor of its own, or (out_lead None) the new state it equals."""
        tensors = [input, *given] if given else [input]
        if not plain_eager(tensors):
            return None
        params = self._parameters.values()
        train = torch.is_grad_enabled() and (any(t.requires_grad for t in tensors) or
                                             any(p is not None and p.requires_grad for p in params))
        if train and saved_tensor_hooks():
            return None
        try:
            key = (self.backend, self.input_size, self.hidden_size, self.__dict__.get("nonlinearity"),
                   torch.get_num_threads(), torch.is_inference_mode_enabled(),
                   *[(t.shape, t.dtype, t.device, t.requires_grad) for t in tensors],
                   *[p if p is None else (id(p), p.data_ptr(), p.shape, p.stride(), p.requires_grad)
                     for p in params])
        except RuntimeError:  # a tensor without storage (meta, a wrapper subclass): the full path
            return None
        entries = _PREPARED.get(self)
        if entries is None:
            entries = _PREPARED[self] = {}
        entry = entries.get(train)
        # the loop's revision (its libraries, GEMM choices) as the step was made, asked of that loop:
        # the key's backend and device pick the same one
        if entry is None or entry[0] != key or (entry[2] is not None and entry[2]() != entry[3]):
            revision = loop_revision(self.compiled.key, self.backend, input)
            entry = entries[train] = (key, self._prepare(input, given, train, layer is not None), *revision)
        step = entry[1]
        if step is None:
            return None
        if layer is None:
            lead = out_lead = input.shape[:-1]
            distinct = self._distinct_output
        else:
            lead, out_lead = layer
            distinct = out_lead is not None
            if not distinct:
                out_lead = lead
        lock = step[0].lock
        if not lock.acquire(blocking=False):
            return None  # another thread is in this step (its buffers): this call takes the full path
        try:
            if train:
                return self._train_call(*step, input, tensors[1:], (lead, out_lead), distinct)
            step, held, derived = step
            if derived:
                self._refresh(held, derived, input)
            return step(input, tensors[1:], distinct, lead, out_lead)
        finally:
            lock.release()

    def _refresh(self, held: list[torch.Tensor], derived: list[int], like: torch.Tensor) -> None:
        """The op tensors `derived` (not views of parameters: a combination, blocks of several
        parameters) computed again from the parameters as they are, into the tensors the prepared
        step reads (`held`: its op parameter list)."""
        refresh_copies(self.compiled, self._stored(like=like), self._sizes(), like, held, derived)

    def _train_call(self, step, layout, held, derived, input, given, leads, distinct):
        """_replayed under autograd: one PreparedCall. The parameters are the layout's (the key of
        `_replayed` holds their ids, and the entry holds them: the same objects); the op weights
        `derived` (blocks of several parameters) are made again first, outside autograd."""
        if derived:
            step.spill()  # an earlier call's backward reads its own copies
            with torch.no_grad():
                self._refresh(held, derived, input)
        distinct = distinct or step.output_state is None
        outs = apply_prepared(step, layout, self._full_step, len(given), distinct, leads, input, *given,
                              *layout.stored)
        news = list(outs[: len(step.news)])
        return (outs[-1] if distinct else news[step.output_state]), news

    def _full_step(self, input, given, leads, stored):
        """The full path's (new states..., out), shaped as `_replayed`'s (leads: the states' and the
        output's leading dimensions), reading `stored` (the Layout's tensors, in its order) in place
        of the module's: PreparedCall's backward differentiates it."""
        stored = dict(zip(self._stored_names(), stored, strict=True))
        if input.dim() <= 2:
            out, news = self._step(input, given, {}, prepared=False, stored=stored)
            return [*news, out]
        lead, out_lead = leads
        rows = [s.reshape(-1, s.shape[-1]) for s in given]
        out, news = self._step(input.reshape(-1, input.shape[-1]), rows, {}, prepared=False, stored=stored)
        return [*[n.reshape(*lead, n.shape[-1]) for n in news], out.reshape(*out_lead, out.shape[-1])]

    def _prepare(self, input, given, train: bool = False, layer: bool = False):
        """The prepared step for these arguments, or None (they fail a check, or the loop has none):
        without autograd (PreparedStep, the op parameters it reads, the indices of those that are
        not views of a stored tensor: `_refresh` computes them again before every call); under
        autograd (train) (PreparedTrainStep, its Layout, the op parameters, the indices of the copies
        among them: GEMM weights made of blocks of several parameters, made again before every call).
        layer: a layer's step (input [1, N, I] or [N, 1, I]: `_replayed`), checked as [N, I]."""
        compiled = self.compiled
        if layer:
            if input.dim() != 3 or 1 not in input.shape[:2] or \
                    any(s.dim() not in (2, 3) for s in given or []):
                return None
            input = input.reshape(-1, input.shape[-1])
            given = [s.reshape(-1, s.shape[-1]) for s in given or []]
        if len(compiled.ir.inputs) != 1 or input.dim() not in (1, 2) or \
                any(s.dim() != input.dim() for s in given or []):
            return None
        x = input[None] if input.dim() == 1 else input
        states = [s[None] if input.dim() == 1 else s for s in given or []]
        try:
            self._check(x, states)
            backend = resolve_backend(self.backend, x)
            sizes = self._sizes()
            stored, blocks = self._stored(like=x), {}
            params = op_params(compiled, stored, sizes, like=x, blocks=blocks)
            bases = {id(t) for t in stored.values()}

            def viewed(q):
                return id(q if q._base is None else q._base) in bases
            derived = [i for i, q in enumerate(params) if not viewed(q)]
            if train:  # the copies the step reads, made again before each call outside autograd
                params = [q.detach() if i in derived else q for i, q in enumerate(params)]
            loop = loop_for(compiled.key, backend)
            prepare = getattr(loop, "prepare_train_step" if train else "prepare_step", None)
            if prepare is None:
                return None
            zeros = [x.new_zeros(x.shape[0], sizes[compiled.ir.width(n)])
                     for n in compiled.states[len(states):]]
            split = split_params(loop, params)
            step = prepare(x[None], [*states, *zeros], *split)
            if step is None:
                return None
            if not train:
                # a weight made of blocks that are views: the step reads them where it can
                live = step.read_blocks({i: blocks[i] for i in derived
                                         if i in blocks and all(viewed(b) for b in blocks[i])})
                return step, params, [i for i in derived if i not in live]
            names = self._stored_names()
            stored = [self._parameters[n] for n in names]
            if len(stored) != sum(p is not None for p in self._parameters.values()):
                return None  # a parameter the cell does not read
            layout = training_layout(step, stored, params, split, blocks, derived)
            return None if layout is None else (step, layout, params, derived)
        except (CellTensorError, ValueError, TypeError):
            return None  # the full path raises it again, with its message

    def _stored_names(self) -> list[str]:
        """The stores the module holds (not left out by bias=False), in the cell's order: a Layout's."""
        return [s.name for s in stores_of(self.compiled) if self._parameters.get(s.name) is not None]

    def _step(self, input, given: list[torch.Tensor] | None, extra: dict, prepared: bool = True,
              stored: dict[str, torch.Tensor] | None = None):
        """-> (output [N, H], all new states [N, H]); [H] each for unbatched input [I]. prepared=False:
        the full path, never the prepared step; stored: tensors in place of the module's, by name."""
        if not extra and prepared and isinstance(input, torch.Tensor):
            replayed = self._replayed(input, given)
            if replayed is not None:
                return replayed
        name = type(self).__name__
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"{name}: input must be a Tensor, got {type(input).__name__}")
        if input.dim() not in (1, 2):
            raise CellTensorError(f"{name}: Expected input to be 1D or 2D, got {input.dim()}D instead")
        for i, s in enumerate(given or []):
            if s.dim() not in (1, 2):
                label = self._state_label(i)
                raise CellTensorError(f"{name}: Expected {label} to be 1D or 2D, got {s.dim()}D instead")
            if s.dim() != input.dim():
                kind = "unbatched 1-D" if input.dim() == 1 else "batched 2-D"
                raise CellTensorError(f"For {kind} input, {self._state_label(i)} should also be "
                                      f"{input.dim()}-D but got {s.dim()}-D")
        unbatched = input.dim() == 1
        x = input.unsqueeze(0) if unbatched else input
        states = [s.unsqueeze(0) if unbatched else s for s in given or []]
        input_dtype, cast = x.dtype, autocast_dtype(x)
        if cast is not None:  # torch.autocast: the op runs in its dtype (celldsl/nn/autocasting.py)
            x, states = x.to(cast), [s.to(cast) for s in states]
            extra = {k: v.to(cast) if isinstance(v, torch.Tensor) else v for k, v in extra.items()}
        self._check(x, states, autocast=cast is not None)
        N, sizes = x.shape[0], self._sizes()
        states = [s.contiguous() for s in states]
        states += [x.new_zeros(N, sizes[self.compiled.ir.width(name)])
                   for name in self.compiled.states[len(states):]]
        seq = torch.cat([x, *self._extras(extra, x, unbatched)], dim=-1)[None]  # [T = 1, N, I + C]
        params = op_params(self.compiled, self._stored(like=x, given=stored), sizes, like=x)
        params = [p if p.dtype == x.dtype else p.to(x.dtype) for p in params]  # differs only under autocast
        with without_autocast(x, cast):
            out, finals = run(self.compiled.key, resolve_backend(self.backend, x), seq, states, params)
        out = out[0]
        if cast is not None:
            dtype = result_dtype(input_dtype, cast, x.device.type, self.autocast_keeps_input_dtype)
            out, finals = out.to(dtype), [f.to(dtype) for f in finals]
        if unbatched:
            out, finals = out[0], [f[0] for f in finals]
        return out, finals

    def _check(self, x: torch.Tensor, states: list[torch.Tensor], autocast: bool = False) -> None:
        """torch.nn's cell checks and wording (input [N, I], states [N, H]); under autocast the
        weights are cast to x's dtype, so theirs is not checked."""
        name = type(self).__name__
        weights = list(self.parameters())
        if weights and x.dtype != weights[0].dtype and not autocast:
            w = weights[0].dtype
            raise CellTensorError(f"{name} input dtype ({x.dtype}) does not match weight dtype ({w}). "
                                  f"Convert input: input.to({w}), or convert model: model.to({x.dtype})")
        if weights and x.device != weights[0].device:
            raise CellTensorError("Input and parameter tensors are not at the same device, found input "
                                  f"tensor at {x.device} and parameter tensor at {weights[0].device}")
        if x.shape[1] != self.input_size:
            raise CellTensorError(f"input has inconsistent input_size: got {x.shape[1]} expected "
                                  f"{self.input_size}")
        sizes = self._sizes()
        for i, s in enumerate(states):
            width = sizes[self.compiled.ir.width(self.compiled.states[i])]
            if s.shape[1] != width:
                raise CellTensorError(f"hidden{i} has inconsistent hidden_size: got {s.shape[1]}, expected "
                                      f"{width}")
            if s.shape[0] != x.shape[0]:
                raise CellTensorError(f"Input batch size {x.shape[0]} doesn't match hidden{i} batch size "
                                      f"{s.shape[0]}")
            if s.device != x.device:
                raise CellTensorError("Input and hidden tensors are not at the same device, found input "
                                      f"tensor at {x.device} and hidden tensor at {s.device}")
            if s.dtype != x.dtype:
                raise CellTensorError(f"{self._state_label(i)} is {s.dtype} but the input is {x.dtype}: the "
                                      "states must have the input's dtype")

    def _extras(self, extra: dict, x: torch.Tensor, unbatched: bool) -> list[torch.Tensor]:
        """The extra inputs the cell reads, [N, C] each, in declaration order."""
        names = self.compiled.ir.inputs[1:]
        unknown, missing = sorted(set(extra) - set(names)), [n for n in names if n not in extra]
        if unknown or missing:
            wanted = ", ".join(f"{n}=" for n in names) or "none"
            raise ValueError(f"cell {self.compiled.name!r} takes the extra inputs ({wanted}) as keywords"
                             + (f"; missing: {', '.join(missing)}" if missing else "")
                             + (f"; unknown: {', '.join(unknown)}" if unknown else ""))
        read, out = set(self.compiled.plan.inputs_read()), []
        for name in names:
            e, C = extra[name], self.input_sizes[name]
            want = (C,) if unbatched else (x.shape[0], C)
            if not isinstance(e, torch.Tensor) or tuple(e.shape) != want:
                got = tuple(e.shape) if isinstance(e, torch.Tensor) else type(e).__name__
                raise CellTensorError(f"extra input {name!r} must have shape {want}, got {got}")
            if e.dtype != x.dtype or e.device != x.device:
                raise CellTensorError(f"extra input {name!r} is {e.dtype} on {e.device} but the input is "
                                      f"{x.dtype} on {x.device}")
            if name in read:
                out.append(e.unsqueeze(0) if unbatched else e)
        return out

    def _state_list(self, state) -> list[torch.Tensor] | None:
        """The caller's state (a tensor for a one-state cell, else a tuple; prev(...) states may be
        left out) as a list."""
        if state is None:
            return None
        names, declared = self.compiled.states, self.compiled.ir.declared_states
        if isinstance(state, torch.Tensor) and declared == 1:
            return [state]
        if not isinstance(state, (tuple, list)) or not all(isinstance(s, torch.Tensor) for s in state):
            raise TypeError(f"{type(self).__name__}: the state must be a tuple of {declared} tensors "
                            f"({', '.join(names[:declared])}), got {type(state).__name__}")
        if len(state) not in (declared, len(names)):
            counts = f"{declared} or {len(names)}" if declared != len(names) else f"{declared}"
            raise CellTensorError(f"cell {self.compiled.name!r} carries {len(names)} state(s) "
                                  f"({', '.join(names)}): expected {counts} state tensor(s), got "
                                  f"{len(state)}")
        return list(state)


class Cell(PreparesStep, _Step, nn.Module):
    """One step of any cell, with the parameters of one layer of Recurrent.

    Args:
        cell: a .cell path, a zoo name ("lstm"), cell text, or a compiled cell.
        input_size, hidden_size, bias, device, dtype: as in torch.nn.LSTMCell (bias=False leaves out
            the parameters named b, b_*, bias*: fixed at 0).
        backend: "auto", "torch", "cpu" or "triton", as for Recurrent.
        input_sizes: the size of every input after the first, by name (cells with `input x, ctx`).

    forward(input, state=None, **extra) -> (output, new_state):
        input [N, I], or [I] unbatched. state: one tensor [N, H] for a one-state cell, else a tuple in
        the order of the cell's `state` line, optionally followed by the prev(...) states (zero when
        left out, as are all states when state is None). output [N, H]; new_state: a tensor for a
        one-state cell, else the tuple of all carried states, ready for the next step. extra: one
        tensor [N, C] ([C] unbatched) per input after the first (`cell(x_t, state, ctx=c)`).

    Parameters are named by the cell file's groups (weight_ih, ...) and views of them come from
    cell_parameter("W_hh"). Example:
        >>> step = Cell("gru", 8, 16)
        >>> y, h = step(torch.randn(4, 8))
        >>> y, h = step(torch.randn(4, 8), h)
    """

    def __new__(cls, *args, **kwargs):
        """Cell(a matrix-memory cell, ...) is that cell's MatrixCell (nn/matrix.py): one step of its layer."""
        cell = args[0] if args else kwargs.get("cell")
        if cls is Cell and cell is not None and isinstance(compile_cell(cell), CompiledMatrixCell):
            return MatrixCell(*args, **kwargs)
        return super().__new__(cls)

    def __init__(self, cell, input_size: int, hidden_size: int, bias: bool = True, backend: str = "auto",
                 device=None, dtype=None, input_sizes: dict[str, int] | None = None,
                 sizes: dict[str, int] | None = None):
        super().__init__()
        check_layer_arguments(input_size, hidden_size, bias=bias, backend=backend)
        self.compiled = compile_cell(cell)
        check_not_matrix(self.compiled)
        check_no_shifted_input(self.compiled)
        register(self.compiled)
        self.input_sizes = extra_input_sizes(self.compiled, input_sizes)
        self.width_sizes = declared_width_sizes(self.compiled, sizes)
        self.compiled.check_sizes(input_size, hidden_size, self.input_sizes, self.width_sizes)
        # no `bias` attribute: a cell file may name a parameter group `bias` (torch's cells keep the flag)
        self.input_size, self.hidden_size, self.backend = input_size, hidden_size, backend
        check_first_input(self.compiled, input_size)
        check_heads(self.compiled, self._sizes())
        for store in stores_of(self.compiled):
            if bias or not store.is_bias:
                shape = store.shape(self._sizes())
                tensor = torch.empty(shape, device=device, dtype=dtype)
                self.register_parameter(store.name, nn.Parameter(tensor))
        self.reset_parameters()

    @classmethod
    def sharing(cls, compiled, input_size: int, hidden_size: int, backend: str, input_sizes: dict[str, int],
                parameters: dict[str, nn.Parameter], width_sizes: dict[str, int] | None = None) -> Cell:
        """A Cell whose parameters are the given ones, not copies (Recurrent.cell(k))."""
        check_no_shifted_input(compiled)
        step = cls.__new__(cls)
        nn.Module.__init__(step)
        step.compiled, step.input_sizes = compiled, dict(input_sizes)
        step.width_sizes = dict(width_sizes or {})
        step.input_size, step.hidden_size, step.backend = input_size, hidden_size, backend
        for name, p in parameters.items():
            step.register_parameter(name, p)
        return step

    def __setstate__(self, state):
        super().__setstate__(state)
        register(self.compiled)  # an unpickled cell must be reachable from the ops again

    def reset_parameters(self) -> None:
        """torch's U(-1/sqrt(H), 1/sqrt(H)) everywhere, then the cell file's `init` lines."""
        stored = [(s, getattr(self, s.name)) for s in stores_of(self.compiled) if getattr(self, s.name, None)
                  is not None]
        initialize(self.compiled, stored, self._sizes())

    def cell_parameter(self, name: str) -> torch.Tensor:
        """The parameter the cell file names (e.g. "b_f", "U_z") as a view sharing storage."""
        for store in stores_of(self.compiled):
            if name in store.members:
                tensor = getattr(self, store.name, None)
                if tensor is None:
                    raise ValueError(f"bias=False: the cell has no parameter {name!r} (it is fixed at 0)")
                return member(store, name, tensor, self._sizes())
        names = ", ".join(m for s in stores_of(self.compiled) for m in s.members)
        raise ValueError(f"cell {self.compiled.name!r} has no parameter {name!r}; it has: {names}")

    def forward(self, input, state=None, extra=None, **named):
        """The extra inputs by keyword (`ctx=c`) or as a dict (`extra={"ctx": c}`, as scripted)."""
        out, finals = self._step(input, self._state_list(state), extra_inputs(extra, named))
        return out, (finals[0] if len(finals) == 1 else tuple(finals))

    def extra_repr(self) -> str:
        s = f"{self.compiled.name!r}, {self.input_size}, {self.hidden_size}"
        if any(getattr(self, st.name, None) is None for st in stores_of(self.compiled) if st.is_bias):
            s += ", bias=False"
        if self.backend != "auto":
            s += f", backend={self.backend!r}"
        if self.input_sizes:
            s += f", input_sizes={self.input_sizes}"
        return s


class _TorchCell(WarnsWhenNotQuantized, ScriptableCell, _Step):
    """LSTMCell/GRUCell/RNNCell: torch.nn's class (constructor, parameters, state_dict, repr) with a
    forward that runs the zoo cell. `backend` is keyword only."""

    __jit_unused_properties__ = ["compiled", "stem", "qconfig"]  # torch.jit.script: scripting.py

    stem = ""
    input_sizes: dict = {}
    _distinct_output = False  # forward returns the output or the states, not both

    @property
    def compiled(self):
        return zoo_cell(self.stem)

    def _init_backend(self, backend: str) -> None:
        check_backend(backend)
        self.backend = backend
        if getattr(self, "nonlinearity", "tanh") in ("tanh", "relu"):
            zoo_cell(self.stem)

    def __setstate__(self, state):
        super().__setstate__(state)
        if getattr(self, "nonlinearity", "tanh") in ("tanh", "relu"):
            zoo_cell(self.stem)


class LSTMCell(_TorchCell, nn.LSTMCell):
    """torch.nn.LSTMCell running cells/lstm.cell: forward(input, hx=None) -> (h', c')."""

    stem = "lstm"

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None, dtype=None, *,
                 backend: str = "auto"):
        super().__init__(input_size, hidden_size, bias, device, dtype)
        self._init_backend(backend)

    def forward(self, input: Tensor, hx: tuple[Tensor, Tensor] | None = None
                ) -> tuple[Tensor, Tensor]:
        if torch.jit.is_scripting():  # TorchScript compiles this branch only (scripting.py)
            h, c = self.script_step(input, [] if hx is None else [hx[0], hx[1]])
            return h, c
        if hx is not None and not isinstance(hx, (tuple, list)):
            raise TypeError(f"LSTMCell: hx must be a tuple (h, c) of tensors, got {type(hx).__name__}")
        _out, (h, c) = self._step(input, self._state_list(hx), {})
        return h, c


class GRUCell(_TorchCell, nn.GRUCell):
    """torch.nn.GRUCell running cells/gru.cell: forward(input, hx=None) -> h'."""

    stem = "gru"

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None, dtype=None, *,
                 backend: str = "auto"):
        super().__init__(input_size, hidden_size, bias, device, dtype)
        self._init_backend(backend)

    def forward(self, input: Tensor, hx: Tensor | None = None) -> Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles this branch only (scripting.py)
            return self.script_step(input, [] if hx is None else [hx])[0]
        return self._step(input, self._state_list(hx), {})[0]


class RNNCell(_TorchCell, nn.RNNCell):
    """torch.nn.RNNCell running cells/rnn_tanh.cell or cells/rnn_relu.cell: forward(input, hx=None)
    -> h'. As in torch, nonlinearity is checked when the cell runs."""

    autocast_keeps_input_dtype = False  # torch.nn.RNNCell returns autocast's dtype

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, nonlinearity: str = "tanh",
                 device=None, dtype=None, *, backend: str = "auto"):
        super().__init__(input_size, hidden_size, bias, nonlinearity, device, dtype)
        self._init_backend(backend)

    @property
    def stem(self) -> str:
        if self.nonlinearity not in ("tanh", "relu"):
            raise RuntimeError(f"Unknown nonlinearity: {self.nonlinearity}")
        return f"rnn_{self.nonlinearity}"

    def forward(self, input: Tensor, hx: Tensor | None = None) -> Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles this branch only (scripting.py)
            return self.script_step(input, [] if hx is None else [hx])[0]
        return self._step(input, self._state_list(hx), {})[0]
