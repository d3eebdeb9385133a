"""Reliability of the deployment paths: an export, or an eager backend, that runs must give the
numbers of the others and of the cell's equations, also at values where two spellings of one function
part (found by a probe of docs/deploy.md's paths: torch.onnx.export, `celldsl export --c/--onnx`,
torch.export, TorchScript); and bad export arguments are one located line, never a traceback."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from c_harness import CC, compile_harness, needs_cc, run_harness

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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mod_in_an_init_line_is_the_cells_formula(tmp_path, dtype):
    """`init b = mod(-140, 0.7)`: the formula's 0, as the step computes mod, not torch.remainder's 0.7 -
    9e-15 (nn/inits.py used torch.remainder)."""
    path = tmp_path / "mod_init.cell"
    path.write_text("cell mod_init\ninput x\nstate h\noutput h\nparam W, U\nparam b\n"
                    "init b = mod(-140, 0.7)\nh' = tanh(W @ x + U @ h + b)\n")
    layer = celldsl.Recurrent(str(path), 3, 4, dtype=dtype)
    a, b = torch.tensor(-140.0, dtype=dtype), torch.tensor(0.7, dtype=dtype)
    assert torch.equal(layer.cell_parameter("b"), formula_mod(a, b).expand(4))
    assert not torch.equal(torch.remainder(a, b), formula_mod(a, b))  # the case that tells them apart


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


# ---- `celldsl export`: bad arguments are one located line -----------------------------------------


def export_error(capsys, tmp_path, *args) -> str:
    """`celldsl export lstm --c DIR --input-size 4 --hidden-size 5 ARGS...`: exit 1 and its one line."""
    from celldsl.cli.main import main

    code = main(["export", "lstm", "--c", str(tmp_path / "out"), "--input-size", "4", "--hidden-size", "5",
                 *args])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("celldsl: error: ") and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()
    return err


def test_a_state_dict_keyed_by_other_than_names_is_refused(tmp_path, capsys):
    """Before: "celldsl: internal error: AttributeError: 'int' object has no attribute 'endswith'"."""
    torch.save({1: torch.zeros(2)}, tmp_path / "sd.pt")
    assert "sd.pt: expected a state_dict (tensors by parameter name), got the key 1" in \
        export_error(capsys, tmp_path, "--weights", str(tmp_path / "sd.pt"))


def test_complex_weights_are_refused_not_made_real(tmp_path, capsys):
    """Before: exported with the imaginary parts dropped (torch's load_state_dict only warns)."""
    torch.manual_seed(0)
    sd = celldsl.Recurrent("lstm", 4, 5).state_dict()
    sd["weight_hh_l0"] = sd["weight_hh_l0"].to(torch.complex64)
    torch.save(sd, tmp_path / "sd.pt")
    assert "sd.pt: the weights must be real numbers; weight_hh_l0 is complex64" in \
        export_error(capsys, tmp_path, "--weights", str(tmp_path / "sd.pt"))


def test_a_size_given_twice_is_refused(tmp_path, capsys):
    """Before: --sizes P=3,P=4 exported with P = 4, silently."""
    from celldsl.cli.main import main

    code = main(["export", "lstm_proj", "--c", str(tmp_path / "out"), "--input-size", "4",
                 "--hidden-size", "5", "--sizes", "P=3,P=4"])
    assert code == 1 and capsys.readouterr().err == "celldsl: error: --sizes gives 'P' twice\n"


def test_a_seed_out_of_torchs_range_says_so(tmp_path, capsys):
    """Before: "celldsl: error: Overflow when unpacking long long", which names no argument."""
    assert "the seed must be an integer from -2^63 to 2^64 - 1, got 99999999999999999999" in \
        export_error(capsys, tmp_path, "--seed", "99999999999999999999")


def test_sizes_memory_cannot_hold_are_an_error_not_a_bug(tmp_path, capsys):
    """Before: "celldsl: internal error: RuntimeError: ... can't allocate memory (this is a bug...)"."""
    from celldsl.cli.main import main

    code = main(["export", "lstm", "--c", str(tmp_path / "out"), "--input-size", "100000000", "--hidden-size",
                 "100000000"])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("celldsl: error: cell 'lstm': cannot build its layer at input size "
                                        "100000000 and hidden size 100000000: "), err


def test_a_file_that_cannot_be_written_is_named_first(tmp_path, capsys):
    """Before: "celldsl: error: [Errno 17] File exists: '...'" (the errno first, the path quoted last)."""
    from celldsl.cli.main import main

    (tmp_path / "taken").write_text("")
    code = main(["export", "lstm", "--c", str(tmp_path / "taken"), "--input-size", "4", "--hidden-size", "5"])
    assert code == 1 and capsys.readouterr().err == f"celldsl: error: {tmp_path / 'taken'}: File exists\n"


# ---- non-finite values travel through the exports as through the layer ----------------------------


@pytest.mark.parametrize("name", ["lstm", "qrnn", "ln_gru"])
def test_inf_and_nan_in_the_input_and_the_state_reach_the_same_outputs(tmp_path, name):
    """The C and ONNX exports (H = 17, no multiple of a vector width; I != H) against the torch
    backend: the same NaN and inf positions, and the same finite values elsewhere."""
    from test_export_c import inputs, reference

    cell = load_cell(name, 5, 17, seed=2)
    x, states = inputs(cell, 4, 3)
    x[0, 0, 0], x[1, 2, 4] = float("inf"), float("nan")
    states[0][1, 3] = float("-inf")
    want_out, want_finals = reference(cell, x, states)
    assert want_out.isnan().any() and want_out.isfinite().any()  # else the test could not fail
    s = session(onnx_model(cell, "f64"))
    got = s.run(None, {"x": x.numpy(), **{f"state_in_{k}": v.numpy() for k, v in enumerate(states)}})
    results = [("onnx", torch.from_numpy(got[-1]), [torch.from_numpy(g) for g in got[:-1]])]
    if CC is not None:  # the C export needs a compiler on PATH; onnxruntime runs regardless
        exe = compile_harness(write_c(cell, tmp_path, "f64")[0], "f64")
        results.append(("c", *run_harness(exe, tmp_path / f"{c_name(cell)}.bin", "f64", x, states)))
    for _, out, finals in results:
        for got_t, want_t in zip([out, *finals], [want_out, *want_finals], strict=True):
            torch.testing.assert_close(got_t, want_t, rtol=1e-12, atol=1e-12, equal_nan=True)
