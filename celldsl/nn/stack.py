"""The forward of a stack of recurrent layers over one compiled cell, shared by Recurrent (any cell)
and LSTM/GRU/RNN (torch.nn's own classes): input forms, torch.nn's checks with torch.nn's wording,
initial states, directions and dropout between layers. Each layer and direction is one call of the
registered op (ops/op.py), so torch.compile, DDP and torch.func see an ordinary op.
"""

from __future__ import annotations

import importlib.util
import os
import weakref

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import PackedSequence

from ..compiler import CompiledCell, compile_cell
from ..lang.errors import CellTensorError
from ..ops import run
from ..ops.function import loop_for, register, split_params
from ..ops.op import plain_eager
from ..resources import ZOO
from .autocasting import autocast_dtype, result_dtype, without_autocast
from .parameters import checked_shape, member, op_params, refresh_copies, stores_of
from .prepared import apply_prepared, saved_tensor_hooks, training_layout

_ZOO_CELLS: dict[str, CompiledCell] = {}

# layer -> (its parameters' ids, one cell per layer sharing them): the one-step path (`_streamed`); kept
# out of the module (a submodule attribute would enter state_dict, pickles and deepcopies)
_STEPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# layer -> (its parameters' identities, {a call's signature: its layers' prepared sequences, for
# inference or training, or None}): `_sequenced`, a few signatures per layer (a caller alternating two
# batch sizes)
_SEQUENCES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
SEQUENCE_SIGNATURES = 4


def zoo_cell(stem: str) -> CompiledCell:
    """A zoo cell compiled once per process and reachable from the ops. LSTM/GRU/RNN and the cell
    classes look their cell up here, so they pickle without it; they call this when built or
    unpickled, so torch.compile, tracing a forward, finds the cell in the dict (it cannot trace the
    compiler's file reads)."""
    cell = _ZOO_CELLS.get(stem)
    if cell is None:
        cell = _ZOO_CELLS[stem] = compile_cell(ZOO / f"{stem}.cell")
        register(cell)
        stores_of(cell)  # cached now: computed inside torch.export's trace, it is a side effect there
    return cell


def resolve_backend(backend: str, x: torch.Tensor) -> str:
    """'auto' runs fused Triton kernels on CUDA tensors and fused C kernels on CPU tensors."""
    if backend == "torch":
        return "torch"
    if backend == "cpu":
        if x.device.type != "cpu":
            raise CellTensorError(f"backend='cpu' needs CPU tensors; the input is on {x.device}")
        return "cpu"
    if backend == "triton":
        if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise CellTensorError(
                "backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 to run the kernels on the "
                f"CPU); the input is on {x.device}"
            )
        return "triton"
    if x.device.type == "cpu":
        return "cpu"
    return "triton" if x.is_cuda and importlib.util.find_spec("triton") is not None else "torch"


def loop_revision(cell_key: str, backend: str, x: torch.Tensor) -> tuple:
    """(the loop's `revision` method, its value now) for the loop a call on x runs
    (FusedCPULoop.revision: its C libraries and GEMM choices; a prepared call is made again when it
    changes), or (None, None) for a loop without one."""
    try:
        loop = loop_for(cell_key, resolve_backend(backend, x))
    except CellTensorError:
        return None, None
    revision = getattr(loop, "revision", None)
    return revision, (revision() if revision is not None else None)


class RecurrentStack:
    """Mixin for an nn.Module that has `compiled` (the CompiledCell), input_size, hidden_size,
    num_layers, bidirectional, batch_first, dropout, backend and input_sizes (the sizes of the inputs
    after the first, by name), and stores parameters as `{store}_l{layer}` (`_reverse` for direction
    1), torch.nn's names. A store it does not have (bias=False) runs as zeros."""

    autocast_keeps_input_dtype = False  # under CPU autocast: torch.nn.GRU's results keep it (autocasting.py)

    def _autocast_keeps_input_dtype(self, packed: bool) -> bool:
        """Whether torch.nn's class returns the input's dtype under CPU autocast (autocasting.py)."""
        return self.autocast_keeps_input_dtype

    def _streamed(self, input, state):
        """(output, final states) of a one-step call (T = 1, batched, padded, unidirectional, no
        projection, no dropout running, no extra input) from each layer's prepared step (its
        `cell(k)`'s `_replayed` in nn/cells.py: with or without autograd), or None: then the full
        path runs, with its checks and messages (a layer's step refuses what its cell's checks
        refuse). A longer padded call, or a bidirectional one, goes to `_sequenced`.

        Under torch.compile, torch.export or jit tracing the full path runs before any cache is
        read: dynamo would otherwise guard on the weak dictionaries' keys, and a key collected
        between tracing and guard building failed the export (IndexError in a guard)."""
        if not isinstance(input, torch.Tensor) or not plain_eager([input]) or input.dim() != 3 \
                or getattr(self, "proj_size", 0) or getattr(self, "schedule", None) is not None \
                or (self.dropout and self.training and self.num_layers > 1) \
                or self.compiled.ir.shifted:  # prev(x): a Cell refuses it
            return None
        given = self._given_list(state)
        if given is False:
            return None
        if input.shape[1 if self.batch_first else 0] != 1 or self.bidirectional:
            return self._sequenced(input, given)
        params = tuple(id(p) for p in self._parameters.values())
        entry = _STEPS.get(self)
        if entry is None or entry[0] != params:
            # plain tensors in place of the parameters (torch.func.functional_call), or a weight that
            # a parametrization or weight_norm computes at each call: the full path (a cell shares
            # the layer's nn.Parameters, and would keep one computed weight)
            plain = all(p is None or isinstance(p, torch.nn.Parameter) for p in self._parameters.values()) \
                and all(isinstance(getattr(self, self._param_name(s.name, k, 0), None), (torch.nn.Parameter,
                                                                                       type(None)))
                        for s in stores_of(self.compiled) for k in range(self.num_layers))
            entry = _STEPS[self] = (params, [self.cell(k) for k in range(self.num_layers)] if plain else None)
        if entry[1] is None:
            return None
        # each step takes x as [1, N, I] ([N, 1, I] batch_first) and gives its output in x's shape and
        # the new states as [1, N, H]: one layer's are the layer's results as they are (no stack, no
        # unsqueeze: no view or copy for autograd to record); only the last layer's output needs to
        # be a tensor of its own (with several layers the final states are a concatenation)
        x, last, finals = input, self.num_layers - 1, []
        lead = (1, input.shape[0 if self.batch_first else 1])
        for k, step in enumerate(entry[1]):
            states = None if given is None else given if last == 0 else [s[k] for s in given]
            replayed = step._replayed(x, states, (lead, input.shape[:-1]) if k == last else (lead, None))
            if replayed is None:
                return None
            x, news = replayed
            finals.append(news)
        final = finals[0] if last == 0 else [torch.cat([f[i] for f in finals]) for i in range(len(finals[0]))]
        return x, (final[0] if len(final) == 1 else tuple(final))

    def _given_list(self, state):
        """The states a one-step or prepared call was given, as a list of [L, N, width] tensors, None
        for none, or False for any other form (the full path then checks it, with its message)."""
        if state is None:
            return None
        declared, names = self.compiled.ir.declared_states, self.compiled.states
        given = [state] if isinstance(state, torch.Tensor) and declared == 1 else \
            list(state) if isinstance(state, (tuple, list)) and declared > 1 else []
        if len(given) not in (declared, len(names)) or not all(
                isinstance(s, torch.Tensor) and s.dim() == 3
                and s.shape[0] == self.num_layers * self.num_directions
                for s in given):
            return False
        return given

    def _sequenced(self, input, given):
        """(output, final states) of a small call on the CPU (padded input [T, N, I], T > 1 or
        bidirectional) from each layer's and direction's prepared sequence (targets/c/fused:
        PreparedSequence, its kernel arguments bound once; under autograd PreparedTrainSequence,
        through nn/prepared.PreparedCall; direction 1 runs on the input reversed in time and its
        output is reversed back, as the full path's `_layers`), or None: then the full path runs,
        with its checks and messages. The sequences are made after that path's checks pass and kept
        while the call's shapes, dtypes, the threads, inference mode, autograd and the parameters
        (object, storage, shape, strides, requires_grad) stay the same (and the loop's libraries and
        GEMM choices: `revision`); they read the parameters' values live at every call."""
        tensors = [input, *(given or [])]
        params = list(self._parameters.values())
        try:
            identities = tuple(p if p is None else (id(p), p.data_ptr(), p.shape, p.stride(), p.dtype,
                                                    p.device, p.requires_grad)  # a training Layout reads it
                               for p in params)
        except RuntimeError:  # a tensor without storage (a wrapper subclass): the full path
            return None
        entries = _SEQUENCES.get(self)
        if entries is not None and entries[0] != identities:  # moved, converted, replaced: let go of the old
            del _SEQUENCES[self]
            entries = None
        train = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                                for t in [*tensors, *params])
        if train and saved_tensor_hooks():
            return None
        if not plain_eager(tensors) or input.device.type != "cpu" or self.backend not in ("auto", "cpu"):
            return None
        revision = getattr(loop_for(self.compiled.key, "cpu"), "revision", None)
        if revision is None:  # no C kernels here: the op's torch loop
            return None
        key = (input.shape, input.dtype, self.batch_first, torch.get_num_threads(),
               torch.is_inference_mode_enabled(), self.training, train, revision(),
               *[(s.shape, s.dtype, s.device) for s in given or []])
        if entries is None:
            entries = _SEQUENCES[self] = (identities, {})
        signatures = entries[1]
        sequences = signatures.pop(key, False)  # False: not prepared yet (None: prepared, none)
        if sequences is False:
            sequences = self._prepare_sequences(input, given, train)
            while len(signatures) >= SEQUENCE_SIGNATURES:
                signatures.pop(next(iter(signatures)))  # the least recently used
        signatures[key] = sequences  # last: the most recently used
        if sequences is None:
            return None
        lock = sequences[0][0].lock
        if not lock.acquire(blocking=False):
            return None  # another thread is in these buffers: this call takes the full path
        try:
            x, finals = input.transpose(0, 1) if self.batch_first else input, []
            directions = self.num_directions
            for k in range(self.num_layers):
                outs = []
                for d in range(directions):
                    idx = k * directions + d
                    states = [] if given is None else [s[idx] for s in given]
                    seq = x if d == 0 else x.flip(0)
                    sequence, weights, derived, layout = sequences[idx]
                    if derived:  # outside autograd: the copies are no part of the graph
                        if layout is not None:  # an earlier call's backward reads its own copies
                            sequence.spill()
                        with torch.no_grad():
                            self._refresh_derived(k, d, weights, derived)
                    if layout is None:
                        out, news = sequence(seq, states)
                    else:
                        leads = ((seq.shape[1],), seq.shape[:2])  # the final states', the output's
                        results = apply_prepared(sequence, layout, self._full_sequence(k, d), len(states),
                                                 True, leads, seq, *states, *layout.stored)
                        out, news = results[-1], list(results[:-1])
                    outs.append(out if d == 0 else out.flip(0))
                    finals.append(news)
                x = outs[0] if directions == 1 else torch.cat(outs, dim=-1)
        finally:
            lock.release()
        final = [torch.stack([f[i] for f in finals]) for i in range(len(finals[0]))]
        return x.transpose(0, 1) if self.batch_first else x, (final[0] if len(final) == 1 else tuple(final))

    def _prepare_sequences(self, input, given, train: bool = False):
        """Per layer and direction, in h_n's order (its PreparedSequence for calls like this one, the
        op parameters it reads, the indices of those that are no views of stored tensors: blocks of
        several parameters, or a combination such as W - Wᵀ, made again before every call, and None),
        or None where a layer has none or the call fails a check (the full path raises it again,
        with its message). Every stored tensor must be a registered nn.Parameter (not a
        parametrization's tensor, made anew at each call). train (a call under autograd): a
        PreparedTrainSequence and the nn/prepared.Layout of its parameters in place of None, and
        None unless every op parameter is a plain view of a stored one or a GEMM weight made of such
        views (W_z, W_i, ... stored apart: a copy, made again before each call)."""
        x = input.transpose(0, 1) if self.batch_first else input
        try:
            self._check_input(x, None)
            self._initial_states(given, x, x.shape[1], False)
        except (CellTensorError, ValueError, TypeError):
            return None
        if not all(isinstance(self._parameters.get(n), torch.nn.Parameter) or
                   (n not in self._parameters and getattr(self, n, None) is None)
                   for n in self._stored_names()):
            return None
        loop = loop_for(self.compiled.key, "cpu")
        prepare = getattr(loop, "prepare_train_sequence" if train else "prepare_sequence", None)
        if prepare is None:
            return None
        sequences, shape = [], x.shape
        for k in range(self.num_layers):
            like = torch.empty(*shape[:2], self._layer_input_size(k), dtype=x.dtype)  # layer k's input
            sizes = self._sizes(k)
            for d in range(self.num_directions):
                stored = self._stored(k, d, like=like)
                bases = {id(t) for t in stored.values()}
                blocks: dict[int, list[torch.Tensor]] = {}
                params = op_params(self.compiled, stored, sizes, like=like, blocks=blocks)
                derived = [i for i, q in enumerate(params)
                           if id(q if q._base is None else q._base) not in bases]
                if train:  # the copies the sequence reads, made again before each call (no autograd)
                    params = [q.detach() if i in derived else q for i, q in enumerate(params)]
                states = [like.new_zeros(shape[1], sizes[self.compiled.ir.width(n)])
                          for n in self.compiled.states]
                split = split_params(loop, params)
                sequence = prepare(like, states, *split)
                if sequence is None:
                    return None
                layout = None
                if train:
                    parameters = [self._parameters[n] for n in self._position_names(k, d)
                                  if self._parameters.get(n) is not None]
                    layout = training_layout(sequence, parameters, params, split, blocks, derived)
                    if layout is None:
                        return None
                sequences.append((sequence, params, derived, layout))
            shape = (*shape[:2], sequence.out.shape[-1] * self.num_directions)
        for entry in sequences[1:]:
            entry[0].lock = sequences[0][0].lock  # one lock for the stack's buffers
        return sequences

    def _full_sequence(self, layer: int, direction: int):
        """full(x, given, (lead, out_lead), stored) for nn/prepared.PreparedCall: the op's full path on
        one layer and direction, reading `stored` (its Layout's tensors) in place of the module's
        parameters -> [final states shaped lead + (width,)..., output]. A backward that autograd
        records (create_graph) differentiates it."""
        def full(x, given, leads, stored):
            names = self._position_names(layer, direction)
            present = iter(stored)
            tensors = self._stored(layer, direction, like=x)
            for st, name in zip(stores_of(self.compiled), names, strict=True):
                if self._parameters.get(name) is not None:
                    tensors[st.name] = next(present)
            sizes = self._sizes(layer)
            states = [*given, *[x.new_zeros(x.shape[1], sizes[self.compiled.ir.width(n)])
                                for n in self.compiled.states[len(given):]]]
            weights = op_params(self.compiled, tensors, sizes, like=x)
            out, last = run(self.compiled.key, "cpu", x, states, weights, None)
            return [*[s.view(*leads[0], s.shape[-1]) for s in last], out]
        return full

    def _refresh_derived(self, layer: int, direction: int, held: list[torch.Tensor],
                         derived: list[int]) -> None:
        """The op parameters `derived` of one layer and direction made again from the parameters as
        they are, into the tensors its prepared sequence reads (`held`)."""
        like = held[0]
        refresh_copies(self.compiled, self._stored(layer, direction, like=like), self._sizes(layer), like,
                       held, derived)

    # ---- parameters --------------------------------------------------------------------------

    @property
    def stores(self):
        """How the cell's parameters are stored: one parameters.Store per group or ungrouped parameter."""
        return stores_of(self.compiled)

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    def _layer_input_size(self, layer: int) -> int:
        """Layer 0 reads the input; layer k > 0 the outputs of layer k - 1's directions, side by side."""
        if layer == 0:
            return self.input_size
        previous = self._sizes(layer - 1)
        return previous[self.compiled.ir.width(self.compiled.ir.output)] * self.num_directions

    def _sizes(self, layer: int = 0) -> dict[str, int]:
        """The size of every width of the cell in one layer (CompiledCell.sizes): H, the inputs', and
        the widths the cell declares (`state h : P`), given to the layer as sizes={"P": ...}."""
        return self.compiled.sizes(self._layer_input_size(layer), self.hidden_size, self.input_sizes,
                                   getattr(self, "width_sizes", None))

    @staticmethod
    def _param_name(store: str, layer: int, direction: int) -> str:
        return f"{store}_l{layer}" + ("_reverse" if direction == 1 else "")

    def _check_position(self, layer: int, direction: int) -> None:
        if not (0 <= layer < self.num_layers) or not (0 <= direction < self.num_directions):
            raise ValueError(
                f"layer must be in [0, {self.num_layers}) and direction in [0, {self.num_directions}), got "
                f"layer={layer}, direction={direction}"
            )

    def _stored(self, layer: int, direction: int, like: torch.Tensor | None = None
                ) -> dict[str, torch.Tensor]:
        """The stored tensors of one layer and direction by store name (zeros for one left out).
        getattr, not the parameter dict, so weight_norm, parametrizations and functional_call apply."""
        tensors, like, sizes = {}, self._like(like), self._sizes(layer)
        for store in stores_of(self.compiled):
            name = self._param_name(store.name, layer, direction)
            tensor = getattr(self, name, None)
            tensors[store.name] = checked_shape(name, tensor, store.shape(sizes), like)
        return tensors

    def _like(self, like: torch.Tensor | None) -> torch.Tensor:
        """What gives dtype and device to the tensors the layer makes: the input, else the first
        parameter, else (a cell without parameters, called with no input) the default dtype on CPU."""
        if like is not None:
            return like
        for p in self.parameters():
            return p
        return torch.empty(0)

    def cell_parameter(self, name: str, layer: int = 0, direction: int = 0) -> torch.Tensor:
        """The parameter the cell file names (e.g. "b_f", "U_z"), as a view sharing storage.

        Matrices are [H, K] (torch's out x in layout), vectors [H], scalars [].
        """
        self._check_position(layer, direction)
        for store in stores_of(self.compiled):
            if name in store.members:
                tensor = getattr(self, self._param_name(store.name, layer, direction), None)
                if tensor is None:
                    raise ValueError(f"bias=False: the layer has no parameter {name!r} (it is fixed at 0)")
                return member(store, name, tensor, self._sizes(layer))
        names = ", ".join(m for s in stores_of(self.compiled) for m in s.members)
        raise ValueError(f"cell {self.compiled.name!r} has no parameter {name!r}; it has: {names}")

    def _shared(self, name: str) -> torch.nn.Parameter | None:
        """Parameter `name` for a cell(k) to share (None: bias=False). A weight that a parametrization
        or weight_norm computes at each call, or that functional_call gives, is no Parameter of the
        layer: a cell sharing it would keep one value of it, so cell(k) refuses it."""
        p = getattr(self, name, None)
        if p is None or isinstance(p, torch.nn.Parameter):
            return p
        raise TypeError(f"{type(self).__name__}.cell(): {name} is a tensor computed from the layer's "
                        "parameters (a parametrization, weight_norm or functional_call), not a Parameter; a "
                        "cell shares the layer's Parameters: call the layer on a length-1 sequence instead")

    def _weights(self, layer: int, direction: int, like: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The op's flat parameter list for one layer and direction."""
        like = self._like(like)
        return op_params(self.compiled, self._stored(layer, direction, like), self._sizes(layer), like)

    # ---- forward -----------------------------------------------------------------------------

    def _run(self, input, state, extra: dict):
        """-> (output, final states as given: one tensor for a one-state cell, else a tuple)."""
        name = type(self).__name__
        packed = isinstance(input, PackedSequence)
        sorted_indices = unsorted_indices = batch_sizes = None
        if packed:
            x, batch_sizes, sorted_indices, unsorted_indices = input
            unbatched, batch = False, int(batch_sizes[0])
            given = self._given_states(state, 3, packed=True)
        else:
            if not isinstance(input, torch.Tensor):
                kind = type(input).__name__
                raise TypeError(f"{name}: input must be a Tensor or a PackedSequence, got {kind}")
            if input.dim() not in (2, 3):
                raise CellTensorError(f"{name}: Expected input to be 2D or 3D, got {input.dim()}D instead")
            unbatched = input.dim() == 2
            given = self._given_states(state, 2 if unbatched else 3, packed=False)
            x = input.unsqueeze(0 if self.batch_first else 1) if unbatched else input
            x = x.transpose(0, 1) if self.batch_first else x
            batch = x.shape[1]
        input_dtype, cast = x.dtype, autocast_dtype(x)
        if cast is not None:  # torch.autocast: the op runs in its dtype (celldsl/nn/autocasting.py)
            x, given = x.to(cast), given and [s.to(cast) for s in given]
            extra = {k: v.to(cast) if isinstance(v, torch.Tensor) else v for k, v in extra.items()}
        self._check_input(x, batch_sizes, autocast=cast is not None)
        states = self._initial_states(given, x, batch, unbatched)
        if x.shape[0] == 0:
            raise CellTensorError("Expected sequence length to be larger than 0 in RNN")
        if sorted_indices is not None:  # the rows of a packed batch's states follow its sort
            states = [s.index_select(1, sorted_indices) for s in states]
        extras = self._check_extras(extra, x, batch_sizes, sorted_indices, unbatched)
        with without_autocast(x, cast):
            out, final = self._layers(x.contiguous(), states, extras, batch_sizes)
        if cast is not None:
            keeps = self._autocast_keeps_input_dtype(packed)
            dtype = result_dtype(input_dtype, cast, x.device.type, keeps)
            out, final = out.to(dtype), [f.to(dtype) for f in final]
        if packed:
            output = PackedSequence(out, batch_sizes, sorted_indices, unsorted_indices)
            if unsorted_indices is not None:
                final = [f.index_select(1, unsorted_indices) for f in final]
        else:
            output = out.transpose(0, 1) if self.batch_first else out
            if unbatched:
                output = output.squeeze(0 if self.batch_first else 1)
                final = [f.squeeze(1) for f in final]
        return output, (final[0] if len(final) == 1 else tuple(final))

    def _layers(self, x, states, extras, batch_sizes):
        """x time-major [T, N, I] (or packed rows) -> (last layer's output, final states [L*D, N, H])."""
        backend = self._resolve_backend(x)
        packed = batch_sizes is not None
        reverse = _packed_reversal(batch_sizes, x.device) if packed and self.bidirectional else None
        finals: list[list[torch.Tensor]] = [[] for _ in states]
        layer_input = x
        for layer in range(self.num_layers):
            outs = []
            for direction in range(self.num_directions):
                idx = layer * self.num_directions + direction
                seq = torch.cat([layer_input, *extras], dim=-1) if extras else layer_input
                seq = seq if direction == 0 else _reversed(seq, reverse)
                weights = self._weights(layer, direction, like=x)  # cast only under autocast:
                weights = [w if w.dtype == x.dtype else w.to(x.dtype) for w in weights]  # else checked
                out, last = run(self.compiled.key, backend, seq, [s[idx] for s in states], weights,
                                batch_sizes)
                outs.append(out if direction == 0 else _reversed(out, reverse))
                for i, s in enumerate(last):
                    finals[i].append(s)
            layer_input = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                layer_input = F.dropout(layer_input, p=self.dropout, training=True)
        return layer_input, [torch.stack(f) for f in finals]

    def _resolve_backend(self, x: torch.Tensor) -> str:
        """The backend, or "triton:<schedule>" for a layer built with `schedule=`."""
        backend = resolve_backend(self.backend, x)
        schedule = getattr(self, "schedule", None)
        if schedule is None:
            return backend
        if backend != "triton":
            raise ValueError(f"schedule={schedule!r} runs on the Triton backend (CUDA tensors, or "
                             f"TRITON_INTERPRET=1); this input runs on {backend!r}")
        return f"triton:{schedule}"

    # ---- checks (torch.nn's order and wording where torch.nn checks) -------------------------------

    def _state_label(self, i: int | None = None) -> str:
        """How messages name state i (None: all of them): torch's hx / hidden[i]."""
        names = self.compiled.states
        if len(names) == 1:
            return "hx"
        if i is not None:
            return f"hidden[{i}]"
        return "hx and cx" if names == ["h", "c"] else f"the states ({', '.join(names)})"

    def _state_name(self, i: int) -> str:
        names = self.compiled.states
        return f" (state {names[i]!r})" if len(names) > 1 else ""

    def _given_states(self, state, dims: int, packed: bool) -> list[torch.Tensor] | None:
        """The states the caller gave, as a list, checked for structure and dimensions."""
        if state is None:
            return None
        names, declared = self.compiled.states, self.compiled.ir.declared_states
        if isinstance(state, torch.Tensor):
            if declared > 1:
                raise CellTensorError(
                    f"{type(self).__name__} carries {declared} states ({', '.join(names[:declared])}): give "
                    f"them as a tuple of {declared} tensors, got one tensor"
                )
            given = [state]
        elif isinstance(state, (tuple, list)) and all(isinstance(s, torch.Tensor) for s in state):
            given = list(state)
        else:
            raise TypeError(f"the state must be a tensor (one-state cells) or a tuple of tensors, got "
                            f"{type(state).__name__}")
        if len(given) not in (declared, len(names)):
            counts = f"{declared} or {len(names)}" if declared != len(names) else f"{declared}"
            raise CellTensorError(
                f"cell {self.compiled.name!r} carries {len(names)} state(s) ({', '.join(names)}): expected "
                f"{counts} state tensor(s), got {len(given)}"
            )
        if not packed and any(s.dim() != dims for s in given):
            kind = "batched 3-D" if dims == 3 else "unbatched 2-D"
            got = ", ".join(f"{s.dim()}-D" for s in given)
            got = f"{got} tensor" if len(given) == 1 else f"({got}) tensors"
            label = self._state_label()
            raise CellTensorError(f"For {kind} input, {label} should also be {dims}-D but got {got}")
        return given

    def _check_input(self, x: torch.Tensor, batch_sizes, autocast: bool = False) -> None:
        """x: time-major padded [T, N, I] or packed [rows, I]; like torch.nn.RNNBase.check_input.
        Under autocast the weights are cast to x's dtype, so their dtype is not checked."""
        params = self._used_tensors()
        if params and not autocast:
            w = params[0][1]
            if x.dtype != w.dtype:
                raise CellTensorError(
                    f"RNN input dtype ({x.dtype}) does not match weight dtype ({w.dtype}). Convert input: "
                    f"input.to({w.dtype}), or convert model: model.to({x.dtype})"
                )
        for pname, p in params:
            if p.dtype != x.dtype and not autocast:
                raise CellTensorError(f"parameter {pname} is {p.dtype} but the input and {params[0][0]} are "
                                      f"{x.dtype}: use layer.to(dtype) so all parameters match")
            if p.device != x.device:
                raise CellTensorError(
                    "Input and parameter tensors are not at the same device, found input tensor at "
                    f"{x.device} and parameter tensor at {p.device} ({pname})"
                )
        dims = 2 if batch_sizes is not None else 3
        if x.dim() != dims:
            raise CellTensorError(f"input must have {dims} dimensions, got {x.dim()}")
        if x.shape[-1] != self.input_size:
            raise CellTensorError(
                f"input.size(-1) must be equal to input_size. Expected {self.input_size}, got {x.shape[-1]}"
            )

    def _used_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """(name, tensor) of what the layer's op reads, as torch.nn's checks see `_flat_weights`:
        getattr, so a parametrization's tensor, not a child module's parameters (a subclass's head)."""
        return [(n, t) for n in self._stored_names() if isinstance(t := getattr(self, n, None), torch.Tensor)]

    def _stored_names(self) -> list[str]:
        """The names of every layer's and direction's stored tensors, in torch.nn's `_flat_weights` order."""
        return [n for k in range(self.num_layers) for d in range(self.num_directions)
                for n in self._position_names(k, d)]

    def _position_names(self, layer: int, direction: int) -> list[str]:
        """The names of one layer's and direction's stored tensors, in the cell's store order."""
        return [self._param_name(s.name, layer, direction) for s in stores_of(self.compiled)]

    def _initial_states(self, given, x, batch: int, unbatched: bool) -> list[torch.Tensor]:
        """All carried states [L*D, N, width]: the given ones checked (unbatched ones get N = 1), the
        rest (all, or the prev(...) states) zero. Every layer's state has the same width (a state of
        an input's width would differ between layers: such a cell has one layer)."""
        L, sizes = self.num_layers * self.num_directions, self._sizes(0)
        shapes = [(L, batch, sizes[self.compiled.ir.width(name)]) for name in self.compiled.states]
        states = []
        for i, s in enumerate(given or []):
            expected = shapes[i]
            s = s.unsqueeze(1) if unbatched else s
            if tuple(s.shape) != expected:
                label = "hidden" if len(self.compiled.states) == 1 else f"hidden[{i}]"
                raise CellTensorError(f"Expected {label} size {expected}, got {list(s.shape)}"
                                      + self._state_name(i))
            if s.device != x.device:
                raise CellTensorError(
                    "Input and hidden tensors are not at the same device, found input tensor at "
                    f"{x.device} and hidden tensor at {s.device}"
                )
            if s.dtype != x.dtype:
                label = self._state_label(i) + self._state_name(i)
                raise CellTensorError(f"{label} is {s.dtype} but the input is {x.dtype}: the states must "
                                      "have the input's dtype")
            states.append(s.contiguous())
        while len(states) < len(self.compiled.states):
            states.append(x.new_zeros(shapes[len(states)]))
        return states

    def _check_extras(self, extra: dict, x, batch_sizes, sorted_indices, unbatched) -> list[torch.Tensor]:
        """The extra inputs the cell reads, time-major like x ([T, N, C], or packed [rows, C]), in
        declaration order. x: the checked input, time-major (batched) or packed data."""
        names = self.compiled.ir.inputs[1:]
        if not names and not extra:
            return []
        unknown = sorted(set(extra) - set(names))
        missing = [n for n in names if n not in extra]
        if unknown or missing:
            wanted = ", ".join(f"{n}=" for n in names) or "none"
            raise ValueError(
                f"cell {self.compiled.name!r} takes the extra inputs ({wanted}) as keywords; "
                + (f"missing: {', '.join(missing)}" if missing else "")
                + ("; " if missing and unknown else "")
                + (f"unknown: {', '.join(unknown)}" if unknown else "")
            )
        packed = batch_sizes is not None
        T, N = (len(batch_sizes), int(batch_sizes[0])) if packed else (x.shape[0], x.shape[1])
        read = set(self.compiled.plan.inputs_read())
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
                raise CellTensorError(f"extra input {name!r} must be {form} = {words}, got shape "
                                      f"{tuple(e.shape)}")
            if e.dtype != x.dtype or e.device != x.device:
                raise CellTensorError(
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
