"""Plain PyTorch references for the matrix-memory cells of issue 26, written from the papers.

Written from the equations as printed in shared/reference/matrix-memories.md (and, for the LSTM
behind chrono initialisation, cell-equations.md 2a), NOT from any compiler output: an explicit
time loop, einsum for the matrix states, so that a compiled cell can be checked against something
derived independently. tests/test_matrix_references.py checks each loop against a second, parallel
("attention") or closed form where the cell is linear in its state.

Every reference has the signature

    ref_<cell>(p, x, state=None, *, heads=..., ...) -> (outputs [T, N, H_out], final_state)

- ``p`` maps parameter names to tensors. Matrices are in torch's (out, in) layout, so the paper's
  ``W x`` is ``lin(W, x)`` = ``x @ W.T``. Projections to several heads are head-major: a
  [heads * K, I] matrix gives [N, heads, K] after ``split_heads``. Parameters a docstring lists
  as optional (biases, the output layer) are used when present and skipped when absent.
- ``x`` is [T, N, I]; ``state`` is a tuple in the order the docstring gives, or None for zeros.
- Key size K, value size V, model width I and output width may all differ.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

Params = dict[str, Tensor]
State = tuple[Tensor, ...]

sigmoid, tanh, exp = torch.sigmoid, torch.tanh, torch.exp


def lin(W: Tensor, v: Tensor) -> Tensor:
    """The paper's ``W v`` for a batch of row vectors: W [O, I], v [..., I] -> [..., O]."""
    return v @ W.T


def affine(p: Params, w: str, b: str, v: Tensor) -> Tensor:
    """``W v + b``, the bias only when ``p`` has one."""
    out = lin(p[w], v)
    return out + p[b] if b in p else out


def split_heads(v: Tensor, heads: int) -> Tensor:
    """[..., heads * D] -> [..., heads, D] (head-major, as the projections are laid out)."""
    return v.reshape(*v.shape[:-1], heads, v.shape[-1] // heads)


def merge_heads(v: Tensor) -> Tensor:
    """[..., heads, D] -> [..., heads * D]."""
    return v.reshape(*v.shape[:-2], v.shape[-2] * v.shape[-1])


def l2norm(v: Tensor, eps: float = 1e-6) -> Tensor:
    """v / sqrt(sum v^2 + eps) over the last axis (fla's l2norm; the eps keeps 0 finite)."""
    return v / torch.sqrt((v * v).sum(-1, keepdim=True) + eps)


def head_norm(o: Tensor, eps: float) -> Tensor:
    """Normalise each head's vector (last axis) to zero mean and unit variance, no affine."""
    mu = o.mean(-1, keepdim=True)
    var = ((o - mu) ** 2).mean(-1, keepdim=True)
    return (o - mu) / torch.sqrt(var + eps)


def head_decay(p: Params, x: Tensor, name: str) -> Tensor:
    """A per-head gate in (0, 1) from ``w_<name>`` [heads, I] and ``b_<name>`` [heads]:
    sigm(w x + b), or, when ``A_log_<name>`` [heads] is given, Mamba-2's
    exp(-exp(A_log) * softplus(w x + b)) (the official Gated DeltaNet and lm-engine's M2RNN)."""
    pre = affine(p, f"w_{name}", f"b_{name}", x)
    if f"A_log_{name}" in p:
        return exp(-exp(p[f"A_log_{name}"]) * F.softplus(pre))
    return sigmoid(pre)


def _zeros(x: Tensor, *shape: int) -> Tensor:
    return x.new_zeros(x.shape[1], *shape)


def _out(p: Params, y: Tensor) -> Tensor:
    """The optional output projection ``W_O`` [H_out, heads * V] on the merged heads."""
    y = merge_heads(y)
    return lin(p["W_O"], y) if "W_O" in p else y


# --- mLSTM --------------------------------------------------------------------------------------


def ref_mlstm(
    p: Params, x: Tensor, state: State | None = None, *, heads: int, forget: str = "sigmoid",
    stabilized: bool = True,
) -> tuple[Tensor, State]:  # fmt: skip
    """mLSTM: Beck et al., "xLSTM", NeurIPS 2024, arXiv:2405.04517, Sec. 2.3, eqs. (19)-(27);
    the stabiliser of Appendix A.

        C_t = f_t C_{t-1} + i_t v_t k_t^T     n_t = f_t n_{t-1} + i_t k_t      (per head)
        h~_t = C_t q_t / max(|n_t^T q_t|, 1)   h_t = o_t * h~_t
        q = W_q x + b_q, k = W_k x / sqrt(K) + b_k, v = W_v x + b_v, o = sigm(W_o x + b_o)
        i = exp(w_i x + b_i), f = sigm(w_f x + b_f) (forget="sigmoid") or exp(...) ("exp")

    Stabilised (``stabilized=True``): m_t = max(log f_t + m_{t-1}, i~_t), i' = exp(i~ - m_t),
    f' = exp(log f_t + m_{t-1} - m_t), denominator max(|n^T q|, exp(-m_t)). Its (C, n) are the
    unstabilised ones times exp(-m_t), so both give the same h where both are finite.
    Where forms differ: the paper scales k by 1/sqrt(K) (followed here); NX-AI's mlstm_kernels
    scale q k^T instead and add an eps to the denominator (not here).

    Parameters: W_q, W_k [heads*K, I]; W_v, W_o [heads*V, I]; w_i, w_f [heads, I];
    optional b_q, b_k, b_v, b_o, b_i, b_f.
    State: (C [N, heads, V, K], n [N, heads, K], m [N, heads]) stabilised, (C, n) otherwise.
    Output: h [T, N, heads*V].
    """
    K = p["W_k"].shape[0] // heads
    V = p["W_v"].shape[0] // heads
    if state is None:
        state = (_zeros(x, heads, V, K), _zeros(x, heads, K)) + ((_zeros(x, heads),) if stabilized else ())
    C, n = state[0], state[1]
    m = state[2] if stabilized else None
    outs = []
    for x_t in x:
        q = split_heads(affine(p, "W_q", "b_q", x_t), heads)
        k = split_heads(lin(p["W_k"], x_t) / math.sqrt(K) + p.get("b_k", 0.0), heads)
        v = split_heads(affine(p, "W_v", "b_v", x_t), heads)
        o = sigmoid(affine(p, "W_o", "b_o", x_t))
        i_pre = affine(p, "w_i", "b_i", x_t)  # [N, heads]
        f_pre = affine(p, "w_f", "b_f", x_t)
        log_f = F.logsigmoid(f_pre) if forget == "sigmoid" else f_pre
        vk = torch.einsum("nhv,nhk->nhvk", v, k)
        if stabilized:
            m_new = torch.maximum(log_f + m, i_pre)
            i_g = exp(i_pre - m_new)
            f_g = exp(log_f + m - m_new)
            floor = exp(-m_new)
            m = m_new
        else:
            i_g, f_g, floor = exp(i_pre), exp(log_f), torch.ones_like(i_pre)
        C = f_g[..., None, None] * C + i_g[..., None, None] * vk
        n = f_g[..., None] * n + i_g[..., None] * k
        num = torch.einsum("nhvk,nhk->nhv", C, q)
        den = torch.maximum(torch.einsum("nhk,nhk->nh", n, q).abs(), floor)
        outs.append(o * merge_heads(num / den[..., None]))
    return torch.stack(outs), ((C, n, m) if stabilized else (C, n))


# --- GLA ----------------------------------------------------------------------------------------


def ref_gla(
    p: Params, x: Tensor, state: State | None = None, *, heads: int, tau: float = 16.0,
    scale: float = 1.0, eps: float = 1e-5,
) -> tuple[Tensor, State]:  # fmt: skip
    """Gated Linear Attention: Yang et al., ICML 2024, arXiv:2312.06635, Sec. 4.1 (recurrent form),
    Sec. 4.4 (the layer).

        S_t = Diag(alpha_t) S_{t-1} + k_t^T v_t      (K x V per head; row j decays by alpha_t[j])
        o_t = q_t S_t
        alpha_t = sigm(W_a2 (W_a1 x_t) + b_a)^(1/tau), tau = 16     (low-rank gate, rank R)
        r_t = Swish(W_r x_t + b_r);  y_t = W_O (LN(o_t) * r_t)      (the layer, when W_r is given)

    Where forms differ: fla multiplies q by K^-1/2 (``scale``; the paper's recurrence prints no
    scale, so 1 by default); LN here is per head, without affine (fla: a per-head RMSNorm).
    Parameters: W_q, W_k [heads*K, I]; W_v [heads*V, I]; W_a1 [R, I]; W_a2 [heads*K, R];
    optional b_a; optional layer: W_r [heads*V, I], b_r, W_O [H_out, heads*V].
    State: (S [N, heads, K, V],). Output: o [T, N, heads*V], or y [T, N, H_out] with the layer.
    """
    K = p["W_k"].shape[0] // heads
    V = p["W_v"].shape[0] // heads
    (S,) = state if state is not None else (_zeros(x, heads, K, V),)
    outs = []
    for x_t in x:
        q = split_heads(lin(p["W_q"], x_t), heads) * scale
        k = split_heads(lin(p["W_k"], x_t), heads)
        v = split_heads(lin(p["W_v"], x_t), heads)
        alpha = sigmoid(affine(p, "W_a2", "b_a", lin(p["W_a1"], x_t))) ** (1.0 / tau)
        alpha = split_heads(alpha, heads)
        S = alpha[..., None] * S + torch.einsum("nhk,nhv->nhkv", k, v)
        o = torch.einsum("nhk,nhkv->nhv", q, S)
        if "W_r" in p:
            r = F.silu(split_heads(affine(p, "W_r", "b_r", x_t), heads))
            o = head_norm(o, eps) * r
        outs.append(_out(p, o))
    return torch.stack(outs), (S,)


# --- DeltaNet and Gated DeltaNet ----------------------------------------------------------------


def ref_deltanet(
    p: Params, x: Tensor, state: State | None = None, *, heads: int, gated: bool = False
) -> tuple[Tensor, State]:
    """DeltaNet: Schlag, Irie, Schmidhuber, ICML 2021, arXiv:2102.11174, Sec. 4.2, in the form of
    Yang et al., NeurIPS 2024, arXiv:2406.06484, Sec. 2.2; gated: Yang, Kautz, Hatamizadeh,
    "Gated Delta Networks", ICLR 2025, arXiv:2412.06464, eq. (10).

        S_t = S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T             (V x K per head)
        gated:  S_t = alpha_t S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T
        o_t = S_t q_t;  q, k = L2norm(SiLU(W x));  v = W_v x;  beta_t = sigm(w_b x + b_b)

    alpha_t is per head: sigm(w_a x + b_a), or with A_log_a given the official
    exp(-exp(A_log) softplus(w_a x + b_a)) (see ``head_decay``). Where forms differ: Schlag et al.
    normalise phi(k) by its sum; this follows Yang et al.'s L2 norm of SiLU (eps 1e-6 inside the
    square root, as fla). The product with (I - beta k k^T) is computed literally.
    Parameters: W_q, W_k [heads*K, I]; W_v [heads*V, I]; w_b [heads, I]; optional b_b;
    gated: w_a [heads, I], optional b_a, A_log_a [heads]; optional W_O [H_out, heads*V].
    State: (S [N, heads, V, K],). Output: [T, N, heads*V] (or H_out with W_O).
    """
    K = p["W_k"].shape[0] // heads
    V = p["W_v"].shape[0] // heads
    (S,) = state if state is not None else (_zeros(x, heads, V, K),)
    eye = torch.eye(K, dtype=x.dtype, device=x.device)
    outs = []
    for x_t in x:
        q = l2norm(F.silu(split_heads(lin(p["W_q"], x_t), heads)))
        k = l2norm(F.silu(split_heads(lin(p["W_k"], x_t), heads)))
        v = split_heads(lin(p["W_v"], x_t), heads)
        beta = sigmoid(affine(p, "w_b", "b_b", x_t))[..., None, None]  # [N, heads, 1, 1]
        erase = eye - beta * torch.einsum("nhk,nhj->nhkj", k, k)
        kept = torch.einsum("nhvk,nhkj->nhvj", S, erase)
        if gated:
            kept = head_decay(p, x_t, "a")[..., None, None] * kept
        S = kept + beta * torch.einsum("nhv,nhk->nhvk", v, k)
        outs.append(_out(p, torch.einsum("nhvk,nhk->nhv", S, q)))
    return torch.stack(outs), (S,)


def ref_gated_deltanet(p: Params, x: Tensor, state: State | None = None, *, heads: int):
    """Gated DeltaNet (arXiv:2412.06464, eq. 10): ``ref_deltanet`` with gated=True."""
    return ref_deltanet(p, x, state, heads=heads, gated=True)


# --- Mamba (S6) ---------------------------------------------------------------------------------


def mamba_inputs(p: Params, u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Delta [.., D], B [.., Ns], C [.., Ns] from the scan's input u [.., D] (Sec. 3.2, Alg. 2):
    Delta = softplus(W_dt (W_dt_low u) + b_dt) with a rank-R W_dt_low [R, D] when given (the
    block's dt_rank), else softplus(W_dt u + b_dt); B = W_B u, C = W_C u."""
    d = lin(p["W_dt_low"], u) if "W_dt_low" in p else u
    return F.softplus(affine(p, "W_dt", "b_dt", d)), lin(p["W_B"], u), lin(p["W_C"], u)


def ref_mamba(
    p: Params, x: Tensor, state: State | None = None, *, discretization: str = "zoh"
) -> tuple[Tensor, State]:
    """Mamba's selective scan S6: Gu and Dao, arXiv:2312.00752, Sec. 3.2 (Algorithm 2), eq. (4)
    (zero-order hold), Sec. 3.4 (the block).

        h_t[d, n] = exp(Delta_t[d] A[d, n]) h_{t-1}[d, n] + Bbar_t[d, n] u_t[d],  A = -exp(A_log)
        ZOH (eq. 4):  Bbar = (exp(Delta A) - 1) / A * B[n]    ("zoh", as printed)
        Euler:        Bbar = Delta * B[n]                      ("euler": the official CUDA kernel
                                                                and selective_scan_ref)
        y_t[d] = sum_n C_t[n] h_t[d, n] + D[d] u_t[d]

    B, C, Delta from u (``mamba_inputs``). With ``W_in`` given, the Sec. 3.4 block around it:
    [u_pre; z] = W_in x, u = SiLU(causal depthwise conv1d(u_pre)), out = W_out (y * SiLU(z)).
    Without W_in, u = x (D = I) and the output is y.
    Parameters: A_log [D, Ns]; W_B, W_C [Ns, D]; W_dt [D, D] or W_dt_low [R, D] + W_dt [D, R];
    optional b_dt, D_skip [D]. Block: W_in [2D, I], conv_w [D, d_conv], optional conv_b [D],
    W_out [H_out, D].
    State: (h [N, D, Ns],), block: (h, conv [N, D, d_conv-1], the last inputs u_pre, oldest first).
    """
    if discretization not in ("zoh", "euler"):
        raise ValueError(f"discretization must be 'zoh' or 'euler' (got {discretization!r})")
    A = -exp(p["A_log"])  # [D, Ns]
    D, Ns = A.shape
    block = "W_in" in p
    if state is None:
        state = (_zeros(x, D, Ns),) + ((_zeros(x, D, p["conv_w"].shape[1] - 1),) if block else ())
    h = state[0]
    window = state[1] if block else None
    outs = []
    for x_t in x:
        if block:
            u_pre, z = lin(p["W_in"], x_t).split(D, dim=-1)
            window = torch.cat([window, u_pre[..., None]], dim=-1)  # [N, D, d_conv]
            u = F.silu((window * p["conv_w"]).sum(-1) + p.get("conv_b", 0.0))
            window = window[..., 1:]
        else:
            u = x_t
        delta, B, C = mamba_inputs(p, u)
        dA = delta[..., None] * A  # [N, D, Ns]
        if discretization == "zoh":
            B_bar = (exp(dA) - 1) / A * B[:, None, :]
        else:
            B_bar = delta[..., None] * B[:, None, :]
        h = exp(dA) * h + B_bar * u[..., None]
        y = torch.einsum("ndk,nk->nd", h, C) + p.get("D_skip", 0.0) * u
        if block:
            y = lin(p["W_out"], y * F.silu(z))
        outs.append(y)
    return torch.stack(outs), ((h, window) if block else (h,))


# --- RWKV-6 -------------------------------------------------------------------------------------

RWKV6_MIXES = ("r", "k", "v", "g", "w")


def rwkv6_mix(p: Params, x_t: Tensor, x_prev: Tensor) -> dict[str, Tensor]:
    """Finch's data-dependent token shift (arXiv:2404.05892, Sec. 5): for each of r, k, v, g, w,
    ddlerp(a, b) = a + (b - a) * lora(a + (b - a) * mu_x), lora(y) = lam + B tanh(A y),
    with a = x_t and b = x_{t-1} (g only when its parameters are given: only the layer reads it)."""
    diff = x_prev - x_t
    shared = x_t + diff * p["mu_x"]
    return {
        c: x_t + diff * (p[f"lam_{c}"] + lin(p[f"B_{c}"], tanh(lin(p[f"A_{c}"], shared))))
        for c in RWKV6_MIXES
        if f"lam_{c}" in p
    }


def ref_rwkv6(
    p: Params, x: Tensor, state: State | None = None, *, heads: int, eps: float = 64e-5
) -> tuple[Tensor, State]:
    """RWKV-6 (Finch): Peng et al., "Eagle and Finch", COLM 2024, arXiv:2404.05892, Sec. 5.

        r_t = W_r ddlerp_r(x_t, x_{t-1})     (k_t, v_t, g_t alike; ``rwkv6_mix``)
        d_t = lora_d(ddlerp_w(x_t, x_{t-1})) = lam_d + B_d tanh(A_d ...);  w_t = exp(-exp(d_t))
        wkv_t = Diag(u) k_t^T v_t + S_{t-1};   S_t = Diag(w_t) S_{t-1} + k_t^T v_t   (K x V)
        o_t = W_o (SiLU(g_t) * GroupNorm(r_t wkv_t))       (when W_o is given; else r_t wkv_t)

    The official code's one shared low-rank A for the five mixes equals five row blocks A_c, as
    here (tanh acts elementwise). GroupNorm: one group per head, eps 64e-5 as the official ln_x,
    optional affine gn_w, gn_b [heads*V].
    Parameters: mu_x [I]; for c in r, k, v, g, w: lam_c [I], A_c [R, I], B_c [I, R];
    lam_d [heads*K], A_d [R_d, I], B_d [heads*K, R_d]; W_r, W_k [heads*K, I]; W_v [heads*V, I];
    u [heads*K]; layer: W_g [heads*V, I], W_o [H_out, heads*V], optional gn_w, gn_b.
    State: (S [N, heads, K, V], x_prev [N, I]). Output: [T, N, heads*V] or [T, N, H_out].
    """
    K = p["W_k"].shape[0] // heads
    V = p["W_v"].shape[0] // heads
    if state is None:
        state = (_zeros(x, heads, K, V), _zeros(x, x.shape[2]))
    S, x_prev = state
    u = split_heads(p["u"], heads)
    outs = []
    for x_t in x:
        mix = rwkv6_mix(p, x_t, x_prev)
        r = split_heads(lin(p["W_r"], mix["r"]), heads)
        k = split_heads(lin(p["W_k"], mix["k"]), heads)
        v = split_heads(lin(p["W_v"], mix["v"]), heads)
        d = p["lam_d"] + lin(p["B_d"], tanh(lin(p["A_d"], mix["w"])))
        w = split_heads(exp(-exp(d)), heads)
        kv = torch.einsum("nhk,nhv->nhkv", k, v)
        wkv = u[..., None] * kv + S
        o = torch.einsum("nhk,nhkv->nhv", r, wkv)
        S = w[..., None] * S + kv
        if "W_o" in p:
            o = merge_heads(head_norm(o, eps)) * p.get("gn_w", 1.0) + p.get("gn_b", 0.0)
            o = lin(p["W_o"], F.silu(lin(p["W_g"], mix["g"])) * o)
        else:
            o = merge_heads(o)
        outs.append(o)
        x_prev = x_t
    return torch.stack(outs), (S, x_prev)


# --- HGRN2 --------------------------------------------------------------------------------------


def ref_hgrn2(p: Params, x: Tensor, state: State | None = None, *, heads: int) -> tuple[Tensor, State]:
    """HGRN2: Qin et al., COLM 2024, arXiv:2404.07904, Sec. 3.

        f_t = gamma + (1 - gamma) * sigm(W_f x_t + b_f)       (lower-bounded forget gate, K wide)
        S_t = Diag(f_t) S_{t-1} + (1 - f_t)^T i_t,  i_t = W_i x_t     (K x V per head)
        y_t = q_t S_t,  q_t = W_q x_t

    gamma is the lower bound (a learned per-layer value in the paper; any [heads*K] or scalar
    tensor here). Where forms differ: fla's HGRN2 adds an output norm and gate; not here.
    Parameters: W_f, W_q [heads*K, I]; W_i [heads*V, I]; gamma; optional b_f, W_O [H_out, heads*V].
    State: (S [N, heads, K, V],). Output: [T, N, heads*V] (or H_out).
    """
    K = p["W_f"].shape[0] // heads
    V = p["W_i"].shape[0] // heads
    (S,) = state if state is not None else (_zeros(x, heads, K, V),)
    outs = []
    for x_t in x:
        f = p["gamma"] + (1 - p["gamma"]) * sigmoid(affine(p, "W_f", "b_f", x_t))
        f = split_heads(f, heads)
        i = split_heads(lin(p["W_i"], x_t), heads)
        q = split_heads(lin(p["W_q"], x_t), heads)
        S = f[..., None] * S + torch.einsum("nhk,nhv->nhkv", 1 - f, i)
        outs.append(_out(p, torch.einsum("nhk,nhkv->nhv", q, S)))
    return torch.stack(outs), (S,)


# --- M2RNN --------------------------------------------------------------------------------------


def ref_m2rnn(p: Params, x: Tensor, state: State | None = None, *, heads: int) -> tuple[Tensor, State]:
    """M2RNN, a nonlinear matrix memory, as open-lm-engine/accelerated-model-architectures ("XMA")
    computes it: xma/functional/m2rnn/__init__.py, ``forward_backward_torch``, at commit
    16a501c4875aa13625a1e5dfea2e756c756c99c4.

        H_t = f_t H_{t-1} + (1 - f_t) tanh(H_{t-1} W + k_t v_t^T)     (K x V per head, W V x V)
        y_t = q_t^T H_t  (+ D * v_t when D is given, as lm-engine's block adds)

    XMA takes f as an input (one scalar per head and step); here f = ``head_decay(p, x, "f")``:
    sigm(w_f x + b_f), or exp(-exp(A_log_f) softplus(w_f x + b_f)) with A_log_f given (the form
    lm-engine's M2RNN block feeds it). No chunkwise form: the state goes through tanh.
    Parameters: W_q, W_k [heads*K, I]; W_v [heads*V, I]; W [heads, V, V]; w_f [heads, I];
    optional b_f, A_log_f [heads], D [heads*V], W_O [H_out, heads*V].
    State: (H [N, heads, K, V],). Output: [T, N, heads*V] (or H_out).
    """
    K = p["W_k"].shape[0] // heads
    V = p["W_v"].shape[0] // heads
    (H,) = state if state is not None else (_zeros(x, heads, K, V),)
    outs = []
    for x_t in x:
        q = split_heads(lin(p["W_q"], x_t), heads)
        k = split_heads(lin(p["W_k"], x_t), heads)
        v = split_heads(lin(p["W_v"], x_t), heads)
        f = head_decay(p, x_t, "f")[..., None, None]
        cand = tanh(torch.einsum("nhkv,hvw->nhkw", H, p["W"]) + torch.einsum("nhk,nhv->nhkv", k, v))
        H = f * H + (1 - f) * cand
        y = torch.einsum("nhk,nhkv->nhv", q, H)
        if "D" in p:
            y = y + split_heads(p["D"], heads) * v
        outs.append(_out(p, y))
    return torch.stack(outs), (H,)


# --- LRU ----------------------------------------------------------------------------------------


def ref_lru(p: Params, x: Tensor, state: State | None = None) -> tuple[Tensor, State]:
    """Linear Recurrent Unit: Orvieto et al., ICML 2023, arXiv:2303.06349, Sec. 3 and the code of
    Appendix A, with the complex diagonal written as real and imaginary parts.

        x_k = Diag(lambda) x_{k-1} + gamma * (B u_k),   y_k = Re(C x_k) + D * u_k
        lambda = exp(-exp(nu_log) + i exp(theta_log)),  gamma = exp(gamma_log)

    so |lambda| = exp(-exp(nu_log)), lambda = |lambda| (cos phi + i sin phi) with phi = exp(theta_log),
    and Re(C x) = C_re x_re - C_im x_im. D * u needs the output as wide as the input (as the paper).
    Parameters: nu_log, theta_log, gamma_log [P]; B_re, B_im [P, I]; C_re, C_im [H, P]; D [H].
    State: (x_re [N, P], x_im [N, P]). Output: [T, N, H].
    """
    P = p["nu_log"].shape[0]
    re, im = state if state is not None else (_zeros(x, P), _zeros(x, P))
    mod = exp(-exp(p["nu_log"]))
    phase = exp(p["theta_log"])
    lam_re, lam_im = mod * torch.cos(phase), mod * torch.sin(phase)
    gamma = exp(p["gamma_log"])
    outs = []
    for u in x:
        bu_re, bu_im = gamma * lin(p["B_re"], u), gamma * lin(p["B_im"], u)
        re, im = lam_re * re - lam_im * im + bu_re, lam_re * im + lam_im * re + bu_im
        outs.append(lin(p["C_re"], re) - lin(p["C_im"], im) + p["D"] * u)
    return torch.stack(outs), (re, im)


def lru_ring_init(
    state_size: int, in_size: int, out_size: int | None = None, *, r_min: float = 0.0,
    r_max: float = 1.0, max_phase: float = 2 * math.pi, generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
) -> Params:  # fmt: skip
    """LRU's ring initialisation, Orvieto et al. 2023, Sec. 3.3 and Appendix A (``init_lru_parameters``).

    lambda lies uniformly on the ring r_min <= |lambda| <= r_max, phase in [0, max_phase]: the
    paper's code draws |lambda|^2 uniformly in [r_min^2, r_max^2] (uniform over the ring's area),
    nu_log = log(-log(|lambda|^2) / 2), theta_log = log(max_phase u2), gamma_log = log sqrt(1 -
    |lambda|^2). (The reference notes say "|lambda| uniform"; this follows the paper's code.)
    B ~ N(0, 1/(2 I)) (real and imaginary), C ~ N(0, 1/P), D ~ N(0, 1), as Appendix A.
    """
    out_size = in_size if out_size is None else out_size
    g = dict(generator=generator, dtype=dtype)
    u1, u2 = torch.rand(state_size, **g), torch.rand(state_size, **g)
    nu_log = torch.log(-0.5 * torch.log(u1 * (r_max**2 - r_min**2) + r_min**2))
    theta_log = torch.log(max_phase * u2)
    mod_sq = exp(-2 * exp(nu_log))
    return {
        "nu_log": nu_log,
        "theta_log": theta_log,
        "gamma_log": torch.log(torch.sqrt(1 - mod_sq)),
        "B_re": torch.randn(state_size, in_size, **g) / math.sqrt(2 * in_size),
        "B_im": torch.randn(state_size, in_size, **g) / math.sqrt(2 * in_size),
        "C_re": torch.randn(out_size, state_size, **g) / math.sqrt(state_size),
        "C_im": torch.randn(out_size, state_size, **g) / math.sqrt(state_size),
        "D": torch.randn(out_size, **g),
    }


# --- chrono LSTM --------------------------------------------------------------------------------


def chrono_init(
    hidden: int, T_max: float, *, generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Chrono initialisation: Tallec and Ollivier, "Can recurrent neural networks warp time?",
    ICLR 2018, arXiv:1804.11188, Sec. 4: b_f ~ log(U[1, T_max - 1]), b_i = -b_f.
    Returns (b_i, b_f), each [hidden]. The forget gate's time constant 1 / (1 - sigm(b_f)) =
    1 + exp(b_f) then lies in [2, T_max]."""
    if not T_max > 2:
        raise ValueError(f"chrono_init: T_max must be > 2 (got {T_max})")
    b_f = torch.log(1 + (T_max - 2) * torch.rand(hidden, generator=generator, dtype=dtype))
    return -b_f, b_f


def ref_chrono_lstm(p: Params, x: Tensor, state: State | None = None) -> tuple[Tensor, State]:
    """The LSTM that chrono initialisation starts (cell-equations.md 2a, torch.nn.LSTM's form):
    i, f, o = sigm(W_i* x + b_i* + W_h* h + b_h*), g = tanh(...); c_t = f c + i g; h_t = o tanh(c_t).
    Gate order i, f, g, o in W_ih [4H, I], W_hh [4H, H], b_ih, b_hh [4H] (torch's layout); chrono
    sets the i and f blocks of one bias (``chrono_init``) and zeroes the other.
    State: (h [N, H], c [N, H]). Output: h [T, N, H].
    """
    H = p["W_hh"].shape[1]
    h, c = state if state is not None else (_zeros(x, H), _zeros(x, H))
    outs = []
    for x_t in x:
        gates = affine(p, "W_ih", "b_ih", x_t) + affine(p, "W_hh", "b_hh", h)
        i, f, g, o = gates.split(H, dim=-1)
        c = sigmoid(f) * c + sigmoid(i) * tanh(g)
        h = sigmoid(o) * tanh(c)
        outs.append(h)
    return torch.stack(outs), (h, c)


REFERENCES = {
    "mlstm": ref_mlstm,
    "gla": ref_gla,
    "deltanet": ref_deltanet,
    "gated_deltanet": ref_gated_deltanet,
    "mamba": ref_mamba,
    "rwkv6": ref_rwkv6,
    "hgrn2": ref_hgrn2,
    "m2rnn": ref_m2rnn,
    "lru": ref_lru,
    "chrono_lstm": ref_chrono_lstm,
}
