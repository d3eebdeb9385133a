"""celldsl: recurrent cells written as equations, compiled to fused kernels and drop-in torch layers."""

from .compiler import CompiledCell, compile_cell
from .lang.errors import CellError, CellTensorError, CellWarning

__all__ = [
    "GRU", "LSTM", "RNN", "Cell", "CellError", "CellTensorError", "CellWarning", "CompiledCell", "GRUCell",
    "LSTMCell", "MatrixRecurrent", "RNNCell", "Recurrent", "compile_cell",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    """The layers import torch (about a second): load them on first use, so `celldsl check` starts fast."""
    if name in ("GRU", "LSTM", "RNN", "Recurrent", "Cell", "GRUCell", "LSTMCell", "RNNCell"):
        from .nn import layers

        return getattr(layers, name)
    if name == "MatrixRecurrent":
        from .nn.matrix import MatrixRecurrent

        return MatrixRecurrent
    raise AttributeError(f"module 'celldsl' has no attribute {name!r}")
