"""A product with diag(a) is the IR's scale node (lang/tensors.py), printed by every backend and export
as a broadcast product: `diag(f) @ S` scales S's rows, `S @ diag(a)` its columns, so an inf in S stays
in its row and column, as in the papers' Diag(f) S Diag(a), where a product with a matrix of zeros
would add 0 * inf = NaN to the other rows. Checked against a hand-written broadcast loop of the
equations: the torch, cpu and triton (interpreter) backends, forward, gradients in float64 and
gradcheck; the ONNX and C exports forward; diag(f) @ diag(d) (a diag the product keeps as a matrix)
likewise."""

from __future__ import annotations

import pytest
import torch
from every_backend import backend_fixture
from test_export_c_matrix import build
from test_export_onnx_matrix import run_onnx

from celldsl.compiler import compile_cell
from celldsl.export.onnx_matrix import matrix_onnx_model
from celldsl.nn.matrix import MatrixRecurrent
from celldsl.targets.triton.matrix_emit import value_width

I = 3
SIZES = {"heads": 2, "K": 3, "V": 5}

# rows and columns scaled in one update: S' = Diag(f) S Diag(a) + k vᵀ
SCALES = """cell scales
input x
state S : (K, V) per head
output o
param W_k, W_f : (K, x) per head
param W_v, W_a : (V, x) per head
k = W_k @ x
v = W_v @ x
f = sigmoid(W_f @ x)
a = sigmoid(W_a @ x)
S' = diag(f) @ S @ diag(a) + k @ vᵀ
o = kᵀ @ S'
"""

# a product of two diags: diag(f) @ diag(d) is the matrix Diag(f d), zero off the diagonal
DIAG_PRODUCT = """cell diagprod
input x
state S : (K, K) per head
state d : K per head
output o
param W_k, W_f : (K, x) per head
k = W_k @ x
f = sigmoid(W_f @ x)
S' = diag(f) @ diag(d) + 0.5 * S + k @ kᵀ
d' = d + k
o = S' @ k
"""


def _params(layer) -> dict:
    return {n: getattr(layer, layer.param_name(n, 0, 0)) for n in layer.ir.params}


def scales_reference(p, x, states):
    """SCALES by hand: f and a as broadcast factors of S's rows and columns."""
    (S,) = states
    outs = []
    for x_t in x:
        k, v = torch.einsum("hki,ni->nhk", p["W_k"], x_t), torch.einsum("hvi,ni->nhv", p["W_v"], x_t)
        f = torch.sigmoid(torch.einsum("hki,ni->nhk", p["W_f"], x_t))
        a = torch.sigmoid(torch.einsum("hvi,ni->nhv", p["W_a"], x_t))
        S = f[..., :, None] * S * a[..., None, :] + k[..., :, None] * v[..., None, :]
        outs.append(torch.einsum("nhk,nhkv->nhv", k, S).flatten(1))
    return torch.stack(outs), [S]


def diag_product_reference(p, x, states):
    """DIAG_PRODUCT by hand: Diag(f) Diag(d) as the diagonal matrix of f * d."""
    S, d = states
    outs = []
    for x_t in x:
        k = torch.einsum("hki,ni->nhk", p["W_k"], x_t)
        f = torch.sigmoid(torch.einsum("hki,ni->nhk", p["W_f"], x_t))
        S = torch.diag_embed(f * d) + 0.5 * S + k[..., :, None] * k[..., None, :]
        d = d + k
        outs.append(torch.einsum("nhkc,nhc->nhk", S, k).flatten(1))
    return torch.stack(outs), [S, d]


CELLS = {"scales": (SCALES, scales_reference), "diagprod": (DIAG_PRODUCT, diag_product_reference)}


def _layer(name, backend):
    torch.manual_seed(0)
    layer = MatrixRecurrent(CELLS[name][0], I, SIZES, backend=backend, dtype=torch.float64)
    with torch.no_grad():  # parameters of ~unit scale (the default init is small: a weak test)
        for p in layer.parameters():
            p.mul_(3.0)
    return layer


def _states(layer, N, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [0.5 * torch.randn(N, *layer.ir.state_shape(s, layer.layer_sizes[0]), generator=g,
                              dtype=torch.float64) for s in layer.ir.states]


def _with_inf(name, states):
    """An inf in S (scales: at row 1, column 2 of one head) or in d (diagprod: Diag(f d)'s entry 1)."""
    states = [s.clone() for s in states]
    if name == "scales":
        states[0][0, 1, 1, 2] = float("inf")
    else:
        states[1][0, 1, 1] = float("inf")
    return states


def test_the_ir_has_scale_nodes_and_no_diag_a_product_reads():
    """diag(f) @ S -> scale(f, S); S @ diag(a) -> scale(S, aᵀ); the diag nodes those products read are
    gone. diag(f) @ diag(d) -> scale(f, diag(d)): diag(d) is used as a matrix and stays."""
    ir = compile_cell(SCALES).ir
    assert not [n for n in ir.nodes if n.op in ("diag", "matmul") and any(
        ir.nodes[j].op == "diag" for j in n.args)]
    assert "diag" not in [n.op for n in ir.nodes]
    rows, cols = [n for n in ir.nodes if n.op == "scale"]
    assert (ir.nodes[rows.args[0]].kind.rows, ir.nodes[rows.args[0]].kind.cols) == ("K", "1")
    assert ir.nodes[cols.args[0]] is rows and ir.nodes[cols.args[1]].op == "transpose"
    assert (ir.nodes[cols.args[1]].kind.rows, ir.nodes[cols.args[1]].kind.cols) == ("1", "V")
    assert [(n.kind.rows, n.kind.cols) for n in (rows, cols)] == [("K", "V"), ("K", "V")]
    ir = compile_cell(DIAG_PRODUCT).ir
    (scale,) = [n for n in ir.nodes if n.op == "scale"]
    assert [ir.nodes[j].op for j in scale.args] == ["pointwise", "diag"]
    assert [n.op for n in ir.nodes].count("diag") == 1


backend = backend_fixture()  # torch, cpu and triton (its interpreter)


@pytest.mark.parametrize("name", CELLS)
def test_an_inf_stays_in_its_row_and_column(name, backend):
    """Forward with an inf in a state: the same finals as the broadcast reference, one inf where the
    reference has it and no NaN; the output (NaN where the reference has one) alike."""
    layer = _layer(name, backend)
    x = torch.randn(4, 2, I, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    states = _with_inf(name, _states(layer, 2))
    with torch.no_grad():
        out, finals = layer(x, tuple(s[None] for s in states))
        want, want_finals = CELLS[name][1](_params(layer), x, states)
    assert torch.isinf(want_finals[0]).sum() == 1 and not torch.isnan(want_finals[0]).any()
    for got, w in zip(finals, want_finals, strict=True):
        torch.testing.assert_close(got[0], w, rtol=1e-10, atol=1e-10)
    assert torch.isfinite(want).sum() > want.numel() // 2  # the inf reaches only its row's outputs
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10, equal_nan=True)


@pytest.mark.parametrize("name", CELLS)
def test_gradients_against_the_reference(name, backend):
    """float64 gradients of the input, the initial states and every parameter against autograd through
    the reference; gradcheck of the loop (not through the Triton interpreter: minutes)."""
    layer = _layer(name, backend)
    x = torch.randn(3, 2, I, generator=torch.Generator().manual_seed(2), dtype=torch.float64,
                    requires_grad=True)
    states = [s.requires_grad_() for s in _states(layer, 2)]
    out, finals = layer(x, tuple(s[None] for s in states))
    finals = [f[0] for f in (finals if isinstance(finals, tuple) else (finals,))]
    want, want_finals = CELLS[name][1](_params(layer), x, states)
    g = torch.Generator().manual_seed(3)
    weights = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in (out, *finals)]
    wrt = [x, *states, *layer.parameters()]

    def loss(values):
        return sum((v * w).sum() for v, w in zip(values, weights, strict=True))

    got = torch.autograd.grad(loss([out, *finals]), wrt)
    for a, b in zip(got, torch.autograd.grad(loss([want, *want_finals]), wrt), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    if backend == "triton":
        return
    params = [p.detach().clone().requires_grad_() for p in layer.parameters()]

    def f(x, *rest):
        out, finals = layer.loop.run(x, list(rest[:len(states)]), list(rest[len(states):]),
                                     layer.layer_sizes[0])
        return (out, *finals)

    assert torch.autograd.gradcheck(f, (x.detach().requires_grad_(), *[s.detach().requires_grad_()
                                                                        for s in states], *params))


def test_triton_splits_the_scaled_columns(monkeypatch):
    """S @ diag(a) scales each column by its own a: no node couples V's blocks, so the Triton loop splits
    V (5 in blocks of 2: 3 programs); forward with the inf and gradients, against the reference."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert value_width(compile_cell(SCALES).ir) == "V"
    layer = _layer("scales", "triton")
    layer.loop.value_block = 2
    assert layer.loop.split == "V" and layer.loop.blocks(layer.layer_sizes[0]) == 3
    x = torch.randn(3, 2, I, generator=torch.Generator().manual_seed(4), dtype=torch.float64,
                    requires_grad=True)
    with torch.no_grad():
        states = _with_inf("scales", _states(layer, 2))
        out, (S,) = layer(x, (states[0][None],))
        want, (S_want,) = scales_reference(_params(layer), x, states)
    torch.testing.assert_close(S[0], S_want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10, equal_nan=True)
    states = [s.requires_grad_() for s in _states(layer, 2)]
    out, (S,) = layer(x, (states[0][None],))
    want, (S_want,) = scales_reference(_params(layer), x, states)
    wrt = [x, *states, *layer.parameters()]
    g1, g2 = torch.randn_like(out), torch.randn_like(S_want)
    got = torch.autograd.grad((out * g1).sum() + (S[0] * g2).sum(), wrt)
    for a, b in zip(got, torch.autograd.grad((want * g1).sum() + (S_want * g2).sum(), wrt), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", CELLS)
def test_onnx_export_keeps_an_inf_in_its_row(name):
    layer = _layer(name, "torch")
    sizes = {**layer.layer_sizes[0]}
    params = {n: p.detach() for n, p in _params(layer).items()}
    model = matrix_onnx_model(layer.ir, sizes, params, "f64")
    x = torch.randn(4, 2, I, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    states = _with_inf(name, _states(layer, 2))
    out, finals = run_onnx(model, x, states, "f64")
    want, want_finals = CELLS[name][1](params, x, states)
    assert torch.isinf(want_finals[0]).sum() == 1 and not torch.isnan(want_finals[0]).any()
    for got, w in zip(finals, want_finals, strict=True):
        torch.testing.assert_close(got, w, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10, equal_nan=True)


@pytest.mark.parametrize("name", CELLS)
def test_c_export_keeps_an_inf_in_its_row(name, tmp_path):
    from c_harness import CC, run_harness

    if CC is None:
        pytest.skip("no C compiler on PATH (the test compiles the export)")
    layer = _layer(name, "torch")
    exe, weights = build(layer, tmp_path, "f64")
    x = torch.randn(4, 2, I, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    states = _with_inf(name, _states(layer, 2))
    out, finals = run_harness(exe, weights, "f64", x, states)
    with torch.no_grad():
        want, want_finals = CELLS[name][1](_params(layer), x, states)
    assert torch.isinf(want_finals[0]).sum() == 1 and not torch.isnan(want_finals[0]).any()
    for got, w in zip(finals, want_finals, strict=True):
        torch.testing.assert_close(got, w, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10, equal_nan=True)


def test_plain_torch_onnx_export_of_a_diag_used_as_a_matrix(tmp_path):
    """torch.onnx.export's translation (export/torch_onnx.py: the same printer on onnx_ir) of DIAG_PRODUCT,
    whose diag(d) is a matrix (a Where on the identity), against the layer in onnxruntime."""
    import onnxruntime as ort

    from celldsl import Recurrent

    torch.manual_seed(0)
    model = Recurrent(DIAG_PRODUCT, I, 6, sizes={"heads": 2}, backend="torch").eval()
    program = torch.onnx.export(model, (torch.randn(5, 2, I),), dynamic_shapes=({0: "T", 1: "N"},))
    program.save(str(tmp_path / "model.onnx"))
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(4, 3, I)
    with torch.no_grad():
        out, finals = model(x)
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    for g, w in zip(got, [out, *finals], strict=True):
        torch.testing.assert_close(torch.from_numpy(g), w, rtol=2e-4, atol=2e-4)
