"""A NaN or an inf at one place of a matrix state, not the whole of it, on every backend and in the ONNX
export, against a hand-written loop under autograd (torch.amax / amin, as the torch backend runs them):
- max() / min() over a value holding a NaN are NaN wherever the NaN is (onnxruntime's ReduceMax and
  ReduceMin dropped it at some places: 1.0 for [nan, -inf, 1]), and their gradient is NaN (torch's
  g * hit / hit.sum() is 0 / 0; the C backward added g / cnt only where an element equalled the result,
  so no element took anything: a gradient of 0 and finite parameter gradients for a NaN loss);
- an inf gradient carried back through a step stays inf (the Triton backward wrote `step + (1 - on) *
  d_s`, 0 * inf = NaN)."""

import pytest
import torch
from every_backend import backend_fixture
from test_export_onnx_matrix import I, run_onnx
from torch.nn.utils.rnn import pack_sequence, pad_packed_sequence

from celldsl.export.model import load_matrix_cell
from celldsl.export.onnx_matrix import matrix_onnx_model
from celldsl.nn.matrix import MatrixRecurrent

backend = backend_fixture()
NAN, INF = float("nan"), float("inf")

SPREAD = """cell spread
input x
state v : V per head
state S : (K, V) per head
state m : 1 per head
output o
param W : (V, x) per head
param W_k : (K, x) per head
k = W_k @ x
v' = v * 0.5 + W @ x
S' = S * 0.5 + k @ vᵀ
m' = max(v') - min(v') + max(S') * 0.5 - min(S') * 0.25
o = v' * m'
"""
V, K = 4, 3


def hand_loop(W, W_k, x, v, S):
    """SPREAD's equations with torch.amax / amin: (outputs [T, N, heads * V], final v, S, m)."""
    outs = []
    for x_t in x:
        k = torch.einsum("hki,ni->nhk", W_k, x_t)
        S = S * 0.5 + k[..., None] * v[..., None, :]
        v = v * 0.5 + torch.einsum("hvi,ni->nhv", W, x_t)
        m = v.amax(-1) - v.amin(-1) + S.amax((-2, -1)) * 0.5 - S.amin((-2, -1)) * 0.25
        outs.append((v * m[..., None]).flatten(1))
    return torch.stack(outs), v, S, m


def poisoned_states(N):
    """v and S with a NaN at each place of v's first head, an inf and a -inf, a NaN and an inf in S."""
    g = torch.Generator().manual_seed(4)
    v = torch.randn(N, 2, V, generator=g, dtype=torch.float64)
    S = torch.randn(N, 2, K, V, generator=g, dtype=torch.float64)
    for i in range(V):
        v[i, 0, i] = NAN
    v[V, 1, 0], v[V, 1, 3] = INF, -INF
    S[V + 1, 0, 1, 2], S[V + 2, 1, 2, 3], S[V + 2, 0, 0, 0] = NAN, NAN, INF
    return v, S


def assert_same(got, want, what):
    assert torch.equal(got.isnan(), want.isnan()), \
        f"{what}: NaN at {got.isnan().sum()} places, want {want.isnan().sum()}"
    torch.testing.assert_close(got.nan_to_num(0, 1e300, -1e300), want.nan_to_num(0, 1e300, -1e300), msg=what)


def test_reductions_and_carried_infs_on_every_backend(backend):
    torch.manual_seed(0)
    layer = MatrixRecurrent(SPREAD, 4, {"heads": 2, "V": V, "K": K}, dtype=torch.float64, backend=backend)
    N = V + 3
    v0, S0 = poisoned_states(N)
    x = torch.randn(3, N, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    m0 = torch.zeros(N, 2, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (x, v0, S0)]
    out, (v, S, m) = layer(leaves[0], (leaves[1][None], leaves[2][None], m0[None]))
    got = torch.autograd.grad(out.sum() + v.sum() + S.sum() + m.sum(), [*leaves, layer.W_l0, layer.W_k_l0])
    params = [p.detach().clone().requires_grad_() for p in (layer.W_l0, layer.W_k_l0)]
    ref = [t.clone().requires_grad_() for t in (x, v0, S0)]
    want_out, wv, wS, wm = hand_loop(*params, *ref)
    want = torch.autograd.grad(want_out.sum() + wv.sum() + wS.sum() + wm.sum(), [*ref, *params])
    assert_same(out.detach(), want_out.detach(), f"output on {backend}")
    assert_same(m.detach().reshape(wm.shape), wm.detach(), f"final m on {backend}")
    for name, g, w in zip(["x", "v0", "S0", "W", "W_k"], got, want, strict=True):
        assert_same(g, w, f"gradient of {name} on {backend}")


@pytest.mark.parametrize("dtype", ["f64", "f32"])
def test_onnx_max_and_min_keep_a_nan_wherever_it_is(dtype):
    compiled, sizes, params = load_matrix_cell(SPREAD, I, 2 * V, seed=3, sizes={"heads": 2, "V": V, "K": K})
    model = matrix_onnx_model(compiled.ir, sizes, params, dtype)
    N = V + 3
    v0, S0 = poisoned_states(N)
    x = torch.randn(2, N, I, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    out, (v, S, m) = run_onnx(model, x, [v0, S0, torch.zeros(N, 2, dtype=torch.float64)], dtype)
    want_out, wv, wS, wm = hand_loop(params["W"], params["W_k"], x, v0, S0)
    assert wm.isnan().sum() >= V + 2
    assert torch.equal(m.reshape(wm.shape).isnan(), wm.isnan())
    assert torch.equal(out.isnan(), want_out.isnan())
    if dtype == "f64":
        assert_same(m.reshape(wm.shape), wm, "final m")
        assert_same(out, want_out, "output")


def test_packed_sequences_carry_an_inf_as_each_sequence_alone(backend):
    """A finished sequence's padded steps pass its state's gradient through unchanged: the torch and Triton
    loops masked by products (d * mask, (1 - mask) * d) and ran the padded steps' reverse mode on the
    carried states, so an inf there gave 0 * inf = NaN in the gradients of x, v0 and W."""
    torch.manual_seed(0)
    layer = MatrixRecurrent(SPREAD, 4, {"heads": 2, "V": V, "K": K}, dtype=torch.float64, backend=backend)
    lengths, g = [3, 1, 2], torch.Generator().manual_seed(1)
    v0 = torch.randn(3, 2, V, generator=g, dtype=torch.float64)
    S0 = torch.randn(3, 2, K, V, generator=g, dtype=torch.float64)
    S0[0, 0, 0, 0], S0[2, 1, 1, 1], v0[1, 0, 2] = INF, INF, INF
    m0 = torch.zeros(3, 2, dtype=torch.float64)
    seqs = [torch.randn(n, 4, generator=g, dtype=torch.float64) for n in lengths]
    leaves = [s.clone().requires_grad_() for s in [*seqs, v0, S0]]
    packed = pack_sequence(leaves[:3], enforce_sorted=False)
    out, finals = layer(packed, (leaves[3][None], leaves[4][None], m0[None]))
    padded, _ = pad_packed_sequence(out)
    loss = sum(padded[:n, i].sum() for i, n in enumerate(lengths)) + sum(f.sum() for f in finals)
    got = torch.autograd.grad(loss, [*leaves, layer.W_l0, layer.W_k_l0])
    params = [p.detach().clone().requires_grad_() for p in (layer.W_l0, layer.W_k_l0)]
    ref = [s.clone().requires_grad_() for s in [*seqs, v0, S0]]
    loss = 0
    for i, x in enumerate(ref[:3]):  # each sequence alone, unpadded
        o, v, S, m = hand_loop(*params, x[:, None], ref[3][i:i + 1], ref[4][i:i + 1])
        loss = loss + o.sum() + v.sum() + S.sum() + m.sum()
    want = torch.autograd.grad(loss, [*ref, *params])
    assert sum(w.isnan().sum() for w in want) > 0 and sum(w.isinf().sum() for w in want) > 0
    for name, a, w in zip(["x0", "x1", "x2", "v0", "S0", "W", "W_k"], got, want, strict=True):
        assert_same(a, w, f"gradient of {name} on {backend}")


NORMED = """cell normed
input x
state S : (K, K) per head
output o
param W_k : (K, x) per head
k = W_k @ x
S' = 0.9 * S + k @ kᵀ
o = S' @ k / sqrt(sum(S' * S'))
"""


def test_packed_sequences_of_a_cell_singular_at_zero_as_each_sequence_alone(backend):
    """A step that is NaN at a zero state and input (a norm divides): a finished sequence's padded
    steps must take no part in the backward. Running them on zero states (the first fix for the inf
    above) made every W_k gradient NaN on the torch and Triton backends."""
    torch.manual_seed(0)
    layer = MatrixRecurrent(NORMED, 4, {"heads": 2, "K": 3}, dtype=torch.float64, backend=backend)
    g = torch.Generator().manual_seed(1)
    lengths = [3, 1, 2]
    S0 = torch.randn(3, 2, 3, 3, generator=g, dtype=torch.float64)
    seqs = [torch.randn(n, 4, generator=g, dtype=torch.float64) for n in lengths]
    leaves = [s.clone().requires_grad_() for s in [*seqs, S0]]
    out, (final,) = layer(pack_sequence(leaves[:3], enforce_sorted=False), (leaves[3][None],))
    padded, _ = pad_packed_sequence(out)
    loss = sum(padded[:n, i].sum() for i, n in enumerate(lengths)) + final.sum()
    got = torch.autograd.grad(loss, [*leaves, layer.W_k_l0])
    params = layer.W_k_l0.detach().clone().requires_grad_()
    ref = [s.clone().requires_grad_() for s in [*seqs, S0]]
    loss = 0
    for i, x in enumerate(ref[:3]):  # each sequence alone, unpadded, by hand
        S = ref[3][i]
        for x_t in x:
            k = torch.einsum("hki,i->hk", params, x_t)
            S = 0.9 * S + k[:, :, None] * k[:, None, :]
            loss = loss + (torch.einsum("hab,hb->ha", S, k) / S.pow(2).sum((-2, -1)).sqrt()[:, None]).sum()
        loss = loss + S.sum()
    want = torch.autograd.grad(loss, [*ref, params])
    for name, a, w in zip(["x0", "x1", "x2", "S0", "W_k"], got, want, strict=True):
        assert not a.isnan().any(), f"gradient of {name} on {backend}: NaN"
        torch.testing.assert_close(a, w, msg=f"gradient of {name} on {backend}")
