"""celldsl: recurrent cells written as equations, compiled to fused kernels and drop-in torch layers."""

from . import torch_hook
from .compiler import CompiledCell, compile_cell
from .lang.errors import CellError, CellTensorError, CellWarning

__all__ = [
    "GRU", "LSTM", "RNN", "Cell", "CellError", "CellTensorError", "CellWarning", "CompiledCell", "GRUCell",
    "LSTMCell", "MatrixRecurrent", "RNNCell", "Recurrent", "compile_cell", "load_program", "load_torchscript",
    "safe_globals", "save_program", "save_torchscript",
]
__version__ = "0.1.0"

torch_hook.install()  # the torch ops, for saved torch.export programs: now, or when torch is imported


def safe_globals() -> list:
    """What `torch.load(..., weights_only=True)` must allow to load a whole saved model holding
    celldsl's layers: their classes, and `compile_source`, which a Recurrent or Cell over any cell
    calls with its cell's file name and text (LSTM/GRU/RNN and their cells pickle no cell: theirs
    are the zoo's). Safe to allow: their state is tensors, numbers and strings, and cell text is
    parsed, never executed (docs/security.md).

        with torch.serialization.safe_globals([*celldsl.safe_globals(), MyModel, nn.Linear]):
            model = torch.load(path, weights_only=True)
    """
    from .compiler import compile_source
    from .nn import layers, matrix

    return [layers.LSTM, layers.GRU, layers.RNN, layers.LSTMCell, layers.GRUCell, layers.RNNCell,
            layers.Recurrent, layers.Cell, matrix.MatrixRecurrent, matrix.MatrixCell, compile_source]


def __getattr__(name: str):
    """The layers import torch (about a second): load them on first use, so `celldsl check` starts fast."""
    if name in ("GRU", "LSTM", "RNN", "Recurrent", "Cell", "GRUCell", "LSTMCell", "RNNCell"):
        from .nn import layers

        return getattr(layers, name)
    if name in ("save_program", "load_program", "save_torchscript", "load_torchscript"):
        from .export import programs

        return getattr(programs, name)
    if name == "MatrixRecurrent":
        from .nn.matrix import MatrixRecurrent

        return MatrixRecurrent
    raise AttributeError(f"module 'celldsl' has no attribute {name!r}")
