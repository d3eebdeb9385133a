"""Reliability of the deployment paths: an export, or an eager backend, that runs must give the
numbers of the others and of the cell's equations, also at values where two spellings of one function
part (found by a probe of docs/deploy.md's paths: torch.onnx.export, `celldsl export --c/--onnx`,
torch.export, TorchScript); and bad export arguments are one located line, never a traceback."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from c_harness import compile_harness, needs_cc, run_harness

import celldsl
from celldsl.export.c_library import c_name, write_c
from celldsl.export.c_matrix import write_layer_library
from celldsl.export.model import load_cell
from celldsl.export.onnx_graph import onnx_model
from celldsl.export.onnx_matrix import matrix_onnx_model
from celldsl.targets.c import fused as cpu_fused

EAGER = ["torch", pytest.param("cpu", marks=pytest.mark.skipif(cpu_fused.compiler() is None,
                                                               reason="the cpu backend needs a C compiler"))]


def formula_mod(a, b):
    """The language's mod as docs/language.md defines it: a - b floor(a / b). torch.remainder differs
    where a / b rounds to an integer (mod(-140, 0.7): 0 here, 0.7 - 9e-15 there) and where b is
    infinite (NaN here)."""
    return a - b * torch.floor(a / b)


def session(model):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


# ---- mod: every backend and export computes it as written -----------------------------------------

MOD_CELL = """cell modcell
input x
state h
output h
param g
h' = mod(x, 0.7) + mod(g, x) + 0.5 * h
"""
MOD_X = [-140.0, -126.0, -138.6, 2.1, 20.5, -20.5, -0.3, float("inf"), float("-inf"), 0.25]  # I = H = 10


def mod_inputs():
    x = torch.tensor(MOD_X, dtype=torch.float64).repeat(3, 2, 1)  # [T=3, N=2, 10]
    x[1] = x[1].flip(-1)
    return x


def mod_reference(x, g):
    """The cell's equations as a torch loop, h starting at zero."""
    h, out = torch.zeros_like(x[0]), []
    for x_t in x:
        h = formula_mod(x_t, 0.7) + formula_mod(g, x_t) + 0.5 * h
        out.append(h)
    return torch.stack(out), h


def test_the_formula_differs_from_torch_remainder_at_these_values():
    """Else the tests below could not tell the two spellings apart."""
    x = mod_inputs()
    assert not torch.allclose(formula_mod(x, 0.7), torch.remainder(x, 0.7), equal_nan=True)
    assert not torch.equal(formula_mod(0.3, x).isnan(), torch.remainder(torch.tensor(0.3), x).isnan())


@pytest.mark.parametrize("backend", EAGER)
def test_mod_on_each_eager_backend_is_the_cells_formula(backend):
    """The torch backend printed torch.remainder, the cpu (C), Triton and ONNX printers the formula:
    a layer trained on backend="torch" and exported gave other numbers at such values."""
    torch.manual_seed(0)
    layer = celldsl.Recurrent(MOD_CELL, 10, 10, backend=backend, dtype=torch.float64)
    x = mod_inputs()
    with torch.no_grad():
        out, h = layer(x)
    want_out, want_h = mod_reference(x, layer.g_l0.detach())
    torch.testing.assert_close(out, want_out, rtol=1e-12, atol=1e-12, equal_nan=True)
    torch.testing.assert_close(h[0], want_h, rtol=1e-12, atol=1e-12, equal_nan=True)


def test_mod_in_the_onnx_export_is_the_cells_formula():
    cell = load_cell(MOD_CELL, 10, 10, seed=0)
    x = mod_inputs()
    s = session(onnx_model(cell, "f64"))
    got = s.run(None, {"x": x.numpy(), "state_in_0": np.zeros((2, 10))})
    want_out, want_h = mod_reference(x, cell.layer.g_l0.detach())
    torch.testing.assert_close(torch.from_numpy(got[-1]), want_out, rtol=1e-12, atol=1e-12, equal_nan=True)
    torch.testing.assert_close(torch.from_numpy(got[0]), want_h, rtol=1e-12, atol=1e-12, equal_nan=True)


@needs_cc
def test_mod_in_the_c_export_is_the_cells_formula(tmp_path):
    cell = load_cell(MOD_CELL, 10, 10, seed=0)
    x = mod_inputs()
    exe = compile_harness(write_c(cell, tmp_path, "f64")[0], "f64")
    out, finals = run_harness(exe, tmp_path / f"{c_name(cell)}.bin", "f64", x, [torch.zeros(2, 10,
                                                                                              dtype=torch.float64)])
    want_out, want_h = mod_reference(x, cell.layer.g_l0.detach())
    torch.testing.assert_close(out, want_out, rtol=1e-12, atol=1e-12, equal_nan=True)
    torch.testing.assert_close(finals[0], want_h, rtol=1e-12, atol=1e-12, equal_nan=True)


# The matrix path: k = mod(W_k @ x, 0.7) in the step, and u of prev(x), which the matrix path computes
# before its loop (targets/matrix_hoist.py); W_k is the identity per head, so that mod's argument is x
# itself on every backend (no sum whose order could move it across a multiple of 0.7).
MOD_MATRIX = """cell modmat
input x
state S : (K, V) per head
output o
param W_k : (K, x) per head
param W_v : (V, x) per head
param W_q : (K, x) per head
k = mod(W_k @ x, 0.7)
u = mod(W_k @ prev(x), 0.7)
v = W_v @ x
q = W_q @ x
S' = 0.5 * S + k @ vᵀ + u @ vᵀ
o = qᵀ @ S'
"""
HEADS, K = 2, 3


def modmat_layer(backend):
    torch.manual_seed(0)
    layer = celldsl.Recurrent(MOD_MATRIX, K, HEADS * K, sizes={"heads": HEADS, "K": K, "V": K},
                              backend=backend, dtype=torch.float64)
    with torch.no_grad():
        layer.W_k_l0.copy_(torch.eye(K, dtype=torch.float64).expand_as(layer.W_k_l0))
    return layer


def modmat_inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 2, K, generator=g, dtype=torch.float64)
    # where the formula and torch.remainder part (-140, -126, -138.6, 2.1) and where they agree
    x[:, :, 0] = torch.tensor([-140.0, -126.0, -138.6, 2.1, -0.3, 20.5, 3.5, -7.7]).reshape(4, 2)
    return x


def modmat_reference(layer, x):
    """The cell's equations with einsum, S starting at zero: out [T, N, heads * V], S [N, heads, K, V]."""
    w = {n: getattr(layer, f"{n}_l0").detach().reshape(HEADS, K, K) for n in ("W_k", "W_v", "W_q")}
    S, out = torch.zeros(x.shape[1], HEADS, K, K, dtype=torch.float64), []
    previous = torch.cat([torch.zeros_like(x[:1]), x[:-1]])  # prev(x): zero before the first step
    for x_t, p_t in zip(x, previous, strict=True):
        k = formula_mod(torch.einsum("hki,ni->nhk", w["W_k"], x_t), 0.7)
        u = formula_mod(torch.einsum("hki,ni->nhk", w["W_k"], p_t), 0.7)
        v = torch.einsum("hvi,ni->nhv", w["W_v"], x_t)
        q = torch.einsum("hki,ni->nhk", w["W_q"], x_t)
        S = 0.5 * S + torch.einsum("nhk,nhv->nhkv", k + u, v)
        out.append(torch.einsum("nhk,nhkv->nhv", q, S).reshape(x.shape[1], -1))
    return torch.stack(out), S


@pytest.mark.parametrize("backend", EAGER)
def test_mod_on_the_matrix_path_is_the_cells_formula(backend):
    layer, x = modmat_layer(backend), modmat_inputs()
    with torch.no_grad():
        out, (S,) = layer(x)  # the states [layers x directions, N, heads, K, V]
    want_out, want_S = modmat_reference(layer, x)
    torch.testing.assert_close(out, want_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(S[0], want_S, rtol=1e-10, atol=1e-10)


def test_mod_in_the_matrix_onnx_export_is_the_cells_formula():
    layer, x = modmat_layer("torch"), modmat_inputs()
    params = {n: getattr(layer, f"{n}_l0").detach() for n in layer.ir.params}
    s = session(matrix_onnx_model(layer.ir, layer.layer_sizes[0], params, "f64"))
    got = dict(zip([o.name for o in s.get_outputs()],
                   s.run(None, {"x": x.numpy(), "state_in_0": np.zeros((2, HEADS, K, K))}), strict=True))
    want_out, want_S = modmat_reference(layer, x)
    torch.testing.assert_close(torch.from_numpy(got["out"]), want_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(torch.from_numpy(got["state_out_0"]), want_S, rtol=1e-10, atol=1e-10)


@needs_cc
def test_mod_in_the_matrix_c_export_is_the_cells_formula(tmp_path):
    layer, x = modmat_layer("torch"), modmat_inputs()
    paths = write_layer_library(layer, tmp_path, torch.float64)
    out, finals = run_harness(compile_harness(paths[0], "f64"), paths[2], "f64", x,
                              [torch.zeros(2, HEADS, K, K, dtype=torch.float64)])
    want_out, want_S = modmat_reference(layer, x)
    torch.testing.assert_close(out, want_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(finals[0], want_S, rtol=1e-10, atol=1e-10)
