"""celldsl.Cell for matrix-memory cells (nn/matrix.py's MatrixCell): one step of the layer, as
torch.nn.LSTMCell is one step of torch.nn.LSTM. In float64: T steps against the einsum references of
tests/matrix_references.py (outputs, states and gradients), step by step against the sequence layer
(MatrixRecurrent) on the torch, cpu and triton (interpreter) backends, gradcheck of the step, the
default sizes and zero states, unbatched input, and torch's errors for wrong shapes."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from matrix_layers import HEADS, REFERENCES, SIZES, I, K, V, matrix_layer, ref_params

import celldsl
from celldsl.lang.errors import CellError
from celldsl.nn.matrix import MatrixCell

T, N = 4, 2  # the sizes: tests/matrix_layers.py
MLSTM = {"heads": HEADS, "K": K, "V": V}
F64 = torch.float64


def _step(cell, layer, backend):
    """A Cell built as a user builds it, holding the layer's parameters (copied by name)."""
    sizes = {w: v for w, v in SIZES.items() if w == "heads" or w in layer.ir.widths}  # no R but GLA's
    step = celldsl.Cell(cell, I, layer.output_size, sizes=sizes, backend=backend, dtype=F64)
    step.load_state_dict({n.removesuffix("_l0"): p for n, p in layer.state_dict().items()})
    return step


def _states(layer, seed=1):
    g = torch.Generator().manual_seed(seed)
    return tuple((0.5 * torch.randn(N, *layer.ir.state_shape(s, layer.layer_sizes[0]), generator=g,
                                    dtype=F64)).requires_grad_() for s in layer.ir.states)


def _unroll(step, x, state):
    outs = []
    for t in range(x.shape[0]):
        out, state = step(x[t], state)
        outs.append(out)
    return torch.stack(outs), state


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("cell", sorted(REFERENCES))
def test_steps_match_the_reference(cell, backend):
    layer = matrix_layer(cell)
    step = _step(cell, layer, backend)
    assert type(step) is MatrixCell and type(step.loop).__name__ == {"torch": "MatrixLoop",
                                                                       "cpu": "CMatrixLoop"}[backend]
    x = torch.randn(T, N, I, dtype=F64, requires_grad=True)
    state0 = _states(layer)
    out, finals = _unroll(step, x, state0)
    ref_out, ref_finals = REFERENCES[cell](ref_params(step), x, state0)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    for a, b in zip(finals, ref_finals, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(out)
    wrt = [x, *state0, *step.parameters()]
    got = torch.autograd.grad((out * g).sum() + sum((s * s).sum() for s in finals), wrt)
    want = torch.autograd.grad((ref_out * g).sum() + sum((s * s).sum() for s in ref_finals), wrt)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.fixture
def interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
@pytest.mark.parametrize("cell", sorted(REFERENCES))
def test_step_by_step_equals_the_sequence_layer(cell, backend, interpreter):
    """layer.cell() shares the layer's parameters; T calls of it give the layer's output and final
    states on each backend (the layer on the same backend)."""
    layer = matrix_layer(cell, backend)
    step = layer.cell()
    assert all(getattr(step, n) is getattr(layer, f"{n}_l0") for n in layer.ir.params)
    x = torch.randn(T, N, I, dtype=F64)
    state0 = tuple(s.detach() for s in _states(layer))
    out, finals = layer(x, tuple(s[None] for s in state0))
    got, got_finals = _unroll(step, x, state0)
    torch.testing.assert_close(got, out, rtol=1e-12, atol=1e-12)
    for a, b in zip(got_finals, finals, strict=True):
        torch.testing.assert_close(a, b[0], rtol=1e-12, atol=1e-12)


def test_cell_of_a_deeper_layer_and_the_reverse_direction():
    layer = matrix_layer("gla", num_layers=2, bidirectional=True)
    step = layer.cell(1, 1)
    assert step.input_size == 2 * layer.output_size and step.W_q is layer.W_q_l1_reverse
    with pytest.raises(IndexError, match="2 layer"):
        layer.cell(2)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("cell", ["mlstm", "deltanet"])
def test_gradcheck(cell, backend):
    step = _step(cell, matrix_layer(cell, seed=2), backend)
    x = torch.randn(N, I, dtype=F64, requires_grad=True)
    state0 = tuple((0.5 * torch.randn(N, *shape, dtype=F64)).requires_grad_() for shape in step.state_shapes)
    names = list(step.ir.params)
    params = [getattr(step, n).detach().clone().requires_grad_() for n in names]

    def f(x, *rest):
        states, ps = rest[: len(state0)], rest[len(state0):]
        out, finals = torch.func.functional_call(step, dict(zip(names, ps, strict=True)), (x, states))
        return (out, *finals)

    assert torch.autograd.gradcheck(f, (x, *state0, *params))


def test_unbatched_input_and_default_zero_states():
    step = celldsl.Cell("mlstm", I, HEADS * V, sizes=MLSTM, dtype=F64)
    x = torch.randn(I, dtype=F64)
    out, states = step(x)
    assert out.shape == (HEADS * V,) and [s.shape for s in states] == [(HEADS, V, K), (HEADS, K), (HEADS,)]
    zeros = tuple(torch.zeros(N, *shape, dtype=F64) for shape in step.state_shapes)
    batched, batched_states = step(x.expand(N, I), zeros)  # equal up to a GEMM's order of sums
    torch.testing.assert_close(batched[0], out)
    for a, b in zip(batched_states, states, strict=True):
        torch.testing.assert_close(a[1], b)
    again, _ = step(x, states)  # the unbatched states go back in
    assert again.shape == out.shape


def test_one_state_cell_takes_a_lone_tensor():
    step = celldsl.Cell("gla", I, HEADS * V, sizes=SIZES, dtype=F64)
    S = torch.randn(N, HEADS, K, V, dtype=F64)
    a, (S1,) = step(torch.randn(N, I, dtype=F64, generator=torch.Generator().manual_seed(0)), S)
    b, (S2,) = step(torch.randn(N, I, dtype=F64, generator=torch.Generator().manual_seed(0)), (S,))
    assert torch.equal(a, b) and torch.equal(S1, S2)


def test_default_sizes_follow_from_hidden_size():
    """As celldsl.Recurrent (docs/language.md): heads = 1 and every width = hidden_size."""
    step = celldsl.Cell("mlstm", 4, 6)
    assert step.sizes == {"heads": 1, "K": 6, "V": 6, "x": 4}
    out, (C, n, m) = step(torch.randn(2, 4))
    assert out.shape == (2, 6) and C.shape == (2, 1, 6, 6) and n.shape == (2, 1, 6) and m.shape == (2, 1)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"hidden_size": 12, "sizes": {"heads": 3, "V": 2}}, ValueError,
         "its output is heads x its width = 6 wide with these sizes, but hidden_size is 12"),
        ({"sizes": {"Q": 3}}, ValueError, "unknown: Q"),
        ({"sizes": {"heads": 5}}, ValueError, "must be a positive int that divides hidden_size 12"),
        ({"bias": False}, ValueError, "does not take bias=False yet"),
        ({"hidden_size": "12"}, TypeError, "hidden_size should be of type int"),
        ({"backend": "gpu"}, ValueError, "backend"),
    ],
    ids=["hidden-size", "unknown-size", "heads", "bias", "hidden-type", "backend"],
)
def test_constructor_errors(kwargs, error, match):
    args = {"input_size": 6, "hidden_size": 12, **kwargs}
    with pytest.raises(error, match=match):
        celldsl.Cell("mlstm", **args)


@pytest.mark.parametrize("cell", ["rwkv6", "mamba"])
def test_prev_is_refused_located(cell):
    """prev(x) in a step would read zeros, not the last step's input: refused at prev, not wrong."""
    with pytest.raises(CellError, match="a one-step Cell cannot run prev()") as err:
        celldsl.Cell(cell, 4, 8)
    line = open(f"cells/{cell}.cell", encoding="utf-8").read().splitlines()[err.value.line - 1]
    assert line[err.value.column - 1:].startswith("prev(")


GOOD_X = (N, I)


@pytest.mark.parametrize(
    ("x_shape", "state_shapes", "error", "match"),
    [
        ((T, N, I), None, ValueError, "Expected input to be 1D or 2D, got 3D instead"),
        ((N, I + 1), None, RuntimeError, f"input has inconsistent input_size: got {I + 1} expected {I}"),
        (GOOD_X, [(N, HEADS, V, K)], RuntimeError, r"carries 3 state\(s\) \(C, n, m\): expected 3 state"),
        (GOOD_X, [(N, HEADS, K, V), (N, HEADS, K), (N, HEADS)], RuntimeError,
         r"state C has inconsistent shape: got \[2, 3, 4, 5\], expected \[2, 3, 5, 4\]"),
        (GOOD_X, [(N + 1, HEADS, V, K), (N + 1, HEADS, K), (N + 1, HEADS)], RuntimeError,
         "Input batch size 2 doesn't match state C batch size 3"),
        ((I,), [(N, HEADS, V, K), (N, HEADS, K), (N, HEADS)], RuntimeError,
         "For unbatched 1-D input, state C should be 3-D"),
        (GOOD_X, [(HEADS, V, K), (HEADS, K), (HEADS,)], RuntimeError,
         "For batched 2-D input, state C should be 4-D"),
    ],
    ids=["3d-input", "input-size", "state-count", "state-shape", "batch", "unbatched-states",
         "batched-states"],
)
def test_shape_errors_as_torch_raises_them(x_shape, state_shapes, error, match):
    step = celldsl.Cell("mlstm", I, HEADS * V, sizes=MLSTM)
    state = None if state_shapes is None else tuple(torch.zeros(s) for s in state_shapes)
    with pytest.raises(error, match=match):
        step(torch.zeros(x_shape), state)


def test_type_and_dtype_errors():
    step = celldsl.Cell("mlstm", I, HEADS * V, sizes=MLSTM)
    with pytest.raises(TypeError, match="input must be a Tensor"):
        step([0.0] * I)
    with pytest.raises(TypeError, match="the state must be a tuple of 3 tensors"):
        step(torch.zeros(N, I), [1, 2, 3])
    with pytest.raises(RuntimeError, match=r"input dtype \(torch.float64\) does not match weight dtype"):
        step(torch.zeros(N, I, dtype=F64))
    states = tuple(torch.zeros(N, *s, dtype=F64) for s in step.state_shapes)
    with pytest.raises(RuntimeError, match="state C is torch.float64 on cpu but the input is torch.float32"):
        step(torch.zeros(N, I), states)


def test_pickle_and_deepcopy_keep_the_numbers():
    step = celldsl.Cell("deltanet", I, HEADS * V, sizes=MLSTM, dtype=F64)
    x = torch.randn(N, I, dtype=F64)
    want, _ = step(x)
    for other in (pickle.loads(pickle.dumps(step)), copy.deepcopy(step)):
        assert type(other) is MatrixCell
        torch.testing.assert_close(other(x)[0], want, rtol=0, atol=0)


def test_torch_jit_script_gives_the_eager_step():
    """Scripted through the op celldsl::matrix_sequence (it was refused); tests/test_matrix_deploy.py
    has more."""
    step = celldsl.Cell("gla", 4, 8, dtype=F64)
    x = torch.randn(N, 4, dtype=F64)
    torch.testing.assert_close(torch.jit.script(step)(x), step(x), rtol=1e-12, atol=1e-12)
