"""Issue 26's zoo cells that need the new language parts: lru (sin/cos, ring init), chrono_lstm (init
expressions), against tests/matrix_references.py's loops written from the papers, in float64: outputs,
final states, gradients, gradcheck; sin and cos on every printer; init expressions' located errors."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from matrix_layers import matrix_layer, ref_params
from matrix_references import chrono_init, ref_chrono_lstm, ref_lru

import celldsl
from celldsl.lang.errors import CellError, CellWarning

I, P, T, N = 4, 3, 5, 2


def _params(layer):
    return {n.removesuffix("_l0"): t for n, t in layer.named_parameters()}


def _compare(layer, ref, x, state0):
    out, finals = layer(x, state0)
    ref_out, ref_finals = ref(_params(layer), x, tuple(s[0] for s in state0))
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    for a, b in zip(finals, ref_finals, strict=True):
        torch.testing.assert_close(a[0], b, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(out)
    wrt = [x, *state0, *layer.parameters()]
    got = torch.autograd.grad((out * g).sum() + sum((s * s).sum() for s in finals), wrt)
    want = torch.autograd.grad((ref_out * g).sum() + sum((s * s).sum() for s in ref_finals), wrt)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def _states(*widths):
    return tuple(torch.randn(1, N, w, dtype=torch.float64, requires_grad=True) for w in widths)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("steps", [1, T])
def test_lru_matches_reference(backend, steps):
    torch.manual_seed(0)
    layer = celldsl.Recurrent("lru", I, I, sizes={"P": P}, dtype=torch.float64, backend=backend)
    with torch.no_grad():  # away from the ring, so cos and sin of every phase are exercised
        layer.theta_log_l0.copy_(torch.tensor([-1.0, 0.5, 1.5], dtype=torch.float64))
    x = torch.randn(steps, N, I, dtype=torch.float64, requires_grad=True)
    _compare(layer, ref_lru, x, _states(P, P))


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_lru_gradcheck(backend):
    torch.manual_seed(1)
    layer = celldsl.Recurrent("lru", I, I, sizes={"P": P}, dtype=torch.float64, backend=backend)
    x = torch.randn(3, N, I, dtype=torch.float64, requires_grad=True)
    params = list(layer.parameters())
    ps = [p.detach().clone().requires_grad_() for p in params]
    assert torch.autograd.gradcheck(
        lambda x, *ps: torch.func.functional_call(
            layer, {n: v for (n, _), v in zip(layer.named_parameters(), ps, strict=True)}, (x,)
        )[0],
        (x, *ps),
    )


def test_lru_ring_initialisation():
    """Sec. 3.3 / Appendix A: |λ|² uniform on [r_min², r_max²], φ = exp(θ_log) uniform on [0, 2π],
    γ = sqrt(1 - |λ|²) exactly; B ~ N(0, 1/(2I)), C ~ N(0, 1/P), D ~ N(0, 1)."""
    torch.manual_seed(0)
    big = 4000
    layer = celldsl.Recurrent("lru", 50, 50, sizes={"P": big}, dtype=torch.float64)
    p = _params(layer)
    mod_sq = torch.exp(-2 * torch.exp(p["nu_log"]))
    assert mod_sq.min() >= 0.9**2 - 1e-12 and mod_sq.max() <= 0.999**2 + 1e-12
    assert abs(mod_sq.mean().item() - (0.9**2 + 0.999**2) / 2) < 0.01
    phase = torch.exp(p["theta_log"])
    assert phase.min() >= 0 and phase.max() <= 2 * math.pi and abs(phase.mean().item() - math.pi) < 0.1
    torch.testing.assert_close(torch.exp(p["gamma_log"]), torch.sqrt(1 - mod_sq))
    assert abs(p["B_re"].std().item() - math.sqrt(1 / 100)) < 0.005
    assert abs(p["C_im"].std().item() - math.sqrt(1 / big)) < 0.001
    assert abs(p["D"].std().item() - 1) < 0.3


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_chrono_lstm_matches_reference(backend):
    torch.manual_seed(0)
    layer = celldsl.Recurrent("chrono_lstm", I, 5, sizes={"T_max": 40}, dtype=torch.float64, backend=backend)
    x = torch.randn(T, N, I, dtype=torch.float64, requires_grad=True)
    _compare(layer, ref_chrono_lstm, x, _states(5, 5))


def test_chrono_initialisation():
    """Tallec and Ollivier Sec. 4: b_f = log(U[1, T_max - 1]), b_i = -b_f, the other bias zero; the
    draw is chrono_init's (same generator state, same numbers)."""
    H, T_max = 3000, 100.0
    torch.manual_seed(5)
    layer = celldsl.Recurrent("chrono_lstm", 2, H, sizes={"T_max": int(T_max)}, dtype=torch.float64)
    b = layer.b_ih_l0.detach()
    b_i, b_f = b[:H], b[H : 2 * H]
    assert torch.equal(b_i, -b_f) and torch.equal(
        layer.b_hh_l0.detach(), torch.zeros(4 * H, dtype=torch.float64)
    )
    assert b_f.min() >= 0 and b_f.max() <= math.log(T_max - 1)
    assert abs(torch.exp(b_f).mean().item() - T_max / 2) < 2  # U[1, T_max - 1] has mean T_max / 2
    # the same numbers as the reference's chrono_init from the generator state the draw starts at: after
    # the default U(-1/sqrt(H), 1/sqrt(H)) of the four stored tensors
    torch.manual_seed(5)
    for shape in [(4 * H, 2), (4 * H, H), (4 * H,), (4 * H,)]:
        torch.empty(shape, dtype=torch.float64).uniform_()
    want_i, want_f = chrono_init(H, T_max)
    torch.testing.assert_close(b_f, want_f, rtol=0, atol=1e-15)
    torch.testing.assert_close(b_i, want_i, rtol=0, atol=1e-15)


def test_chrono_needs_t_max():
    with pytest.raises(ValueError, match="T_max"):
        celldsl.Recurrent("chrono_lstm", 2, 3)


HDR = "cell t\ninput x\nstate h\nparam W, b\n"


@pytest.mark.parametrize(
    ("init", "fragment", "column"),
    [
        ("init b = -W", "'b' is a vector, but its init expression reads 'W', a matrix", 11),
        ("init b = log(uniform(1, 2, 3))", "uniform() in an init expression takes 1 or 2 arguments", 14),
        ("init b = glorot(b, 2)", "unknown function 'glorot' in an init expression", 10),
        ("init b = 2 * W @ b", "'@' is not allowed in an init expression", 14),
        ("init b = exp(W)", "reads parameter 'W', which no earlier init line sets", 14),
        ("init b = sin(1, 2)", "sin() takes 1 argument, got 2", 10),
    ],
    ids=["kind", "uniform-arity", "unknown-function", "matmul", "not-initialised-above", "arity"],
)
def test_init_expression_errors_are_located(init, fragment, column):
    text = (
        HDR
        + ("init W = zeros\n" if "reads 'W', a matrix" in fragment else "")
        + init
        + "\nh' = tanh(W @ x + b * h)\n"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CellWarning)
        with pytest.raises(CellError) as info:
            celldsl.compile_cell(text)
    err = info.value
    assert fragment in err.message, err.message
    assert err.line == text.count("\n", 0, text.index(init)) + 1 and err.column == column, str(err)


def test_sin_cos_derivatives_and_every_printer(tmp_path):
    """sin and cos in an elementwise cell: torch and cpu against a hand loop with gradients; Triton's
    and ONNX's printers spell them (the ONNX graph runs in onnxruntime against torch)."""
    text = "cell sc\ninput x\nstate h\nparam W, U, b\nh' = sin(W @ x + b) * cos(U @ h) + cos(h)\n"
    for backend in ("torch", "cpu"):
        torch.manual_seed(2)
        layer = celldsl.Recurrent(text, 3, 4, dtype=torch.float64, backend=backend)
        x = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
        out, _ = layer(x)
        h, want = torch.zeros(2, 4, dtype=torch.float64), []
        p = _params(layer)
        for x_t in x:
            h = torch.sin(x_t @ p["W"].T + p["b"]) * torch.cos(h @ p["U"].T) + torch.cos(h)
            want.append(h)
        want = torch.stack(want)
        torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
        g = torch.randn_like(out)
        a = torch.autograd.grad((out * g).sum(), [x, *layer.parameters()])
        b = torch.autograd.grad((want * g).sum(), [x, *layer.parameters()])
        for u, v in zip(a, b, strict=True):
            torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-10)
    from celldsl.compiler import compile_cell
    from celldsl.targets import target

    source = target("triton").source(compile_cell(text).plan)
    assert "tl.sin(" in source and "tl.cos(" in source
    c_source = target("cpu").source(compile_cell(text).plan)
    assert "cd_sin_f64(" in c_source and "cd_cos_f64(" in c_source
    from test_export_onnx import check

    from celldsl.export.model import load_cell

    check(load_cell(text, 3, 4, seed=1), "f64", 1e-10)


def test_sin_cos_on_the_triton_interpreter(monkeypatch):
    """Triton's spelling of sin and cos runs (the interpreter, float64) and matches the torch backend."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    text = "cell sc\ninput x\nstate h\nparam W, U, b\nh' = sin(W @ x + b) * cos(U @ h) + cos(h)\n"
    torch.manual_seed(2)
    tri = celldsl.Recurrent(text, 3, 4, dtype=torch.float64, backend="triton")
    ref = celldsl.Recurrent(text, 3, 4, dtype=torch.float64, backend="torch")
    ref.load_state_dict(tri.state_dict())
    x = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    a, b = tri(x)[0], ref(x)[0]
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(a)
    torch.testing.assert_close(
        torch.autograd.grad((a * g).sum(), x)[0], torch.autograd.grad((b * g).sum(), x)[0]
    )


# --- matrix cells: rwkv6 (prev(x) token shift, shared vectors), mamba (chained projections, conv taps) --

HEADS, K, V, MI = 3, 4, 5, 6  # heads != K != V != I
MATRIX_SIZES = {
    "rwkv6": {"heads": HEADS, "K": K, "V": V, "R": 2, "R_d": 3},
    "mamba": {"heads": 1, "D": 5, "N_s": 3, "R": 2, "O": 4},
}


def _rwkv6_ref(p, x, s):
    from matrix_references import ref_rwkv6

    out, (S, _x_prev) = ref_rwkv6(p, x, (s[0], torch.zeros_like(x[0])), heads=HEADS)
    return out, (S,)


def _mamba_ref(p, x, s):
    """The block of ref_mamba: W_in is [W_in_u; W_in_z], conv_w [D, 4] the four taps (oldest first)."""
    from matrix_references import ref_mamba

    p = dict(p)
    p["W_in"] = torch.cat([p.pop("W_in_u"), p.pop("W_in_z")])
    p["conv_w"] = torch.stack([p.pop(f"conv_w{j}") for j in range(4)], -1)
    h0 = s[0].reshape(x.shape[1], *p["A_log"].shape)  # heads = 1: [N, 1, D, N_s] -> [N, D, N_s]
    out, (h, _window) = ref_mamba(p, x, (h0, x.new_zeros(x.shape[1], p["A_log"].shape[0], 3)))
    return out, (h,)


@pytest.mark.parametrize("steps", [1, T])
@pytest.mark.parametrize("cell", ["rwkv6", "mamba"])
def test_matrix_zoo_matches_reference(cell, steps):
    layer = matrix_layer(cell, sizes=MATRIX_SIZES[cell], inputs=MI)
    x = torch.randn(steps, N, MI, dtype=torch.float64, requires_grad=True)
    state0 = tuple(
        torch.randn(
            1, N, *layer.ir.state_shape(s, layer.layer_sizes[0]), dtype=torch.float64, requires_grad=True
        )
        for s in layer.ir.states
    )
    out, finals = layer(x, state0)
    ref = {"rwkv6": _rwkv6_ref, "mamba": _mamba_ref}[cell]
    ref_out, ref_finals = ref(ref_params(layer), x, tuple(s[0] for s in state0))
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    for a, b in zip(finals, ref_finals, strict=True):
        torch.testing.assert_close(a[0], b.reshape(a[0].shape), rtol=1e-10, atol=1e-10)
    g = torch.randn_like(out)
    wrt = [x, *state0, *layer.parameters()]
    got = torch.autograd.grad((out * g).sum() + sum((s * s).sum() for s in finals), wrt)
    want = torch.autograd.grad((ref_out * g).sum() + sum((s * s).sum() for s in ref_finals), wrt)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("cell", ["rwkv6", "mamba"])
def test_matrix_zoo_gradcheck(cell):
    layer = matrix_layer(cell, sizes=MATRIX_SIZES[cell], inputs=MI, seed=1)
    x = torch.randn(3, 2, MI, dtype=torch.float64, requires_grad=True)
    state0 = tuple(
        torch.randn(
            1, 2, *layer.ir.state_shape(s, layer.layer_sizes[0]), dtype=torch.float64, requires_grad=True
        )
        for s in layer.ir.states
    )
    names = [n for n, _ in layer.named_parameters()]

    def f(x, *rest):
        states, ps = rest[: len(state0)], rest[len(state0) :]
        out, finals = torch.func.functional_call(layer, dict(zip(names, ps, strict=True)), (x, states))
        return out, *finals

    ps = [p.detach().clone().requires_grad_() for p in layer.parameters()]
    assert torch.autograd.gradcheck(f, (x, *state0, *ps))


MHDR = ("cell t\ninput x\nstate S : (K, V) per head\noutput o\nparam W_k, W_q : (K, x) per head\n"
        "param W_v : (V, x) per head\n")


@pytest.mark.parametrize(
    ("line", "fragment", "column"),
    [
        (
            "k = W_k @ prev(S @ (W_v @ x), 1)",
            "prev() in a matrix-memory cell reads a value that depends on no state",
            11,
        ),
        ("k = W_k @ prev(x, 0)", "prev(v, k) takes a whole number of steps k from 1 to 64", 19),
        ("k = W_k @ prev(x, 1.5)", "prev(v, k) takes a whole number of steps k from 1 to 64", 19),
        ("k = W_k @ prev(x, 1, 2)", "prev() takes 1 or 2 arguments", 11),
        ("k = W_k @ prev(2)", "prev() of a constant", 11),
    ],
    ids=["of-a-state", "zero-steps", "fraction", "arity", "constant"],
)
def test_matrix_prev_errors_are_located(line, fragment, column):
    text = MHDR + line + "\nv = W_v @ x\nq = W_q @ x\nS' = S + k @ vᵀ\no = qᵀ @ S'\n"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CellWarning)
        with pytest.raises(CellError) as info:
            celldsl.compile_cell(text)
    err = info.value
    assert fragment in err.message, err.message
    assert (err.line, err.column) == (7, column), str(err)


def test_matrix_prev_shifts_within_each_sequence():
    """prev(x, 2) reads x two steps back, 0 before; with packed sequences of different lengths too."""
    text = (
        "cell t\ninput x\nstate s : 1 per head\noutput o\nparam w : x per head\n"
        "s' = s + wᵀ @ prev(x, 2)\no = s'\n"
    )
    torch.manual_seed(0)
    layer = celldsl.MatrixRecurrent(text, 3, {"heads": 2}, dtype=torch.float64)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    out, _ = layer(x)
    shifted = torch.cat([torch.zeros_like(x[:2]), x[:-2]])
    want = torch.cumsum(shifted @ layer.w_l0.T, 0)
    torch.testing.assert_close(out, want)


def test_recurrent_runs_matrix_cells():
    """celldsl.Recurrent(matrix cell, input_size, hidden_size, sizes=...) is the cell's MatrixRecurrent: the
    same parameters and numbers; widths not given are hidden_size / heads (heads defaults to 1)."""
    torch.manual_seed(0)
    a = celldsl.Recurrent("mlstm", 6, 12, sizes={"heads": 3, "K": 2}, dtype=torch.float64)
    torch.manual_seed(0)
    b = celldsl.MatrixRecurrent("mlstm", 6, {"heads": 3, "K": 2, "V": 4}, dtype=torch.float64)
    assert isinstance(a, celldsl.MatrixRecurrent) and a.hidden_size == 12
    x = torch.randn(4, 2, 6, dtype=torch.float64)
    torch.testing.assert_close(a(x)[0], b(x)[0], rtol=0, atol=0)
    c = celldsl.Recurrent(cell="gla", input_size=6, hidden_size=8, num_layers=2, batch_first=True)
    assert c.layer_sizes[0] == {"heads": 1, "K": 8, "R": 8, "V": 8, "x": 6} and c(torch.randn(2, 3, 6))[
        0
    ].shape == (2, 3, 8)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"sizes": {"heads": 3, "V": 2}},
            "its output is heads x its width = 6 wide with these sizes, but hidden_size is 12",
        ),
        ({"dropout": 0.5}, "does not take dropout= yet"),
        ({"sizes": {"Q": 3}}, "unknown: Q"),
        ({"sizes": {"heads": 5}}, "must be a positive int that divides hidden_size 12"),
    ],
    ids=["hidden-size", "dropout", "unknown-size", "heads"],
)
def test_recurrent_matrix_cell_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        celldsl.Recurrent("mlstm", 6, 12, **kwargs)


def test_labs_train_a_matrix_cell(tmp_path):
    """The labs build their layer with celldsl.Recurrent(cell path, ...): a matrix cell trains (MQAR)."""
    import json

    from celldsl.cli.main import main

    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "mqar",
                "--cell",
                "cells/mlstm.cell",
                "--steps",
                "3",
                "--hidden",
                "8",
                "--batch",
                "4",
                "--eval-every",
                "3",
                "--out",
                str(out),
                "--no-pictures",
                "--quiet",
            ]
        )
        == 0
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert "test_acc" in json.dumps(metrics)


def test_matrix_init_expressions():
    """mamba's dt init: softplus(b_dt) = exp(U[log 0.001, log 0.1]); an init line of a matrix cell with a
    size the layer is given, a parameter set above, and fixed forms."""
    torch.manual_seed(0)
    layer = celldsl.MatrixRecurrent(
        "mamba", 3, {"heads": 1, "D": 2000, "N_s": 2, "R": 2, "O": 3}, dtype=torch.float64
    )
    dt = torch.nn.functional.softplus(layer.b_dt_l0.detach())
    assert dt.min() >= 0.001 - 1e-12 and dt.max() <= 0.1 + 1e-12
    assert abs(torch.log(dt).mean().item() - (math.log(0.001) + math.log(0.1)) / 2) < 0.1
    text = (
        "cell t\ninput x\nstate s : K per head\noutput s\nparam a, b : K per head\nparam c : 1 per head\n"
        "param w : x per head\ninit a = uniform(Q, Q + 1)\ninit b = 2 * a + K\ninit c = 3\n"
        "s' = a * s + b + c * (wᵀ @ x)\n"
    )
    layer = celldsl.MatrixRecurrent(text, 2, {"heads": 2, "K": 3, "Q": 5}, dtype=torch.float64)
    a, b = layer.a_l0.detach(), layer.b_l0.detach()
    assert a.min() >= 5 and a.max() <= 6
    torch.testing.assert_close(b, 2 * a + 3)
    assert torch.equal(layer.c_l0.detach(), torch.full((2,), 3.0, dtype=torch.float64))
    with pytest.raises(ValueError, match="'Q'"):
        celldsl.MatrixRecurrent(text, 2, {"heads": 2, "K": 3})


@pytest.mark.parametrize(
    ("line", "fragment", "column"),
    [
        ("init b = a", "reads parameter 'a', which no earlier init line sets", 10),
        (
            "init W = 1\ninit b = 2 * W",
            "'b' is a K-vector per head, but its init expression reads 'W', a (K, x) matrix",
            14,
        ),
        ("init a = glorot", "unknown initialiser 'glorot' in a matrix-memory cell", 10),
        ("init z = zeros", "init of 'z', which is not a parameter of this cell", 6),
        ("init a = 1\ninit a = 2", "'a' is initialised twice (first on line 8)", 6),
    ],
    ids=["not-above", "shape", "unknown", "not-a-parameter", "twice"],
)
def test_matrix_init_errors_are_located(line, fragment, column):
    text = (
        "cell t\ninput x\nstate s : K per head\noutput s\nparam a, b : K per head\n"
        "param W : (K, x) per head\n"
        "\n" + line + "\ns' = a * s + b + W @ x\n"
    )
    with pytest.raises(CellError) as info:
        celldsl.compile_cell(text)
    err = info.value
    assert fragment in err.message, err.message
    assert (err.line, err.column) == (7 + line.count("\n") + 1, column), str(err)


@pytest.mark.parametrize("cell", ["rwkv6", "mamba"])
def test_prev_with_packed_sequences_two_layers_bidirectional(cell):
    """prev() shifts within each sequence: a packed batch of lengths 5 and 3, 2 layers, both directions,
    gives each sequence what it gives alone (whose single-direction runs match the references above)."""
    from torch.nn.utils.rnn import pack_sequence, pad_packed_sequence

    torch.manual_seed(3)
    layer = celldsl.MatrixRecurrent(
        cell, MI, MATRIX_SIZES[cell], num_layers=2, bidirectional=True, dtype=torch.float64, backend="torch"
    )
    seqs = [torch.randn(5, MI, dtype=torch.float64), torch.randn(3, MI, dtype=torch.float64)]
    out, finals = layer(pack_sequence(seqs))
    out, _ = pad_packed_sequence(out)
    for n, s in enumerate(seqs):
        alone, alone_finals = layer(s[:, None])
        torch.testing.assert_close(out[: len(s), n], alone[:, 0], rtol=1e-10, atol=1e-10)
        assert out[len(s) :, n].abs().max() == 0 if len(s) < out.shape[0] else True
        for f, a in zip(finals, alone_finals, strict=True):
            torch.testing.assert_close(f[:, n], a[:, 0], rtol=1e-10, atol=1e-10)


MLSTM_SIZES = {"heads": 2, "K": 3, "V": 3}


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: celldsl.MatrixRecurrent("mlstm", 6, 8), TypeError,
         r"sizes must be a dict \{width: size\}, got int"),
        (lambda: celldsl.MatrixRecurrent("mlstm", 6, None), ValueError, "needs the sizes 'heads', 'K', 'V'"),
        (lambda: celldsl.MatrixRecurrent("mlstm", 6, MLSTM_SIZES, batch_first=1), TypeError,
         "batch_first should be of type bool, got: int"),
        (lambda: celldsl.Recurrent("mlstm", 6, 12, sizes=0), TypeError, "sizes must be a dict"),
        (lambda: celldsl.Recurrent("mlstm", 6, 12, sizes="heads"), TypeError, "sizes must be a dict"),
        (lambda: celldsl.Recurrent("mlstm", 6, "12"), TypeError,
         "hidden_size should be of type int, got: str"),
        (lambda: celldsl.Recurrent("mlstm", 6, 12, batch_first=None), TypeError,
         "batch_first should be of type bool, got: NoneType"),
        (lambda: celldsl.Recurrent("mlstm", 6, 12, num_layers=0), ValueError,
         "num_layers must be greater than zero"),
        (lambda: celldsl.Recurrent("mlstm", 6, 12, bias=None), TypeError, "bias should be of type bool"),
    ],
    ids=["sizes-int", "sizes-none", "batch-first-int", "recurrent-sizes-0", "recurrent-sizes-str",
         "hidden-size-str", "recurrent-batch-first-none", "num-layers-0", "bias-none"],
)
def test_matrix_layer_arguments_of_a_wrong_type_say_what_was_expected(make, error, match):
    """A wrong type is torch.nn's TypeError with what was expected (was: "argument of type 'int' is not
    iterable"; sizes=0 read as no sizes; a string split into characters; batch_first=1 taken)."""
    with pytest.raises(error, match=match):
        make()
