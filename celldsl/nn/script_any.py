"""TorchScript for `Recurrent` and `Cell` over any cell: the module torch.jit.script compiles in their
place.

Their eager forward takes a cell's extra inputs as keywords (`forward(input, state=None, **extra)`)
and returns one state or a tuple of as many as the cell carries; TorchScript compiles neither
`**extra` nor a tuple of a length it cannot see. So `__prepare_scriptable__` (which torch.jit.script
calls on every module first, using what it returns) gives a copy of the layer, sharing its parameters,
whose class adds a forward typed for this cell's number of states (nn/script_arity.py's mixins):

    forward(input, state: Optional[Tuple[Tensor, ...n]] = None, extra: Optional[Dict[str, Tensor]] = None)

(one Tensor for a one-state cell; a cell with prev(...) states takes and returns all of them), with
the extra inputs by name in `extra`. Scripted, its body (`script_call`) calls the registered op
celldsl::cell_sequence with the parameter list replayed by script_programs.run_program. Called
eagerly (torch.jit.script replaces a submodule inside its parent, so the parent's eager forward then
calls the copy) it is the layer's own forward, keywords included; it pickles as the layer's own class.
Padded input only, as TorchScript's nn.LSTM; no autocast in the scripted forward.
"""

import importlib.util
import os

import torch
from torch import Tensor

from .parameters import stores_of
from .script_arity import MAX_STATES, PicklesAsEager, arity_forward
from .script_programs import program, run_program
from .scripting import ScriptedLayers


def _backends(backend: str, schedule: str | None) -> dict[str, str]:
    """The op's backend for CPU and for CUDA inputs ("" where the layer's backend refuses them), as
    stack.resolve_backend picks it."""
    gpu = "triton" if importlib.util.find_spec("triton") is not None else "torch"
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    cpu = {"auto": "cpu", "torch": "torch", "cpu": "cpu", "triton": "triton" if interpreted else ""}[backend]
    cuda = {"auto": gpu, "torch": "torch", "cpu": "", "triton": "triton"}[backend]
    if schedule is not None:
        cpu = "triton:" + schedule if cpu == "triton" else ""
        cuda = "triton:" + schedule
    return {"cpu": cpu, "cuda": cuda}


def extra_inputs(extra, named: dict) -> dict:
    """The eager layers' extra inputs: keywords (`ctx=c`), or the dict a scripted layer takes
    (`extra={"ctx": c}`), so one model's code runs both ways. A tensor passed as `extra=` is the
    cell's input named "extra"."""
    if extra is None:
        return named
    if isinstance(extra, torch.Tensor):
        return {**named, "extra": extra}
    if not isinstance(extra, dict):
        raise TypeError(f"extra must be a dict of the cell's extra inputs by name, got "
                        f"{type(extra).__name__}")
    both = sorted(set(extra) & set(named))
    if both:
        raise ValueError(f"extra input(s) {', '.join(both)} given both in extra= and as keywords")
    return {**extra, **named}


class _Prepares:
    """What the eager classes add: `__prepare_scriptable__`, returning the scriptable copy."""

    def __prepare_scriptable__(self):
        compiled = self.compiled
        if len(compiled.states) > MAX_STATES:
            raise RuntimeError(f"torch.jit.script: {type(self).__name__} over cell {compiled.name!r} carries "
                               f"{len(compiled.states)} states; a scripted layer takes at most {MAX_STATES} "
                               "(its state is a typed tuple). Use torch.jit.trace, which has no such limit")
        cls = scripted_class(type(self), len(compiled.states))
        if type(self) is cls:
            copy = self
        else:
            copy = object.__new__(cls)
            copy.__dict__.update(self.__dict__)  # the same _parameters dict: the same Parameter objects
        copy._prepare_script()
        return copy


_CLASSES: dict = {}


def scripted_class(base: type, n: int) -> type:
    """The scriptable subclass of `base` (Recurrent or Cell, or a subclass of theirs) for n states."""
    if getattr(base, "_script_base", None) is not None:
        return base
    key = (base, n)
    if key not in _CLASSES:
        body = _ScriptedStep if issubclass(base, PreparesStep) else _ScriptedLayer
        _CLASSES[key] = type(f"Scripted{base.__name__}{n}", (arity_forward(n, bare=n == 1), body, base),
                             {"_script_base": base, "__module__": __name__})
    return _CLASSES[key]


class _Scripted(PicklesAsEager):
    """Common to the scriptable copies: keywords in eager calls, the cell's extra inputs, the op's
    backend and parameters."""

    __jit_unused_properties__ = ["stores", "num_directions", "__class__"]

    def __call__(self, *args, **kwargs):
        """Eager calls keep the eager API: `layer(x, state, ctx=c)` as well as `extra={"ctx": c}`."""
        named = {k: kwargs.pop(k) for k in list(kwargs) if k not in ("input", "state", "extra")}
        if named:
            kwargs["extra"] = {**(kwargs.get("extra") or {}), **named}
        return super().__call__(*args, **kwargs)

    def _script_common(self, sizes: dict[str, int]) -> None:
        compiled = self.compiled
        self._script_key = compiled.key
        self._script_name = compiled.name
        self._script_widths = [sizes[compiled.ir.width(name)] for name in compiled.states]
        names = list(compiled.ir.inputs[1:])
        read = set(compiled.plan.inputs_read())
        self._script_extra_names = names
        self._script_extra_sizes = [self.input_sizes[name] for name in names]
        self._script_extra_read = [name in read for name in names]
        self._script_backends = _backends(self.backend, getattr(self, "schedule", None))

    def _script_position(self, names: dict[str, str], sizes: dict[str, int]) -> None:
        """Record one layer and direction: its stored tensors (appended to _script_stored) and the
        program that makes the op's parameters from them. names: store -> attribute name."""
        stored: dict[str, int | None] = {}
        shapes = {}
        for store in stores_of(self.compiled):
            shape = store.shape(sizes)
            shapes[store.name] = shape
            tensor = getattr(self, names[store.name], None)
            if tensor is None:
                stored[store.name] = None
                continue
            if tuple(tensor.shape) != shape:
                raise RuntimeError(f"torch.jit.script: parameter {names[store.name]} has shape "
                                   f"{tuple(tensor.shape)}, the cell needs {shape}")
            stored[store.name] = len(self._script_stored)
            self._script_stored.append(tensor)
        code, floats = program(self.compiled, stored, shapes, sizes)
        self._script_programs.append(code)
        self._script_floats.append(floats)

    def _script_backend(self, x: Tensor) -> str:
        backend = self._script_backends["cpu" if x.device.type == "cpu" else "cuda"]
        if backend == "":
            raise RuntimeError("celldsl: this layer's backend does not run tensors on " + str(x.device))
        return backend

    def _script_extras(self, extra: dict[str, Tensor] | None, forms: list[list[int]], x: Tensor,
                       unbatched: bool, per_step: bool, batch_first: bool) -> list[Tensor]:
        """The extra inputs the cell reads, checked, in declaration order: forms[i] the shapes extra
        input i may have (with -1 for its own size)."""
        out: list[Tensor] = []
        names = self._script_extra_names
        given: dict[str, Tensor] = {} if extra is None else extra
        for name in given.keys():
            if name not in names:
                raise ValueError("cell '" + self._script_name + "' has no extra input '" + name + "'")
        for i, name in enumerate(names):
            if name not in given:
                raise ValueError("cell '" + self._script_name + "' takes the extra input '" + name
                                 + "' (scripted: extra={'" + name + "': tensor})")
            e = given[name]
            size = self._script_extra_sizes[i]
            ok = False
            for form in forms:
                shape = [size if d == -1 else d for d in form]
                if e.size() == shape:
                    ok = True
            if not ok:
                raise RuntimeError("extra input '" + name + "' has the wrong shape " + str(e.size()))
            if e.dtype != x.dtype or e.device != x.device:
                raise RuntimeError("extra input '" + name + "' must have the input's dtype and device")
            if not self._script_extra_read[i]:
                continue
            if per_step:
                out.append(e.unsqueeze(0) if unbatched else e)
                continue
            if unbatched:
                e = e.unsqueeze(-2)
            elif e.dim() == 3 and batch_first:
                e = e.transpose(0, 1)
            if e.dim() == 2:
                e = e.expand(x.size(0), x.size(1), size)
            out.append(e.contiguous())
        return out


class PreparesLayer(_Prepares):
    """Mixin for Recurrent."""


class PreparesStep(_Prepares):
    """Mixin for Cell."""


class _ScriptedLayer(_Scripted, ScriptedLayers):
    """The scripted forward of Recurrent: its layers and directions, each one call of the op (the loop
    LSTM/GRU/RNN's scripted forward runs, nn/scripting.py)."""

    _script_key: str
    _script_name: str
    _script_widths: list[int]
    _script_extra_names: list[str]
    _script_extra_sizes: list[int]
    _script_extra_read: list[bool]
    _script_backends: dict[str, str]
    _script_stored: list[Tensor]
    _script_programs: list[list[int]]
    _script_floats: list[list[float]]
    input_size: int
    hidden_size: int
    num_layers: int
    batch_first: bool
    bidirectional: bool
    dropout: float

    def _prepare_script(self) -> None:
        self._script_common(self._sizes(0))
        self._script_stored, self._script_programs, self._script_floats = [], [], []
        for layer in range(self.num_layers):
            for direction in range(self.num_directions):
                names = {s.name: self._param_name(s.name, layer, direction) for s in stores_of(self.compiled)}
                self._script_position(names, self._sizes(layer))

    def _eager(self, input, state, extra):
        return self._run(input, state, extra_inputs(extra, {}))

    def _script_params(self, idx: int, x: Tensor) -> list[Tensor]:
        return run_program(self._script_programs[idx], self._script_floats[idx], self._script_stored, x)

    def script_call(self, input: Tensor, given: list[Tensor], extra: dict[str, Tensor] | None
                    ) -> tuple[Tensor, list[Tensor]]:
        x, unbatched = self.script_time_major(input)
        if x.size(2) != self.input_size:
            raise RuntimeError("input.size(-1) must be equal to input_size. Expected " + str(self.input_size)
                               + ", got " + str(x.size(2)))
        D = 2 if self.bidirectional else 1
        states: list[Tensor] = []
        for i, width in enumerate(self._script_widths):
            if i < len(given):
                s = given[i].unsqueeze(1) if unbatched else given[i]
                if s.size() != [self.num_layers * D, x.size(1), width]:
                    raise RuntimeError("Expected hidden[" + str(i) + "] size "
                                       + str([self.num_layers * D, x.size(1), width]) + ", got "
                                       + str(s.size()))
                if s.dtype != x.dtype or s.device != x.device:
                    raise RuntimeError("the states must have the input's dtype and device")
            else:
                s = torch.zeros(self.num_layers * D, x.size(1), width, dtype=x.dtype, device=x.device)
            states.append(s.contiguous())
        if unbatched:
            forms = [[x.size(0), -1], [-1]]
        elif self.batch_first:
            forms = [[x.size(1), x.size(0), -1], [x.size(1), -1]]
        else:
            forms = [[x.size(0), x.size(1), -1], [x.size(1), -1]]
        extras = self._script_extras(extra, forms, x, unbatched, False, self.batch_first)
        return self.script_layers(x, unbatched, states, extras, self._script_backend(x))


class _ScriptedStep(_Scripted):
    """The scripted forward of Cell: one call of the op with T = 1."""

    _script_key: str
    _script_name: str
    _script_widths: list[int]
    _script_extra_names: list[str]
    _script_extra_sizes: list[int]
    _script_extra_read: list[bool]
    _script_backends: dict[str, str]
    _script_stored: list[Tensor]
    _script_programs: list[list[int]]
    _script_floats: list[list[float]]
    input_size: int
    hidden_size: int

    def _prepare_script(self) -> None:
        self._script_common(self._sizes())
        self._script_stored, self._script_programs, self._script_floats = [], [], []
        self._script_position({s.name: s.name for s in stores_of(self.compiled)}, self._sizes())

    def _eager(self, input, state, extra):
        out, finals = self._step(input, self._state_list(state), extra_inputs(extra, {}))
        return out, (finals[0] if len(finals) == 1 else tuple(finals))

    def script_call(self, input: Tensor, given: list[Tensor], extra: dict[str, Tensor] | None
                    ) -> tuple[Tensor, list[Tensor]]:
        if input.dim() != 1 and input.dim() != 2:
            raise ValueError("Expected input to be 1D or 2D, got " + str(input.dim()) + "D instead")
        unbatched = input.dim() == 1
        x = input.unsqueeze(0) if unbatched else input
        if x.size(1) != self.input_size:
            raise RuntimeError("input has inconsistent input_size: got " + str(x.size(1)) + " expected "
                               + str(self.input_size))
        states: list[Tensor] = []
        for i, width in enumerate(self._script_widths):
            if i < len(given):
                s = given[i].unsqueeze(0) if unbatched else given[i]
                if s.size() != [x.size(0), width]:
                    raise RuntimeError("Expected hx[" + str(i) + "] size " + str([x.size(0), width])
                                       + ", got "
                                       + str(s.size()))
                if s.dtype != x.dtype or s.device != x.device:
                    raise RuntimeError("the states must have the input's dtype and device")
            else:
                s = torch.zeros(x.size(0), width, dtype=x.dtype, device=x.device)
            states.append(s.contiguous())
        forms = [[-1]] if unbatched else [[x.size(0), -1]]
        extras = self._script_extras(extra, forms, x, unbatched, True, False)
        seq = torch.cat([x] + extras, -1).unsqueeze(0).contiguous()  # T = 1
        params = run_program(self._script_programs[0], self._script_floats[0], self._script_stored, x)
        result = torch.ops.celldsl.cell_sequence(self._script_key, self._script_backend(x), seq, states,
                                                 params, None)
        out = result[0][0]
        finals = result[1 : 1 + len(self._script_widths)]
        if unbatched:
            return out[0], [f[0] for f in finals]
        return out, finals
