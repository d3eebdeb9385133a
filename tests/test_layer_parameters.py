"""Layers over cells with unusual parameters (issue 24, findings 16, 18 and 20): a parameter the
equations never read, a cell with no parameter at all, and a parameter given the wrong shape after
the layer was built. Every backend (torch, cpu, and triton on Triton's CPU interpreter) against a
hand-written torch loop of the equations.
"""

import re
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import celldsl
from celldsl import CellWarning

T, N, I, H = 4, 3, 5, 6
BACKENDS = ["torch", "cpu", "triton"]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """The backend under test; triton runs on Triton's CPU interpreter (set per test, as in
    tests/test_triton_interpreter.py)."""
    if request.param == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    return request.param


def quiet(make):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CellWarning)
        return make()


# ---- 16: a parameter no equation reads ------------------------------------------------------------

UNUSED = """cell unused
input x
state h
output h
param W, U, b, V
param s : scalar
param M : matrix
param weight_ih = [W_skip, W_x]
param g = [g_unused, g_used]
h' = tanh(W_x @ x + U @ h + b + g_used)
"""


def unused_reference(layer, x, h):
    """The equations, with the used members sliced out of their groups by hand."""
    w_x, g_used = layer.weight_ih_l0[H:], layer.g_l0[H:]
    outs = []
    for t in range(x.shape[0]):
        h = torch.tanh(x[t] @ w_x.T + h @ layer.U_l0.T + layer.b_l0 + g_used)
        outs.append(h)
    return torch.stack(outs), h


def test_unused_parameters_are_stored_warned_about_and_get_no_gradient(backend):
    """An unused parameter warns at compile time, then the layer builds (it raised KeyError(None)):
    the parameter keeps its group's layout, else its declared kind, else a vector of width H; it is
    passed along unread, so its gradient is zero (None for the unused matrix M, which no GEMM reads:
    what torch gives an unused parameter)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CellWarning)
        celldsl.compile_cell(UNUSED, use_cache=False)
    unused = [re.search(r"parameter '(\w+)' is never used", str(w.message)) for w in caught]
    assert [m[1] for m in unused if m] == ["W", "V", "s", "M", "W_skip", "g_unused"]
    torch.manual_seed(0)
    layer = quiet(lambda: celldsl.Recurrent(UNUSED, I, H, backend=backend, dtype=torch.float64))
    shapes = {n: tuple(p.shape) for n, p in layer.named_parameters()}
    assert shapes == {"W_l0": (H,), "U_l0": (H, H), "b_l0": (H,), "V_l0": (H,), "s_l0": (), "M_l0": (H, H),
                      "weight_ih_l0": (2 * H, I), "g_l0": (2 * H,)}
    x = torch.randn(T, N, I, dtype=torch.float64)
    h0 = torch.randn(1, N, H, dtype=torch.float64)
    out, hn = layer(x, h0)
    ref_out, ref_h = unused_reference(layer, x, h0[0])
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(hn[0], ref_h)
    (out.square().sum() + hn.sum()).backward()
    grads = {n: p.grad for n, p in layer.named_parameters()}
    assert grads["M_l0"] is None
    for name in ("V_l0", "s_l0", "W_l0"):
        assert torch.count_nonzero(grads[name]) == 0, name
    assert torch.count_nonzero(grads["weight_ih_l0"][:H]) == 0 and torch.count_nonzero(grads["g_l0"][:H]) == 0
    params = {n: p.detach().clone().requires_grad_() for n, p in layer.named_parameters()}
    ref_out, ref_h = unused_reference(SimpleNamespace(**params), x, h0[0])
    (ref_out.square().sum() + ref_h.sum()).backward()
    for name in ("U_l0", "b_l0", "weight_ih_l0", "g_l0"):
        torch.testing.assert_close(grads[name], params[name].grad, msg=name)


def test_unused_parameter_in_a_step_cell(backend):
    step = quiet(lambda: celldsl.Cell(UNUSED, I, H, backend=backend))
    assert step.V.shape == (H,) and step.weight_ih.shape == (2 * H, I)
    y, h = step(torch.randn(N, I))
    assert y.shape == (N, H) and torch.equal(y, h)


# ---- 18: a cell without parameters ------------------------------------------------------------------

NO_PARAMS = "cell no_params\ninput x\nstate h\noutput h\nh' = tanh(x + 0.5 * h)\n"
EYE_ONLY = "cell eye_only\ninput x\nstate h\noutput h\nh' = tanh(x + (0.5 * eye) @ h)\n"


def no_params_reference(x, h):
    outs = []
    for t in range(x.shape[0]):
        h = torch.tanh(x[t] + 0.5 * h)
        outs.append(h)
    return torch.stack(outs), h


@pytest.mark.parametrize("text", [NO_PARAMS, EYE_ONLY], ids=["no-params", "eye-only"])
def test_cell_without_parameters_runs_on_every_backend(backend, text):
    """It raised StopIteration (dtype and device came from the first parameter), which `map` takes
    for the end of its iteration: list(map(layer, inputs)) was silently empty. dtype and device now
    come from the input."""
    layer = celldsl.Recurrent(text, H, H, backend=backend)
    assert list(layer.parameters()) == []
    xs = [torch.randn(T, N, H) for _ in range(3)]
    results = list(map(layer, xs))
    assert len(results) == 3
    for x, (out, hn) in zip(xs, results, strict=True):
        ref_out, ref_h = no_params_reference(x, torch.zeros(N, H))
        torch.testing.assert_close(out, ref_out)
        torch.testing.assert_close(hn[0], ref_h)
    x = torch.randn(T, N, H, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(1, N, H, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, h0: layer(x, h0), (x, h0))
    step = celldsl.Cell(text, H, H, backend=backend)
    outs = list(map(step, [x[0].detach() for x in xs]))
    assert len(outs) == 3
    torch.testing.assert_close(outs[0][0], torch.tanh(xs[0][0]))


def test_no_stop_iteration_in_the_package():
    """A StopIteration escaping a forward ends the caller's loop in silence (map, generators): every
    `next(` in celldsl's runtime and layers has a default or an endless iterator."""
    root = Path(celldsl.__file__).parent
    bare = []
    for path in [*root.glob("*.py"), *root.glob("runtime/*.py")]:
        if path.name in ("plan.py", "widths.py", "ir.py"):  # compile-time only: never in a forward
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for call in re.findall(r"\bnext\((.*)", line):
                if "," not in call and "None" not in call:
                    bare.append(f"{path.name}:{number}: {line.strip()}")
    assert bare == []


# ---- 20: a parameter of the wrong shape --------------------------------------------------------

LAYERS = {
    "LSTM": (lambda b: celldsl.LSTM(I, H, backend=b), lambda: nn.LSTM(I, H), 4),
    "GRU": (lambda b: celldsl.GRU(I, H, backend=b), lambda: nn.GRU(I, H), 3),
    "RNN": (lambda b: celldsl.RNN(I, H, backend=b), lambda: nn.RNN(I, H), 1),
    "Recurrent": (lambda b: celldsl.Recurrent("lstm", I, H, backend=b), lambda: nn.LSTM(I, H), 4),
}
CELLS = {
    "LSTMCell": (lambda b: celldsl.LSTMCell(I, H, backend=b), lambda: nn.LSTMCell(I, H), 4),
    "GRUCell": (lambda b: celldsl.GRUCell(I, H, backend=b), lambda: nn.GRUCell(I, H), 3),
    "RNNCell": (lambda b: celldsl.RNNCell(I, H, backend=b), lambda: nn.RNNCell(I, H), 1),
    "Cell": (lambda b: celldsl.Cell("gru", I, H, backend=b), lambda: nn.GRUCell(I, H), 3),
}


def assign(module, name, how, value):
    if how == "parameter":
        setattr(module, name, nn.Parameter(value))
    else:
        getattr(module, name).data = value


@pytest.mark.parametrize("how", ["parameter", "data"])
@pytest.mark.parametrize("kind", sorted(LAYERS) + sorted(CELLS))
def test_a_parameter_assigned_with_the_wrong_shape_is_refused(backend, kind, how):
    """A bias three elements too long, or a weight one column too wide, assigned directly (which
    skips load_state_dict's size check) was computed with on cpu and torch. It raises a RuntimeError
    naming the parameter and both shapes, as torch.nn raises a RuntimeError (its message is about the
    failing operation)."""
    make, make_torch, gates = {**LAYERS, **CELLS}[kind]
    suffix = "_l0" if kind in LAYERS else ""
    x = torch.randn(T, N, I) if kind in LAYERS else torch.randn(N, I)
    for name, wrong, right in [
        (f"bias_hh{suffix}", (gates * H + 3,), (gates * H,)),
        (f"weight_hh{suffix}", (gates * H, H + 1), (gates * H, H)),
    ]:
        module = make(backend)
        assign(module, name, how, torch.randn(wrong))
        message = rf"size mismatch for {name}: .*{list(right)}.*{list(wrong)}"
        with pytest.raises(RuntimeError, match=message.replace("[", r"\[").replace("]", r"\]")):
            module(x)
    reference = make_torch()
    assign(reference, f"bias_hh{suffix}", how, torch.randn(gates * H + 3))
    with pytest.raises(RuntimeError):
        reference(x)


@pytest.mark.parametrize("kind", sorted(LAYERS) + sorted(CELLS))
def test_load_state_dict_of_the_wrong_shape_is_refused_as_torch_refuses_it(kind):
    make, _make_torch, gates = {**LAYERS, **CELLS}[kind]
    suffix = "_l0" if kind in LAYERS else ""
    module = make("cpu")
    state = module.state_dict()
    state[f"bias_hh{suffix}"] = torch.randn(gates * H + 3)
    for assign_ in (False, True):
        with pytest.raises(RuntimeError, match=f"size mismatch for bias_hh{suffix}"):
            module.load_state_dict(state, assign=assign_)


def test_a_wrong_shape_in_a_parameter_of_a_custom_cell_is_refused(backend):
    layer = quiet(lambda: celldsl.Recurrent(UNUSED, I, H, num_layers=2, backend=backend))
    layer.g_l1.data = torch.randn(2 * H - 1)
    with pytest.raises(RuntimeError, match=r"size mismatch for g_l1: .*\[12\].*\[11\]"):
        layer(torch.randn(T, N, I))


# ---- found by the fuzz test: a first input declared `: 1` -------------------------------------------

ROW_FIRST = """cell row_first
input t : 1
input x
state h
output h
param W, U, b, w
h' = tanh(W @ x + U @ h + b + w * t)
"""


def test_a_first_input_of_one_value_per_sequence_must_be_one_wide(backend):
    """input_size 3 for `input t : 1` was taken: cpu ran with it (the kernels read one value a row),
    torch failed inside its generated code. It is refused where the layer is built."""
    with pytest.raises(ValueError, match=r"input 't' is declared ': 1' .*input_size must be 1, got 3"):
        celldsl.Recurrent(ROW_FIRST, 3, H, backend=backend, input_sizes={"x": I})
    with pytest.raises(ValueError, match=r"layer 1 reads the 6-wide output of layer 0 as its input 't'"):
        celldsl.Recurrent(ROW_FIRST, 1, H, num_layers=2, backend=backend, input_sizes={"x": I})
    with pytest.raises(ValueError, match=r"input_size must be 1, got 2"):
        celldsl.Cell(ROW_FIRST, 2, H, backend=backend, input_sizes={"x": I})
    layer = celldsl.Recurrent(ROW_FIRST, 1, H, backend=backend, input_sizes={"x": I}, dtype=torch.float64)
    t, x = torch.randn(T, N, 1, dtype=torch.float64), torch.randn(T, N, I, dtype=torch.float64)
    out, _ = layer(t, x=x)
    h = torch.zeros(N, H, dtype=torch.float64)
    for k in range(T):
        h = torch.tanh(x[k] @ layer.W_l0.T + h @ layer.U_l0.T + layer.b_l0 + layer.w_l0 * t[k])
        torch.testing.assert_close(out[k], h)
