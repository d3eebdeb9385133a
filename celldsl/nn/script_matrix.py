"""TorchScript for the matrix path (nn/matrix.py): the module torch.jit.script compiles in place of a
MatrixRecurrent or a MatrixCell.

As for the elementwise layers (nn/script_any.py), `__prepare_scriptable__` returns a copy sharing the
layer's parameters whose class adds a forward typed for the cell's number of states (nn/script_arity.py's
mixins: TorchScript needs a tuple's length in the signature). Scripted, its body (`script_call`) calls
the registered op celldsl::matrix_sequence (ops/matrix_op.py) once per layer and direction; called
eagerly (torch.jit.script puts the copy in its parent's place) it is the layer's own forward; it
pickles as the layer's own class.

    MatrixRecurrent: forward(input, state: Optional[Tuple[Tensor, ...n]] = None, extra=None)
                     -> (output, Tuple[Tensor, ...n]); a cell without heads and one state takes and
                     returns one Tensor, as its eager forward does
    MatrixCell:      forward(input, state: Optional[Tuple[Tensor, ...n]] = None, extra=None)
                     -> (output, Tuple[Tensor, ...n])

`extra` is there only for one signature with the elementwise layers: a matrix cell has no extra
inputs, so anything but None is refused (TypeError). Padded input only (no PackedSequence), as
TorchScript's nn.LSTM.
"""

import torch
from torch import Tensor

from ..ops.matrix_op import encode_sizes
from .script_arity import MAX_STATES, PicklesAsEager, arity_forward


def prepare_layer(layer):
    """The scriptable copy of a MatrixRecurrent."""
    ir = layer.ir
    kind = "tensor" if not ir.heads and len(ir.states) == 1 else len(ir.states)
    copy = _copy(layer, kind, _ScriptedLayer)
    inner = [list(ir.state_shape(s, layer.layer_sizes[0])) for s in ir.states]
    copy._script_inner = inner
    copy._script_outer = [sh if ir.heads else (sh[1:] or [1]) for sh in inner]
    copy._script_sizes = [encode_sizes(s) for s in layer.layer_sizes]
    copy._script_stored = [getattr(layer, layer.param_name(n, k, d)) for k in range(layer.num_layers)
                           for d in range(layer.num_directions) for n in ir.params]
    return copy


def prepare_step(step):
    """The scriptable copy of a MatrixCell."""
    copy = _copy(step, len(step.ir.states), _ScriptedStep)
    copy._script_shapes = [list(s) for s in step.state_shapes]
    copy._script_sizes = [encode_sizes(step.sizes)]
    copy._script_stored = [getattr(step, n) for n in step.ir.params]
    return copy


_CLASSES: dict = {}


def _copy(module, kind, body: type):
    """kind: the number of states (a tuple of them), or "tensor": one state as a bare Tensor."""
    if len(module.ir.states) > MAX_STATES:
        raise RuntimeError(f"torch.jit.script: {type(module).__name__} over cell {module.ir.name!r} carries "
                           f"{len(module.ir.states)} states; a scripted layer takes at most {MAX_STATES} "
                           "(its state is a typed tuple). Use torch.jit.trace or torch.export")
    base = getattr(type(module), "_script_base", None) or type(module)
    key = (base, kind)
    if key not in _CLASSES:
        forward = arity_forward(1, bare=True) if kind == "tensor" else arity_forward(kind)
        _CLASSES[key] = type(f"Scripted{base.__name__}{kind}", (forward, body, base),
                             {"_script_base": base, "__module__": __name__})
    copy = object.__new__(_CLASSES[key])
    copy.__dict__.update(module.__dict__)  # the same _parameters dict: the same Parameter objects
    copy._script_key = module.compiled.key
    copy._script_count = len(module.ir.params)
    return copy


class _Scripted(PicklesAsEager):
    """Common to the copies: the eager forward where not scripted, the states."""

    def _eager(self, input, state, extra):
        if extra is not None:
            raise TypeError(f"{self._script_base.__name__}: a matrix cell takes no extra inputs (extra must "
                            "be None)")
        return self._script_base.forward(self, input, state)

    def _script_no_extra(self, extra: dict[str, Tensor] | None) -> None:
        """The forward's `extra` (one signature with nn/script_any.py's layers) must be None."""
        if extra is not None:
            raise TypeError("a matrix cell takes no extra inputs (extra must be None)")

    def _script_state(self, given: list[Tensor], i: int, shape: list[int], x: Tensor) -> Tensor:
        """State i as given (checked) or zeros."""
        if i < len(given):
            s = given[i]
            if s.size() != shape:
                raise ValueError("state " + str(i) + " must be " + str(shape) + ", got " + str(s.size()))
            if s.dtype != x.dtype or s.device != x.device:
                raise RuntimeError("the states must have the input's dtype and device")
            return s
        return torch.zeros(shape, dtype=x.dtype, device=x.device)


class _ScriptedLayer(_Scripted):
    _script_key: str
    _script_count: int
    _script_inner: list[list[int]]
    _script_outer: list[list[int]]
    _script_sizes: list[str]
    _script_stored: list[Tensor]
    backend: str
    input_size: int
    num_layers: int
    num_directions: int
    batch_first: bool

    def script_call(self, input: Tensor, given: list[Tensor], extra: dict[str, Tensor] | None
                    ) -> tuple[Tensor, list[Tensor]]:
        self._script_no_extra(extra)
        unbatched = input.dim() == 2  # [T, I], states without N (torch.nn's unbatched call)
        if (input.dim() != 3 and not unbatched) or input.size(-1) != self.input_size:
            raise ValueError("x must be [T, N, " + str(self.input_size) + "] ([N, T, " + str(self.input_size)
                             + "] with batch_first) or [T, " + str(self.input_size) + "] unbatched, got "
                             + str(input.size()))
        x = input.unsqueeze(1) if unbatched else input.transpose(0, 1) if self.batch_first else input
        N = x.size(1)
        D = self.num_directions
        states: list[Tensor] = []
        for i in range(len(self._script_outer)):
            lead = [self.num_layers * D] if unbatched else [self.num_layers * D, N]
            s = self._script_state(given, i, lead + self._script_outer[i], x)
            states.append(s.unsqueeze(1) if unbatched else s)
        finals: list[list[Tensor]] = []
        for _ in range(len(states)):
            finals.append(torch.jit.annotate(list[Tensor], []))
        P = self._script_count
        for layer in range(self.num_layers):
            outs: list[Tensor] = []
            for d in range(D):
                idx = layer * D + d
                seq = x if d == 0 else x.flip(0)
                init: list[Tensor] = []
                for i in range(len(states)):
                    init.append(states[i][idx].reshape([N] + self._script_inner[i]))
                result = torch.ops.celldsl.matrix_sequence(self._script_key, self.backend, seq, init,
                                                           self._script_stored[idx * P:(idx + 1) * P],
                                                           self._script_sizes[layer], None)
                outs.append(result[0] if d == 0 else result[0].flip(0))
                for i in range(len(states)):
                    finals[i].append(result[1 + i].reshape([N] + self._script_outer[i]))
            x = outs[0] if D == 1 else torch.cat(outs, -1)
        out = x.squeeze(1) if unbatched else x.transpose(0, 1) if self.batch_first else x
        stacked: list[Tensor] = []
        for f in finals:
            stacked.append(torch.stack(f).squeeze(1) if unbatched else torch.stack(f))
        return out, stacked


class _ScriptedStep(_Scripted):
    _script_key: str
    _script_shapes: list[list[int]]
    _script_sizes: list[str]
    _script_stored: list[Tensor]
    backend: str
    input_size: int

    def script_call(self, input: Tensor, given: list[Tensor], extra: dict[str, Tensor] | None
                    ) -> tuple[Tensor, list[Tensor]]:
        self._script_no_extra(extra)
        if input.dim() != 1 and input.dim() != 2:
            raise ValueError("MatrixCell: Expected input to be 1D or 2D, got " + str(input.dim())
                             + "D instead")
        unbatched = input.dim() == 1
        x = input.unsqueeze(0) if unbatched else input
        if x.size(1) != self.input_size:
            raise ValueError("input has inconsistent input_size: got " + str(x.size(1)) + " expected "
                             + str(self.input_size))
        N = x.size(0)
        states: list[Tensor] = []
        for i in range(len(self._script_shapes)):
            shape = self._script_shapes[i] if unbatched else [N] + self._script_shapes[i]
            s = self._script_state(given, i, shape, x)
            states.append(s.unsqueeze(0) if unbatched else s)
        result = torch.ops.celldsl.matrix_sequence(self._script_key, self.backend, x.unsqueeze(0), states,
                                                   self._script_stored, self._script_sizes[0], None)
        out = result[0][0]
        finals = result[1:]
        if unbatched:
            squeezed: list[Tensor] = []
            for f in finals:
                squeezed.append(f[0])
            return out[0], squeezed
        return out, finals
