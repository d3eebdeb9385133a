"""Drop-in torch layers: `Recurrent(cell, ...)` for any cell file; LSTM/GRU/RNN (torch.nn's own
classes running the zoo's cells, celldsl/nn/torch_layers.py) and the one-step Cell classes
(celldsl/nn/cells.py) are importable from here too.

Parameters are stored the way the cell file groups them (`param weight_ih = [W_ii, ...]` is one tensor
`weight_ih_l0`), so torch.nn state_dicts load unchanged; `cell_parameter("b_f")` returns a view.
"""

from __future__ import annotations

import torch
from torch import nn

from ..compiler import compile_cell
from ..ops.function import register
from .arguments import (
    check_first_input,
    check_heads,
    check_layer_arguments,
    check_not_matrix,
    check_schedule_argument,
    declared_width_sizes,
    extra_input_sizes,
)
from .cells import Cell, GRUCell, LSTMCell, RNNCell
from .matrix import matrix_recurrent
from .parameters import initialize, stores_of
from .script_any import PreparesLayer, extra_inputs
from .stack import RecurrentStack
from .torch_layers import GRU, LSTM, RNN

__all__ = ["GRU", "LSTM", "RNN", "Cell", "GRUCell", "LSTMCell", "RNNCell", "Recurrent"]


class Recurrent(PreparesLayer, RecurrentStack, nn.Module):
    """A multi-layer recurrent layer running any cell, with the arguments and results of torch.nn.LSTM.

    Args:
        cell: a .cell path, a zoo name ("lstm"; `celldsl list` shows them), cell text, or a compiled cell.
        input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional, device, dtype:
            as in torch.nn.LSTM, checked as torch checks them. `bias=False` leaves out the parameters
            named b, b_*, bias* (they run as 0).
        backend: "auto" (Triton kernels for CUDA tensors, compiled C kernels for CPU tensors), "torch"
            (the generated PyTorch code: the executable meaning of the cell), "cpu" or "triton".
        input_sizes: the size of every input after the first, by name, for a cell that declares
            several (`input x, ctx`: input_sizes={"ctx": 32}). The first input is the sequence (layer
            k > 0 reads the previous layer's output); every other one is fed to every layer as is.
        schedule: None (the backend's default), or a Triton schedule forced for the "triton" backend:
            "graphed", "persistent", "fused_step", "time_loop", "scan", or "auto" (the compiler's choice
            by the plan and sizes); ValueError when it does not apply to the cell. The schedules other
            than graphed are opt-in until their gpu tests pass on hardware (targets/triton/schedules.py;
            `celldsl explain FILE --sizes N=16,H=768` shows the choice and why).

    forward(input, state=None, **extra) -> (output, final_state):
        input [T, N, I] ([N, T, I] if batch_first), [T, I] unbatched, or a PackedSequence (output is
        then packed the same way; each sequence runs over its own length only). N may be 0.
        output [T, N, D*H] (D = 2 if bidirectional); state and final_state: one tensor [L*D, N, H]
        ([L*D, H] unbatched) for a one-state cell, else a tuple in the order of the cell's `state` line,
        optionally followed by the prev(...) states (they start at zero when left out).
        Dropout (training only) acts on each layer's output but the last, as in torch.nn.LSTM.
        extra: one tensor per input after the first (`layer(x, ctx=c)`), shaped like input with its
        own size C: [T, N, C] ([N, T, C] if batch_first, [T, C] unbatched), or one value per
        sequence for every step: [N, C] ([C] unbatched). With a PackedSequence input, an extra is
        padded [T, N, C] ([N, T, C] if batch_first) in the order of the unpacked sequences, or [N, C].
        Bad tensors raise torch.nn's errors (celldsl.errors.CellTensorError: a RuntimeError and a
        ValueError). Differentiable to any order; works under torch.compile, DDP and torch.func.

    cell(layer=0, direction=0) is that layer's one-step Cell, sharing these parameters.

    A parameter the equations never read (`celldsl check` warns) is still stored, with its group's
    shape, else its declared kind (a vector of width H if undeclared), and gets a zero gradient (None
    for an unused matrix, as torch gives an unused parameter). A parameter replaced by one of another
    shape (`layer.bias_hh_l0 = nn.Parameter(...)`, `.data = ...`) is refused at forward with a
    RuntimeError naming it and both shapes; load_state_dict refuses it as torch does.

    Example:
        >>> layer = Recurrent("mut1", 64, 64)
        >>> out, h = layer(torch.randn(10, 3, 64))
    """

    def __new__(cls, *args, **kwargs):
        """Recurrent(matrix-memory cell, ...) is that cell's MatrixRecurrent (nn/matrix.py): one API for
        both kinds of cells; its sizes ("heads", K, V) come from sizes=, the rest from hidden_size."""
        if cls is Recurrent and (args or "cell" in kwargs):
            cell = args[0] if args else kwargs["cell"]
            compiled = compile_cell(cell)
            if getattr(compiled, "plan", None) is None:
                rest = dict(zip(("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout",
                                 "bidirectional", "backend", "device", "dtype", "input_sizes", "sizes",
                                 "schedule"), args[1:], strict=False))
                rest.update({k: v for k, v in kwargs.items() if k != "cell"})
                return matrix_recurrent(compiled, **rest)
        return super().__new__(cls)

    def __init__(
        self,
        cell,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        backend: str = "auto",
        device=None,
        dtype=None,
        input_sizes: dict[str, int] | None = None,
        sizes: dict[str, int] | None = None,
        schedule: str | None = None,
    ):
        super().__init__()
        check_layer_arguments(input_size, hidden_size, num_layers, bias, batch_first, dropout, backend)
        self.compiled = compile_cell(cell)
        check_not_matrix(self.compiled)
        register(self.compiled)
        self.schedule = check_schedule_argument(self.compiled, backend, schedule)
        self.input_sizes = extra_input_sizes(self.compiled, input_sizes)
        self.width_sizes = declared_width_sizes(self.compiled, sizes)
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.dropout = bias, batch_first, float(dropout)
        self.bidirectional, self.backend = bidirectional, backend
        for layer in range(num_layers):
            self.compiled.check_sizes(self._layer_input_size(layer), hidden_size, self.input_sizes,
                                      self.width_sizes, layer=layer)
        for layer in range(num_layers):
            check_first_input(self.compiled, self._layer_input_size(layer), layer)
            check_heads(self.compiled, self._sizes(layer))
            for direction in range(self.num_directions):
                for store in stores_of(self.compiled):
                    if bias or not store.is_bias:
                        shape = store.shape(self._sizes(layer))
                        tensor = torch.empty(shape, device=device, dtype=dtype)
                        self.register_parameter(self._param_name(store.name, layer, direction),
                                                nn.Parameter(tensor))
        self.reset_parameters()

    def __setstate__(self, state):
        super().__setstate__(state)
        register(self.compiled)  # an unpickled layer's cell must be reachable from the ops again

    def flatten_parameters(self) -> None:
        """No-op, for code written for torch.nn.LSTM (there is no cuDNN weight buffer to compact)."""

    def _positions(self):
        return [(layer, d) for layer in range(self.num_layers) for d in range(self.num_directions)]

    def reset_parameters(self) -> None:
        """torch's U(-1/sqrt(H), 1/sqrt(H)) everywhere, then the cell file's `init` lines."""
        stored = []
        for layer, direction in self._positions():
            for store in stores_of(self.compiled):
                tensor = getattr(self, self._param_name(store.name, layer, direction), None)
                if tensor is not None:
                    stored.append((store, tensor))
        initialize(self.compiled, stored, self._sizes(0))

    def cell(self, layer: int = 0, direction: int = 0) -> Cell:
        """Layer `layer`'s one-step Cell (direction 1: the reverse one) whose parameters are this
        layer's own Parameter objects: training either trains both."""
        self._check_position(layer, direction)
        parameters = {}
        for store in stores_of(self.compiled):
            p = self._shared(self._param_name(store.name, layer, direction))
            if p is not None:
                parameters[store.name] = p
        return Cell.sharing(self.compiled, self._layer_input_size(layer), self.hidden_size, self.backend,
                            self.input_sizes, parameters, self.width_sizes)

    def forward(self, input, state=None, extra=None, **named):
        """The extra inputs by keyword (`ctx=c`) or as a dict (`extra={"ctx": c}`, what a scripted
        layer takes: celldsl/nn/script_any.py)."""
        extra = extra_inputs(extra, named)
        streamed = None if extra else self._streamed(input, state)
        return streamed if streamed is not None else self._run(input, state, extra)

    def extra_repr(self) -> str:
        """torch.nn.LSTM's repr after the cell's name."""
        s = f"{self.compiled.name!r}, {self.input_size}, {self.hidden_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        if self.bias is not True:
            s += ", bias=False"
        if self.batch_first is not False:
            s += ", batch_first=True"
        if self.dropout != 0:
            s += f", dropout={self.dropout}"
        if self.bidirectional is not False:
            s += ", bidirectional=True"
        if self.backend != "auto":
            s += f", backend={self.backend!r}"
        if self.input_sizes:
            s += f", input_sizes={self.input_sizes}"
        if self.width_sizes:
            s += f", sizes={self.width_sizes}"
        if self.schedule is not None:
            s += f", schedule={self.schedule!r}"
        return s
