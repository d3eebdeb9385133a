"""A NaN or an infinity in the input gives what torch gives, on every backend: NaN where torch has NaN
(Triton's tl.maximum drops a NaN unless told to keep it: relu(NaN) was 0, so a diverged run looked
finite), and the same finite gradients around it (torch's relu passes the gradient through a NaN:
threshold_backward tests x <= 0, and lang/functions.step now does the same; `x > 0` gave 0 there).
torch.nn is the reference for the classic layers, the torch backend (the executable meaning) for the
zoo, and a hand-written loop for the matrix reductions."""

import pytest
import torch
from every_backend import BACKENDS, backend_fixture
from matrix_layers import I as MATRIX_INPUTS
from matrix_layers import matrix_layer
from zoo import GENERIC, LAYER_ARGS, MATRIX

import celldsl
from celldsl.nn.matrix import MatrixRecurrent

backend = backend_fixture()


def poisoned(T, N, width, dtype=torch.float64):
    """A random input with a NaN, a +inf and a -inf at different steps and batch rows."""
    torch.manual_seed(1)
    x = torch.randn(T, N, width, dtype=dtype)
    x[1, 0, 2], x[2, 1, 0], x[0, 2, 1] = float("nan"), float("inf"), -float("inf")
    return x


def assert_same(got, want, what):
    """The same NaN and infinity positions, and the finite values close."""
    assert got.shape == want.shape, what
    assert torch.equal(got.isnan(), want.isnan()), \
        f"{what}: NaN at {got.isnan().sum()} places, want {want.isnan().sum()}"
    assert torch.equal(got.isinf(), want.isinf()), f"{what}: infinities differ"
    assert torch.equal(got[got.isinf()], want[want.isinf()]), f"{what}: infinities' signs differ"
    finite = got.isfinite()
    torch.testing.assert_close(got[finite], want[finite], rtol=1e-7, atol=1e-9, msg=what)


def results(layer, x):
    """Outputs, final states, the input's and every parameter's gradient of out.sum()."""
    x = x.clone().requires_grad_()
    out, finals = layer(x)
    out.sum().backward()
    finals = finals if isinstance(finals, tuple) else (finals,)
    return {"out": out.detach(), **{f"final{i}": f.detach() for i, f in enumerate(finals)}, "dx": x.grad,
            **{name: p.grad for name, p in layer.named_parameters()}}


@pytest.mark.parametrize(("name", "kwargs"), [("LSTM", {}), ("GRU", {}), ("RNN", {}),
                                              ("RNN", {"nonlinearity": "relu"})])
def test_torch_nn_layers_on_nan_and_inf(backend, name, kwargs):
    torch.manual_seed(0)
    reference = getattr(torch.nn, name)(5, 8, dtype=torch.float64, **kwargs)
    layer = getattr(celldsl, name)(5, 8, backend=backend, dtype=torch.float64, **kwargs)
    layer.load_state_dict(reference.state_dict())
    x = poisoned(4, 3, 5)
    want = results(reference, x)
    for key, got in results(layer, x).items():
        assert_same(got, want[key], f"{name} {kwargs} on {backend}: {key}")


@pytest.mark.parametrize("cell", GENERIC)
@pytest.mark.parametrize("other", [b for b in BACKENDS if b != "torch"])
def test_zoo_cells_on_nan_and_inf_as_the_torch_backend(cell, other, monkeypatch):
    """Each elementwise zoo cell on the cpu and triton backends against the torch backend."""
    if other == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    width = 8  # mut1, mut2 and sru read x elementwise: I == H
    x = poisoned(4, 3, width)
    got = {}
    for b in ("torch", other):
        torch.manual_seed(0)
        layer = celldsl.Recurrent(cell, width, 8, backend=b, dtype=torch.float64, **LAYER_ARGS.get(cell, {}))
        got[b] = results(layer, x)
    for key, value in got[other].items():
        assert_same(value, got["torch"][key], f"{cell} on {other}: {key}")


REDUCTIONS = """cell r
input x
state s : 1 per head
output o
param W : (V, x) per head
v = relu(W @ x)
s' = s + max(v) - min(v)
o = v * s'
"""


def test_matrix_max_min_and_relu_keep_a_nan(backend):
    """max and min over a head's vector are NaN where it holds a NaN (torch.amax), relu keeps it:
    against a hand-written loop."""
    torch.manual_seed(5)
    layer = MatrixRecurrent(REDUCTIONS, 4, {"heads": 2, "V": 3}, dtype=torch.float64, backend=backend)
    x = poisoned(3, 3, 4)
    out, (s_final,) = layer(x)
    W, s, outs = layer.W_l0, torch.zeros(3, 2, dtype=torch.float64), []
    for x_t in x:
        v = torch.relu(torch.einsum("hvi,ni->nhv", W, x_t))
        s = s + v.amax(-1) - v.amin(-1)
        outs.append((v * s[..., None]).reshape(3, -1))
    assert_same(out.detach(), torch.stack(outs), f"output on {backend}")
    assert_same(s_final.detach().reshape(3, 2), s, f"final state on {backend}")


@pytest.mark.parametrize("cell", [c for c in MATRIX if c not in ("mamba", "rwkv6")])
@pytest.mark.parametrize("other", [b for b in BACKENDS if b != "torch"])
def test_matrix_zoo_on_nan_and_inf_as_the_torch_backend(cell, other, monkeypatch):
    if other == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = poisoned(4, 3, MATRIX_INPUTS)
    got = {}
    for b in ("torch", other):
        layer = matrix_layer(cell, b)
        xg = x.clone().requires_grad_()
        out, _finals = layer(xg)
        out.sum().backward()
        got[b] = {"out": out.detach(), "dx": xg.grad, **{n: p.grad for n, p in layer.named_parameters()}}
    for key, value in got[other].items():
        assert_same(value, got["torch"][key], f"{cell} on {other}: {key}")


MAX_MIN = """cell m
input x
state h
param W : (h, x)
h' = max(W @ x + h, 0.5) + min(h, -0.5)
"""


def test_max_and_min_of_a_nan_give_both_arguments_the_gradient(backend):
    """torch.maximum / minimum at a NaN pass the gradient to both arguments (neither a < b nor a > b).
    max(a, b)'s derivative in a was 1 - step(b - a): with step(NaN) = 1, a NaN state got 0."""
    torch.manual_seed(0)
    layer = celldsl.Recurrent(MAX_MIN, 3, 2, backend=backend, dtype=torch.float64)
    x = torch.randn(2, 1, 3, dtype=torch.float64)
    h0 = torch.tensor([[[float("nan"), 0.3]]], dtype=torch.float64, requires_grad=True)
    out, _ = layer(x, h0)
    (got,) = torch.autograd.grad(out.sum(), [h0])
    W = layer.W_l0.detach()
    h0_ref = h0.detach().clone().requires_grad_()
    h, outs = h0_ref[0], []
    for x_t in x:
        h = torch.maximum(x_t @ W.T + h, torch.tensor(0.5, dtype=torch.float64)) + \
            torch.minimum(h, torch.tensor(-0.5, dtype=torch.float64))
        outs.append(h)
    (want,) = torch.autograd.grad(torch.stack(outs).sum(), [h0_ref])
    assert_same(got, want, f"d h0 on {backend}")
