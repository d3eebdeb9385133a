"""What the scriptable layer copies (nn/script_any.py, nn/script_matrix.py) share: their typed
forwards, written once, and pickling as the eager class.

TorchScript needs a tuple's length in a signature, so each number of states has its own forward:

    forward(input, state: Optional[Tuple[Tensor, ...n]] = None, extra: Optional[Dict[str, Tensor]] = None)
        -> (output, Tuple[Tensor, ...n])

or, for `BareState`, one state as a bare Tensor in and out. Each is a mixin put first in the copy's
class: scripted, it packs the state into a list, calls the body's
`script_call(input, given: List[Tensor], extra) -> (output, List[Tensor])` and unpacks the finals;
eagerly (torch.jit.script puts the copy in its parent's place) it calls the body's
`_eager(input, state, extra)`, the layer's own forward.
"""

import copyreg

import torch
from torch import Tensor

MAX_STATES = 6  # one mixin per number of states


class PicklesAsEager:
    """A copy whose class is made from its eager class `_script_base`: pickle sees the eager class, so
    the copy pickles as the layer itself, and torch.load(weights_only=True) with celldsl.safe_globals()
    loads a model scripted before saving."""

    __jit_unused_properties__ = ["__class__"]

    @property
    def __class__(self):
        return self._script_base

    def __reduce_ex__(self, protocol):
        """The eager class's own state (its __getstate__: MatrixRecurrent leaves out its loop, which
        holds a module), less the copy's _script_ attributes."""
        state = self._script_base.__getstate__(self)
        state = {k: v for k, v in state.items() if not k.startswith("_script_")}
        return copyreg.__newobj__, (self._script_base,), state


class BareState:
    """One state, a bare Tensor."""

    def forward(self, input: Tensor, state: Tensor | None = None,
                extra: dict[str, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        if torch.jit.is_scripting():
            given: list[Tensor] = []
            if state is not None:
                given = [state]
            out, f = self.script_call(input, given, extra)
            return out, f[0]
        return self._eager(input, state, extra)


class States1:
    def forward(self, input: Tensor, state: tuple[Tensor] | None = None,
                extra: dict[str, Tensor] | None = None) -> tuple[Tensor, tuple[Tensor]]:
        if torch.jit.is_scripting():
            given: list[Tensor] = []
            if state is not None:
                given = [state[0]]
            out, f = self.script_call(input, given, extra)
            return out, (f[0],)
        return self._eager(input, state, extra)


class States2:
    def forward(self, input: Tensor, state: tuple[Tensor, Tensor] | None = None,
                extra: dict[str, Tensor] | None = None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        if torch.jit.is_scripting():
            given: list[Tensor] = []
            if state is not None:
                given = [state[0], state[1]]
            out, f = self.script_call(input, given, extra)
            return out, (f[0], f[1])
        return self._eager(input, state, extra)


class States3:
    def forward(self, input: Tensor, state: tuple[Tensor, Tensor, Tensor] | None = None,
                extra: dict[str, Tensor] | None = None) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
        if torch.jit.is_scripting():
            given: list[Tensor] = []
            if state is not None:
                given = [state[0], state[1], state[2]]
            out, f = self.script_call(input, given, extra)
            return out, (f[0], f[1], f[2])
        return self._eager(input, state, extra)


class States4:
    def forward(self, input: Tensor, state: tuple[Tensor, Tensor, Tensor, Tensor] | None = None,
                extra: dict[str, Tensor] | None = None
                ) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor, Tensor]]:
        if torch.jit.is_scripting():
            given: list[Tensor] = []
            if state is not None:
                given = [state[0], state[1], state[2], state[3]]
            out, f = self.script_call(input, given, extra)
            return out, (f[0], f[1], f[2], f[3])
        return self._eager(input, state, extra)


class States5:
    def forward(self, input: Tensor, state: tuple[Tensor, Tensor, Tensor, Tensor, Tensor] | None = None,
                extra: dict[str, Tensor] | None = None
                ) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor, Tensor, Tensor]]:
        if torch.jit.is_scripting():
            given: list[Tensor] = []
            if state is not None:
                given = [state[0], state[1], state[2], state[3], state[4]]
            out, f = self.script_call(input, given, extra)
            return out, (f[0], f[1], f[2], f[3], f[4])
        return self._eager(input, state, extra)


class States6:
    def forward(self, input: Tensor,
                state: tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor] | None = None,
                extra: dict[str, Tensor] | None = None
                ) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]]:
        if torch.jit.is_scripting():
            given: list[Tensor] = []
            if state is not None:
                given = [state[0], state[1], state[2], state[3], state[4], state[5]]
            out, f = self.script_call(input, given, extra)
            return out, (f[0], f[1], f[2], f[3], f[4], f[5])
        return self._eager(input, state, extra)


_TUPLES = (States1, States2, States3, States4, States5, States6)


def arity_forward(n: int, bare: bool = False) -> type:
    """The mixin whose forward takes and returns n states: a tuple of n, or (bare, n = 1) one Tensor."""
    if bare:
        if n != 1:
            raise ValueError(f"a bare-Tensor state is one state, not {n}")
        return BareState
    if not 1 <= n <= MAX_STATES:
        raise ValueError(f"a scripted layer takes 1 to {MAX_STATES} states, not {n}")
    return _TUPLES[n - 1]
