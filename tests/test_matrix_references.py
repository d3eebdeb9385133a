"""The matrix-memory references (tests/matrix_references.py) against second computations.

Each time loop is checked against a form computed another way: the parallel ("attention") form
for the cells linear in their state (GLA, HGRN2, RWKV-6, mLSTM's D matrix, DeltaNet's pseudo-value
triangular solve, Mamba unrolled with the block's conv as torch's conv1d), DeltaNet's two steps
worked by hand, LRU in complex numbers, the chrono LSTM against torch.nn.LSTM, M2RNN with one
matmul per head. Plus: shapes, final states that continue a run, finite gradients. float64, tiny.
"""

import math

import matrix_references as mr
import pytest
import torch
import torch.nn.functional as F

T, N, I, NH, K, V, HO = 5, 2, 3, 2, 3, 4, 5
DT = torch.float64


def rnd(gen, *shape, scale=0.5):
    return (torch.randn(*shape, generator=gen, dtype=DT) * scale).requires_grad_()


def make(cell: str, seed: int = 0, layer: bool = False):
    """(params, kwargs, input) for `cell` at K != V != I != H_out, 2 heads."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, N, I, generator=g, dtype=DT).requires_grad_()
    qkv = {"W_q": rnd(g, NH * K, I), "W_k": rnd(g, NH * K, I), "W_v": rnd(g, NH * V, I)}
    kw = {"heads": NH}
    if cell == "mlstm":
        p = {**qkv, "W_o": rnd(g, NH * V, I), "w_i": rnd(g, NH, I), "w_f": rnd(g, NH, I)}
        p.update(b_q=rnd(g, NH * K), b_k=rnd(g, NH * K), b_v=rnd(g, NH * V), b_o=rnd(g, NH * V))
        p.update(
            b_i=rnd(g, NH), b_f=(torch.full((NH,), 2.0, dtype=DT) + rnd(g, NH)).detach().requires_grad_()
        )
    elif cell == "gla":
        p = {**qkv, "W_a1": rnd(g, 2, I), "W_a2": rnd(g, NH * K, 2), "b_a": rnd(g, NH * K)}
        if layer:
            p.update(W_r=rnd(g, NH * V, I), b_r=rnd(g, NH * V), W_O=rnd(g, HO, NH * V))
    elif cell in ("deltanet", "gated_deltanet"):
        p = {**qkv, "w_b": rnd(g, NH, I), "b_b": rnd(g, NH)}
        if cell == "gated_deltanet":
            p.update(w_a=rnd(g, NH, I), b_a=rnd(g, NH))
        if layer:
            p["W_O"] = rnd(g, HO, NH * V)
    elif cell == "mamba":
        D, Ns = (4, 3)
        kw = {}
        p = {"A_log": rnd(g, D, Ns), "W_B": rnd(g, Ns, D), "W_C": rnd(g, Ns, D), "D_skip": rnd(g, D)}
        p.update(W_dt_low=rnd(g, 2, D), W_dt=rnd(g, D, 2), b_dt=rnd(g, D))
        if layer:
            p.update(W_in=rnd(g, 2 * D, I), conv_w=rnd(g, D, 3), conv_b=rnd(g, D), W_out=rnd(g, HO, D))
        else:
            x = torch.randn(T, N, D, generator=g, dtype=DT).requires_grad_()
    elif cell == "rwkv6":
        R = 2
        p = {"mu_x": rnd(g, I), "W_r": rnd(g, NH * K, I), "W_k": rnd(g, NH * K, I), "W_v": rnd(g, NH * V, I)}
        for c in mr.RWKV6_MIXES if layer else ("r", "k", "v", "w"):
            p.update({f"lam_{c}": rnd(g, I), f"A_{c}": rnd(g, R, I), f"B_{c}": rnd(g, I, R)})
        p.update(lam_d=rnd(g, NH * K), A_d=rnd(g, R, I), B_d=rnd(g, NH * K, R), u=rnd(g, NH * K))
        if layer:
            p.update(W_g=rnd(g, NH * V, I), W_o=rnd(g, HO, NH * V), gn_w=rnd(g, NH * V), gn_b=rnd(g, NH * V))
    elif cell == "hgrn2":
        p = {
            "W_f": rnd(g, NH * K, I),
            "W_q": rnd(g, NH * K, I),
            "W_i": rnd(g, NH * V, I),
            "b_f": rnd(g, NH * K),
        }
        p["gamma"] = torch.rand(NH * K, generator=g, dtype=DT).mul(0.5).requires_grad_()
        if layer:
            p["W_O"] = rnd(g, HO, NH * V)
    elif cell == "m2rnn":
        p = {**qkv, "W": rnd(g, NH, V, V), "w_f": rnd(g, NH, I), "b_f": rnd(g, NH)}
        if layer:
            p.update(D=rnd(g, NH * V), A_log_f=rnd(g, NH), W_O=rnd(g, HO, NH * V))
    elif cell == "lru":
        kw = {}
        p = {
            k: v.requires_grad_()
            for k, v in mr.lru_ring_init(4, I, generator=g, r_min=0.5, r_max=0.95).items()
        }
    elif cell == "chrono_lstm":
        kw = {}
        H = 4
        b_i, b_f = mr.chrono_init(H, 20, generator=g)
        b = torch.cat([b_i, b_f, torch.zeros(2 * H, dtype=DT)])
        p = {"W_ih": rnd(g, 4 * H, I), "W_hh": rnd(g, 4 * H, H), "b_ih": b.requires_grad_()}
        p["b_hh"] = torch.zeros(4 * H, dtype=DT, requires_grad=True)
    else:
        raise KeyError(cell)
    return p, kw, x


def out_width(cell, layer):
    if layer:
        return HO
    return {"mamba": 4, "lru": I, "chrono_lstm": 4}.get(cell, NH * V)


CELLS = list(mr.REFERENCES)
LAYERED = ["gla", "deltanet", "gated_deltanet", "mamba", "rwkv6", "hgrn2", "m2rnn"]


@pytest.mark.parametrize("cell", CELLS)
def test_shapes_states_continue_and_gradients_are_finite(cell):
    for layer in [False, True] if cell in LAYERED else [False]:
        p, kw, x = make(cell, layer=layer)
        ref = mr.REFERENCES[cell]
        out, state = ref(p, x, None, **kw)
        assert out.shape == (T, N, out_width(cell, layer)) and out.dtype == DT
        assert all(s.shape[0] == N for s in state)
        # the final state continues the run: two halves give the whole
        first, mid = ref(p, x[:2], None, **kw)
        second, end = ref(p, x[2:], mid, **kw)
        torch.testing.assert_close(torch.cat([first, second]), out)
        for a, b in zip(end, state, strict=True):
            torch.testing.assert_close(a, b)
        loss = out.square().sum() + sum(s.square().sum() for s in state)
        grads = torch.autograd.grad(loss, [x, *p.values()], allow_unused=True)
        for name, gr in zip(["x", *p], grads, strict=True):
            assert gr is not None, f"{cell}: {name} does not reach the output"
            assert torch.isfinite(gr).all(), f"{cell}: gradient of {name} is not finite"
        assert any(gr.abs().sum() > 0 for gr in grads[1:])


def test_missing_parameter_is_a_key_error_and_bad_discretization_a_value_error():
    p, kw, x = make("gla")
    del p["W_a1"]
    with pytest.raises(KeyError):
        mr.ref_gla(p, x, heads=NH)
    p, kw, x = make("mamba")
    with pytest.raises(ValueError, match="zoh"):
        mr.ref_mamba(p, x, discretization="rk4")


# --- parallel forms -----------------------------------------------------------------------------


def prod_decay(a):
    """a [T, ...] -> G [T, T, ...], G[t, s] = prod_{j=s+1..t} a_j for s <= t, else 0 (literal products)."""
    G = a.new_zeros(a.shape[0], *a.shape)
    for t in range(a.shape[0]):
        for s in range(t + 1):
            G[t, s] = torch.prod(a[s + 1 : t + 1], dim=0) if s < t else torch.ones_like(a[0])
    return G


def linear_attention(q, k, v, decay, S0):
    """o_t = sum_{s<=t} (q_t * prod_{j=s+1..t} decay_j) k_s^T v_s + (q_t * prod_{j<=t} decay_j) S0
    with q, k, decay [T, N, h, K], v [T, N, h, V], S0 [N, h, K, V]."""
    G = prod_decay(decay)
    o = torch.einsum("tnhk,tsnhk,snhk,snhv->tnhv", q, G, k, v)
    full = torch.cumprod(decay, dim=0)
    return o + torch.einsum("tnhk,nhkv->tnhv", q * full, S0)


def heads(v):
    return v.reshape(*v.shape[:-1], NH, -1)


def test_gla_equals_its_parallel_form_and_its_layer_uses_layer_norm():
    p, kw, x = make("gla")
    S0 = torch.randn(N, NH, K, V, dtype=DT)
    out, (S,) = mr.ref_gla(p, x, (S0,), **kw)
    q, k, v = (heads(x @ p[w].T) for w in ("W_q", "W_k", "W_v"))
    alpha = torch.sigmoid(x @ p["W_a1"].T @ p["W_a2"].T + p["b_a"]) ** (1 / 16)
    o = linear_attention(q, k, v, heads(alpha), S0)
    torch.testing.assert_close(out, o.flatten(-2))
    # the layer: y = W_O (LN(o) * SiLU(W_r x + b_r)), LayerNorm per head
    p, kw, x = make("gla", layer=True)
    y, _ = mr.ref_gla(p, x, None, **kw)
    o, _ = mr.ref_gla({k_: v_ for k_, v_ in p.items() if k_ not in ("W_r", "b_r", "W_O")}, x, None, **kw)
    normed = F.layer_norm(heads(o), (V,), eps=1e-5)
    want = (normed * heads(F.silu(x @ p["W_r"].T + p["b_r"]))).flatten(-2) @ p["W_O"].T
    torch.testing.assert_close(y, want)


def test_hgrn2_equals_linear_attention_with_keys_one_minus_f():
    p, kw, x = make("hgrn2")
    S0 = torch.randn(N, NH, K, V, dtype=DT)
    out, _ = mr.ref_hgrn2(p, x, (S0,), **kw)
    f = heads(p["gamma"] + (1 - p["gamma"]) * torch.sigmoid(x @ p["W_f"].T + p["b_f"]))
    assert (f >= heads(p["gamma"].expand(T, N, -1))).all()  # the lower bound holds
    o = linear_attention(heads(x @ p["W_q"].T), 1 - f, heads(x @ p["W_i"].T), f, S0)
    torch.testing.assert_close(out, o.flatten(-2))


def test_mlstm_unstabilised_equals_the_d_matrix_form():
    p, kw, x = make("mlstm")
    out, _ = mr.ref_mlstm(p, x, None, stabilized=False, **kw)
    q = heads(x @ p["W_q"].T + p["b_q"])
    k = heads(x @ p["W_k"].T / math.sqrt(K) + p["b_k"])
    v = heads(x @ p["W_v"].T + p["b_v"])
    i = torch.exp(x @ p["w_i"].T + p["b_i"])  # [T, N, h]
    f = torch.sigmoid(x @ p["w_f"].T + p["b_f"])
    D = prod_decay(f) * i[None]  # D[t, s] = prod f_{s+1..t} * i_s
    Ct = torch.einsum("tnhk,snhk->tsnh", q, k) * D
    num = torch.einsum("tsnh,snhv->tnhv", Ct, v)
    den = Ct.sum(1).abs().clamp(min=1.0)
    want = torch.sigmoid(x @ p["W_o"].T + p["b_o"]) * (num / den[..., None]).flatten(-2)
    torch.testing.assert_close(out, want)


@pytest.mark.parametrize("forget", ["sigmoid", "exp"])
def test_mlstm_stabilised_agrees_with_unstabilised_where_both_are_finite(forget):
    p, kw, x = make("mlstm")
    if forget == "exp":
        p["b_f"] = (p["b_f"] - 2.5).detach()  # log f = w_f x + b_f, mostly < 0
    C0, n0 = torch.randn(N, NH, V, K, dtype=DT), torch.randn(N, NH, K, dtype=DT)
    m0 = torch.randn(N, NH, dtype=DT)
    stab, (C, n, m) = mr.ref_mlstm(p, x, (C0, n0, m0), forget=forget, **kw)
    scale = torch.exp(m0)[..., None]  # the stabilised state is the plain one times exp(-m)
    plain, (Cu, nu) = mr.ref_mlstm(
        p, x, (C0 * scale[..., None], n0 * scale), stabilized=False, forget=forget, **kw
    )
    torch.testing.assert_close(stab, plain)
    torch.testing.assert_close(C * torch.exp(m)[..., None, None], Cu)
    torch.testing.assert_close(n * torch.exp(m)[..., None], nu)
    # a huge input gate overflows exp(i) in the plain form; the stabilised one stays finite
    big = dict(p, b_i=p["b_i"].detach() + 800.0)
    assert not torch.isfinite(mr.ref_mlstm(big, x, None, stabilized=False, **kw)[0]).all()
    assert torch.isfinite(mr.ref_mlstm(big, x, None, **kw)[0]).all()


def test_mlstm_stabilised_gradcheck():
    p, kw, x = make("mlstm")
    names = ["W_q", "w_i", "b_f"]
    base = {k_: v_.detach() for k_, v_ in p.items()}

    def fn(x_, *ws):
        out, (C, n, m) = mr.ref_mlstm({**base, **dict(zip(names, ws, strict=True))}, x_, None, **kw)
        return out, C

    assert torch.autograd.gradcheck(fn, (x[:3].detach().requires_grad_(), *(p[n_] for n_ in names)))


def deltanet_pseudo_values(p, x, gated):
    """DeltaNet via Yang et al. 2024's pseudo-values u (Sec. 3): S_t = sum_s Gamma[t, s] u_s k_s^T,
    (I + tril(diag(beta) (Gamma * K K^T), -1)) U = diag(beta) V, one triangular solve per head."""
    q = mr.l2norm(F.silu(heads(x @ p["W_q"].T)))
    k = mr.l2norm(F.silu(heads(x @ p["W_k"].T)))
    v = heads(x @ p["W_v"].T)
    beta = torch.sigmoid(x @ p["w_b"].T + p["b_b"])  # [T, N, h]
    alpha = torch.sigmoid(x @ p["w_a"].T + p["b_a"]) if gated else torch.ones_like(beta)
    G = prod_decay(alpha)  # [T, S, N, h]
    KK = torch.einsum("tnhk,snhk->nhts", k, k) * G.permute(2, 3, 0, 1)
    M = torch.eye(T, dtype=DT) + torch.tril(beta.permute(1, 2, 0)[..., None] * KK, -1)
    U = torch.linalg.solve_triangular(
        M, beta.permute(1, 2, 0)[..., None] * v.permute(1, 2, 0, 3), upper=False
    )
    o = torch.einsum("nhts,nhsv,snhk,tnhk->tnhv", G.permute(2, 3, 0, 1), U, k, q)
    return o.flatten(-2)


@pytest.mark.parametrize("cell", ["deltanet", "gated_deltanet"])
def test_deltanet_equals_the_pseudo_value_form(cell):
    p, kw, x = make(cell)
    out, _ = mr.REFERENCES[cell](p, x, None, **kw)
    torch.testing.assert_close(out, deltanet_pseudo_values(p, x, cell == "gated_deltanet"))


def test_deltanet_two_steps_by_hand():
    """S_1 = S0 (I - b1 k1 k1^T) + b1 v1 k1^T, S_2 = S_1 (I - b2 k2 k2^T) + b2 v2 k2^T, so
    o_2 = S0 q2 - b1 (S0 k1)(k1.q2) - b2 (S0 k2)(k2.q2) + b1 b2 (S0 k1)(k1.k2)(k2.q2)
          + b1 v1 (k1.q2) - b1 b2 v1 (k1.k2)(k2.q2) + b2 v2 (k2.q2)."""
    p, kw, x = make("deltanet")
    S0 = torch.randn(N, NH, V, K, dtype=DT)
    out, _ = mr.ref_deltanet(p, x[:2], (S0,), **kw)
    q = mr.l2norm(F.silu(heads(x[:2] @ p["W_q"].T)))
    k = mr.l2norm(F.silu(heads(x[:2] @ p["W_k"].T)))
    v = heads(x[:2] @ p["W_v"].T)
    b1, b2 = torch.sigmoid(x[:2] @ p["w_b"].T + p["b_b"])[..., None]
    (q1, q2), (k1, k2), (v1, v2) = q, k, v

    def dot(a, b):
        return (a * b).sum(-1, keepdim=True)

    def Sv(vec):
        return torch.einsum("nhvk,nhk->nhv", S0, vec)

    o1 = Sv(q1) - b1 * Sv(k1) * dot(k1, q1) + b1 * v1 * dot(k1, q1)
    o2 = Sv(q2) - b1 * Sv(k1) * dot(k1, q2) - b2 * Sv(k2) * dot(k2, q2)
    o2 = o2 + b1 * b2 * Sv(k1) * dot(k1, k2) * dot(k2, q2)
    o2 = o2 + b1 * v1 * dot(k1, q2) - b1 * b2 * v1 * dot(k1, k2) * dot(k2, q2) + b2 * v2 * dot(k2, q2)
    torch.testing.assert_close(out, torch.stack([o1, o2]).flatten(-2))


def test_deltanet_with_beta_one_stores_each_value_under_its_key():
    """The delta rule with beta = 1 overwrites: S_t k_t = (1 - |k|^2) S_{t-1} k_t + |k|^2 v_t,
    which is v_t for a unit key (l2norm's eps leaves |k| just under 1)."""
    p, kw, x = make("deltanet")
    p["b_b"] = torch.full((NH,), 60.0, dtype=DT)  # sigm(60) = 1 in float64
    S_prev = torch.zeros(N, NH, V, K, dtype=DT)
    for t in range(1, T + 1):
        _, (S,) = mr.ref_deltanet(p, x[:t], None, **kw)
        k = mr.l2norm(F.silu(heads(x[t - 1] @ p["W_k"].T)))
        v = heads(x[t - 1] @ p["W_v"].T)
        k2 = (k * k).sum(-1, keepdim=True)
        assert (k2 > 0.5).all() and (k2 < 1).all()
        want = (1 - k2) * torch.einsum("nhvk,nhk->nhv", S_prev, k) + k2 * v
        torch.testing.assert_close(torch.einsum("nhvk,nhk->nhv", S, k), want)
        S_prev = S


def mamba_unrolled(p, x, h0, window0=None, euler=False):
    """Mamba's scan unrolled: h_t = exp(A sum_{j<=t} Delta_j) h0 + sum_{s<=t} exp(A sum_{j=s+1..t}
    Delta_j) Bbar_s u_s, with ZOH's Bbar = Delta (exp(Delta A) - 1) / (Delta A) B; the block's conv
    as torch's conv1d over the whole sequence."""
    if "W_in" in p:
        D = p["A_log"].shape[0]
        u_pre, z = (x @ p["W_in"].T).split(D, dim=-1)
        seq = torch.cat([window0, u_pre.permute(1, 2, 0)], dim=-1)  # [N, D, d_conv - 1 + T]
        u = F.silu(F.conv1d(seq, p["conv_w"][:, None, :], p["conv_b"], groups=D)).permute(2, 0, 1)
    else:
        u = x
    delta = F.softplus(u @ p["W_dt_low"].T @ p["W_dt"].T + p["b_dt"])  # [T, N, D]
    B, C = u @ p["W_B"].T, u @ p["W_C"].T  # [T, N, Ns]
    A = -torch.exp(p["A_log"])
    dA = delta[..., None] * A
    B_bar = delta[..., None] * B[:, :, None, :]
    if not euler:
        B_bar = B_bar * torch.expm1(dA) / dA
    cum = torch.cumsum(delta, 0)
    gap = (cum[:, None] - cum[None, :])[..., None] * A  # [T, S, N, D, Ns]: A * sum_{j=s+1..t} Delta_j
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))[:, :, None, None, None]
    kernel = torch.where(causal, torch.exp(torch.where(causal, gap, 0.0)), 0.0)
    h = torch.einsum("tsndk,sndk->tndk", kernel, B_bar * u[..., None])
    h = h + torch.exp(cum[..., None] * A) * h0
    y = torch.einsum("tndk,tnk->tnd", h, C) + p["D_skip"] * u
    if "W_in" in p:
        y = (y * F.silu(z)) @ p["W_out"].T
    return y


@pytest.mark.parametrize("layer", [False, True])
@pytest.mark.parametrize("disc", ["zoh", "euler"])
def test_mamba_equals_its_unrolled_form(layer, disc):
    p, kw, x = make("mamba", layer=layer)
    h0 = torch.randn(N, 4, 3, dtype=DT)
    window0 = torch.randn(N, 4, 2, dtype=DT) if layer else None
    out, _ = mr.ref_mamba(p, x, (h0, window0) if layer else (h0,), discretization=disc)
    torch.testing.assert_close(out, mamba_unrolled(p, x, h0, window0, euler=disc == "euler"))


def test_mamba_zoh_one_step_by_hand_and_euler_is_its_small_step_limit():
    p = {"A_log": torch.tensor([[math.log(2.0)]], dtype=DT), "W_B": torch.tensor([[3.0]], dtype=DT)}
    p.update(W_C=torch.tensor([[1.0]], dtype=DT), W_dt=torch.tensor([[0.0]], dtype=DT))
    for b_dt, tol in ((0.5, None), (-12.0, 1e-4)):
        p["b_dt"] = torch.tensor([b_dt], dtype=DT)
        x = torch.tensor([[[1.0]]], dtype=DT)  # u = 1
        d = math.log1p(math.exp(b_dt))  # softplus
        zoh, _ = mr.ref_mamba(p, x, None)
        euler, _ = mr.ref_mamba(p, x, None, discretization="euler")
        # h = (exp(-2 d) - 1) / (-2) * 3 * u, y = C h = h
        assert zoh.item() == pytest.approx((math.exp(-2 * d) - 1) / -2 * 3)
        assert euler.item() == pytest.approx(d * 3)
        if tol:
            assert abs(zoh.item() / euler.item() - 1) < tol


def test_rwkv6_equals_its_parallel_form_with_group_norm():
    for layer in (False, True):
        p, kw, x = make("rwkv6", layer=layer)
        S0, xp0 = torch.randn(N, NH, K, V, dtype=DT), torch.randn(N, I, dtype=DT)
        out, (S, x_last) = mr.ref_rwkv6(p, x, (S0, xp0), **kw)
        assert torch.equal(x_last, x[-1])
        prev = torch.cat([xp0[None], x[:-1]])  # token shift: x_{t-1}
        xx = prev - x
        shared = x + xx * p["mu_x"]

        def mixed(c, x=x, xx=xx, p=p, shared=shared):
            return x + xx * (p[f"lam_{c}"] + torch.tanh(shared @ p[f"A_{c}"].T) @ p[f"B_{c}"].T)

        r, k, v = (
            heads(mixed("r") @ p["W_r"].T),
            heads(mixed("k") @ p["W_k"].T),
            heads(mixed("v") @ p["W_v"].T),
        )
        w = heads(torch.exp(-torch.exp(p["lam_d"] + torch.tanh(mixed("w") @ p["A_d"].T) @ p["B_d"].T)))
        # o_t = r_t (S_{t-1} + Diag(u) k_t^T v_t), S_{t-1} = linear attention over s < t
        ones = torch.ones_like(w[:1])
        w_shift = torch.cat([ones, w[:-1]])  # S_{t-1} decays by w_1..w_{t-1}
        past = linear_attention(r, torch.cat([torch.zeros_like(k[:1]), k[:-1]]),
                                torch.cat([torch.zeros_like(v[:1]), v[:-1]]), w_shift, S0)  # fmt: skip
        bonus = torch.einsum("tnhk,tnhk,tnhv->tnhv", r, heads(p["u"]).expand_as(k) * k, v)
        o = (past + bonus).flatten(-2)
        if layer:
            g = F.silu(mixed("g") @ p["W_g"].T)
            normed = F.group_norm(o.reshape(T * N, -1), NH, p["gn_w"], p["gn_b"], eps=64e-5).reshape(T, N, -1)
            o = (g * normed) @ p["W_o"].T
        torch.testing.assert_close(out, o)


def test_m2rnn_equals_one_matmul_per_head():
    p, kw, x = make("m2rnn", layer=True)
    H0 = torch.randn(N, NH, K, V, dtype=DT)
    out, (H,) = mr.ref_m2rnn(p, x, (H0,), **kw)
    q, k, v = (heads(x @ p[w].T) for w in ("W_q", "W_k", "W_v"))
    f = torch.exp(-torch.exp(p["A_log_f"]) * F.softplus(x @ p["w_f"].T + p["b_f"]))  # [T, N, h]
    Dv = heads(p["D"])
    state = H0.clone()
    ys = torch.zeros(T, N, NH, V, dtype=DT)
    for t in range(T):
        new = torch.empty_like(state)
        for n in range(N):
            for h in range(NH):
                z = torch.tanh(state[n, h] @ p["W"][h] + torch.outer(k[t, n, h], v[t, n, h]))
                new[n, h] = f[t, n, h] * state[n, h] + (1 - f[t, n, h]) * z
                ys[t, n, h] = q[t, n, h] @ new[n, h] + Dv[h] * v[t, n, h]
        state = new
    torch.testing.assert_close(out, ys.flatten(-2) @ p["W_O"].T)
    torch.testing.assert_close(H, state)


def test_lru_equals_the_complex_recurrence():
    p, kw, x = make("lru")
    x0 = torch.randn(N, 4, dtype=DT), torch.randn(N, 4, dtype=DT)
    out, (re, im) = mr.ref_lru(p, x, x0)
    lam = torch.exp(-torch.exp(p["nu_log"]) + 1j * torch.exp(p["theta_log"]))
    B = (p["B_re"] + 1j * p["B_im"]) * torch.exp(p["gamma_log"])[:, None]
    C = p["C_re"] + 1j * p["C_im"]
    h = torch.complex(*x0)
    ys = []
    for u in x:
        h = lam * h + u.to(B.dtype) @ B.T
        ys.append((h @ C.T).real + p["D"] * u)
    torch.testing.assert_close(out, torch.stack(ys))
    torch.testing.assert_close(torch.complex(re, im), h)


def test_lru_ring_initialisation():
    g = torch.Generator().manual_seed(1)
    p = mr.lru_ring_init(20000, 3, r_min=0.4, r_max=0.9, max_phase=math.pi / 10, generator=g)
    mod = torch.exp(-torch.exp(p["nu_log"]))
    phase = torch.exp(p["theta_log"])
    assert mod.min() >= 0.4 and mod.max() <= 0.9 and mod.max() > 0.89 and mod.min() < 0.41
    assert phase.min() >= 0 and phase.max() <= math.pi / 10
    # uniform over the ring's area: |lambda|^2 uniform in [r_min^2, r_max^2]
    assert (mod**2).mean().item() == pytest.approx((0.4**2 + 0.9**2) / 2, abs=0.005)
    torch.testing.assert_close(torch.exp(p["gamma_log"]), torch.sqrt(1 - mod**2))  # normalisation
    assert p["B_re"].shape == (20000, 3) and p["C_im"].shape == (3, 20000) and p["D"].shape == (3,)


def test_chrono_lstm_equals_torch_lstm_and_chrono_bias_ranges():
    p, kw, x = make("chrono_lstm")
    lstm = torch.nn.LSTM(I, 4).double()
    with torch.no_grad():
        for mine in ("W_ih", "W_hh", "b_ih", "b_hh"):
            theirs = ("weight_" if mine[0] == "W" else "bias_") + mine[2:] + "_l0"
            getattr(lstm, theirs).copy_(p[mine])
    h0, c0 = torch.randn(N, 4, dtype=DT), torch.randn(N, 4, dtype=DT)
    out, (h, c) = mr.ref_chrono_lstm(p, x, (h0, c0))
    want, (wh, wc) = lstm(x, (h0[None], c0[None]))
    torch.testing.assert_close(out, want)
    torch.testing.assert_close((h, c), (wh[0], wc[0]))
    b_i, b_f = mr.chrono_init(10000, 50, generator=torch.Generator().manual_seed(0))
    assert torch.equal(b_i, -b_f)
    timescale = 1 / (1 - torch.sigmoid(b_f))  # = 1 + exp(b_f), uniform in [2, T_max]
    assert timescale.min() >= 2 - 1e-9 and timescale.max() <= 50 + 1e-9
    assert timescale.mean().item() == pytest.approx(26, abs=0.5)
    with pytest.raises(ValueError, match="T_max"):
        mr.chrono_init(3, 2)
