"""celldsl: recurrent cells written as equations, compiled to fused kernels and drop-in torch layers."""

from .compiler import CompiledCell, compile_cell
from .errors import CellError, CellWarning
from .layers import GRU, LSTM, RNN, Recurrent

__all__ = ["GRU", "LSTM", "RNN", "CellError", "CellWarning", "CompiledCell", "Recurrent", "compile_cell"]
__version__ = "0.1.0"
