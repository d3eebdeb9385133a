"""Drop-in torch layers: `Recurrent(cell, ...)` for any cell file, and `LSTM`/`GRU`/`RNN` built from the
zoo with torch.nn's constructor, forward and state_dict layout.

Parameters are stored the way the cell file groups them (`param weight_ih = [W_ii, ...]` is one tensor
`weight_ih_l0`), so torch.nn state_dicts load unchanged; `cell_parameter("b_f")` returns a view.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from .compiler import ZOO, CompiledCell, compile_cell
from .ir import H as HIDDEN
from .runtime.function import register
from .runtime.ops import run

BIAS_NAME = re.compile(r"^(b|bias)(_\w*|\d*)$")


@dataclass(frozen=True)
class Store:
    """One stored tensor: parameters stacked by rows (matrices, vectors) or entries (scalars)."""

    name: str
    members: tuple[str, ...]
    kind: str  # matrix | vector | scalar
    operand_size: str | None  # matrices: "H" or an input's name

    def shape(self, input_size: int, hidden_size: int, extra_sizes: dict[str, int] | None = None
              ) -> tuple[int, ...]:
        """input_size: the first input's; extra_sizes: the other inputs' (by name)."""
        n = len(self.members)
        if self.kind == "matrix":
            extra = extra_sizes or {}
            cols = hidden_size if self.operand_size == HIDDEN else extra.get(self.operand_size, input_size)
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
        backend: "auto" (Triton kernels for CUDA tensors, compiled C kernels for CPU tensors), "torch"
            (the generated PyTorch code: the executable meaning of the cell), "cpu" or "triton".
        input_sizes: the size of every input after the first, by name, for a cell that declares
            several (`input x, ctx`: input_sizes={"ctx": 32}). The first input is the sequence (layer
            k > 0 reads the previous layer's output); every other one is fed to every layer as is.
        schedule: None (the backend's default), or a Triton schedule forced for the "triton" backend:
            "graphed", "persistent", "fused_step", "time_loop", "scan", or "auto" (the compiler's choice
            by the plan and sizes); ValueError when it does not apply to the cell. The schedules other
            than graphed are opt-in until their gpu tests pass on hardware (runtime/triton_schedules.py;
            `celldsl explain FILE --sizes N=16,H=768` shows the choice and why).

    forward(input, state=None, **extra) -> (output, final_state):
        input [T, N, I] ([N, T, I] if batch_first), [T, I] unbatched, or a PackedSequence (output is
        then packed the same way; each sequence runs over its own length only).
        output [T, N, D*H] (D = 2 if bidirectional); state and final_state: one tensor [L*D, N, H]
        ([L*D, H] unbatched) for a one-state cell, else a tuple in the order of the cell's `state` line,
        optionally followed by the prev(...) states (they start at zero when left out).
        Dropout (training only) acts on each layer's output but the last, as in torch.nn.LSTM.
        extra: one tensor per input after the first (`layer(x, ctx=c)`), shaped like input with its
        own size C: [T, N, C] ([N, T, C] if batch_first, [T, C] unbatched), or one value per
        sequence for every step: [N, C] ([C] unbatched). With a PackedSequence input, an extra is
        padded [T, N, C] ([N, T, C] if batch_first) in the order of the unpacked sequences, or [N, C].
        Each layer and direction is one call of the registered op celldsl::cell_sequence
        (runtime/ops.py), so torch.compile and DDP see an ordinary differentiable op.

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
        input_sizes: dict[str, int] | None = None,
        schedule: str | None = None,
    ):
        super().__init__()
        sizes = (("input_size", input_size), ("hidden_size", hidden_size), ("num_layers", num_layers))
        for name, value in sizes:
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not (isinstance(dropout, (int, float)) and 0 <= dropout <= 1) or isinstance(dropout, bool):
            raise ValueError(f"dropout must be a number in [0, 1], got {dropout!r}")
        if dropout > 0 and num_layers == 1:
            warnings.warn(
                f"dropout={dropout} acts between layers only (as in torch.nn.LSTM); with num_layers=1 it "
                "does nothing",
                stacklevel=2,
            )
        if backend not in ("auto", "torch", "cpu", "triton"):
            raise ValueError(f"backend must be 'auto', 'torch', 'cpu' or 'triton', got {backend!r}")
        self.cell = compile_cell(cell)
        register(self.cell)
        if schedule is not None:
            from .runtime.triton_schedules import check_schedule

            if backend not in ("auto", "triton"):
                raise ValueError(f"schedule={schedule!r} is a Triton schedule; backend={backend!r} has none")
            check_schedule(self.cell.plan, schedule)
        self.schedule = schedule
        self.input_sizes = _extra_sizes(self.cell, input_sizes)
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.dropout = bias, batch_first, float(dropout)
        self.bidirectional, self.backend = bidirectional, backend
        self.num_directions = 2 if bidirectional else 1
        self.stores = stores_of(self.cell)
        for layer in range(num_layers):
            self.cell.check_sizes(self._layer_input_size(layer), hidden_size, self.input_sizes)
        factory = {"device": device, "dtype": dtype}
        self._store_names = []
        for layer in range(num_layers):
            for direction in range(self.num_directions):
                for store in self.stores:
                    name = self._param_name(store.name, layer, direction)
                    shape = store.shape(self._layer_input_size(layer), hidden_size, self.input_sizes)
                    if not bias and BIAS_NAME.match(store.name):
                        self.register_buffer(name, torch.zeros(shape, **factory), persistent=False)
                    else:
                        self.register_parameter(name, nn.Parameter(torch.empty(shape, **factory)))
                        self._store_names.append(name)
        self.reset_parameters()

    def __setstate__(self, state):
        super().__setstate__(state)
        register(self.cell)  # an unpickled layer's cell must be reachable from the ops again

    def flatten_parameters(self) -> None:
        """No-op, for code written for torch.nn.LSTM (there is no cuDNN weight buffer to compact)."""

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

    def _weights(self, layer: int, direction: int) -> list[torch.Tensor]:
        """The op's flat parameter list: concatenated hoisted and step GEMM weights, vectors, scalars."""
        members = {}
        for store in self.stores:
            tensor = self._store_tensor(store, layer, direction)
            for m in store.members:
                members[m] = (store, tensor)

        def member(name):
            store, tensor = members[name]
            return self._member(store, name, tensor)

        def gemm_weight(gemm):
            store, tensor = members[gemm.params[0]]
            if store.members == gemm.params:
                return tensor
            return torch.cat([member(p) for p in gemm.params])

        plan, params = self.cell.plan, self.cell.ir.params  # the order of TorchLoop's arguments
        return (
            [gemm_weight(g) for g in plan.hoisted]
            + [gemm_weight(g) for g in plan.gemms]
            + [member(n) for n, p in params.items() if p.kind == "vector"]
            + [member(n) for n, p in params.items() if p.kind == "scalar"]
        )

    def forward(self, input, state=None, **extra):
        packed = isinstance(input, PackedSequence)
        if packed:
            x, batch_sizes, sorted_indices, unsorted_indices = input
            self._check_tensor(x, 2, "PackedSequence.data must be [sum(lengths), input_size]")
            if x.shape[0] == 0:
                raise ValueError("the PackedSequence is empty (no time steps); give at least one")
            x, batch, unbatched = x.contiguous(), int(batch_sizes[0]), False
            state = self._check_state(state, batch, False, x)
            if state is not None and sorted_indices is not None:  # rows of the state follow the sort
                state = [s.index_select(1, sorted_indices) for s in state]
        else:
            x, state, unbatched = self._check_input(input, state)
            if self.batch_first:
                x = x.transpose(0, 1)
            x, batch_sizes = x.contiguous(), None
            batch = x.shape[1]
        n_states = len(self.cell.states)
        if state is None:
            shape = (self.num_layers * self.num_directions, batch, self.hidden_size)
            state = [x.new_zeros(shape) for _ in range(n_states)]
        extras = self._check_extras(extra, x, batch_sizes, sorted_indices if packed else None, unbatched)
        backend = self._resolve_backend(x)
        if self.schedule is not None:
            if backend != "triton":
                raise ValueError(f"schedule={self.schedule!r} runs on the Triton backend (CUDA tensors, or "
                                 f"TRITON_INTERPRET=1); this input runs on {backend!r}")
            backend = f"triton:{self.schedule}"
        reverse = _packed_reversal(batch_sizes, x.device) if packed and self.bidirectional else None
        finals: list[list[torch.Tensor]] = [[] for _ in range(n_states)]
        layer_input = x
        for layer in range(self.num_layers):
            outs = []
            for direction in range(self.num_directions):
                idx = layer * self.num_directions + direction
                seq = torch.cat([layer_input, *extras], dim=-1) if extras else layer_input
                seq = seq if direction == 0 else _reversed(seq, reverse)
                out, last = run(
                    self.cell.key, backend, seq, [s[idx] for s in state], self._weights(layer, direction),
                    batch_sizes,
                )
                outs.append(out if direction == 0 else _reversed(out, reverse))
                for i, s in enumerate(last):
                    finals[i].append(s)
            layer_input = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                layer_input = F.dropout(layer_input, p=self.dropout, training=True)
        final = [torch.stack(f) for f in finals]
        if packed:
            output = PackedSequence(layer_input, batch_sizes, sorted_indices, unsorted_indices)
            if unsorted_indices is not None:
                final = [f.index_select(1, unsorted_indices) for f in final]
        else:
            output = layer_input.transpose(0, 1) if self.batch_first else layer_input
            if unbatched:
                output = output.squeeze(0 if self.batch_first else 1)
                final = [f.squeeze(1) for f in final]
        return output, (final[0] if n_states == 1 else tuple(final))

    def _resolve_backend(self, x: torch.Tensor) -> str:
        """'auto' runs fused Triton kernels on CUDA tensors and fused C kernels on CPU tensors."""
        if self.backend == "torch":
            return "torch"
        if self.backend == "cpu":
            if x.device.type != "cpu":
                raise ValueError(f"backend='cpu' needs CPU tensors; the input is on {x.device}")
            return "cpu"
        if self.backend == "triton":
            if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
                raise ValueError(
                    "backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 to run the kernels on the "
                    f"CPU); the input is on {x.device}"
                )
            return "triton"
        if x.device.type == "cpu":
            return "cpu"
        return "triton" if x.is_cuda and _triton_available() else "torch"

    # ---- checks ------------------------------------------------------------------------------

    def _check_tensor(self, x, dims, shape_text: str) -> None:
        """x is a floating tensor of `dims` dims with input_size features, like the parameters."""
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"input must be a tensor or a PackedSequence, got {type(x).__name__}")
        if x.dim() not in ((dims,) if isinstance(dims, int) else dims):
            raise ValueError(f"{shape_text}, got shape {tuple(x.shape)}")
        if x.shape[-1] != self.input_size:
            raise ValueError(
                f"input.size(-1) must be input_size={self.input_size}, got {x.shape[-1]} "
                f"(input shape {tuple(x.shape)})"
            )
        if not x.is_floating_point():
            raise ValueError(f"input must be a floating-point tensor, got dtype {x.dtype}")
        for name, p in self.named_parameters():
            if x.dtype != p.dtype or x.device != p.device:
                raise ValueError(
                    f"input is {x.dtype} on {x.device} but parameter {name} is {p.dtype} on {p.device}; "
                    "all must match: use layer.to(...) or convert the input"
                )

    def _check_input(self, input, state):
        self._check_tensor(
            input,
            (2, 3),
            f"input must be 3-D [{'N, T' if self.batch_first else 'T, N'}, input_size], 2-D [T, input_size] "
            "(unbatched) or a PackedSequence",
        )
        unbatched = input.dim() == 2
        if unbatched:
            input = input.unsqueeze(0 if self.batch_first else 1)
        seq_len = input.shape[1] if self.batch_first else input.shape[0]
        batch = input.shape[0] if self.batch_first else input.shape[1]
        if seq_len == 0:
            raise ValueError("input is an empty sequence (length 0); give at least one time step")
        if batch == 0:
            raise ValueError("input has batch size 0")
        return input, self._check_state(state, batch, unbatched, input), unbatched

    def _check_state(self, state, batch, unbatched, input):
        """-> list of all carried states [L*D, N, H] (prev(...) states zero when not given), or None."""
        if state is None:
            return None
        names = self.cell.states
        declared = self.cell.ir.declared_states
        given = [state] if isinstance(state, torch.Tensor) else state
        if not isinstance(given, (tuple, list)) or not all(isinstance(s, torch.Tensor) for s in given):
            raise ValueError("state must be a tensor (one-state cells) or a tuple of tensors")
        if len(given) not in (declared, len(names)):
            counts = f"{declared} or {len(names)}" if declared != len(names) else f"{declared}"
            raise ValueError(
                f"cell {self.cell.name!r} carries {len(names)} state(s) {tuple(names)}: expected {counts} "
                f"state tensor(s), got {len(given)}"
            )
        L = self.num_layers * self.num_directions
        expected = (L, self.hidden_size) if unbatched else (L, batch, self.hidden_size)
        out = []
        for name, s in zip(names, given, strict=False):
            if tuple(s.shape) != expected:
                raise ValueError(
                    f"state {name!r} must have shape {expected} (num_layers * num_directions, "
                    f"{'' if unbatched else 'batch, '}hidden_size), got {tuple(s.shape)}"
                )
            if s.dtype != input.dtype or s.device != input.device:
                raise ValueError(
                    f"state {name!r} is {s.dtype} on {s.device} but input is {input.dtype} on {input.device}"
                )
            out.append(s.unsqueeze(1) if unbatched else s)
        for _ in range(len(names) - len(given)):  # prev(...) states start at zero
            out.append(input.new_zeros(L, batch, self.hidden_size))
        return [s.contiguous() for s in out]

    def _check_extras(self, extra: dict, x, batch_sizes, sorted_indices, unbatched) -> list[torch.Tensor]:
        """The extra inputs the cell reads, time-major like x ([T, N, C], or packed [rows, C]), in
        declaration order. x: the checked input, time-major (batched) or packed data."""
        names = self.cell.ir.inputs[1:]
        unknown = sorted(set(extra) - set(names))
        missing = [n for n in names if n not in extra]
        if unknown or missing:
            wanted = ", ".join(f"{n}=" for n in names) or "none"
            raise ValueError(
                f"cell {self.cell.name!r} takes the extra inputs ({wanted}) as keywords; "
                + (f"missing: {', '.join(missing)}" if missing else "")
                + ("; " if missing and unknown else "")
                + (f"unknown: {', '.join(unknown)}" if unknown else "")
            )
        packed = batch_sizes is not None
        T, N = (len(batch_sizes), int(batch_sizes[0])) if packed else (x.shape[0], x.shape[1])
        read = set(self.cell.plan.inputs_read())
        out = []
        for name in names:
            e, C = extra[name], self.input_sizes[name]
            if not isinstance(e, torch.Tensor):
                raise ValueError(f"extra input {name!r} must be a tensor, got {type(e).__name__}")
            lead = "N, T" if self.batch_first else "T, N"
            seq = (N, T, C) if self.batch_first else (T, N, C)
            forms = {2: (T, C), 1: (C,)} if unbatched else {3: seq, 2: (N, C)}
            got = list(e.shape)
            t_dim = 1 if self.batch_first else 0
            if packed and e.dim() == 3 and got[t_dim] >= T:
                got[t_dim] = T  # padded past the longest sequence (pad_packed_sequence's total_length)
            if tuple(got) != forms.get(e.dim()):
                words = " or ".join(str(f) for f in forms.values())
                form = f"[T, {name} size] or [{name} size]" if unbatched else \
                    f"[{lead}, {name} size] or [N, {name} size]"
                raise ValueError(f"extra input {name!r} must be {form} = {words}, got shape {tuple(e.shape)}")
            if e.dtype != x.dtype or e.device != x.device:
                raise ValueError(
                    f"extra input {name!r} is {e.dtype} on {e.device} but input is {x.dtype} on {x.device}"
                )
            if name not in read:
                continue  # declared but never read by the equations: not passed to the op
            if unbatched:
                e = e.unsqueeze(-2)  # [T, 1, C] or [1, C]
            elif e.dim() == 3 and self.batch_first:
                e = e.transpose(0, 1)
            if packed:
                out.append(_pack_like(e, batch_sizes, sorted_indices))
            else:
                out.append((e.expand(T, N, C) if e.dim() == 2 else e).contiguous())
        return out

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
        if self.input_sizes:
            s += f", input_sizes={self.input_sizes}"
        return s


class _TorchRNN(Recurrent):
    """Shared base of LSTM/GRU/RNN: a zoo cell with torch.nn's constructor, forward and state_dict."""

    mode = ""

    def __init__(self, stem, input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                 device, dtype, backend, schedule=None):
        super().__init__(
            ZOO / f"{stem}.cell", input_size, hidden_size, num_layers=num_layers, bias=bias,
            batch_first=batch_first, dropout=dropout, bidirectional=bidirectional, backend=backend,
            device=device, dtype=dtype, schedule=schedule,
        )
        self.proj_size = 0

    def forward(self, input, hx=None):
        """input [T, N, I] ([N, T, I] if batch_first), [T, I] or a PackedSequence; hx as torch's."""
        return super().forward(input, hx)


class LSTM(_TorchRNN):
    """torch.nn.LSTM built from cells/lstm.cell: same arguments, forward, state (h, c) and state_dict
    keys (`weight_ih_l0`, `bias_hh_l1_reverse`, ...), so state_dicts load in both directions.

    proj_size is not supported yet: any proj_size > 0 raises NotImplementedError.
    `backend` and `schedule` (keyword only) are Recurrent's.
    """

    mode = "LSTM"

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
                 bidirectional=False, proj_size=0, device=None, dtype=None, *, backend="auto", schedule=None):
        if proj_size != 0:
            raise NotImplementedError(
                f"celldsl.LSTM does not support proj_size yet (got proj_size={proj_size}); use proj_size=0"
            )
        super().__init__("lstm", input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, device, dtype, backend, schedule)


class GRU(_TorchRNN):
    """torch.nn.GRU built from cells/gru.cell: same arguments, forward and state_dict keys."""

    mode = "GRU"

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
                 bidirectional=False, device=None, dtype=None, *, backend="auto", schedule=None):
        super().__init__("gru", input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, device, dtype, backend, schedule)


class RNN(_TorchRNN):
    """torch.nn.RNN built from cells/rnn_tanh.cell or cells/rnn_relu.cell (`nonlinearity`): same
    arguments (nonlinearity is the 4th positional one, as in torch), forward and state_dict keys."""

    def __init__(self, input_size, hidden_size, num_layers=1, nonlinearity="tanh", bias=True,
                 batch_first=False, dropout=0.0, bidirectional=False, device=None, dtype=None, *,
                 backend="auto", schedule=None):
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
        super().__init__(f"rnn_{nonlinearity}", input_size, hidden_size, num_layers, bias, batch_first,
                         dropout, bidirectional, device, dtype, backend, schedule)
        self.nonlinearity = nonlinearity
        self.mode = "RNN_TANH" if nonlinearity == "tanh" else "RNN_RELU"


def _extra_sizes(cell: CompiledCell, sizes) -> dict[str, int]:
    """Check `input_sizes` against the cell's inputs after the first: {name: positive int}."""
    names = cell.ir.inputs[1:]
    sizes = {} if sizes is None else sizes
    if not isinstance(sizes, dict):
        raise ValueError(f"input_sizes must be a dict {{input name: size}}, got {type(sizes).__name__}")
    unknown = sorted(set(sizes) - set(names))
    missing = [n for n in names if n not in sizes]
    if unknown or missing:
        declared = ", ".join(names) if names else "none"
        raise ValueError(
            f"cell {cell.name!r} declares the inputs {', '.join(cell.ir.inputs)}; input_sizes must give the "
            f"size of each after the first ({declared})"
            + (f"; missing: {', '.join(missing)}" if missing else "")
            + (f"; unknown: {', '.join(unknown)}" if unknown else "")
        )
    for name in names:
        v = sizes[name]
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"input_sizes[{name!r}] must be a positive int, got {v!r}")
    return {n: sizes[n] for n in names}


def _pack_like(e: torch.Tensor, batch_sizes: torch.Tensor, sorted_indices) -> torch.Tensor:
    """A padded extra input [T', N, C] (T' >= T) or a per-sequence one [N, C] -> packed rows
    [sum(batch_sizes), C] in the order of a PackedSequence with these batch_sizes and sorting."""
    batch_sizes = batch_sizes.to("cpu", torch.int64)
    offsets = torch.cumsum(batch_sizes, 0) - batch_sizes
    step = torch.repeat_interleave(torch.arange(len(batch_sizes)), batch_sizes)
    row = torch.arange(int(batch_sizes.sum())) - offsets[step]
    seq = row if sorted_indices is None else sorted_indices.to("cpu")[row]
    step, seq = step.to(e.device), seq.to(e.device)
    return (e[seq] if e.dim() == 2 else e[step, seq]).contiguous()


def _packed_reversal(batch_sizes: torch.Tensor, device) -> torch.Tensor:
    """Row permutation of packed data that reverses every sequence within its own length: [rows].

    Row r of step t (packed position offset_t + r) goes to step length_r - 1 - t; the reversed
    sequences have the same lengths, so the result is packed with the same batch_sizes (an involution).
    """
    batch_sizes = batch_sizes.to("cpu", torch.int64)
    offsets = torch.cumsum(batch_sizes, 0) - batch_sizes
    lengths = (batch_sizes[None, :] > torch.arange(int(batch_sizes[0]))[:, None]).sum(1)
    step = torch.repeat_interleave(torch.arange(len(batch_sizes)), batch_sizes)
    row = torch.arange(int(batch_sizes.sum())) - offsets[step]
    return (offsets[lengths[row] - 1 - step] + row).to(device)


def _reversed(seq: torch.Tensor, packed_reversal: torch.Tensor | None) -> torch.Tensor:
    """Time-reversed sequence: padded [T, N, K] flips time; packed [rows, K] reverses each sequence."""
    return seq.flip(0) if packed_reversal is None else seq.index_select(0, packed_reversal)


def _triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


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
