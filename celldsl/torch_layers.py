"""LSTM, GRU and RNN: torch.nn's own classes, running the zoo's cells (cells/lstm.cell, gru.cell,
rnn_tanh.cell, rnn_relu.cell) through celldsl's op.

They subclass torch.nn.LSTM/GRU/RNN and replace forward, so everything else is torch's by
construction: the constructor and its checks, the parameters and their names (bias=False has none),
state_dict, _flat_weights, all_weights, check_forward_args, repr, weight_norm, pickling, and every
`isinstance(m, nn.LSTM)` in other code. The price: Dynamo refuses nn.RNN/GRU/LSTM modules unless
torch._dynamo.config.allow_rnn is set, so torch.compile graph-breaks at celldsl.LSTM exactly as at
torch.nn.LSTM; with allow_rnn=True it compiles to one graph (celldsl.Recurrent("lstm", ...) does
without the flag).

`backend` ("auto", "torch", "cpu", "triton") is a keyword-only argument on top of torch's.
"""

from __future__ import annotations

from torch import nn

from .arguments import check_backend
from .cells import GRUCell, LSTMCell, RNNCell
from .stack import RecurrentStack, zoo_cell

# proj_size waits for states of another width than H (the language's second edition, issue 13).
# The torch tests to port then: test_nn.py's test_projections_lstm_args_check,
# test_projections_lstm_initial_hidden_state, test_projections_errors_on_gru_and_rnn (passes now:
# torch's own check), test_variable_sequence with proj_size=2, test_rnn_weight_norm's weight_hr_l0
# case, and test_modules.py over module_db's LSTM samples with proj_size=2 (common_modules.py's
# module_inputs_torch_nn_LSTM). Their GPU-only ones: test_projections_lstm_check_device and the
# proj_size parts of _test_RNN_cpu_vs_cudnn and test_cudnn_weight_format.


class _TorchRNN(RecurrentStack):
    """What LSTM/GRU/RNN add to torch's class: the zoo cell, the backend, forward and cell(k)."""

    input_sizes: dict = {}  # torch's cells have one input
    cell_class: type = nn.Module

    @property
    def stem(self) -> str:
        return {"LSTM": "lstm", "GRU": "gru", "RNN_TANH": "rnn_tanh", "RNN_RELU": "rnn_relu"}[self.mode]

    @property
    def compiled(self):
        return zoo_cell(self.stem)


    def __setstate__(self, state):
        super().__setstate__(state)
        zoo_cell(self.stem)

    def forward(self, input, hx=None):
        """input [T, N, I] ([N, T, I] if batch_first), [T, I] or a PackedSequence; hx as torch's."""
        self._update_flat_weights()
        return self._run(input, hx, {})

    def cell(self, layer: int = 0, direction: int = 0):
        """Layer `layer`'s step as torch's cell class (LSTMCell for LSTM, ...), whose parameters are
        this layer's own (direction 1: the reverse direction's)."""
        self._check_position(layer, direction)
        step = self._make_cell(self._layer_input_size(layer))
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            p = getattr(self, self._param_name(name, layer, direction), None)
            if p is not None:
                setattr(step, name, p)
        return step

    def _make_cell(self, input_size: int):
        return self.cell_class(input_size, self.hidden_size, bias=self.bias, device="meta",
                               backend=self.backend)


class LSTM(_TorchRNN, nn.LSTM):
    """torch.nn.LSTM running cells/lstm.cell. proj_size > 0 raises NotImplementedError (pending)."""

    cell_class = LSTMCell

    def __init__(self, *args, backend: str = "auto", **kwargs):
        check_backend(backend)
        super().__init__(*args, **kwargs)
        self.backend = backend
        zoo_cell(self.stem)
        if self.proj_size > 0:
            raise NotImplementedError(
                f"celldsl.LSTM does not support proj_size yet (got proj_size={self.proj_size}): it needs "
                "states of another width than hidden_size; use proj_size=0"
            )


class GRU(_TorchRNN, nn.GRU):
    """torch.nn.GRU running cells/gru.cell."""

    cell_class = GRUCell

    def __init__(self, *args, backend: str = "auto", **kwargs):
        check_backend(backend)
        super().__init__(*args, **kwargs)
        self.backend = backend
        zoo_cell(self.stem)


class RNN(_TorchRNN, nn.RNN):
    """torch.nn.RNN running cells/rnn_tanh.cell or cells/rnn_relu.cell (its `nonlinearity`)."""

    cell_class = RNNCell

    def __init__(self, *args, backend: str = "auto", **kwargs):
        check_backend(backend)
        super().__init__(*args, **kwargs)
        self.backend = backend
        zoo_cell(self.stem)

    def _make_cell(self, input_size: int):
        return RNNCell(input_size, self.hidden_size, bias=self.bias, nonlinearity=self.nonlinearity,
                       device="meta", backend=self.backend)
