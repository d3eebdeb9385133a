"""Helpers for the tests ported from PyTorch's test suite (test_torch_nn_tests.py,
test_torch_module_tests.py): torch's TestCase assertions as functions, and the class pairs.

torch's `self.assertEqual(a, b)` on tensors is torch.testing.assert_close with the dtype's default
tolerances; `assertNotEqual` passes where assertEqual would fail.
"""

from __future__ import annotations

import torch
from torch import nn

import celldsl

# torch's class -> celldsl's: the pairs every ported test runs
LAYERS = {"RNN": (nn.RNN, celldsl.RNN), "GRU": (nn.GRU, celldsl.GRU), "LSTM": (nn.LSTM, celldsl.LSTM)}
CELLS = {"RNNCell": (nn.RNNCell, celldsl.RNNCell), "GRUCell": (nn.GRUCell, celldsl.GRUCell),
         "LSTMCell": (nn.LSTMCell, celldsl.LSTMCell)}


def assert_equal(actual, expected, **tolerances) -> None:
    """torch's TestCase.assertEqual for tensors, tuples/lists of tensors and PackedSequences."""
    torch.testing.assert_close(_tensors(actual), _tensors(expected), **tolerances)


def assert_not_equal(actual, expected, **tolerances) -> None:
    try:
        assert_equal(actual, expected, **tolerances)
    except AssertionError:
        return
    raise AssertionError(f"expected the values to differ, they are equal within tolerance:\n{actual}")


def _tensors(value):
    if isinstance(value, nn.utils.rnn.PackedSequence):
        return value.data
    if isinstance(value, (tuple, list)):
        return tuple(_tensors(v) for v in value)
    return value


def pair(kind: str, *args, **kwargs):
    """(torch's module, celldsl's with the same state_dict): torch's class is the control."""
    torch_cls, ours_cls = {**LAYERS, **CELLS}[kind]
    ref = torch_cls(*args, **kwargs)
    ours = ours_cls(*args, **kwargs)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def grads(module: nn.Module) -> list:
    return [p.grad for p in module.parameters()]
