"""Hand-written PyTorch references for the cell zoo: the executable meaning of cells/*.cell.

Written from the papers' equations (as collected in cell-equations.md), NOT from the .cell files:
plain per-gate code, one step function per cell, so that a compiled cell can be checked against
something that was derived independently.

Every reference has the signature

    ref_<stem>(p, x, state) -> (outputs [T, N, H], final_state)

- ``p`` maps the cell file's individual parameter names ("W_ii", "b_f"; never group names such as
  "weight_ih") to tensors. Matrices are [H, K] in torch's (out, in) layout, so the paper's ``W x``
  is ``x @ W.T`` for a batch of row vectors (``lin`` below); vectors are [H].
- ``x`` is [T, N, I].
- ``state`` is the tuple of carried states, each [N, H], in the cell's ``state`` order, followed by
  the extra states that ``prev(...)`` adds, in order of first appearance (FGR: c, y, i, f, o).
- The return value is (the per-step outputs stacked [T, N, H], the final states in the same order).

Cells with more inputs than x (an attention context) have references in EXTRA_INPUT_REFERENCES,
``ref(p, x, state, **extras)`` with each extra [T, N, C] (one value per step); their cells are
test-only (tests/*.cell), so the zoo's REFERENCES keep the one-input signature.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

sigmoid, tanh, relu, exp = torch.sigmoid, torch.tanh, torch.relu, torch.exp

Params = dict[str, Tensor]
State = tuple[Tensor, ...]
Step = Callable[[Tensor, State], tuple[Tensor, State]]


def lin(W: Tensor, v: Tensor) -> Tensor:
    """The paper's ``W v`` for a batch of row vectors: W [H, K], v [N, K] -> [N, H]."""
    return v @ W.T


def run(step: Step, x: Tensor, state: State) -> tuple[Tensor, State]:
    """Apply ``step(x_t, state) -> (output_t, state)`` along time: x [T, N, I] -> ([T, N, H], state)."""
    outputs = []
    for x_t in x:
        y_t, state = step(x_t, state)
        outputs.append(y_t)
    return torch.stack(outputs), state


# --- torch.nn layers (torch documentation) ---------------------------------------------------------


def ref_lstm(p: Params, x: Tensor, state: State) -> tuple[Tensor, State]:
    """torch.nn.LSTM, gate order i, f, g, o; state (h, c)."""

    def step(x, state):
        h, c = state
        i = sigmoid(lin(p["W_ii"], x) + p["b_ii"] + lin(p["W_hi"], h) + p["b_hi"])
        f = sigmoid(lin(p["W_if"], x) + p["b_if"] + lin(p["W_hf"], h) + p["b_hf"])
        g = tanh(lin(p["W_ig"], x) + p["b_ig"] + lin(p["W_hg"], h) + p["b_hg"])
        o = sigmoid(lin(p["W_io"], x) + p["b_io"] + lin(p["W_ho"], h) + p["b_ho"])
        c = f * c + i * g
        h = o * tanh(c)
        return h, (h, c)

    return run(step, x, state)


def ref_gru(p: Params, x: Tensor, state: State) -> tuple[Tensor, State]:
    """torch.nn.GRU: reset applied after the recurrent matmul (b_hn inside), z keeps the old h."""

    def step(x, state):
        (h,) = state
        r = sigmoid(lin(p["W_ir"], x) + p["b_ir"] + lin(p["W_hr"], h) + p["b_hr"])
        z = sigmoid(lin(p["W_iz"], x) + p["b_iz"] + lin(p["W_hz"], h) + p["b_hz"])
        n = tanh(lin(p["W_in"], x) + p["b_in"] + r * (lin(p["W_hn"], h) + p["b_hn"]))
        h = (1 - z) * n + z * h
        return h, (h,)

    return run(step, x, state)


def _torch_rnn(activation: Callable[[Tensor], Tensor]):
    def ref(p: Params, x: Tensor, state: State) -> tuple[Tensor, State]:
        def step(x, state):
            (h,) = state
            h = activation(lin(p["W_ih"], x) + p["b_ih"] + lin(p["W_hh"], h) + p["b_hh"])
            return h, (h,)

        return run(step, x, state)

    return ref


ref_rnn_tanh = _torch_rnn(tanh)  # torch.nn.RNN(nonlinearity="tanh")
ref_rnn_relu = _torch_rnn(relu)  # torch.nn.RNN(nonlinearity="relu")


# --- Greff et al. 2015, vanilla LSTM and its eight variants; state (c, y) --------------------------


def ref_greff_vanilla(p: Params, x: Tensor, state: State) -> tuple[Tensor, State]:
    """Peepholes: i, f read c^{t-1}; o reads the new c^t."""

    def step(x, state):
        c, y = state
        z = tanh(lin(p["W_z"], x) + lin(p["R_z"], y) + p["b_z"])
        i = sigmoid(lin(p["W_i"], x) + lin(p["R_i"], y) + p["p_i"] * c + p["b_i"])
        f = sigmoid(lin(p["W_f"], x) + lin(p["R_f"], y) + p["p_f"] * c + p["b_f"])
        c = z * i + c * f
        o = sigmoid(lin(p["W_o"], x) + lin(p["R_o"], y) + p["p_o"] * c + p["b_o"])
        y = tanh(c) * o
        return y, (c, y)

    return run(step, x, state)


def ref_greff_nig(p: Params, x: Tensor, state: State) -> tuple[Tensor, State]:
    """No input gate: i = 1."""

    def step(x, state):
        c, y = state
        z = tanh(lin(p["W_z"], x) + lin(p["R_z"], y) + p["b_z"])
        i = 1.0
        f = sigmoid(lin(p["W_f"], x) + lin(p["R_f"], y) + p["p_f"] * c + p["b_f"])
        c = z * i + c * f
        o = sigmoid(lin(p["W_o"], x) + lin(p["R_o"], y) + p["p_o"] * c + p["b_o"])
        y = tanh(c) * o
        return y, (c, y)

    return run(step, x, state)


def ref_greff_nfg(p: Params, x: Tensor, state: State) -> tuple[Tensor, State]:
    """No forget gate: f = 1."""

    def step(x, state):
        c, y = state
        z = tanh(lin(p["W_z"], x) + lin(p["R_z"], y) + p["b_z"])
        i = sigmoid(lin(p["W_i"], x) + lin(p["R_i"], y) + p["p_i"] * c + p["b_i"])
        f = 1.0
        c = z * i + c * f
        o = sigmoid(lin(p["W_o"], x) + lin(p["R_o"], y) + p["p_o"] * c + p["b_o"])
        y = tanh(c) * o
        return y, (c, y)

    return run(step, x, state)


def ref_greff_nog(p: Params, x: Tensor, state: State) -> tuple[Tensor, State]:
    """No output gate: o = 1, y = tanh(c)."""

    def step(x, state):
        c, y = state
        z = tanh(lin(p["W_z"], x) + lin(p["R_z"], y) + p["b_z"])
        i = sigmoid(lin(p["W_i"], x) + lin(p["R_i"], y) + p["p_i"] * c + p["b_i"])
        f = sigmoid(lin(p["W_f"], x) + lin(p["R_f"], y) + p["p_f"] * c + p["b_f"])
        c = z * i + c * f
        y = tanh(c)
        return y, (c, y)

    return run(step, x, state)


def ref_greff_niaf(p: Params, x: Tensor, state: State) -> tuple[Tensor, State]:
    """No input activation: z is its pre-activation."""

    def step(x, state):
        c, y = state
        z = lin(p["W_z"], x) + lin(p["R_z"], y) + p["b_z"]
        i = sigmoid(lin(p["W_i"], x) + lin(p["R_i"], y) + p["p_i"] * c + p["b_i"])
        f = sigmoid(lin(p["W_f"], x) + lin(p["R_f"], y) + p["p_f"] * c + p["b_f"])
        c = z * i + c * f
        o = sigmoid(lin(p["W_o"], x) + lin(p["R_o"], y) + p["p_o"] * c + p["b_o"])
        y = tanh(c) * o
        return y, (c, y)

    return run(step, x, state)


def ref_greff_noaf(p: Params, x: Tensor, state: State) -> tuple[Tensor, State]:
    """No output activation: y = c * o."""

    def step(x, state):
        c, y = state
        z = tanh(lin(p["W_z"], x) + lin(p["R_z"], y) + p["b_z"])
        i = sigmoid(lin(p["W_i"], x) + lin(p["R_i"], y) + p["p_i"] * c + p["b_i"])
        f = sigmoid(lin(p["W_f"], x) + lin(p["R_f"], y) + p["p_f"] * c + p["b_f"])
        c = z * i + c * f
        o = sigmoid(lin(p["W_o"], x) + lin(p["R_o"], y) + p["p_o"] * c + p["b_o"])
        y = c * o
        return y, (c, y)

    return run(step, x, state)


def ref_greff_np(p: Params, x: Tensor, state: State) -> tuple[Tensor, State]:
    """No peepholes."""

    def step(x, state):
        c, y = state
        z = tanh(lin(p["W_z"], x) + lin(p["R_z"], y) + p["b_z"])
        i = sigmoid(lin(p["W_i"], x) + lin(p["R_i"], y) + p["b_i"])
        f = sigmoid(lin(p["W_f"], x) + lin(p["R_f"], y) + p["b_f"])
        c = z * i + c * f
        o = sigmoid(lin(p["W_o"], x) + lin(p["R_o"], y) + p["b_o"])
        y = tanh(c) * o
        return y, (c, y)

    return run(step, x, state)


def ref_greff_cifg(p: Params, x: Tensor, state: State) -> tuple[Tensor, State]:
    """Coupled input and forget gate: f = 1 - i (the input gate keeps its peephole)."""

    def step(x, state):
        c, y = state
        z = tanh(lin(p["W_z"], x) + lin(p["R_z"], y) + p["b_z"])
        i = sigmoid(lin(p["W_i"], x) + lin(p["R_i"], y) + p["p_i"] * c + p["b_i"])
        f = 1 - i
        c = z * i + c * f
        o = sigmoid(lin(p["W_o"], x) + lin(p["R_o"], y) + p["p_o"] * c + p["b_o"])
        y = tanh(c) * o
        return y, (c, y)

    return run(step, x, state)


def ref_greff_fgr(p: Params, x: Tensor, state: State) -> tuple[Tensor, State]:
    """Full gate recurrence: R_ab feeds gate a of step t-1 (after the sigmoid) into gate b.

    State (c, y, i, f, o): the previous gate activations are carried, zero at the start.
    """

    def step(x, state):
        c, y, i_prev, f_prev, o_prev = state
        z = tanh(lin(p["W_z"], x) + lin(p["R_z"], y) + p["b_z"])
        i = sigmoid(
            lin(p["W_i"], x)
            + lin(p["R_i"], y)
            + p["p_i"] * c
            + p["b_i"]
            + lin(p["R_ii"], i_prev)
            + lin(p["R_fi"], f_prev)
            + lin(p["R_oi"], o_prev)
        )
        f = sigmoid(
            lin(p["W_f"], x)
            + lin(p["R_f"], y)
            + p["p_f"] * c
            + p["b_f"]
            + lin(p["R_if"], i_prev)
            + lin(p["R_ff"], f_prev)
            + lin(p["R_of"], o_prev)
        )
        c = z * i + c * f
        o = sigmoid(
            lin(p["W_o"], x)
            + lin(p["R_o"], y)
            + p["p_o"] * c
            + p["b_o"]
            + lin(p["R_io"], i_prev)
            + lin(p["R_fo"], f_prev)
            + lin(p["R_oo"], o_prev)
        )
        y = tanh(c) * o
        return y, (c, y, i, f, o)

    return run(step, x, state)


# --- Jozefowicz et al. 2015 MUT1-3: z weights the candidate; state (h,) -----------------------------


def ref_mut1(p: Params, x: Tensor, state: State) -> tuple[Tensor, State]:
    """Un-weighted tanh(x) in the candidate: needs I == H."""

    def step(x, state):
        (h,) = state
        z = sigmoid(lin(p["W_xz"], x) + p["b_z"])
        r = sigmoid(lin(p["W_xr"], x) + lin(p["W_hr"], h) + p["b_r"])
        h = tanh(lin(p["W_hh"], r * h) + tanh(x) + p["b"]) * z + h * (1 - z)
        return h, (h,)

    return run(step, x, state)


def ref_mut2(p: Params, x: Tensor, state: State) -> tuple[Tensor, State]:
    """Raw x in the reset gate: needs I == H."""

    def step(x, state):
        (h,) = state
        z = sigmoid(lin(p["W_xz"], x) + lin(p["W_hz"], h) + p["b_z"])
        r = sigmoid(x + lin(p["W_hr"], h) + p["b_r"])
        h = tanh(lin(p["W_hh"], r * h) + lin(p["W_xh"], x) + p["b"]) * z + h * (1 - z)
        return h, (h,)

    return run(step, x, state)


def ref_mut3(p: Params, x: Tensor, state: State) -> tuple[Tensor, State]:
    """Update gate reads tanh(h)."""

    def step(x, state):
        (h,) = state
        z = sigmoid(lin(p["W_xz"], x) + lin(p["W_hz"], tanh(h)) + p["b_z"])
        r = sigmoid(lin(p["W_xr"], x) + lin(p["W_hr"], h) + p["b_r"])
        h = tanh(lin(p["W_hh"], r * h) + lin(p["W_xh"], x) + p["b"]) * z + h * (1 - z)
        return h, (h,)

    return run(step, x, state)


# --- other cells ------------------------------------------------------------------------------------


def ref_gru_cho(p: Params, x: Tensor, state: State) -> tuple[Tensor, State]:
    """Cho et al. 2014 eqs. (5)-(8) with biases: reset before the matmul U (r h), z keeps the old h."""

    def step(x, state):
        (h,) = state
        r = sigmoid(lin(p["W_r"], x) + lin(p["U_r"], h) + p["b_r"])
        z = sigmoid(lin(p["W_z"], x) + lin(p["U_z"], h) + p["b_z"])
        h_tilde = tanh(lin(p["W"], x) + lin(p["U"], r * h) + p["b"])
        h = z * h + (1 - z) * h_tilde
        return h, (h,)

    return run(step, x, state)


def ref_vanilla_rnn(p: Params, x: Tensor, state: State) -> tuple[Tensor, State]:
    """RecurrentArchitectures vanillaRNN.py: carries the sigmoid output y; state (y,)."""

    def step(x, state):
        (y,) = state
        s = tanh(lin(p["U"], x) + lin(p["W"], y) + p["b1"])
        y = sigmoid(lin(p["V"], s) + p["b2"])
        return y, (y,)

    return run(step, x, state)


def ref_mingru(p: Params, x: Tensor, state: State) -> tuple[Tensor, State]:
    """Feng et al. 2024 minGRU, plain form: gates read x only."""

    def step(x, state):
        (h,) = state
        z = sigmoid(lin(p["W_z"], x) + p["b_z"])
        h_tilde = lin(p["W_h"], x) + p["b_h"]
        h = (1 - z) * h + z * h_tilde
        return h, (h,)

    return run(step, x, state)


def ref_minlstm(p: Params, x: Tensor, state: State) -> tuple[Tensor, State]:
    """Feng et al. 2024 minLSTM, plain form: f, i normalised to sum to one."""

    def step(x, state):
        (h,) = state
        f = sigmoid(lin(p["W_f"], x) + p["b_f"])
        i = sigmoid(lin(p["W_i"], x) + p["b_i"])
        h_tilde = lin(p["W_h"], x) + p["b_h"]
        f_norm, i_norm = f / (f + i), i / (f + i)
        h = f_norm * h + i_norm * h_tilde
        return h, (h,)

    return run(step, x, state)


def ref_indrnn(p: Params, x: Tensor, state: State) -> tuple[Tensor, State]:
    """Li et al. 2018 eq. (2), ReLU: the recurrent weight u is elementwise."""

    def step(x, state):
        (h,) = state
        h = relu(lin(p["W"], x) + p["u"] * h + p["b"])
        return h, (h,)

    return run(step, x, state)


def ref_sru(p: Params, x: Tensor, state: State) -> tuple[Tensor, State]:
    """Lei et al. 2018 SRU with v * c_{t-1} terms; carries c, outputs h; highway on raw x (I == H)."""

    def step(x, state):
        (c_prev,) = state
        f = sigmoid(lin(p["W_f"], x) + p["v_f"] * c_prev + p["b_f"])
        c = f * c_prev + (1 - f) * lin(p["W"], x)
        r = sigmoid(lin(p["W_r"], x) + p["v_r"] * c_prev + p["b_r"])
        h = r * c + (1 - r) * x
        return h, (c,)

    return run(step, x, state)


def ref_slstm(p: Params, x: Tensor, state: State) -> tuple[Tensor, State]:
    """Beck et al. 2024 sLSTM, one head, sigmoid forget gate in log space; state (h, c, n, m)."""

    def step(x, state):
        h, c, n, m = state
        z = tanh(lin(p["W_z"], x) + lin(p["R_z"], h) + p["b_z"])
        i_tilde = lin(p["W_i"], x) + lin(p["R_i"], h) + p["b_i"]
        f_tilde = lin(p["W_f"], x) + lin(p["R_f"], h) + p["b_f"]
        o = sigmoid(lin(p["W_o"], x) + lin(p["R_o"], h) + p["b_o"])
        log_f = F.logsigmoid(f_tilde)
        m_new = torch.maximum(log_f + m, i_tilde)
        i = exp(i_tilde - m_new)  # stabilised input gate i'
        f = exp(log_f + m - m_new)  # stabilised forget gate f'
        c = f * c + i * z
        n = f * n + i
        h = o * c / n
        return h, (h, c, n, m_new)

    return run(step, x, state)


# --- the language's second edition (issue 13) --------------------------------------------------------


def ref_antisymmetric_rnn(p: Params, x: Tensor, state: State) -> tuple[Tensor, State]:
    """Chang et al. 2019, gated AntisymmetricRNN with gamma = eps = 0.01; state (h,)."""
    H = p["W"].shape[0]

    def step(x, state):
        (h,) = state
        A = p["W"] - p["W"].T - 0.01 * torch.eye(H, dtype=x.dtype)
        z = sigmoid(lin(A, h) + lin(p["V_z"], x) + p["b_z"])
        h = h + 0.01 * z * tanh(lin(A, h) + lin(p["V_h"], x) + p["b_h"])
        return h, (h,)

    return run(step, x, state)


def _with_previous(x: Tensor) -> Tensor:
    """[T, N, I] -> [T, N, 2I]: x_{t-1} (zero at t = 0) beside x_t, the QRNN's window of 2."""
    return torch.cat([torch.cat([torch.zeros_like(x[:1]), x[:-1]]), x], dim=-1)


def ref_qrnn(p: Params, x: Tensor, state: State) -> tuple[Tensor, State]:
    """Bradbury et al. 2017, window 2, fo-pooling; state (c,), output h = o * c."""

    def step(xx, state):
        (c,) = state
        prev, x_t = xx.chunk(2, dim=-1)
        z = tanh(lin(p["W_z1"], prev) + lin(p["W_z2"], x_t) + p["b_z"])
        f = sigmoid(lin(p["W_f1"], prev) + lin(p["W_f2"], x_t) + p["b_f"])
        o = sigmoid(lin(p["W_o1"], prev) + lin(p["W_o2"], x_t) + p["b_o"])
        c = f * c + (1 - f) * z
        return o * c, (c,)

    return run(step, _with_previous(x), state)


def ref_qrnn_f(p: Params, x: Tensor, state: State) -> tuple[Tensor, State]:
    """Bradbury et al. 2017, window 2, f-pooling; state (h,)."""

    def step(xx, state):
        (h,) = state
        prev, x_t = xx.chunk(2, dim=-1)
        z = tanh(lin(p["W_z1"], prev) + lin(p["W_z2"], x_t) + p["b_z"])
        f = sigmoid(lin(p["W_f1"], prev) + lin(p["W_f2"], x_t) + p["b_f"])
        h = f * h + (1 - f) * z
        return h, (h,)

    return run(step, _with_previous(x), state)


def ref_lstm_proj(p: Params, x: Tensor, state: State) -> tuple[Tensor, State]:
    """torch.nn.LSTM with proj_size: h [N, P] = W_hr (o * tanh c), c [N, H]; state (h, c)."""

    def step(x, state):
        h, c = state
        i = sigmoid(lin(p["W_ii"], x) + p["b_ii"] + lin(p["W_hi"], h) + p["b_hi"])
        f = sigmoid(lin(p["W_if"], x) + p["b_if"] + lin(p["W_hf"], h) + p["b_hf"])
        g = tanh(lin(p["W_ig"], x) + p["b_ig"] + lin(p["W_hg"], h) + p["b_hg"])
        o = sigmoid(lin(p["W_io"], x) + p["b_io"] + lin(p["W_ho"], h) + p["b_ho"])
        c = f * c + i * g
        h = lin(p["weight_hr"], o * tanh(c))
        return h, (h, c)

    return run(step, x, state)


def ref_slstm_heads(p: Params, x: Tensor, state: State) -> tuple[Tensor, State]:
    """sLSTM with block-diagonal recurrent matrices: R_* stored [NH, d, d], head k maps h's k-th block
    of d units to the gate's k-th block (xLSTM); otherwise as ref_slstm. State (h, c, n, m)."""
    blocks = {k: torch.block_diag(*p[k]) for k in ("R_z", "R_i", "R_f", "R_o")}
    return ref_slstm({**p, **blocks}, x, state)


def ref_phased_lstm(p: Params, x: Tensor, state: State, t: Tensor) -> tuple[Tensor, State]:
    """Neil, Pfeiffer, Liu 2016, Phased LSTM (eqs. 6-11) over the peephole LSTM; t [T, N, 1] holds
    each step's time stamp. State (c, h)."""
    outputs = []
    c, h = state
    for x_t, t_t in zip(x, t, strict=True):
        i = sigmoid(lin(p["W_xi"], x_t) + lin(p["W_hi"], h) + p["w_ci"] * c + p["b_i"])
        f = sigmoid(lin(p["W_xf"], x_t) + lin(p["W_hf"], h) + p["w_cf"] * c + p["b_f"])
        c_tilde = f * c + i * tanh(lin(p["W_xc"], x_t) + lin(p["W_hc"], h) + p["b_c"])
        o = sigmoid(lin(p["W_xo"], x_t) + lin(p["W_ho"], h) + p["w_co"] * c_tilde + p["b_o"])
        h_tilde = o * tanh(c_tilde)
        phi = torch.remainder(t_t - p["s"], p["tau"]) / p["tau"]
        r_on = p["r_on"]
        k = torch.where(
            phi < r_on / 2, 2 * phi / r_on, torch.where(phi < r_on, 2 - 2 * phi / r_on, 0.001 * phi)
        )
        c = k * c_tilde + (1 - k) * c
        h = k * h_tilde + (1 - k) * h
        outputs.append(h)
    return torch.stack(outputs), (c, h)


def _layer_norm(v: Tensor) -> Tensor:
    """(v - mean) / sqrt(var + 1e-5) over the last dimension, no affine part (torch.nn.LayerNorm's eps)."""
    return F.layer_norm(v, v.shape[-1:], eps=1e-5)


def ref_ln_lstm(p: Params, x: Tensor, state: State) -> tuple[Tensor, State]:
    """Ba et al. 2016 LN-LSTM: LN over the whole 4H-wide W_h h and W_x x (gate order f, i, o, g), a
    gain per row, one bias; LN(c) with gain and bias. State (h, c)."""
    gates = ("f", "i", "o", "g")
    W_h = torch.cat([p[f"W_h{k}"] for k in gates])
    W_x = torch.cat([p[f"W_x{k}"] for k in gates])
    a_h = torch.cat([p[f"a_h{k}"] for k in gates])
    a_x = torch.cat([p[f"a_x{k}"] for k in gates])
    b = torch.cat([p[f"b_{k}"] for k in gates])

    def step(x, state):
        h, c = state
        pre = a_h * _layer_norm(lin(W_h, h)) + a_x * _layer_norm(lin(W_x, x)) + b
        f, i, o, g = pre.chunk(4, dim=-1)
        c = sigmoid(f) * c + sigmoid(i) * tanh(g)
        h = sigmoid(o) * tanh(p["a_c"] * _layer_norm(c) + p["beta_c"])
        return h, (h, c)

    return run(step, x, state)


def ref_ln_gru(p: Params, x: Tensor, state: State) -> tuple[Tensor, State]:
    """Haste's LayerNormGRU: torch.nn.GRU with LN over the 3H-wide W_x x and W_h h (gates r, z, n), a
    gain per row. State (h,)."""
    gates = ("r", "z", "n")
    W_x = torch.cat([p[f"W_x{k}"] for k in gates])
    W_h = torch.cat([p[f"W_h{k}"] for k in gates])
    g_x = torch.cat([p[f"g_x{k}"] for k in gates])
    g_h = torch.cat([p[f"g_h{k}"] for k in gates])

    def step(x, state):
        (h,) = state
        a_r, a_z, a_n = (g_x * _layer_norm(lin(W_x, x))).chunk(3, dim=-1)
        u_r, u_z, u_n = (g_h * _layer_norm(lin(W_h, h))).chunk(3, dim=-1)
        r = sigmoid(a_r + u_r + p["b_r"])
        z = sigmoid(a_z + u_z + p["b_z"])
        n = tanh(a_n + p["b_in"] + r * (u_n + p["b_hn"]))
        h = (1 - z) * n + z * h
        return h, (h,)

    return run(step, x, state)


REFERENCES = {
    "lstm": ref_lstm,
    "gru": ref_gru,
    "rnn_tanh": ref_rnn_tanh,
    "rnn_relu": ref_rnn_relu,
    "greff_vanilla": ref_greff_vanilla,
    "greff_nig": ref_greff_nig,
    "greff_nfg": ref_greff_nfg,
    "greff_nog": ref_greff_nog,
    "greff_niaf": ref_greff_niaf,
    "greff_noaf": ref_greff_noaf,
    "greff_np": ref_greff_np,
    "greff_cifg": ref_greff_cifg,
    "greff_fgr": ref_greff_fgr,
    "mut1": ref_mut1,
    "mut2": ref_mut2,
    "mut3": ref_mut3,
    "gru_cho": ref_gru_cho,
    "vanilla_rnn": ref_vanilla_rnn,
    "mingru": ref_mingru,
    "minlstm": ref_minlstm,
    "indrnn": ref_indrnn,
    "sru": ref_sru,
    "slstm": ref_slstm,
    "antisymmetric_rnn": ref_antisymmetric_rnn,
    "qrnn": ref_qrnn,
    "qrnn_f": ref_qrnn_f,
    "lstm_proj": ref_lstm_proj,
    "slstm_heads": ref_slstm_heads,
    "ln_lstm": ref_ln_lstm,
    "ln_gru": ref_ln_gru,
}


# --- cells with an extra input (test-only cells in tests/) ----------------------------------------


def ref_lstm_context(p: Params, x: Tensor, state: State, ctx: Tensor) -> tuple[Tensor, State]:
    """Show, Attend and Tell's decoder LSTM (Xu et al. 2015, eq. 1-3): every gate is an affine map of
    [E y_{t-1}; h_{t-1}; z_t]; here x is E y_{t-1} and ctx [T, N, C] is z_t. State (h, c)."""
    outputs = []
    h, c = state
    for x_t, z_t in zip(x, ctx, strict=True):
        i = sigmoid(lin(p["W_xi"], x_t) + lin(p["W_hi"], h) + lin(p["Z_i"], z_t) + p["b_i"])
        f = sigmoid(lin(p["W_xf"], x_t) + lin(p["W_hf"], h) + lin(p["Z_f"], z_t) + p["b_f"])
        o = sigmoid(lin(p["W_xo"], x_t) + lin(p["W_ho"], h) + lin(p["Z_o"], z_t) + p["b_o"])
        g = tanh(lin(p["W_xg"], x_t) + lin(p["W_hg"], h) + lin(p["Z_g"], z_t) + p["b_g"])
        c = f * c + i * g
        h = o * tanh(c)
        outputs.append(h)
    return torch.stack(outputs), (h, c)


EXTRA_INPUT_REFERENCES = {
    "lstm_context": ref_lstm_context,
    "phased_lstm": ref_phased_lstm,
}
