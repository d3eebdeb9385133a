"""TorchScript for LSTM/GRU/RNN: a forward that torch.jit.script compiles, calling the registered op.

The eager forward (stack.py) is Python that TorchScript cannot compile; under `torch.jit.script` the
layers' forward takes its `torch.jit.is_scripting()` branch instead: `ScriptableStack.script_forward`,
the same loop over layers and directions calling `torch.ops.celldsl.cell_sequence` (differentiable:
the op has its own autograd; `ScriptedLayers`, which Recurrent's scripted copy in nn/script_any.py
runs too). What it needs from Python is prepared by `__prepare_scriptable__`,
which torch.jit.script calls first: the cell's key, the state widths, the backend for each device, and
for each layer and direction a recipe saying which rows of which `_flat_weights` tensor each of the
op's parameters is (op_params' list, in TorchScript's terms). Padded input only, as TorchScript's
own nn.LSTM: a PackedSequence goes through the eager forward.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from torch import Tensor


def op_recipe(flat_weights: list[Tensor], params: list[Tensor]) -> list[tuple[int, int, int]]:
    """Each of the op's parameters as (k, start, stop): rows start:stop of flat_weights[k] (stop -1:
    the whole tensor), or (-1, n, 0): n zeros (a bias left out by bias=False)."""
    recipe = []
    for t in params:
        recipe.append(_find(flat_weights, t))
    return recipe


def _find(flat_weights: list[Tensor], t: Tensor) -> tuple[int, int, int]:
    for k, w in enumerate(flat_weights):
        if t is w:
            return (k, 0, -1)
    for k, w in enumerate(flat_weights):
        same_storage = t.untyped_storage().data_ptr() == w.untyped_storage().data_ptr()
        if w.dim() == 0 or t.dim() != w.dim() or not same_storage:
            continue
        row = w[0].numel()
        start = (t.storage_offset() - w.storage_offset()) // row if row else 0
        rows = w[start : start + t.shape[0]]
        if rows.shape == t.shape and rows.data_ptr() == t.data_ptr():
            return (k, start, start + t.shape[0])
    if t.dim() == 1 and not t.requires_grad and t.count_nonzero() == 0:
        return (-1, t.shape[0], 0)
    raise RuntimeError("torch.jit.script: this layer's op parameters are not rows of its weights (a cell "
                       "that combines parameters); use torch.jit.trace")


class ScriptedLayers:
    """The scripted multi-layer loop, shared by LSTM/GRU/RNN (ScriptableStack) and Recurrent
    (nn/script_any.py): each layer and direction one call of the op, `_script_params(idx, x)` giving
    position idx's parameters, dropout between layers in training, as torch.nn.LSTM."""

    def script_time_major(self, input: Tensor) -> tuple[Tensor, bool]:
        """input [T, N, I] ([N, T, I] batch_first) or [T, I] as [T, N, I], and whether it was unbatched."""
        if input.dim() != 2 and input.dim() != 3:
            raise ValueError("Expected input to be 2D or 3D, got " + str(input.dim()) + "D instead")
        unbatched = input.dim() == 2
        x = input
        if unbatched:
            x = x.unsqueeze(0) if self.batch_first else x.unsqueeze(1)
        if self.batch_first:
            x = x.transpose(0, 1)
        return x.contiguous(), unbatched

    def script_layers(self, x: Tensor, unbatched: bool, states: list[Tensor], extras: list[Tensor],
                      backend: str) -> tuple[Tensor, list[Tensor]]:
        """x [T, N, I]; states [L * D, N, width] each; extras [T, N, *] appended to every layer's input.
        The output and the final states in the layout the input came in."""
        D = 2 if self.bidirectional else 1
        finals: list[list[Tensor]] = [[] for _ in states]
        layer_input = x
        for layer in range(self.num_layers):
            outs: list[Tensor] = []
            for direction in range(D):
                idx = layer * D + direction
                seq = torch.cat([layer_input] + extras, -1) if len(extras) > 0 else layer_input
                seq = seq if direction == 0 else seq.flip(0)
                result = torch.ops.celldsl.cell_sequence(self._script_key, backend, seq,
                                                         [s[idx] for s in states],
                                                         self._script_params(idx, x), None)
                outs.append(result[0] if direction == 0 else result[0].flip(0))
                for i in range(len(finals)):
                    finals[i].append(result[1 + i])
            layer_input = outs[0] if D == 1 else torch.cat(outs, -1)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                layer_input = F.dropout(layer_input, self.dropout, True)
        out = layer_input.transpose(0, 1) if self.batch_first else layer_input
        stacked = [torch.stack(f) for f in finals]
        if unbatched:
            out = out.squeeze(0) if self.batch_first else out.squeeze(1)
            stacked = [f.squeeze(1) for f in stacked]
        return out, stacked


class ScriptableStack(ScriptedLayers):
    """Mixin for celldsl's LSTM/GRU/RNN: __prepare_scriptable__ and the scripted forward's body."""

    def __prepare_scriptable__(self):
        from .stack import resolve_backend

        self._update_flat_weights()
        self._script_key = self.compiled.key
        sizes = self._sizes(0)
        self._script_widths = [sizes[self.compiled.ir.width(name)] for name in self.compiled.states]
        self._script_recipes = [op_recipe(self._flat_weights, self._weights(layer, d))
                                for layer in range(self.num_layers) for d in range(self.num_directions)]
        gpu = "triton" if importlib.util.find_spec("triton") is not None else "torch"
        self._script_backends = {"cpu": resolve_backend(self.backend, torch.empty(0)),
                                 "cuda": {"auto": gpu, "cpu": "cpu"}.get(self.backend, self.backend)}
        if getattr(self, "schedule", None) is not None:
            self._script_backends["cuda"] = f"triton:{self.schedule}"
        return self

    def _script_params(self, idx: int, x: Tensor) -> list[Tensor]:
        params: list[Tensor] = []
        for k, start, stop in self._script_recipes[idx]:
            if k < 0:
                params.append(torch.zeros(start, dtype=x.dtype, device=x.device))
            elif stop < 0:
                params.append(self._flat_weights[k])
            else:
                params.append(self._flat_weights[k][start:stop])
        return params

    def script_forward(self, input: Tensor, given: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """The forward as TorchScript compiles it: input [T, N, I] ([N, T, I] batch_first) or [T, I]."""
        x, unbatched = self.script_time_major(input)
        D = 2 if self.bidirectional else 1
        states: list[Tensor] = []
        for i, width in enumerate(self._script_widths):
            if i < len(given):
                s = given[i].unsqueeze(1) if unbatched else given[i]
            else:
                s = torch.zeros(self.num_layers * D, x.size(1), width, dtype=x.dtype, device=x.device)
            states.append(s.contiguous())
        backend = self._script_backends["cpu" if x.device.type == "cpu" else "cuda"]
        return self.script_layers(x, unbatched, states, [], backend)


class ScriptableCell:
    """Mixin for celldsl's LSTMCell/GRUCell/RNNCell: the scripted forward's body (one op call, T = 1)."""

    def __prepare_scriptable__(self):
        from .stack import resolve_backend

        like = self.weight_ih
        self._script_key = self.compiled.key
        sizes = self._sizes()
        self._script_widths = [sizes[self.compiled.ir.width(name)] for name in self.compiled.states]
        from .parameters import op_params

        self._script_recipe = op_recipe(self._script_weights(), op_params(self.compiled, self._stored(like),
                                                                          sizes, like))
        gpu = "triton" if importlib.util.find_spec("triton") is not None else "torch"
        self._script_backends = {"cpu": resolve_backend(self.backend, torch.empty(0)),
                                 "cuda": {"auto": gpu, "cpu": "cpu"}.get(self.backend, self.backend)}
        return self

    def _script_weights(self) -> list[Tensor]:
        """torch's cell parameters in their order (the biases only with bias=True)."""
        weights: list[Tensor] = [self.weight_ih, self.weight_hh]
        bias_ih, bias_hh = self.bias_ih, self.bias_hh
        if bias_ih is not None:
            weights.append(bias_ih)
        if bias_hh is not None:
            weights.append(bias_hh)
        return weights

    def script_step(self, input: Tensor, given: list[Tensor]) -> list[Tensor]:
        """The step as TorchScript compiles it: input [N, I] or [I] -> the new states."""
        if input.dim() != 1 and input.dim() != 2:
            raise ValueError("Expected input to be 1D or 2D, got " + str(input.dim()) + "D instead")
        unbatched = input.dim() == 1
        x = input.unsqueeze(0) if unbatched else input
        states: list[Tensor] = []
        for i, width in enumerate(self._script_widths):
            if i < len(given):
                s = given[i].unsqueeze(0) if unbatched else given[i]
            else:
                s = torch.zeros(x.size(0), width, dtype=x.dtype, device=x.device)
            states.append(s.contiguous())
        weights = self._script_weights()
        params: list[Tensor] = []
        for k, start, stop in self._script_recipe:
            if k < 0:
                params.append(torch.zeros(start, dtype=x.dtype, device=x.device))
            elif stop < 0:
                params.append(weights[k])
            else:
                params.append(weights[k][start:stop])
        backend = self._script_backends["cpu" if x.device.type == "cpu" else "cuda"]
        seq = x.unsqueeze(0).contiguous()  # T = 1
        result = torch.ops.celldsl.cell_sequence(self._script_key, backend, seq, states, params, None)
        finals = result[1 : 1 + len(self._script_widths)]
        return [f.squeeze(0) for f in finals] if unbatched else finals
