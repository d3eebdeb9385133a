"""torch.onnx.export (the default, torch.export-based exporter) of models holding celldsl layers, with
celldsl's translation of its op: the graph runs in onnxruntime and gives the model's numbers, with T and
N dynamic, for multi-layer, bidirectional and batch_first layers and the torch.nn-style classes."""

from __future__ import annotations

import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch
from test_export_c import KITCHEN

import celldsl
from celldsl.export.torch_onnx import translation_table

pytest.importorskip("onnxscript", reason="torch.onnx.export(dynamo=True) needs onnxscript (the dev extra)")


class Model(torch.nn.Module):
    """A layer, then a linear read-out of its output, plus its first final state."""

    def __init__(self, layer, width):
        super().__init__()
        self.layer, self.head = layer, torch.nn.Linear(width, 3)

    def forward(self, x):
        out, state = self.layer(x)
        first = state if isinstance(state, torch.Tensor) else state[0]
        return self.head(out), first


def exported(model, x, path, dims):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, (x,), dynamo=True, custom_translation_table=translation_table(),
                                    dynamic_shapes=(dims,), verbose=False)
    program.save(str(path))
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def check(model, shapes, path, dims):
    model.eval()
    session = exported(model, torch.randn(*shapes[0]), path, dims)
    for shape in shapes:  # other T and N than the traced ones
        x = torch.randn(*shape)
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        with torch.no_grad():
            want = model(x)
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g, w.numpy(), rtol=1e-4, atol=1e-5)


def test_stacked_bidirectional_batch_first_lstm(tmp_path):
    torch.manual_seed(0)
    layer = celldsl.Recurrent("lstm", 4, 6, num_layers=2, bidirectional=True, batch_first=True,
                              backend="torch")
    check(Model(layer, 12), [(2, 5, 4), (3, 7, 4), (1, 1, 4)], tmp_path / "m.onnx", {0: "N", 1: "T"})


@pytest.mark.parametrize("cell", ["gru", "qrnn", "slstm_heads", KITCHEN], ids=["gru", "qrnn", "slstm_heads",
                                                                                 "every_function"])
def test_cells(tmp_path, cell):
    torch.manual_seed(1)
    layer = celldsl.Recurrent(cell, 5, 8, num_layers=2, backend="torch")
    check(Model(layer, 8), [(6, 2, 5), (3, 4, 5)], tmp_path / "m.onnx", {0: "T", 1: "N"})


def test_torch_nn_style_classes_and_cpu_backend(tmp_path):
    torch.manual_seed(2)
    layer = celldsl.GRU(5, 7, num_layers=2)  # backend "auto": the compiled C kernels when run on the CPU
    check(Model(layer, 7), [(4, 3, 5), (2, 1, 5)], tmp_path / "m.onnx", {0: "T", 1: "N"})
