"""`celldsl export CELL --onnx FILE`: every zoo cell as an ONNX Scan, run in onnxruntime at two sequence
lengths and batch sizes (T and N are dynamic) against the torch backend of celldsl.Recurrent."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import zoo
from test_export_c import HOISTED, KITCHEN, ROW_STATE, inputs, reference

from celldsl.cli.main import main
from celldsl.export.model import ExportError, load_cell
from celldsl.export.onnx_graph import OnnxPrinter, onnx_model

ELEMENTWISE = {"mut1", "mut2", "mut3", "indrnn", "mingru", "minlstm", "sru", "qrnn_f", "antisymmetric_rnn",
               "lru"}
OPTIONS = zoo.LAYER_ARGS  # the sizes some cells need


def cell_of(name: str):
    """The cell at small sizes (I = H for cells that read x elementwise), weights from seed 3."""
    return load_cell(name, 8 if name in ELEMENTWISE else 5, 8, seed=3, **OPTIONS.get(name, {}))


def run_onnx(model, cell, x, states, dtype):
    np_type = np.float32 if dtype == "f32" else np.float64
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = {"x": x.numpy().astype(np_type)}
    feed |= {f"state_in_{k}": s.numpy().astype(np_type) for k, s in enumerate(states)}
    result = session.run(None, feed)
    return torch.from_numpy(result[-1]).double(), [torch.from_numpy(r).double() for r in result[:-1]]


def check(cell, dtype: str, tol: float):
    model = onnx_model(cell, dtype)
    for T, N in ((6, 3), (1, 1)):  # one model, two shapes: T and N are dynamic
        x, states = inputs(cell, T, N, seed=T)
        want, want_final = reference(cell, x, states)
        out, finals = run_onnx(model, cell, x, states, dtype)
        torch.testing.assert_close(out, want, rtol=tol, atol=tol)
        for got, w in zip(finals, want_final, strict=True):
            torch.testing.assert_close(got, w, rtol=tol, atol=tol)


@pytest.mark.parametrize("name", zoo.ELEMENTWISE)  # matrix cells: refused (test_export_c.py)
def test_every_zoo_cell_runs_in_onnxruntime(name):
    check(cell_of(name), "f32", 2e-4)


@pytest.mark.parametrize("name", ["lstm", "gru", "slstm_heads", "ln_lstm", "qrnn", "phased_lstm",
                                  "lstm_proj"])
def test_onnx_float64_matches_closely(name):
    check(cell_of(name), "f64", 1e-10)


@pytest.mark.parametrize("text", [KITCHEN, HOISTED, ROW_STATE], ids=["every_function", "hoisted_pointwise",
                                                                     "row_state"])
def test_user_cells(text):
    cell = load_cell(text, 5, 8, seed=2)
    check(cell, "f64", 1e-10)
    check(cell, "f32", 2e-4)


def test_time_loop_is_a_scan_with_dynamic_t_and_n(tmp_path):
    assert main(["export", "lstm", "--onnx", str(tmp_path / "m.onnx"), "--input-size", "5",
                 "--hidden-size", "8"]) == 0
    model = onnx.load(str(tmp_path / "m.onnx"))
    ops = [n.op_type for n in model.graph.node]  # the GEMM weights transposed once, then the loop
    assert ops.count("Scan") == 1 and set(ops) == {"Transpose", "Scan"}
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["T", "N", 5]
    cell = load_cell("lstm", 5, 8)  # the same seed (0): the same weights
    x, states = inputs(cell, 4, 2)
    out, _ = run_onnx(model, cell, x, states, "f32")
    torch.testing.assert_close(out, reference(cell, x, states)[0], rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("bias", [True, False])
def test_weights_from_a_state_dict(tmp_path, bias):
    import celldsl

    torch.manual_seed(5)
    trained = celldsl.Recurrent("gru", 4, 6, bias=bias, backend="torch")
    torch.save(trained.state_dict(), tmp_path / "sd.pt")
    assert main(["export", "gru", "--onnx", str(tmp_path / "g.onnx"), "--input-size", "4",
                 "--hidden-size", "6", "--weights", str(tmp_path / "sd.pt"), "--float64"]) == 0
    cell = load_cell("gru", 4, 6, weights=tmp_path / "sd.pt")
    x, states = inputs(cell, 5, 3)
    out, finals = run_onnx(onnx.load(str(tmp_path / "g.onnx")), cell, x, states, "f64")
    with torch.no_grad():
        want, h = trained.double()(x, states[0][None])
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(finals[0], h[0], rtol=1e-10, atol=1e-10)


def test_unknown_function_is_refused_with_where_it_is():
    import sympy as sp

    from celldsl.export.onnx_graph import Graph

    class bessel(sp.Function):  # noqa: N801 - a function no printer knows
        pass

    x = sp.Symbol("x")
    printer = OnnxPrinter(Graph("f32", [0]), {x: "v0"}, "cell 'c', stage1")
    with pytest.raises(ExportError, match=r"cell 'c', stage1: .*no operator for the function 'bessel'"):
        printer.value(bessel(x))


def test_unknown_cell_is_one_line_error(tmp_path, capsys):
    code = main(["export", "no_such_cell", "--onnx", str(tmp_path / "m.onnx"), "--input-size", "3",
                 "--hidden-size", "4"])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("celldsl: error: no_such_cell: ") and err.count("\n") == 1
