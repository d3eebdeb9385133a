"""`celldsl export CELL --onnx FILE` of matrix-path cells (export/onnx_matrix.py): every MATRIX and SHAPED
zoo cell, and a user cell, as an ONNX Scan run in onnxruntime at two sequence lengths and batch sizes
with one model (T and N are dynamic), against celldsl.Recurrent(cell, ..., backend="torch") on the same
weights; the user cell also against a hand-written einsum loop of its equations. Then plain
torch.onnx.export of models holding matrix layers (celldsl::matrix_sequence translated to the same
Scan: export/torch_onnx.py)."""

from __future__ import annotations

import io

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import zoo

from celldsl import Recurrent
from celldsl.cli.main import main
from celldsl.export import onnx_graph
from celldsl.export.model import ExportError, load_matrix_cell
from celldsl.export.onnx_matrix import matrix_onnx_model
from celldsl.lang.errors import CellError

I, H = 5, 8
SIZES = {  # every cell at small sizes, two heads where it has heads (mamba is one head by design)
    "deltanet": {"heads": 2}, "gated_deltanet": {"heads": 2}, "hgrn2": {"heads": 2}, "m2rnn": {"heads": 2},
    "mlstm": {"heads": 2}, "gla": {"heads": 2, "R": 3}, "rwkv6": {"heads": 2, "R": 3, "R_d": 2},
    "mamba": {"D": 4, "N_s": 3, "R": 2, "O": H}, "flstm": {"R": 3},
}

USER = """cell usermat
input x
state S : (K, V) per head
state z : 1 per head
output o
param W_k, W_q : (K, x) per head
param W_v : (V, x) per head
param a : K per head
param s : scalar
k = W_k @ x
v = W_v @ (x + prev(x, 2))
q = W_q @ x / sqrt(K)
g = sigmoid(diag(a) @ k)
S' = diag(g) @ S + k @ vᵀ - 0.1 * (I @ S) * mean(S)
z' = max(S') - min(S') + sum(k) * s + z * 0.5
o = qᵀ @ S' + z'
"""


def layer_of(compiled, sizes, params):
    """The torch-backend layer holding exactly these float64 parameters."""
    given = {k: v for k, v in sizes.items() if k != compiled.ir.inputs[0]}
    if not compiled.ir.heads:
        given.pop("heads")
        given.pop("H")
    layer = Recurrent(compiled, I, H, sizes=given, backend="torch", dtype=torch.float64)
    layer.load_state_dict({f"{n}_l0": p for n, p in params.items()})
    return layer


def states_of(compiled, sizes, N, seed):
    """Random states as the ONNX model takes them: [N, heads, rows, cols] without the 1 axes."""
    g = torch.Generator().manual_seed(seed)
    return [0.3 * torch.randn(N, *compiled.ir.state_shape(s, sizes), generator=g, dtype=torch.float64)
            for s in compiled.ir.states]


def reference(layer, x, states):
    """Recurrent's forward: its states are [L * D, N, ...] (a cell without heads: no heads axis)."""
    ir = layer.ir
    given = tuple(s[None] if ir.heads else s.reshape(1, s.shape[0], -1) for s in states)
    with torch.no_grad():
        out, finals = layer(x, given if ir.heads or len(given) > 1 else given[0])
    finals = finals if isinstance(finals, tuple) else (finals,)
    return out, [f[0].reshape(s.shape) for f, s in zip(finals, states, strict=True)]


def run_onnx(model, x, states, dtype):
    np_type = np.float32 if dtype == "f32" else np.float64
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = {"x": x.numpy().astype(np_type)}
    feed |= {f"state_in_{k}": s.numpy().astype(np_type) for k, s in enumerate(states)}
    got = dict(zip([o.name for o in session.get_outputs()], session.run(None, feed), strict=True))
    return (torch.from_numpy(got["out"]).double(),
            [torch.from_numpy(got[f"state_out_{k}"]).double() for k in range(len(states))])


def check(compiled, sizes, params, dtype, tol, want_of=None):
    """One model, two (T, N): onnxruntime against the torch backend (or `want_of(x, states)`)."""
    model = matrix_onnx_model(compiled.ir, sizes, params, dtype)
    layer = layer_of(compiled, sizes, params)
    for T, N in ((7, 3), (2, 1)):
        x = torch.randn(T, N, I, generator=torch.Generator().manual_seed(T), dtype=torch.float64)
        states = states_of(compiled, sizes, N, T)
        want, want_finals = (want_of or (lambda x, s: reference(layer, x, s)))(x, states)
        out, finals = run_onnx(model, x, states, dtype)
        torch.testing.assert_close(out, want, rtol=tol, atol=tol)
        for got, w in zip(finals, want_finals, strict=True):
            torch.testing.assert_close(got, w, rtol=tol, atol=tol)


@pytest.mark.parametrize("name", zoo.MATRIX + zoo.SHAPED)
def test_every_matrix_zoo_cell_runs_in_onnxruntime(name):
    compiled, sizes, params = load_matrix_cell(name, I, H, seed=3, sizes=SIZES[name])
    check(compiled, sizes, params, "f64", 1e-10)
    check(compiled, sizes, params, "f32", 2e-4)


def user_reference(params, K):
    """USER's equations as an einsum loop, written from the cell text."""
    Wk, Wq, Wv, a, s = (params[n] for n in ("W_k", "W_q", "W_v", "a", "s"))

    def run(x, states):
        S, z = states
        shifted = torch.cat([torch.zeros_like(x[:2]), x[:-2]])[:len(x)]
        outs = []
        for t in range(len(x)):
            k = torch.einsum("hki,ni->nhk", Wk, x[t])
            v = torch.einsum("hvi,ni->nhv", Wv, x[t] + shifted[t])
            q = torch.einsum("hki,ni->nhk", Wq, x[t]) / K**0.5
            g = torch.sigmoid(a * k)
            S = g[..., None] * S + k[..., None] * v[..., None, :] - 0.1 * S * S.mean((-2, -1), keepdim=True)
            z = S.amax((-2, -1)) - S.amin((-2, -1)) + k.sum(-1) * s + z * 0.5
            outs.append((torch.einsum("nhk,nhkv->nhv", q, S) + z[..., None]).flatten(1))
        return torch.stack(outs), [S, z]

    return run


def test_user_cell_with_a_matrix_state():
    """prev(x, 2), diag, I, a width read as a number, sum/mean/max/min, a shared scalar, a `1` state."""
    compiled, sizes, params = load_matrix_cell(USER, I, H, seed=1, sizes={"heads": 2})
    check(compiled, sizes, params, "f64", 1e-10, user_reference(params, sizes["K"]))
    check(compiled, sizes, params, "f32", 2e-4)


def test_graph_is_projections_then_one_scan_with_dynamic_t_and_n():
    compiled, sizes, params = load_matrix_cell("mlstm", I, H, sizes={"heads": 2})
    model = matrix_onnx_model(compiled.ir, sizes, params)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Scan") == 1 and "MatMul" in ops  # the input projections before the loop
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["T", "N", I]
    assert [i.name for i in model.graph.input] == ["x", "state_in_0", "state_in_1", "state_in_2"]
    assert [o.name for o in model.graph.output] == ["state_out_0", "state_out_1", "state_out_2", "out"]
    body = next(n for n in model.graph.node if n.op_type == "Scan").attribute[0].g
    assert "MatMul" in {n.op_type for n in body.node}  # C' @ q in the step


def test_cli_with_weights_and_sizes(tmp_path, capsys):
    """--weights: a saved one-layer MatrixRecurrent state_dict; --sizes heads=2; float32 by default."""
    torch.manual_seed(5)
    layer = Recurrent("mlstm", I, H, sizes={"heads": 2}, backend="torch")
    torch.save(layer.state_dict(), tmp_path / "layer.pt")
    path = tmp_path / "m.onnx"
    assert main(["export", "mlstm", "--onnx", str(path), "--input-size", str(I), "--hidden-size", str(H),
                 "--weights", str(tmp_path / "layer.pt"), "--sizes", "heads=2"]) == 0
    assert capsys.readouterr().out.strip() == str(path)
    model = onnx.load(str(path))
    for T, N in ((6, 2), (3, 5)):
        x = torch.randn(T, N, I)
        states = [torch.zeros(N, *layer.ir.state_shape(s, layer.layer_sizes[0])) for s in layer.ir.states]
        with torch.no_grad():
            want, want_finals = layer(x)
        out, finals = run_onnx(model, x.double(), [s.double() for s in states], "f32")
        torch.testing.assert_close(out.float(), want, rtol=2e-4, atol=2e-4)
        for got, w in zip(finals, want_finals, strict=True):
            torch.testing.assert_close(got.float(), w[0], rtol=2e-4, atol=2e-4)


def test_cli_refusals_say_why(tmp_path, capsys):
    """Weights of other sizes, --input-sizes, several layers: one line each, exit 1, no traceback."""
    layer = Recurrent("mlstm", I, H, sizes={"heads": 2}, num_layers=2)
    torch.save(layer.state_dict(), tmp_path / "two.pt")
    torch.save({k: v for k, v in layer.state_dict().items() if k.endswith("_l0")}, tmp_path / "one.pt")
    base = ["export", "mlstm", "--onnx", str(tmp_path / "m.onnx"), "--input-size", str(I), "--hidden-size",
            str(H)]
    cases = [(["--weights", str(tmp_path / "one.pt"), "--sizes", "heads=4"], "does not fit cell 'mlstm'"),
             (["--weights", str(tmp_path / "two.pt"), "--sizes", "heads=2"], "one layer and one direction"),
             (["--input-sizes", "t=1"], "takes no --input-sizes"),
             (["--sizes", "heads=3"], "divides hidden_size")]
    for extra, message in cases:
        assert main(base + extra) == 1
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and err.startswith("celldsl: error:"), err
    with pytest.raises(ExportError, match="has no matrix state"):
        load_matrix_cell("lstm", I, H)


def test_what_the_printer_cannot_express_is_refused_located(monkeypatch):
    """A function without an ONNX spelling (tanh, taken away here) is a CellError at the equation that
    uses it, never a wrong model."""
    monkeypatch.delitem(onnx_graph.UNARY, "tanh")
    compiled, sizes, params = load_matrix_cell("m2rnn", I, H, sizes={"heads": 2})
    with pytest.raises(CellError, match="the ONNX export cannot print this") as err:
        matrix_onnx_model(compiled.ir, sizes, params)
    lines = (zoo.CELLS / "m2rnn.cell").read_text(encoding="utf-8").splitlines()
    assert err.value.line == next(i for i, line in enumerate(lines, 1) if line.startswith("H' ="))


PLAIN = [("mlstm", {"heads": 2}, "auto"), ("gla", {"heads": 2, "R": 3}, "torch"),
         ("rwkv6", {"heads": 2, "R": 3, "R_d": 2}, "torch"), ("mamba", SIZES["mamba"], "auto"),
         ("flstm", {"R": 3}, "torch"), (USER, {"heads": 2}, "torch")]


@pytest.mark.parametrize(("name", "sizes", "backend"), PLAIN, ids=["mlstm", "gla", "rwkv6", "mamba", "flstm",
                                                                    "user"])
def test_plain_torch_onnx_export_of_matrix_layers(tmp_path, name, sizes, backend):
    """torch.onnx.export(model, (x,)) with no translation table: each layer and direction's
    celldsl::matrix_sequence becomes onnx_matrix's Scan (two layers, bidirectional; then batch_first),
    T and N dynamic, against the model at other T and N than the traced ones (the user cell: the
    reductions at the exporter's opset, where their axes are an input)."""
    for layers, bidirectional, batch_first in ((2, True, False), (1, False, True)):
        torch.manual_seed(0)
        model = Recurrent(name, I, H, sizes=sizes, num_layers=layers, bidirectional=bidirectional,
                          batch_first=batch_first, backend=backend).eval()
        x = torch.randn(3, 6, I) if batch_first else torch.randn(6, 3, I)
        dims = {0: "N", 1: "T"} if batch_first else {0: "T", 1: "N"}
        program = torch.onnx.export(model, (x,), dynamic_shapes=(dims,))
        program.save(str(tmp_path / "model.onnx"))
        session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
        assert sum(n.op_type == "Scan" for n in onnx.load(str(tmp_path / "model.onnx")).graph.node) == \
            layers * (1 + bidirectional)
        for T, N in ((9, 2), (2, 4)):
            x = torch.randn(N, T, I) if batch_first else torch.randn(T, N, I)
            with torch.no_grad():
                out, finals = model(x)
            finals = finals if isinstance(finals, tuple) else (finals,)
            got = session.run(None, {session.get_inputs()[0].name: x.numpy()})
            assert len(got) == 1 + len(finals)
            for g, w in zip(got, [out, *finals], strict=True):
                torch.testing.assert_close(torch.from_numpy(g), w, rtol=2e-4, atol=2e-4)


def test_legacy_exporter_refuses_matrix_layers_with_the_reason():
    """dynamo=False meets celldsl::matrix_sequence: celldsl's refusal naming dynamo=True, not torch's
    "unrecognized namespace"."""
    model = Recurrent("mlstm", I, H, sizes={"heads": 2}, backend="torch").eval()
    with pytest.raises(ExportError, match="dynamo=True"):
        torch.onnx.export(model, (torch.randn(4, 2, I),), io.BytesIO(), dynamo=False)


def test_packed_op_calls_are_refused():
    """The translation takes padded sequences only: a call with lengths is an ExportError."""
    from celldsl.export.torch_onnx import matrix_sequence

    layer = Recurrent("mlstm", I, H, sizes={"heads": 2}, backend="torch")
    with pytest.raises(ExportError, match="padded sequences only"):
        matrix_sequence(layer.compiled.key, "torch", None, [], [], "heads=2", lengths=object())


def test_diag_keeps_an_inf_of_the_state_in_its_row():
    """gla's diag(alpha) @ S as a scaling of S's rows: MatMul with the diagonal matrix added 0 * inf = NaN
    to every other row of an inf's column (the torch loop, checked against the einsum reference in
    tests/test_matrix_reliability.py, keeps the inf in its row)."""
    compiled, sizes, params = load_matrix_cell("gla", I, H, seed=3, sizes=SIZES["gla"])
    model = matrix_onnx_model(compiled.ir, sizes, params, "f64")
    x = torch.randn(4, 2, I, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    states = states_of(compiled, sizes, 2, 0)
    states[0][0, 0, 0, 0] = float("inf")
    out, finals = run_onnx(model, x, states, "f64")
    want, want_finals = reference(layer_of(compiled, sizes, params), x, states)
    assert torch.isinf(want_finals[0]).sum() == 1 and not torch.isnan(want_finals[0]).any()
    torch.testing.assert_close(finals[0], want_finals[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10, equal_nan=True)
