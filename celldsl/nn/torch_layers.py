"""LSTM, GRU and RNN: torch.nn's own classes, running the zoo's cells (cells/lstm.cell, gru.cell,
rnn_tanh.cell, rnn_relu.cell) through celldsl's op.

They subclass torch.nn.LSTM/GRU/RNN and replace forward, so everything else is torch's by
construction: the constructor and its checks, the parameters and their names (bias=False has none),
state_dict, _flat_weights, all_weights, check_forward_args, repr, weight_norm, pickling, and every
`isinstance(m, nn.LSTM)` in other code. The price: Dynamo refuses nn.RNN/GRU/LSTM modules unless
torch._dynamo.config.allow_rnn is set, so torch.compile graph-breaks at celldsl.LSTM exactly as at
torch.nn.LSTM; with allow_rnn=True it compiles to one graph (celldsl.Recurrent("lstm", ...) does
without the flag).

`backend` ("auto", "torch", "cpu", "triton") and `schedule` (a Triton schedule, opt-in: Recurrent's)
are keyword-only arguments on top of torch's.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .arguments import check_backend, check_schedule_argument
from .cells import Cell, GRUCell, LSTMCell, RNNCell
from .quantization import WarnsWhenNotQuantized
from .scripting import ScriptableStack
from .stack import RecurrentStack, zoo_cell

# proj_size runs cells/lstm_proj.cell, whose state h is P = proj_size wide (`state h : P`).


class _TorchRNN(WarnsWhenNotQuantized, ScriptableStack, RecurrentStack):
    """What LSTM/GRU/RNN add to torch's class: the zoo cell, the backend, forward and cell(k)."""

    __jit_unused_properties__ = ["all_weights", "compiled", "stem", "width_sizes", "stores", "num_directions",
                                 "qconfig"]  # Python only: torch.jit.script compiles forward's script branch

    input_sizes: dict = {}  # torch's cells have one input
    cell_class: type = nn.Module

    @property
    def stem(self) -> str:
        if self.mode == "LSTM" and getattr(self, "proj_size", 0) > 0:
            return "lstm_proj"
        return {"LSTM": "lstm", "GRU": "gru", "RNN_TANH": "rnn_tanh", "RNN_RELU": "rnn_relu"}[self.mode]

    @property
    def width_sizes(self) -> dict[str, int]:
        """lstm_proj.cell's declared width P is torch's proj_size."""
        return {"P": self.proj_size} if self.stem == "lstm_proj" else {}

    @property
    def compiled(self):
        return zoo_cell(self.stem)


    def __setstate__(self, state):
        super().__setstate__(state)
        zoo_cell(self.stem)

    def forward(self, input, hx=None):
        """input [T, N, I] ([N, T, I] if batch_first), [T, I] or a PackedSequence; hx as torch's."""
        self._update_flat_weights()
        streamed = self._streamed(input, hx)
        if streamed is not None:
            return streamed
        return self._run(input, hx, {})

    def cell(self, layer: int = 0, direction: int = 0):
        """Layer `layer`'s step as torch's cell class (LSTMCell for LSTM, ...), whose parameters are
        this layer's own (direction 1: the reverse direction's). With proj_size (torch has no such
        cell class) a celldsl.Cell of cells/lstm_proj.cell."""
        self._check_position(layer, direction)
        if self.stem == "lstm_proj":
            parameters = {s.name: self._shared(self._param_name(s.name, layer, direction))
                          for s in self.stores if hasattr(self, self._param_name(s.name, layer, direction))}
            return Cell.sharing(self.compiled, self._layer_input_size(layer), self.hidden_size, self.backend,
                                {}, parameters, self.width_sizes)
        step = self._make_cell(self._layer_input_size(layer))
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            p = self._shared(self._param_name(name, layer, direction))
            if p is not None:
                setattr(step, name, p)
        return step

    def _make_cell(self, input_size: int):
        return self.cell_class(input_size, self.hidden_size, bias=self.bias, device="meta",
                               backend=self.backend)


class LSTM(_TorchRNN, nn.LSTM):
    """torch.nn.LSTM running cells/lstm.cell, or cells/lstm_proj.cell with proj_size > 0 (h is then
    proj_size wide and weight_hr_l{k} projects it, as torch's)."""

    cell_class = LSTMCell

    def __init__(self, *args, backend: str = "auto", schedule: str | None = None, **kwargs):
        check_backend(backend)
        super().__init__(*args, **kwargs)
        self.backend = backend
        self.schedule = check_schedule_argument(zoo_cell(self.stem), backend, schedule)

    def _autocast_keeps_input_dtype(self, packed: bool) -> bool:
        """torch.nn.LSTM on a PackedSequence (without proj_size) returns the input's dtype under CPU
        autocast; on padded input autocast's."""
        return packed and self.proj_size == 0

    def forward(self, input: Tensor, hx: tuple[Tensor, Tensor] | None = None
                ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        if torch.jit.is_scripting():  # TorchScript compiles this branch only (scripting.py)
            out, finals = self.script_forward(input, [] if hx is None else [hx[0], hx[1]])
            return out, (finals[0], finals[1])
        return super().forward(input, hx)


class GRU(_TorchRNN, nn.GRU):
    """torch.nn.GRU running cells/gru.cell."""

    cell_class = GRUCell
    autocast_keeps_input_dtype = True  # as torch.nn.GRU under CPU autocast

    def __init__(self, *args, backend: str = "auto", schedule: str | None = None, **kwargs):
        check_backend(backend)
        super().__init__(*args, **kwargs)
        self.backend = backend
        self.schedule = check_schedule_argument(zoo_cell(self.stem), backend, schedule)

    def forward(self, input: Tensor, hx: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if torch.jit.is_scripting():  # TorchScript compiles this branch only (scripting.py)
            out, finals = self.script_forward(input, [] if hx is None else [hx])
            return out, finals[0]
        return super().forward(input, hx)


class RNN(_TorchRNN, nn.RNN):
    """torch.nn.RNN running cells/rnn_tanh.cell or cells/rnn_relu.cell (its `nonlinearity`)."""

    cell_class = RNNCell

    def __init__(self, *args, backend: str = "auto", schedule: str | None = None, **kwargs):
        check_backend(backend)
        super().__init__(*args, **kwargs)
        self.backend = backend
        self.schedule = check_schedule_argument(zoo_cell(self.stem), backend, schedule)

    def forward(self, input: Tensor, hx: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if torch.jit.is_scripting():  # TorchScript compiles this branch only (scripting.py)
            out, finals = self.script_forward(input, [] if hx is None else [hx])
            return out, finals[0]
        return super().forward(input, hx)

    def _make_cell(self, input_size: int):
        return RNNCell(input_size, self.hidden_size, bias=self.bias, nonlinearity=self.nonlinearity,
                       device="meta", backend=self.backend)
