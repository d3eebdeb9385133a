"""torch.ao.quantization.quantize_dynamic over celldsl's layers (issue 27, item 4).

quantize_dynamic picks nn.LSTM & co. by exact type, so celldsl.LSTM (a subclass) silently stayed
float. celldsl has no int8 kernels: the layers stay float, with a NotQuantizedWarning naming each
one, and still give their numbers; the rest of the model is quantized as before.
"""

import warnings

import pytest
import torch
from torch import nn

import celldsl
from celldsl.nn.quantization import NotQuantizedWarning


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = celldsl.LSTM(4, 5)
        self.step = celldsl.GRUCell(4, 5)
        self.any_cell = celldsl.Recurrent("mut1", 4, 4)
        self.head = nn.Linear(5, 2)

    def forward(self, x):
        return self.head(self.rnn(x)[0] + self.step(x[-1]))


def _quantize(model, *args):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quantized = torch.ao.quantization.quantize_dynamic(model, *args)
    return quantized, [str(w.message) for w in caught if issubclass(w.category, NotQuantizedWarning)]


@pytest.mark.parametrize("spec", [({nn.LSTM, nn.GRUCell, nn.Linear}, torch.qint8), ()],
                         ids=["set", "default"])
def test_quantize_dynamic_warns_for_each_layer_it_leaves_float(spec):
    torch.manual_seed(0)
    model = Model().eval()
    x = torch.randn(6, 3, 4)
    quantized, messages = _quantize(model, *spec)
    assert len(messages) == 2
    assert messages[0].startswith("celldsl.LSTM is not quantized: torch.ao.quantization picks torch.nn.LSTM")
    assert messages[1].startswith("celldsl.GRUCell is not quantized")
    assert type(quantized.rnn) is celldsl.LSTM and type(quantized.step) is celldsl.GRUCell
    assert isinstance(quantized.head, torch.ao.nn.quantized.dynamic.Linear)  # the rest: quantized
    torch.testing.assert_close(quantized.rnn(x)[0], model.rnn(x)[0])


def test_no_warning_when_no_recurrent_class_is_asked_for():
    _quantized, messages = _quantize(Model().eval(), {nn.Linear}, torch.qint8)
    assert messages == []


def test_a_layer_named_by_path_warns_too():
    _quantized, messages = _quantize(Model().eval(), {"rnn": torch.ao.quantization.default_dynamic_qconfig})
    assert len(messages) == 1 and messages[0].startswith("celldsl.LSTM is not quantized")


def test_qconfig_is_an_ordinary_attribute_outside_quantization():
    layer = celldsl.LSTM(2, 3)
    assert not hasattr(layer, "qconfig")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer.qconfig = None
    assert layer.qconfig is None
    del layer.qconfig
    assert not hasattr(layer, "qconfig")
