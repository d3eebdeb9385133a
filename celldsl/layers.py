"""Drop-in torch layers: `Recurrent(cell, ...)` for any cell file, and `LSTM`/`GRU`/`RNN` built from the
zoo with torch.nn's constructor, forward and state_dict layout.

Parameters are stored the way the cell file groups them (`param weight_ih = [W_ii, ...]` is one tensor
`weight_ih_l0`), so torch.nn state_dicts load unchanged; `cell_parameter("b_f")` returns a view.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from .compiler import CompiledCell, compile_cell
from .ir import H as HIDDEN
from .runtime.function import CellSequence

BIAS_NAME = re.compile(r"^(b|bias)(_\w*|\d*)$")


@dataclass(frozen=True)
class Store:
    """One stored tensor: parameters stacked by rows (matrices, vectors) or entries (scalars)."""

    name: str
    members: tuple[str, ...]
    kind: str  # matrix | vector | scalar
    operand_size: str | None  # matrices: "H" or an input's name

    def shape(self, input_size: int, hidden_size: int) -> tuple[int, ...]:
        n = len(self.members)
        if self.kind == "matrix":
            cols = hidden_size if self.operand_size == HIDDEN else input_size
            return (n * hidden_size, cols)
        if self.kind == "vector":
            return (n * hidden_size,)
        return () if n == 1 else (n,)


def stores_of(cell: CompiledCell) -> list[Store]:
    ir, stores, seen = cell.ir, [], set()
    for name, p in ir.params.items():
        if p.group is None:
            stores.append(Store(name, (name,), p.kind, p.operand_size))
        elif p.group not in seen:
            seen.add(p.group)
            members = tuple(ir.groups[p.group])
            stores.append(Store(p.group, members, p.kind, p.operand_size))
    return stores


class Recurrent(nn.Module):
    """A multi-layer recurrent layer running any cell, with the arguments and results of torch.nn.LSTM.

    Args:
        cell: a .cell path, a zoo name ("lstm"), cell text, or a compiled cell.
        input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional, device, dtype:
            as in torch.nn.LSTM. `bias=False` leaves out the parameters named b, b_*, bias* (fixed 0).
        backend: "auto" (Triton for CUDA tensors when available, else torch), "torch" or "triton".

    forward(input, state=None) -> (output, final_state):
        input [T, N, I] ([N, T, I] if batch_first), [T, I] unbatched, or a PackedSequence.
        state and final_state: one tensor [L*D, N, H] for a one-state cell, else a tuple in the
        order of the cell's `state` line (then any prev(...) states).

    Example:
        >>> layer = Recurrent("cells/mut1.cell", 64, 64)
        >>> out, h = layer(torch.randn(10, 3, 64))
    """

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
    ):
        super().__init__()
        for name, value in (("input_size", input_size), ("hidden_size", hidden_size), ("num_layers", num_layers)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not (isinstance(dropout, (int, float)) and 0 <= dropout <= 1) or isinstance(dropout, bool):
            raise ValueError(f"dropout must be a number in [0, 1], got {dropout!r}")
        if backend not in ("auto", "torch", "triton"):
            raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
        self.cell = compile_cell(cell)
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.dropout = bias, batch_first, float(dropout)
        self.bidirectional, self.backend = bidirectional, backend
        self.num_directions = 2 if bidirectional else 1
        self.stores = stores_of(self.cell)
        for layer in range(num_layers):
            self.cell.check_sizes(self._layer_input_size(layer), hidden_size)
        factory = {"device": device, "dtype": dtype}
        self._store_names = []
        for layer in range(num_layers):
            for direction in range(self.num_directions):
                for store in self.stores:
                    name = self._param_name(store.name, layer, direction)
                    shape = store.shape(self._layer_input_size(layer), hidden_size)
                    if not bias and BIAS_NAME.match(store.name):
                        self.register_buffer(name, torch.zeros(shape, **factory), persistent=False)
                    else:
                        self.register_parameter(name, nn.Parameter(torch.empty(shape, **factory)))
                        self._store_names.append(name)
        self.reset_parameters()

    # ---- parameters --------------------------------------------------------------------------

    def _layer_input_size(self, layer: int) -> int:
        return self.input_size if layer == 0 else self.hidden_size * self.num_directions

    @staticmethod
    def _param_name(store: str, layer: int, direction: int) -> str:
        return f"{store}_l{layer}" + ("_reverse" if direction == 1 else "")

    def _store_tensor(self, store: Store, layer: int, direction: int) -> torch.Tensor:
        return getattr(self, self._param_name(store.name, layer, direction))

    def cell_parameter(self, name: str, layer: int = 0, direction: int = 0) -> torch.Tensor:
        """The parameter the cell file names (e.g. "b_f", "U_z"), as a view sharing storage.

        Matrices are [H, K] (torch's out x in layout), vectors [H], scalars [].
        """
        if not (0 <= layer < self.num_layers) or not (0 <= direction < self.num_directions):
            raise ValueError(
                f"layer must be in [0, {self.num_layers}) and direction in [0, {self.num_directions})"
            )
        for store in self.stores:
            if name in store.members:
                return self._member(store, name, self._store_tensor(store, layer, direction))
        names = ", ".join(m for s in self.stores for m in s.members)
        raise ValueError(f"cell {self.cell.name!r} has no parameter {name!r}; it has: {names}")

    def _member(self, store: Store, name: str, tensor: torch.Tensor) -> torch.Tensor:
        j = store.members.index(name)
        if store.kind == "scalar":
            return tensor if len(store.members) == 1 else tensor[j]
        H = self.hidden_size
        return tensor[j * H : (j + 1) * H]

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """torch's U(-1/sqrt(H), 1/sqrt(H)) everywhere, then the cell file's `init` lines."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for name in self._store_names:
            getattr(self, name).uniform_(-bound, bound)
        for layer in range(self.num_layers):
            for direction in range(self.num_directions):
                for store in self.stores:
                    tensor = self._store_tensor(store, layer, direction)
                    if not isinstance(tensor, nn.Parameter):
                        continue
                    for member in store.members:
                        init = self.cell.ir.params[member].init
                        if init is not None:
                            _apply_init(self._member(store, member, tensor), init, bound)

    # ---- forward -----------------------------------------------------------------------------

    def _weights(self, layer: int, direction: int):
        """The Function's parameter arguments: concatenated GEMM weights, vectors, scalars."""
        members = {}
        for store in self.stores:
            tensor = self._store_tensor(store, layer, direction)
            for m in store.members:
                members[m] = (store, tensor)

        def gemm_weight(gemm):
            store, tensor = members[gemm.params[0]]
            if store.members == gemm.params:
                return tensor
            return torch.cat([self._member(members[p][0], p, members[p][1]) for p in gemm.params])

        plan = self.cell.plan
        hoisted = [gemm_weight(g) for g in plan.hoisted]
        step = [gemm_weight(g) for g in plan.gemms]
        loop = self.cell.torch_loop
        vectors = [self._member(members[v][0], v, members[v][1]) for v in loop.vectors]
        scalars = [self._member(members[v][0], v, members[v][1]) for v in loop.scalars]
        return hoisted, step, vectors, scalars

    def forward(self, input, state=None):
        if isinstance(input, PackedSequence):
            raise NotImplementedError("PackedSequence input is not supported yet")
        x, state, unbatched = self._check_input(input, state)
        if self.batch_first:
            x = x.transpose(0, 1)
        x = x.contiguous()
        T, N = x.shape[0], x.shape[1]
        n_states = len(self.cell.states)
        if state is None:
            state = [x.new_zeros(self.num_layers * self.num_directions, N, self.hidden_size)] * n_states
        finals: list[list[torch.Tensor]] = [[] for _ in range(n_states)]
        layer_input = x
        for layer in range(self.num_layers):
            outs = []
            for direction in range(self.num_directions):
                idx = layer * self.num_directions + direction
                seq = layer_input if direction == 0 else layer_input.flip(0)
                out, *last = self._run(seq, [s[idx] for s in state], layer, direction)
                outs.append(out if direction == 0 else out.flip(0))
                for i, s in enumerate(last):
                    finals[i].append(s)
            layer_input = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                layer_input = F.dropout(layer_input, p=self.dropout, training=True)
        output = layer_input
        final = [torch.stack(f) for f in finals]
        if self.batch_first:
            output = output.transpose(0, 1)
        if unbatched:
            output = output.squeeze(1)
            final = [f.squeeze(1) for f in final]
        return output, (final[0] if n_states == 1 else tuple(final))

    def _run(self, x, states, layer, direction):
        hoisted, step, vectors, scalars = self._weights(layer, direction)
        counts = (len(states), len(hoisted), len(step), len(vectors), len(scalars))
        return CellSequence.apply(
            self.cell.torch_loop, counts, x, *states, *hoisted, *step, *vectors, *scalars
        )

    def _check_input(self, input, state):
        if not isinstance(input, torch.Tensor):
            raise ValueError(f"input must be a tensor or a PackedSequence, got {type(input).__name__}")
        if input.dim() not in (2, 3):
            raise ValueError(
                f"input must be 3-D [{'N, T' if self.batch_first else 'T, N'}, input_size] or 2-D "
                f"[T, input_size] (unbatched), got shape {tuple(input.shape)}"
            )
        if input.shape[-1] != self.input_size:
            raise ValueError(
                f"input.size(-1) must be input_size={self.input_size}, got {input.shape[-1]} "
                f"(input shape {tuple(input.shape)})"
            )
        if not input.is_floating_point():
            raise ValueError(f"input must be a floating-point tensor, got dtype {input.dtype}")
        ref = next(iter(self.parameters()), None)
        if ref is not None and (input.dtype != ref.dtype or input.device != ref.device):
            raise ValueError(
                f"input is {input.dtype} on {input.device} but the parameters are {ref.dtype} on "
                f"{ref.device}; use layer.to(...) or convert the input"
            )
        unbatched = input.dim() == 2
        if unbatched:
            input = input.unsqueeze(1 if not self.batch_first else 0)
        seq_len = input.shape[1] if self.batch_first else input.shape[0]
        batch = input.shape[0] if self.batch_first else input.shape[1]
        if seq_len == 0:
            raise ValueError("input is an empty sequence (length 0); give at least one time step")
        if batch == 0:
            raise ValueError("input has batch size 0")
        return input, self._check_state(state, batch, unbatched, input), unbatched

    def _check_state(self, state, batch, unbatched, input):
        if state is None:
            return None
        names = self.cell.states
        declared = self.cell.ir.declared_states
        given = [state] if isinstance(state, torch.Tensor) else state
        if not isinstance(given, (tuple, list)) or not all(isinstance(s, torch.Tensor) for s in given):
            raise ValueError("state must be a tensor (one-state cells) or a tuple of tensors")
        if len(given) not in (declared, len(names)):
            raise ValueError(
                f"cell {self.cell.name!r} carries {len(names)} state(s) {tuple(names)}; got {len(given)}"
            )
        L = self.num_layers * self.num_directions
        expected = (L, self.hidden_size) if unbatched else (L, batch, self.hidden_size)
        out = []
        for name, s in zip(names, given, strict=False):
            if tuple(s.shape) != expected:
                raise ValueError(f"state {name!r} must have shape {expected}, got {tuple(s.shape)}")
            if s.dtype != input.dtype or s.device != input.device:
                raise ValueError(
                    f"state {name!r} is {s.dtype} on {s.device} but input is {input.dtype} on {input.device}"
                )
            out.append(s.unsqueeze(1) if unbatched else s)
        for _ in range(len(names) - len(given)):  # prev(...) states start at zero
            out.append(input.new_zeros(L, batch, self.hidden_size))
        return [s.contiguous() for s in out]

    def extra_repr(self) -> str:
        s = f"{self.cell.name!r}, {self.input_size}, {self.hidden_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        for flag in ("batch_first", "bidirectional"):
            if getattr(self, flag):
                s += f", {flag}=True"
        if not self.bias:
            s += ", bias=False"
        if self.dropout:
            s += f", dropout={self.dropout}"
        return s


def _apply_init(view: torch.Tensor, init, default_bound: float) -> None:
    if init.kind == "constant":
        view.fill_(init.number)
    elif init.kind == "call" and init.name == "uniform":
        view.uniform_(-init.number, init.number)
    elif init.kind == "call" and init.name == "normal":
        view.normal_(0.0, init.number)
    elif init.name == "zeros":
        view.zero_()
    elif init.name == "ones":
        view.fill_(1.0)
    elif init.name == "orthogonal":
        if view.dim() == 2:
            nn.init.orthogonal_(view)
        else:
            view.uniform_(-default_bound, default_bound)
    elif init.name == "default":
        view.uniform_(-default_bound, default_bound)
