"""The language's second edition (issue 13), every construct against a hand-written reference on the
torch, cpu (C kernels) and triton (interpreter) backends, with gradcheck in float64:

- the zoo cells a generic zoo test cannot build (tests/zoo.py's SPECIAL: lstm_proj with its declared
  width, slstm_heads with its 4 heads, phased_lstm with its time-stamp input), one layer and two
  bidirectional packed layers;
- matrices: transposes (`Wᵀ`, `W^T`), combinations scaled by numbers and scalar parameters, the
  identity (the Lipschitz RNN's A), and their errors;
- reductions (mean, sum, layernorm) and piecewise functions (comparisons, where, mod, floor, clip);
- earlier inputs, prev(x) and prev(x, 2), which restart at every sequence of a packed batch;
- widths: a declared width, an input of one value per sequence, explain's account of them;
- the error fixes: carried states in text order, the layer named in a multi-layer size error.

The references are written from the equations with torch ops (reference_cells.py for the zoo),
never from the cell files' text.
"""

import pytest
import torch
from every_backend import backend_fixture, perturbed_layer
from reference_cells import EXTRA_INPUT_REFERENCES, REFERENCES, lin, run
from torch.func import functional_call
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import celldsl
from celldsl import CellError, compile_cell

T, N, I = 5, 3, 4
sigmoid, tanh = torch.sigmoid, torch.tanh


backend = backend_fixture()


def params_of(layer, layer_index=0, direction=0):
    return {n: layer.cell_parameter(n, layer_index, direction) for n in layer.compiled.ir.params}


def one_layer(result):
    """A one-layer, one-direction layer's (output, final states [1, N, W]) as (output, states [N, W])."""
    out, finals = result
    finals = finals if isinstance(finals, tuple) else (finals,)
    return out, tuple(f[0] for f in finals)


def outputs_and_grads(out, finals, tensors):
    finals = finals if isinstance(finals, tuple) else (finals,)
    g = torch.Generator().manual_seed(5)
    loss = (out * torch.randn(out.shape, generator=g, dtype=out.dtype)).sum()
    loss = loss + sum((f * torch.randn(f.shape, generator=g, dtype=f.dtype)).sum() for f in finals)
    return [
        out.detach(),
        *(f.detach() for f in finals),
        *torch.autograd.grad(loss, tensors, allow_unused=True),
    ]


def assert_all_close(got, expected, atol=1e-10):
    assert len(got) == len(expected)
    for i, (a, b) in enumerate(zip(got, expected, strict=True)):
        if b is None:
            assert a is None or not a.abs().max() > 0, i
            continue
        torch.testing.assert_close(a, b, atol=atol, rtol=1e-9, msg=lambda m, i=i: f"tensor {i}: {m}")


# ---- the special zoo cells ---------------------------------------------------------------------------

SPECIAL = {  # stem -> (hidden size, layer arguments, extra inputs maker, reference)
    "lstm_proj": (6, {"sizes": {"P": 3}}, None, REFERENCES["lstm_proj"]),
    "slstm_heads": (8, {}, None, REFERENCES["slstm_heads"]),
    "phased_lstm": (
        6,
        {},
        lambda T, N: {"t": torch.rand(T, N, 1, dtype=torch.float64) * 30},
        EXTRA_INPUT_REFERENCES["phased_lstm"],
    ),
}


@pytest.mark.parametrize("stem", sorted(SPECIAL))
def test_special_zoo_cell_matches_its_reference(stem, backend):
    hidden, kwargs, extras, reference = SPECIAL[stem]
    layer = perturbed_layer(stem, backend, I, hidden, **kwargs)
    x = torch.randn(T, N, I, dtype=torch.float64, requires_grad=True)
    extra = extras(T, N) if extras else {}
    sizes = layer._sizes(0)
    state = tuple(
        torch.randn(N, sizes[layer.compiled.ir.width(s)], dtype=torch.float64) * 0.5
        for s in layer.compiled.states
    )
    params = list(layer.parameters())
    got = outputs_and_grads(
        *layer(x, tuple(s[None] for s in state) if len(state) > 1 else state[0][None], **extra), [x, *params]
    )
    p = params_of(layer)
    ref_out, ref_final = reference(p, x, state, **extra)
    expected = outputs_and_grads(ref_out, ref_final, [x, *params])
    got[1 : 1 + len(state)] = [f[0] for f in got[1 : 1 + len(state)]]
    assert_all_close(got, expected)


@pytest.mark.parametrize("stem", sorted(SPECIAL))
def test_special_zoo_cell_two_bidirectional_packed_layers(stem, backend):
    """Layer 1 reads layer 0's two directions (its output width times 2: 2P for lstm_proj); every
    sequence runs over its own length, the reverse direction backwards. Against the one-layer
    reference composed by hand."""
    hidden, kwargs, extras, reference = SPECIAL[stem]
    layer = perturbed_layer(stem, backend, I, hidden, num_layers=2, bidirectional=True, **kwargs)
    lengths = [5, 2, 4]
    x = torch.randn(T, N, I, dtype=torch.float64, requires_grad=True)
    extra = extras(T, N) if extras else {}
    packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
    out, _ = layer(packed, **extra)
    out, _ = pad_packed_sequence(out)
    params = list(layer.parameters())
    got = outputs_and_grads(out, (), [x, *params])
    # the reference, sequence by sequence
    outs = []
    for n, length in enumerate(lengths):
        seq = x[:length, n : n + 1]
        ex = {k: v[:length, n : n + 1] for k, v in extra.items()}
        for lay in range(2):
            directions = []
            for d in range(2):
                p = params_of(layer, lay, d)
                sizes = layer._sizes(lay)
                state = tuple(
                    torch.zeros(1, sizes[layer.compiled.ir.width(s)], dtype=torch.float64)
                    for s in layer.compiled.states
                )
                e = {k: v.flip(0) if d else v for k, v in ex.items()}
                o, _ = reference(p, seq.flip(0) if d else seq, state, **e)
                directions.append(o.flip(0) if d else o)
            seq = torch.cat(directions, dim=-1)
        outs.append(torch.cat([seq, seq.new_zeros(T - length, 1, seq.shape[-1])]))
    ref_out = torch.cat(outs, dim=1)
    expected = outputs_and_grads(ref_out, (), [x, *params])
    assert_all_close(got, expected)


@pytest.mark.parametrize("stem", sorted(SPECIAL))
def test_special_zoo_cell_gradcheck(stem, backend):
    hidden, kwargs, extras, _ = SPECIAL[stem]
    hidden = 4 if stem == "slstm_heads" else 3
    kwargs = {"sizes": {"P": 2}} if stem == "lstm_proj" else kwargs
    layer = perturbed_layer(stem, backend, 2, hidden, **kwargs)
    x = torch.randn(2, 2, 2, dtype=torch.float64, requires_grad=True)
    extra = extras(2, 2) if extras else {}
    names = [n for n, _ in layer.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in layer.parameters()]

    def f(x, *ps):
        out, final = functional_call(layer, dict(zip(names, ps, strict=True)), (x,), extra)
        final = final if isinstance(final, tuple) else (final,)
        return (out, *final)

    # on the Triton interpreter, random projections of the Jacobian (fast_mode): it is slow per call
    assert torch.autograd.gradcheck(f, (x, *params), atol=1e-6, fast_mode=backend == "triton")


def test_lstm_proj_explains_its_widths():
    text = compile_cell("lstm_proj").explain()
    assert "h  [P]" in text and "c  [H]" in text and "output: h'  [P]" in text
    assert "weight_hr  P x H" in text and "weight_hh = [W_hi, W_hf, W_hg, W_ho]  4H x P" in text
    assert "pointwise 2 [P]" in text and "pointwise 2 [H]" in text  # one kernel per width of the stage


def test_a_declared_width_needs_its_size():
    with pytest.raises(
        ValueError, match="declares the widths P; sizes must give the size of each; missing: P"
    ):
        celldsl.Recurrent("lstm_proj", 4, 6)
    with pytest.raises(ValueError, match="unknown: Q"):
        celldsl.Recurrent("lstm_proj", 4, 6, sizes={"P": 3, "Q": 2})
    with pytest.raises(ValueError, match=r"sizes\['P'\] must be a positive int"):
        celldsl.Recurrent("lstm_proj", 4, 6, sizes={"P": 0})


def test_heads_explain_and_check_the_hidden_size():
    text = compile_cell("slstm_heads").explain()
    assert "R_z  H x H in 4 heads (block-diagonal)" in text
    with pytest.raises(ValueError, match="has 4 heads, so its sizes .* must divide by 4"):
        celldsl.Recurrent("slstm_heads", 4, 6)
    layer = celldsl.Recurrent("slstm_heads", 4, 8)
    assert layer.cell_parameter("R_z").shape == (4, 2, 2)


def test_phased_lstm_takes_its_time_stamps_as_one_value_per_step():
    layer = celldsl.Recurrent("phased_lstm", 4, 6)
    assert layer.input_sizes == {"t": 1}
    out, (c, h) = layer(torch.randn(T, N, 4), t=torch.rand(T, N, 1))
    assert out.shape == (T, N, 6)
    with pytest.raises(ValueError, match="declared ': 1'"):
        celldsl.Recurrent("phased_lstm", 4, 6, input_sizes={"t": 3})


# ---- matrices: transposes, combinations, the identity ----------------------------------------------

LIPSCHITZ = """
cell lipschitz
input x
state h
param M, V, b
param beta, gamma, eps : scalar
init beta = 0.7
init gamma = 0.1
init eps = 0.1
h' = h + eps * (((1 - beta) * (M + Mᵀ) + beta * (M - M^T) - gamma * eye) @ h + tanh(V @ x + b))
"""


def ref_lipschitz(p, x, state):
    """Erichson et al. 2021's Lipschitz RNN, explicit Euler: h' = h + eps (A h + tanh(V x + b)) with
    A = (1 - beta)(M + M^T) + beta (M - M^T) - gamma I."""
    M, beta, gamma, eps = p["M"], p["beta"], p["gamma"], p["eps"]
    A = (1 - beta) * (M + M.T) + beta * (M - M.T) - gamma * torch.eye(M.shape[0], dtype=M.dtype)

    def step(x, state):
        (h,) = state
        h = h + eps * (lin(A, h) + tanh(lin(p["V"], x) + p["b"]))
        return h, (h,)

    return run(step, x, state)


TRANSPOSED = """
cell transposed
input x
state h
param W, U
h' = tanh(Wᵀ @ x + U @ h) + 0.5 * (U^T @ h)
"""


def ref_transposed(p, x, state):
    def step(x, state):
        (h,) = state
        h = tanh(lin(p["W"].T, x) + lin(p["U"], h)) + 0.5 * lin(p["U"].T, h)
        return h, (h,)

    return run(step, x, state)


@pytest.mark.parametrize(
    ("text", "reference"),
    [(LIPSCHITZ, ref_lipschitz), (TRANSPOSED, ref_transposed)],
    ids=["lipschitz", "transposed"],
)
def test_combined_and_transposed_matrices_match_their_reference(text, reference, backend):
    layer = perturbed_layer(text, backend, I, 5)
    x = torch.randn(T, N, I, dtype=torch.float64, requires_grad=True)
    params = list(layer.parameters())
    got = outputs_and_grads(*one_layer(layer(x)), [x, *params])
    ref_out, ref_final = reference(params_of(layer), x, (torch.zeros(N, 5, dtype=torch.float64),))
    assert_all_close(got, outputs_and_grads(ref_out, ref_final, [x, *params]))
    torch.manual_seed(1)
    assert torch.autograd.gradcheck(
        lambda x: layer(x)[0], (torch.randn(2, 2, I, dtype=torch.float64, requires_grad=True),)
    )


def test_a_transposed_matrix_is_stored_in_its_own_shape():
    layer = celldsl.Recurrent(TRANSPOSED, 4, 5)
    assert layer.cell_parameter("W").shape == (4, 5)  # Wᵀ @ x reads I = 4 and gives H = 5
    plan = layer.compiled.plan
    assert [g.params for g in plan.hoisted] == [("(Wᵀ)",)]
    assert [g.params for g in plan.gemms] == [("U", "(Uᵀ)")]  # U and its transpose: one GEMM on h


def test_like_terms_merge_into_one_block():
    with pytest.warns(celldsl.CellWarning, match="'U' is never used"):  # U - U is no term at all
        plan = compile_cell("input x\nstate h\nparam W, U\nh' = tanh((W + W + U - U) @ h + x)\n").plan
    assert [g.params for g in plan.gemms] == [("(2.0*W)",)]


@pytest.mark.parametrize(("equation", "message"), [
    ("h' = transpose(W) @ h + x", "unknown function 'transpose'"),
    ("h' = (W - W) @ h + x", "this combination of matrices is zero"),
    ("h' = (b * W) @ h + x", "a matrix may be scaled by a number or a scalar parameter only"),
    ("h' = (R + W) @ h + x", "cannot be scaled, transposed or combined"),
    ("h' = Rᵀ @ h + x", "has heads: its transpose is not supported"),
    ("h' = W @ W + h + x", "the right side of @ depends on parameters only"),
])  # fmt: skip
def test_matrix_expressions_report_what_is_wrong(equation, message):
    with pytest.raises(CellError, match=message):
        compile_cell(f"input x\nstate h\nparam W, b, R\nparam R2 : heads(2)\n{equation.replace('R', 'R2')}\n")


# ---- reductions and piecewise functions ----------------------------------------------------------------

NORMED = """
cell normed
input x
state h, c
output h
param W, U, g, b, bc
a = layernorm(W @ x) * g + layernorm(U @ h) + b
c' = sigmoid(a) * c + tanh(a) * 0.5
h' = tanh(layernorm(c') + bc) + mean(h) * 0.3 - sum(c') * 0.01 + mean((h - mean(h))^2)
"""


def ref_normed(p, x, state):
    def ln(v):
        return torch.nn.functional.layer_norm(v, v.shape[-1:], eps=1e-5)

    def step(x, state):
        h, c = state
        a = ln(lin(p["W"], x)) * p["g"] + ln(lin(p["U"], h)) + p["b"]
        c = sigmoid(a) * c + tanh(a) * 0.5
        mean = h.mean(-1, keepdim=True)
        h = (
            tanh(ln(c) + p["bc"])
            + mean * 0.3
            - c.sum(-1, keepdim=True) * 0.01
            + h.var(-1, unbiased=False, keepdim=True)
        )
        return h, (h, c)

    return run(step, x, state)


PIECEWISE = """
cell piecewise
input x
state h
param W, U, b, tau
a = W @ x + U @ h + b
phi = mod(a + 3.5, tau) / tau
k = where(phi < 0.25, 4 * phi, where(phi <= 0.5, 2 - 4 * phi, 0.001 * phi))
steps = (h >= 0) * (pi / e) * 0.01 + (a > h) * 0.02
h' = k * tanh(a) + (1 - k) * h + clip(h, -0.5, 0.5) * floor(a) * 0.1 + steps
"""


def ref_piecewise(p, x, state):
    def step(x, state):
        (h,) = state
        a = lin(p["W"], x) + lin(p["U"], h) + p["b"]
        phi = torch.remainder(a + 3.5, p["tau"]) / p["tau"]
        k = torch.where(phi < 0.25, 4 * phi, torch.where(phi <= 0.5, 2 - 4 * phi, 0.001 * phi))
        h = (
            k * tanh(a)
            + (1 - k) * h
            + h.clamp(-0.5, 0.5) * torch.floor(a) * 0.1
            + (h >= 0).to(h.dtype) * (torch.pi / torch.e) * 0.01
            + (a > h).to(h.dtype) * 0.02
        )
        return h, (h,)

    return run(step, x, state)


@pytest.mark.parametrize(
    ("text", "reference", "states"),
    [(NORMED, ref_normed, 2), (PIECEWISE, ref_piecewise, 1)],
    ids=["reductions", "piecewise"],
)
def test_reductions_and_piecewise_functions_match_their_reference(text, reference, states, backend):
    layer = perturbed_layer(text, backend, I, 6)
    if "tau" in text:
        with torch.no_grad():
            layer.cell_parameter("tau").copy_(torch.linspace(1.5, 3.0, 6))
    x = torch.randn(T, N, I, dtype=torch.float64, requires_grad=True)
    params = list(layer.parameters())
    got = outputs_and_grads(*one_layer(layer(x)), [x, *params])
    zeros = tuple(torch.zeros(N, 6, dtype=torch.float64) for _ in range(states))
    ref_out, ref_final = reference(params_of(layer), x, zeros)
    assert_all_close(got, outputs_and_grads(ref_out, ref_final, [x, *params]))


def test_reductions_gradcheck(backend):
    layer = perturbed_layer(NORMED, backend, I, 4)
    names = [n for n, _ in layer.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in layer.parameters()]
    x = torch.randn(2, 2, I, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, *ps: functional_call(layer, dict(zip(names, ps, strict=True)), (x,))[0],
        (x, *params),
        fast_mode=backend == "triton",  # the interpreter is slow: random projections of the Jacobian
    )


def test_a_mean_over_the_state_makes_the_recurrence_dense():
    plan = compile_cell("input x\nstate h\nparam W, b\nh' = tanh(W @ x + b) + mean(h)\n").plan
    assert plan.recurrence == "dense"
    plan = compile_cell("input x\nstate h\nparam W, b\nh' = h * sigmoid(mean(W @ x) + b)\n").plan
    assert plan.recurrence == "linear"  # a mean of the input only: still a + b h


@pytest.mark.parametrize(("equation", "message"), [
    ("h' = h + mean(2)", "reduces over the elements of a vector-wide value"),
    ("h' = h + W @ x + mean(x)", "a mean or sum over x-wide values is used here by H-wide values"),
])  # fmt: skip
def test_reduction_errors(equation, message):
    with pytest.raises(CellError, match=message):
        compile_cell(f"input x\nstate h\nparam W\n{equation}\n")


# ---- earlier inputs ------------------------------------------------------------------------------------

SHIFTED = """
cell shifted
input x
state h
param A, B, C, b
h' = tanh(A @ prev(x) + B @ prev(x, 2) + C @ h + b) + 0.1 * prev(x, 1) * h
"""


def ref_shifted(p, x, state):
    zeros = torch.zeros_like(x[:1])
    x1 = torch.cat([zeros, x[:-1]])
    x2 = torch.cat([zeros, zeros, x[:-2]])
    outs, (h,) = [], state
    for t in range(x.shape[0]):
        h = tanh(lin(p["A"], x1[t]) + lin(p["B"], x2[t]) + lin(p["C"], h) + p["b"]) + 0.1 * x1[t] * h
        outs.append(h)
    return torch.stack(outs), (h,)


def test_earlier_inputs_match_their_reference_and_restart_at_every_sequence(backend):
    H = I  # prev(x) meets h elementwise
    layer = perturbed_layer(SHIFTED, backend, I, H)
    assert layer.compiled.plan.recurrence == "dense" and len(layer.compiled.plan.hoisted) == 2
    lengths = [5, 1, 3]
    x = torch.randn(T, N, I, dtype=torch.float64, requires_grad=True)
    out, _ = layer(pack_padded_sequence(x, lengths, enforce_sorted=False))
    out, _ = pad_packed_sequence(out)
    params = list(layer.parameters())
    got = outputs_and_grads(out, (), [x, *params])
    refs = []
    for n, length in enumerate(lengths):
        o, _ = ref_shifted(params_of(layer), x[:length, n : n + 1], (torch.zeros(1, H, dtype=torch.float64),))
        refs.append(torch.cat([o, o.new_zeros(T - length, 1, H)]))
    assert_all_close(got, outputs_and_grads(torch.cat(refs, dim=1), (), [x, *params]))


def test_prev_of_an_input_checks_its_step_count():
    for k in ("0", "1.5", "65"):
        with pytest.raises(CellError, match=r"k in prev\(x, k\) must be a whole number from 1 to 64"):
            compile_cell(f"input x\nstate h\nparam W\nh' = tanh(W @ prev(x, {k}) + h)\n")
    with pytest.raises(CellError, match="reaches back k steps for inputs only"):
        compile_cell("input x\nstate h\nparam W\na = W @ x\nh' = tanh(prev(a, 2) + h)\n")


# ---- widths and one value per sequence ---------------------------------------------------------------

STAMPED = """
cell stamped
input x
input t : 1
state h
param W, U, s
h' = tanh(W @ x + U @ h) * sigmoid(t - s) + 0.1 * t
"""


def test_an_input_of_one_value_per_sequence_broadcasts_and_gets_its_gradient(backend):
    layer = perturbed_layer(STAMPED, backend, I, 5)
    x = torch.randn(T, N, I, dtype=torch.float64, requires_grad=True)
    t = torch.randn(T, N, 1, dtype=torch.float64, requires_grad=True)
    params = list(layer.parameters())
    got = outputs_and_grads(*one_layer(layer(x, t=t)), [x, t, *params])
    p = params_of(layer)
    h, outs = torch.zeros(N, 5, dtype=torch.float64), []
    for x_t, t_t in zip(x, t, strict=True):
        h = tanh(lin(p["W"], x_t) + lin(p["U"], h)) * sigmoid(t_t - p["s"]) + 0.1 * t_t
        outs.append(h)
    assert_all_close(got, outputs_and_grads(torch.stack(outs), (h,), [x, t, *params]))


def test_explain_shows_declared_widths_and_one_value_per_sequence():
    text = compile_cell(STAMPED).explain()
    assert "t  [1]" in text
    text = compile_cell("input x\nstate h : P\nparam W, V\nh' = W @ tanh(V @ h + x * 0)\n").explain()
    assert "h  [P]" in text


# ---- the error fixes -------------------------------------------------------------------------------------


def test_carried_states_come_in_text_order():
    text = (
        "input x\nstate c\nparam W, U\nzz = tanh(U @ c)\naa = sigmoid(W @ x)\nc' = prev(zz) * aa + prev(aa)\n"
    )
    assert compile_cell(text).ir.states == ["c", "prev(zz)", "prev(aa)"]  # evaluation order had aa first


def test_a_multi_layer_size_error_names_the_layer():
    with pytest.raises(CellError, match="layer 1 reads the 8-wide output of layer 0 as its input 'x'"):
        celldsl.Recurrent("mut1", 4, 4, num_layers=2, bidirectional=True)


def test_explain_says_when_the_output_is_the_only_state():
    text = compile_cell("input x\nstate h\nparam W\nh' = tanh(W @ x + h)\n").explain()
    assert "(no output line: the cell's one state)" in text
