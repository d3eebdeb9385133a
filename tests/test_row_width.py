"""Values of one per sequence (`state n : 1`, a mean a cell outputs) and the broadcasting of widths,
issue 24's findings 1, 2, 15, 19 and 22, each against a hand-written torch loop of its equations on
the torch, cpu (C kernels) and triton (Triton's interpreter) backends, in float64.

The mechanism behind 1, 2, 15 and 19: a function of the step runs over [rows, width]; a value of one
per row broadcasts over the columns, so its gradient is the sum over them (finding 1: the torch
loop kept the [N, H] gradient of an [N, 1] state, and autograd summed it once more at the end); one
value per row computed by a mean or sum runs in the function of the width it reduces and is stored
once per row (finding 2: it ran over one column in C, and in Triton failed); and every function has
an input that sets its [rows, width] (findings 15 and 19). tests/test_row_width_property.py checks the
class on random cells.
"""

import os
import subprocess
import sys
import warnings

import pytest
import torch
from every_backend import backend_fixture, perturbed_layer
from reference_cells import lin

from celldsl import CellError, compile_cell

T, N, I, H = 4, 3, 2, 3
F64 = torch.float64


backend = backend_fixture()


def layer_of(text, backend):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return perturbed_layer(text, backend, I, H)


def initial_states(layer):
    g = torch.Generator().manual_seed(2)
    return tuple((0.5 * torch.randn(N, 1 if layer.compiled.ir.width(s) == "row" else H, generator=g,
                                    dtype=F64)).requires_grad_() for s in layer.compiled.states)


def results(out, finals, tensors):
    """Output, final states and the gradients of `tensors` for a loss that weights each differently."""
    g = torch.Generator().manual_seed(5)
    loss = (out * torch.randn(out.shape, generator=g, dtype=F64)).sum()
    loss = loss + sum((f * torch.randn(f.shape, generator=g, dtype=F64)).sum() for f in finals)
    grads = torch.autograd.grad(loss, tensors, allow_unused=True)
    return [out.detach(), *(f.detach() for f in finals), *grads]


def check(text, backend, step):
    """The layer against `step(p, x_t, states) -> (output_t, states)` run over the same inputs."""
    layer = layer_of(text, backend)
    x = torch.randn(T, N, I, generator=torch.Generator().manual_seed(3), dtype=F64, requires_grad=True)
    states = initial_states(layer)
    params = list(layer.parameters())
    out, finals = layer(x, tuple(s[None] for s in states) if len(states) > 1 else states[0][None])
    finals = tuple(f[0] for f in (finals if isinstance(finals, tuple) else (finals,)))
    got = results(out, finals, [x, *states, *params])
    p = {name: layer.cell_parameter(name) for name in layer.compiled.ir.params}
    outs, cur = [], states
    for x_t in x:
        y, cur = step(p, x_t, cur)
        outs.append(torch.broadcast_to(y, (N, y.shape[-1])))
    expected = results(torch.stack(outs), cur, [x, *states, *params])
    assert len(got) == len(expected)
    for i, (a, b) in enumerate(zip(got, expected, strict=True)):
        if b is None or a is None:
            assert (a is None or not a.abs().max() > 0) and (b is None or not b.abs().max() > 0), i
            continue
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9, msg=lambda m, i=i: f"tensor {i}: {m}")
    return layer, x, states


def rowsum(v):
    return torch.broadcast_to(v, (N, H)).sum(-1, keepdim=True)


# ---- finding 1: the gradient through a `: 1` state read by H-wide values -------------------------------

ROW0 = """
cell row0
input x
state h
state n : 1
output h
param W
n' = 0.5 * n
h' = h + W @ x + n'
"""


def row0(p, x, states):
    h, n = states
    n = 0.5 * n
    h = h + lin(p["W"], x) + n
    return h, (h, n)


def test_finding1_a_row_state_read_by_wide_values_gets_the_gradient_of_its_final_value(backend):
    """d final n / d initial n is 0.5^T: the torch backend gave H times that (0.375 for 0.125 at T=3)."""
    layer, x, (h0, n0) = check(ROW0, backend, row0)
    _, (_, n) = layer(x, (h0[None], n0[None]))
    (grad,) = torch.autograd.grad(n.sum(), n0)
    torch.testing.assert_close(grad, torch.full((N, 1), 0.5**T, dtype=F64), atol=1e-14, rtol=0)


# ---- finding 2: a `: 1` state updated from a sum over H-wide values ------------------------------------

ROW_SUM = """
cell row_sum
input x
state h
state n : 1
output h
param W, w
n' = n + sum(w * (W @ x))
h' = h + W @ x
"""


def row_sum(p, x, states):
    h, n = states
    n = n + rowsum(p["w"] * lin(p["W"], x))
    h = h + lin(p["W"], x)
    return h, (h, n)


def test_finding2_a_row_state_from_a_sum_over_wide_values(backend):
    """The C loop ran the update over one column (wrong values, and H stores into [N, 1]); Triton
    failed with an InterpreterError."""
    check(ROW_SUM, backend, row_sum)


def test_finding2_the_c_kernel_stores_one_value_per_row():
    """The kernel that computes n' runs over the H columns it sums and writes n' once per row."""
    from celldsl.targets.c.emit import c_source

    plan = compile_cell(ROW_SUM).plan
    (pw,) = [pw for pw in plan.pointwise if "n'" in dict(pw.outputs)]
    assert pw.width == "H" and pw.row_outputs == ("n'",)
    source = c_source(plan)
    assert "if (j == j0) o" in source and "/* n' */" in source


MEAN_OUT = """
cell mean_out
input x
state h
output y
param W, U
y = mean(tanh(h))
h' = tanh(W @ x + U @ h)
"""


def mean_out(p, x, states):
    (h,) = states
    y = torch.tanh(h).mean(-1, keepdim=True)  # of the state the step reads
    return y, (torch.tanh(lin(p["W"], x) + lin(p["U"], h)),)


def test_an_output_of_one_value_per_sequence_from_a_mean(backend):
    """The same mechanism for a per-step output: a mean over H-wide values, stored [T, N, 1]."""
    check(MEAN_OUT, backend, mean_out)


INPUT_MEAN = """
cell input_mean
input x
state h
state n : 1
output h
param W
n' = 0.5 * n + mean(x * x)
h' = tanh(h + W @ x) * n
"""


def input_mean(p, x, states):
    h, n = states
    h = torch.tanh(h + lin(p["W"], x)) * n
    return h, (h, 0.5 * n + (x * x).mean(-1, keepdim=True))


def test_a_row_state_from_a_mean_over_the_input_alone(backend):
    """A mean over I-wide values (I != H): its function runs over the input's width, which the layer
    reads off x."""
    check(INPUT_MEAN, backend, input_mean)


# ---- finding 15: a `: 1` state updated only from itself ------------------------------------------------

SELF_ONLY = """
cell self_only
input x
state h
state n : 1
output h
param W, U
n' = 0.5 * n
h' = tanh(W @ x + U @ h) * n
"""


def self_only(p, x, states):
    h, n = states
    h = torch.tanh(lin(p["W"], x) + lin(p["U"], h)) * n
    return h, (h, 0.5 * n)


def test_finding15_a_row_state_updated_only_from_itself(backend):
    """Triton raised NotImplementedError ("no input with a row per sequence") for n' = 0.5 * n."""
    check(SELF_ONLY, backend, self_only)


# ---- finding 19: a batch-constant state update ---------------------------------------------------------

CONSTANT = """
cell constant_update
input x
state h
param b0
h' = 0.5 * b0 + 0 * h
"""


def constant(p, x, states):
    h = (0.5 * p["b0"]).expand(N, H)
    return h, (h,)


def test_finding19_a_batch_constant_state_update(backend):
    """`check` passed, then the loop failed to reshape the [H] result into [N, H]."""
    check(CONSTANT, backend, constant)


ROW_FROM_ROW = """
cell row_broadcast
input x
state h
state n : 1
output h
param W
n' = 0.5 * n + 1
h' = 0 * h + n
"""


def row_from_row(p, x, states):
    h, n = states
    return n.expand(N, H), (n.expand(N, H), 0.5 * n + 1)


def test_a_wide_state_set_from_a_row_value_only(backend):
    """h' reads nothing H wide: its function still returns [N, H], n broadcast over the columns."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check(ROW_FROM_ROW.replace("param W\n", ""), backend, row_from_row)


# ---- the check behind these: a `: 1` state takes one value per sequence --------------------------------


def test_a_wide_value_assigned_to_a_row_state_is_an_error():
    text = "cell c\ninput x\nstate h\nstate n : 1\noutput h\nparam W\nn' = n + W @ x\nh' = h + W @ x\n"
    with pytest.raises(CellError) as err:
        compile_cell(text)
    assert (err.value.line, err.value.column) == (7, 6)
    assert "'n' is declared ': 1' (one value per sequence)" in str(err.value)
    assert "mean(...) or sum(...)" in str(err.value)


# ---- finding 22: every mean or sum over the wrong width, deterministically, in text order --------------

SIX = """cell six
input x
state h
param W
a = mean(x)
b = sum(x * x)
c = mean(tanh(x))
d = sum(exp(x))
e = mean(x * 2)
f = sum(abs(x))
h' = tanh(W @ h) + a + b + c + d + e + f
"""


def test_finding22_every_offending_reduction_is_reported_in_text_order(tmp_path):
    path = tmp_path / "six.cell"
    path.write_text(SIX)
    with pytest.raises(CellError) as err:
        compile_cell(str(path))
    assert [(e.line, e.column) for e in err.value.errors] == [(line, 5) for line in range(5, 11)]
    outputs = set()
    for seed in ("1", "2", "3"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        proc = subprocess.run([sys.executable, "-m", "celldsl.cli", "check", str(path)], capture_output=True,
                              text=True, env=env, timeout=120)
        assert proc.returncode != 0
        outputs.add(proc.stderr + proc.stdout)
    assert len(outputs) == 1, "the report depends on PYTHONHASHSEED"
    text = outputs.pop()
    lines = [line for line in text.splitlines() if ": error: " in line]
    assert [line.split(":")[1] for line in lines] == [str(n) for n in range(5, 11)]
    assert all("a mean or sum over x-wide values is used here by H-wide values" in line for line in lines)
    assert text.count("^") == 6  # each with its line and caret


@pytest.mark.parametrize("text", [ROW0, ROW_SUM, MEAN_OUT], ids=["row0", "row_sum", "mean_out"])
def test_gradcheck_float64(text, backend):
    """The derived backward against finite differences of the forward, every input at once."""
    layer = layer_of(text, backend)
    names = [n for n, _ in layer.named_parameters()]
    x = torch.randn(3, 2, I, dtype=F64, generator=torch.Generator().manual_seed(4), requires_grad=True)
    widths = [1 if layer.compiled.ir.width(s) == "row" else H for s in layer.compiled.states]
    states = tuple((0.5 * torch.randn(1, 2, w, dtype=F64)).requires_grad_() for w in widths)
    params = tuple(p.detach().clone().requires_grad_() for p in layer.parameters())

    def f(x, *rest):
        st, ps = rest[: len(states)], rest[len(states) :]
        out, final = torch.func.functional_call(layer, dict(zip(names, ps, strict=True)),
                                                (x, st if len(st) > 1 else st[0]))
        return (out, *(final if isinstance(final, tuple) else (final,)))

    assert torch.autograd.gradcheck(f, (x, *states, *params), fast_mode=True)
