"""Vectors and scalars read only by the hoisted function before the loop, with I != H (issue 24,
finding 17): RWKV-4's token shift `W @ (mu * x + (1 - mu) * prev(x))` makes mu I wide.

Such a parameter gets its whole gradient from the hoisted function's backward after the loop. The
schedules' kernels grade only what the step reads ([tiles, H] buffers): persistent and fused_step
added those H-wide zeros to mu's I-wide gradient (a size mismatch), and time_loop summed a buffer its
kernel never wrote (a silently wrong gradient of a scalar in `W @ (k * x)`). Every backend and
schedule is checked here against a hand-written torch loop of the equations, in float64, forward and
gradients, and the persistent schedule's backward by gradcheck.
"""

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import celldsl

DENSE_SHIFT = """
cell token_shift
input x
state h
output h
param W, U, mu, b
h' = tanh(W @ (mu * x + (1 - mu) * prev(x)) + U @ h + b)
"""

COLUMN_SHIFT = """
cell token_shift_gate
input x
state h
output h
param W, V, mu, b
f = sigmoid(W @ (mu * x + (1 - mu) * prev(x)) + b)
h' = f * h + (1 - f) * tanh(V @ x)
"""

SCALAR_IN_HOIST = """
cell scalar_in_hoist
input x
state h
output y
param W, V, b
param k : scalar
f = sigmoid(W @ (k * x) + b)
h' = f * h + V @ prev(x)
y = tanh(h')
"""


def _shifted(x):
    """prev(x) of a padded [T, N, I] batch: zero at each sequence's first step."""
    return torch.cat([torch.zeros_like(x[:1]), x[:-1]])


def dense_shift(x, h0, W, U, mu, b):
    xs, h, outs = mu * x + (1 - mu) * _shifted(x), h0, []
    for t in range(x.shape[0]):
        h = torch.tanh(xs[t] @ W.T + h @ U.T + b)
        outs.append(h)
    return torch.stack(outs), h


def column_shift(x, h0, W, V, mu, b):
    f = torch.sigmoid((mu * x + (1 - mu) * _shifted(x)) @ W.T + b)
    z = torch.tanh(x @ V.T)
    h, outs = h0, []
    for t in range(x.shape[0]):
        h = f[t] * h + (1 - f[t]) * z[t]
        outs.append(h)
    return torch.stack(outs), h


def scalar_in_hoist(x, h0, W, V, b, k):
    f = torch.sigmoid((k * x) @ W.T + b)
    v = _shifted(x) @ V.T
    h, outs = h0, []
    for t in range(x.shape[0]):
        h = f[t] * h + v[t]
        outs.append(torch.tanh(h))
    return torch.stack(outs), h


CASES = {"dense": (DENSE_SHIFT, dense_shift), "column": (COLUMN_SHIFT, column_shift),
         "scalar": (SCALAR_IN_HOIST, scalar_in_hoist)}


def _grads(fn, x, h0, params, seed=5):
    """Outputs, final state, and the gradients of x, h0 and every parameter of one loss."""
    x, h0 = x.clone().requires_grad_(), h0.clone().requires_grad_()
    params = [p.detach().clone().requires_grad_() for p in params]
    out, hn = fn(x, h0, params)
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    loss = (out * go).sum() + (hn * hn.detach().sin()).sum()
    return [out, hn, *torch.autograd.grad(loss, [x, h0, *params])]


RUNS = [("dense", "torch", None), ("dense", "cpu", None), ("dense", "triton", None),
        ("dense", "triton", "persistent"), ("dense", "triton", "fused_step"),
        ("column", "torch", None), ("column", "cpu", None), ("column", "triton", None),
        ("column", "triton", "time_loop"), ("column", "triton", "scan"),
        ("scalar", "triton", "time_loop"), ("scalar", "triton", "scan")]


@pytest.mark.parametrize(("case", "backend", "schedule"), RUNS,
                         ids=[f"{c}-{b}-{s or 'default'}" for c, b, s in RUNS])
def test_hoist_only_parameters_match_a_hand_written_loop(case, backend, schedule, monkeypatch):
    """I = 19, H = 17 (two slices of 16 in the dense kernels, the second masked), float64."""
    if backend == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    text, reference = CASES[case]
    T, N, I, H = 4, 3, 19, 17
    torch.manual_seed(0)
    kw = {"schedule": schedule} if schedule else {}
    layer = celldsl.Recurrent(text, I, H, backend=backend, dtype=torch.float64, **kw)
    names = [n for n, _ in layer.named_parameters()]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, N, I, generator=g, dtype=torch.float64)
    h0 = 0.5 * torch.randn(1, N, H, generator=g, dtype=torch.float64)
    params = [p.detach() for p in layer.parameters()]
    if case == "scalar":
        assert layer.state_dict()["k_l0"].shape == () and names[-1] == "k_l0"
    else:
        assert dict(layer.named_parameters())["mu_l0"].shape == (I,)

    def run_layer(x, h0, ps):
        return torch.func.functional_call(layer, dict(zip(names, ps, strict=True)), (x, h0))

    def run_reference(x, h0, ps):
        out, hn = reference(x, h0[0], *ps)
        return out, hn[None]

    got, want = _grads(run_layer, x, h0, params), _grads(run_reference, x, h0, params)
    what = ["output", "final state", "d x", "d h0", *(f"d {n}" for n in names)]
    for w, a, b in zip(what, got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9, msg=lambda m, w=w: f"{w}: {m}")


@pytest.mark.parametrize("schedule", ["persistent", "fused_step", "time_loop"])
def test_hoist_only_parameters_packed(schedule, monkeypatch):
    """Packed sequences of lengths 4, 2, 1: prev(x) restarts at each sequence, and the hoisted
    gradient of mu (or k) sums over the rows that ran; against the torch backend."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    text = DENSE_SHIFT if schedule != "time_loop" else SCALAR_IN_HOIST
    I, H = 6, 17
    torch.manual_seed(0)
    ref = celldsl.Recurrent(text, I, H, backend="torch", dtype=torch.float64)
    tri = celldsl.Recurrent(text, I, H, backend="triton", schedule=schedule, dtype=torch.float64)
    tri.load_state_dict(ref.state_dict())
    x = torch.randn(4, 3, I, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    results = []
    for m in (ref, tri):
        xx = x.clone().requires_grad_()
        out, hn = m(pack_padded_sequence(xx, torch.tensor([4, 2, 1])))
        padded, _ = pad_packed_sequence(out)
        loss = (padded * padded.detach().cos()).sum() + hn.square().sum()
        results.append([padded, hn, *torch.autograd.grad(loss, [xx, *m.parameters()])])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(b, a, atol=1e-10, rtol=1e-9)


def test_persistent_token_shift_gradcheck(monkeypatch):
    """The persistent schedule's backward against finite differences of its own forward (I = 4, H = 3)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    torch.manual_seed(0)
    m = celldsl.Recurrent(DENSE_SHIFT, 4, 3, backend="triton", schedule="persistent", dtype=torch.float64)
    names = [n for n, _ in m.named_parameters()]
    x = torch.randn(3, 2, 4, dtype=torch.float64, requires_grad=True)
    h0 = (0.5 * torch.randn(1, 2, 3, dtype=torch.float64)).requires_grad_()
    params = tuple(p.detach().clone().requires_grad_() for p in m.parameters())

    def f(x, h0, *ps):
        return torch.func.functional_call(m, dict(zip(names, ps, strict=True)), (x, h0))

    assert torch.autograd.gradcheck(f, (x, h0, *params), fast_mode=True)
