"""The torch side: layers (layers.py: Recurrent; torch_layers.py: LSTM, GRU, RNN), Cell classes
(cells.py), the stack of layers and directions (stack.py), parameters and constructor arguments.
They run a cell through the op of celldsl/ops/ and never import a target."""
