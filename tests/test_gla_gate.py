"""GLA's gate where sigmoid underflows (issue 26 item 6): written sigm(z)^(1/16), the gradient was NaN
once z fell below about -88 in float32 (0^(-15/16) * 0), which ended MQAR runs with a finite loss;
cells/gla.cell now writes exp(logsigmoid(z) / 16) as fla does. Checked against a hand-written torch
loop of the paper's recurrence (Yang et al. 2024, Sec. 4.1)."""

from pathlib import Path

import torch
import torch.nn.functional as F

import celldsl

GLA = str(Path(__file__).resolve().parents[1] / "cells" / "gla.cell")


def gla_loop(x, W_q, W_k, W_v, W_a1, W_a2, b_a):
    """x [T, N, I]; per head h: S = diag(alpha) S + k vᵀ, o = qᵀ S; alpha = exp(logsigmoid(z) / 16)."""
    T, N, _ = x.shape
    H, K, _ = W_q.shape
    V = W_v.shape[1]
    S = x.new_zeros(N, H, K, V)
    outs = []
    for t in range(T):
        q = torch.einsum("hki,ni->nhk", W_q, x[t])
        k = torch.einsum("hki,ni->nhk", W_k, x[t])
        v = torch.einsum("hvi,ni->nhv", W_v, x[t])
        z = torch.einsum("hkr,ri,ni->nhk", W_a2, W_a1, x[t]) + b_a
        alpha = torch.exp(F.logsigmoid(z) / 16)
        S = alpha[..., None] * S + k[..., None] * v[..., None, :]
        outs.append(torch.einsum("nhk,nhkv->nhv", q, S).reshape(N, H * V))
    return torch.stack(outs)


def test_gla_gradients_stay_finite_where_the_gate_underflows():
    torch.manual_seed(0)
    layer = celldsl.Recurrent(GLA, 5, 6, sizes={"heads": 2, "K": 3, "V": 3, "R": 2})
    with torch.no_grad():
        layer.b_a_l0.fill_(-200.0)  # sigmoid(-200) is 0 in float32: every gate closed
    x = torch.randn(4, 3, 5)
    params = [layer.W_q_l0, layer.W_k_l0, layer.W_v_l0, layer.W_a1_l0, layer.W_a2_l0, layer.b_a_l0]
    out, _ = layer(x)
    grads = torch.autograd.grad(out.square().sum(), params)
    ref_params = [p.detach().clone().requires_grad_() for p in params]
    ref = gla_loop(x, *ref_params)
    ref_grads = torch.autograd.grad(ref.square().sum(), ref_params)
    assert all(torch.isfinite(g).all() for g in grads)  # NaN in W_a1, W_a2, b_a with sigm(z)^(1/16)
    torch.testing.assert_close(out, ref)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r)
