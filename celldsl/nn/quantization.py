"""torch.ao.quantization over celldsl's LSTM/GRU/RNN and their cells: a warning, not silent float.

`quantize_dynamic(model, {nn.LSTM, nn.Linear}, torch.qint8)` picks modules by exact type, so a
celldsl.LSTM (a subclass of nn.LSTM) gets no qconfig and stays float without a word; one named by
its path gets a qconfig but no quantized class to become. celldsl has no int8 kernels, so these
layers stay float either way; `NotQuantizedWarning` says so when torch's quantization passes meet
one: every flow assigns `module.qconfig` through `propagate_qconfig_`, and the property below sees
that assignment and the qconfig table being propagated.
"""

from __future__ import annotations

import importlib
import inspect
import warnings

from ..lang.errors import CellWarning


class NotQuantizedWarning(CellWarning):
    """A celldsl layer that torch's quantization would have quantized as its torch.nn base class."""


class WarnsWhenNotQuantized:
    """Mixin for celldsl's subclasses of torch.nn's recurrent classes: `qconfig` as an ordinary
    attribute, plus the warning when quantization asks for this layer (or its base class)."""

    @property
    def qconfig(self):
        try:
            return self.__dict__["_qconfig"]
        except KeyError:
            raise AttributeError(f"'{type(self).__name__}' object has no attribute 'qconfig'") from None

    @qconfig.setter
    def qconfig(self, value):
        self.__dict__["_qconfig"] = value
        base = _asked_for(self, value, _propagated_table())
        if base is not None:
            name = f"celldsl.{type(self).__name__}"
            warnings.warn(
                f"{name} is not quantized: torch.ao.quantization picks torch.nn.{base.__qualname__} by "
                f"exact type and has no quantized class for {name}, which stays in floating point (celldsl "
                f"has no int8 kernels). To quantize it, load its state_dict into a {base.__qualname__} and "
                "quantize that; to silence this, leave it out of the qconfig table.",
                NotQuantizedWarning, stacklevel=3)

    @qconfig.deleter
    def qconfig(self):
        self.__dict__.pop("_qconfig", None)


def _propagated_table() -> dict | None:
    """The qconfig table torch.ao.quantization's propagate_qconfig_ is applying, if it is on the stack."""
    quantize = importlib.import_module("torch.ao.quantization.quantize")  # (the package has a quantize())
    code = inspect.unwrap(quantize.propagate_qconfig_).__code__  # under its deprecation wrapper
    frame = inspect.currentframe()
    while frame is not None:
        if frame.f_code is code:
            table = frame.f_locals.get("qconfig_dict")
            return table if isinstance(table, dict) else None
        frame = frame.f_back
    return None


def _asked_for(module, value, table: dict | None):
    """The torch.nn class quantization meant for `module` (None: it was not asked to quantize it)."""
    if table is None:
        return None
    bases = [t for t in type(module).__mro__ if t.__module__.startswith("torch.nn.modules.rnn")]
    if value is not None:  # this layer was given a qconfig (by path, or by its own type)
        return bases[0] if bases else type(module)
    for t, qconfig in table.items():
        if isinstance(t, type) and t in bases and qconfig is not None:
            return t
    return None
