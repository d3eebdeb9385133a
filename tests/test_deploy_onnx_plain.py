"""Plain `torch.onnx.export(model, args)` of models holding celldsl layers (issue 27 item 1): no
custom_translation_table. `import celldsl` adds the translation of celldsl::cell_sequence to torch's
exporter (celldsl/export/onnx_hook.py). Before, the plain call failed deep in the exporter ("No ONNX
function found for celldsl.cell_sequence"), and dynamo=False with "unrecognized namespace".
The graphs run in onnxruntime with T and N dynamic and give the model's numbers."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from test_export_torch_onnx import Model

import celldsl
from celldsl.export.model import ExportError
from celldsl.export.torch_onnx import translation_table

pytest.importorskip("onnxscript", reason="torch.onnx.export(dynamo=True) needs onnxscript (the dev extra)")


def plain_export(model, x, dims, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, (x,), dynamic_shapes=(dims,), verbose=False, **kwargs)
    return ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])


def check(model, shapes, dims, **kwargs):
    model.eval()
    session = plain_export(model, torch.randn(*shapes[0]), dims, **kwargs)
    for shape in shapes[1:]:  # other T and N than the exported ones
        x = torch.randn(*shape)
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        with torch.no_grad():
            want = model(x)
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g, w.numpy(), rtol=1e-4, atol=1e-5)


LAYERS = {  # name: (layer, its output width, input shapes [exported, then others], dynamic dims)
    "lstm_2layer_bidir_batch_first": (lambda: celldsl.Recurrent("lstm", 4, 6, num_layers=2,
                                                                bidirectional=True, batch_first=True), 12,
                                      [(2, 5, 4), (3, 7, 4), (1, 1, 4)], {0: "N", 1: "T"}),
    "greff_fgr_prev_states": (lambda: celldsl.Recurrent("greff_fgr", 4, 5, backend="torch"), 5,
                              [(5, 2, 4), (8, 3, 4)], {0: "T", 1: "N"}),
    "slstm_heads": (lambda: celldsl.Recurrent("slstm_heads", 4, 8, num_layers=2, backend="torch"), 8,
                    [(5, 2, 4), (2, 6, 4)], {0: "T", 1: "N"}),
    "torch_nn_gru": (lambda: celldsl.GRU(4, 7, num_layers=2, bidirectional=True), 14,
                     [(5, 2, 4), (3, 1, 4)], {0: "T", 1: "N"}),
}


@pytest.mark.parametrize("name", LAYERS)
def test_plain_torch_onnx_export_runs_in_onnxruntime(name):
    make, width, shapes, dims = LAYERS[name]
    torch.manual_seed(0)
    check(Model(make(), width), shapes, dims)


def test_the_translation_table_still_works_beside_it():
    torch.manual_seed(1)
    layer = celldsl.Recurrent("gru", 4, 5, backend="torch")
    check(Model(layer, 5), [(4, 2, 4), (6, 3, 4)], {0: "T", 1: "N"},
          custom_translation_table=translation_table())


def test_legacy_exporter_refuses_with_the_reason(tmp_path):
    """dynamo=False: one error naming what works (before: "unrecognized namespace celldsl")."""
    layer = celldsl.Recurrent("gru", 4, 5).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ExportError, match="legacy TorchScript-based ONNX exporter \\(dynamo=False\\).*"
                                              "dynamo=True \\(the default"):
            torch.onnx.export(layer, (torch.randn(3, 2, 4),), str(tmp_path / "m.onnx"), dynamo=False)


def test_plain_export_when_torch_loaded_its_exporter_before_celldsl(tmp_path):
    """The order of imports does not matter: torch's exporter imported first, then celldsl."""
    code = textwrap.dedent("""
        import warnings
        warnings.simplefilter("ignore")
        import torch
        import torch.onnx._internal.exporter._registration  # torch's exporter, before celldsl
        import celldsl
        import numpy as np
        import onnxruntime as ort
        torch.manual_seed(0)
        layer = celldsl.Recurrent("mut3", 4, 4, backend="torch").eval()
        program = torch.onnx.export(layer, (torch.randn(3, 2, 4),), dynamic_shapes=({0: "T", 1: "N"},))
        session = ort.InferenceSession(program.model_proto.SerializeToString())
        x = torch.randn(5, 3, 4)
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        print(np.allclose(got, layer(x)[0].detach().numpy(), rtol=1e-4, atol=1e-5))
    """)
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(root)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "True"
