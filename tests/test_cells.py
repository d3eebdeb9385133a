"""One-step cells: celldsl.Cell for any cell, LSTMCell/GRUCell/RNNCell as torch.nn's, layer.cell(k).

- Stepping layer.cell(k, direction) through a sequence rebuilds the Recurrent layer's outputs, final
  states and parameter gradients: cells with one state, several, prev(...) states, an extra input.
- layer.cell(k) holds the layer's own Parameter objects: training the step trains the layer.
- LSTMCell/GRUCell/RNNCell are torch's classes with torch's state_dict and equal torch's numbers.
- A step is one call of the fused op with T = 1 (the C kernels on CPU tensors), not a loop over gates.
"""

import io
from pathlib import Path

import pytest
import torch
from torch import nn
from torch_testing import CELLS, assert_equal, pair

import celldsl
from celldsl import Cell, Recurrent
from celldsl.lang.errors import CellTensorError

F64 = torch.float64
T, N, I, H = 4, 3, 3, 4
CONTEXT = str(Path(__file__).resolve().parent / "lstm_context.cell")


def as_tuple(state):
    return state if isinstance(state, tuple) else (state,)


def step_through(layer, x, extra=None):
    """The layer rebuilt from its one-step cells: x [T, N, I] -> (out [T, N, D*H], finals [L*D, N, H])."""
    extra = extra or {}
    seq, finals = x, None
    for k in range(layer.num_layers):
        outs = []
        for d in range(layer.num_directions):
            step, state, ys = layer.cell(k, direction=d), None, []
            for t in (reversed(range(T)) if d else range(T)):
                y, state = step(seq[t], state, **extra)
                ys.append(y)
            outs.append(torch.stack(ys[::-1] if d else ys))
            finals = [[] for _ in as_tuple(state)] if finals is None else finals
            for f, s in zip(finals, as_tuple(state), strict=True):
                f.append(s)
        seq = torch.cat(outs, dim=-1)
    return seq, tuple(torch.stack(f) for f in finals)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("stem", ["gru", "lstm", "greff_fgr", "slstm", "mut1"])
def test_stepping_the_cells_rebuilds_the_layer(stem, backend):
    """Two layers, both directions (mut1, which needs input_size == hidden_size: one); greff_fgr
    carries prev(...) states, slstm four states."""
    torch.manual_seed(0)
    size, bidirectional = (H, False) if stem == "mut1" else (I, True)
    layer = Recurrent(stem, size, H, num_layers=2, bidirectional=bidirectional, backend=backend, dtype=F64)
    x = torch.randn(T, N, size, dtype=F64)
    results = []
    for run in (lambda: layer(x), lambda: step_through(layer, x)):
        layer.zero_grad()
        out, final = run()
        final = as_tuple(final)
        (out.square().sum() + sum(f.sum() for f in final)).backward()
        results.append((out, final, [p.grad.clone() for p in layer.parameters()]))
    (out, final, grads), (s_out, s_final, s_grads) = results
    torch.testing.assert_close(s_out, out, atol=1e-12, rtol=0)
    assert len(s_final) == len(final)
    for a, b in zip(s_final, final, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    for a, b in zip(s_grads, grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


def test_a_cell_with_an_extra_input_steps_like_the_layer():
    """tests/lstm_context.cell: `cell(x_t, state, ctx=c)` with one context per sequence."""
    torch.manual_seed(0)
    layer = Recurrent(CONTEXT, I, H, input_sizes={"ctx": 5}, dtype=F64)
    x, ctx = torch.randn(T, N, I, dtype=F64), torch.randn(N, 5, dtype=F64)
    out, final = layer(x, ctx=ctx)
    s_out, s_final = step_through(layer, x, {"ctx": ctx})
    torch.testing.assert_close(s_out, out, atol=1e-12, rtol=0)
    for a, b in zip(s_final, final, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_layer_cell_holds_the_layers_parameters():
    torch.manual_seed(0)
    layer = Recurrent("gru", I, H, num_layers=2, bidirectional=True)
    step = layer.cell(1, direction=1)
    assert step.input_size == 2 * H and step.weight_ih is layer.weight_ih_l1_reverse
    assert [n for n, _ in step.named_parameters()] == ["weight_ih", "weight_hh", "bias_ih", "bias_hh"]
    x = torch.randn(T, N, I)
    before = layer(x)[0]
    opt = torch.optim.SGD(step.parameters(), lr=0.5)
    step(torch.randn(N, 2 * H))[0].square().sum().backward()
    opt.step()
    assert not torch.allclose(layer(x)[0], before)  # the layer's own weights moved
    assert torch.equal(step.cell_parameter("W_hn"), layer.cell_parameter("W_hn", 1, 1))
    with pytest.raises(ValueError, match=r"layer must be in \[0, 2\) and direction in \[0, 2\)"):
        layer.cell(2)


def test_cell_defaults_unbatched_input_and_checks():
    torch.manual_seed(0)
    step = Cell("lstm", I, H, dtype=F64)
    x = torch.randn(N, I, dtype=F64)
    y, (h, c) = step(x)  # states start at zero
    y0, (h0, c0) = step(x, (torch.zeros(N, H, dtype=F64), torch.zeros(N, H, dtype=F64)))
    assert_equal((y, h, c), (y0, h0, c0))
    assert torch.equal(y, h)  # lstm's output is h
    y1, (h1, c1) = step(x[0], (h[0], c[0]))  # unbatched [I] with [H] states
    y2, (h2, c2) = step(x[:1], (h[:1], c[:1]))
    assert y1.shape == (H,)
    assert_equal((y1, h1, c1), (y2[0], h2[0], c2[0]))
    assert step(torch.randn(0, I, dtype=F64))[0].shape == (0, H)  # an empty batch
    with pytest.raises(RuntimeError, match="input has inconsistent input_size: got 4 expected 3"):
        step(torch.randn(N, I + 1, dtype=F64))
    with pytest.raises(RuntimeError, match=r"\(h, c\): expected 2 state tensor\(s\), got 1"):
        step(x, (h,))
    with pytest.raises(CellTensorError, match="Input batch size 3 doesn't match hidden1 batch size 2"):
        step(x, (h, c[:2]))
    with pytest.raises(TypeError, match="input_size should be of type int, got: float"):
        Cell("lstm", 3.0, H)
    assert repr(step) == "Cell('lstm', 3, 4)"


def test_cell_pickles_and_bias_false_has_no_bias():
    torch.manual_seed(0)
    step = Cell("mut3", I, H, bias=False)
    assert all(not n.startswith("b") for n, _ in step.named_parameters())
    assert repr(step) == "Cell('mut3', 3, 4, bias=False)"
    x = torch.randn(N, I)
    buffer = io.BytesIO()
    torch.save(step, buffer)
    buffer.seek(0)
    assert_equal(torch.load(buffer, weights_only=False)(x), step(x))


@pytest.mark.parametrize("kind, extra", [
    ("LSTMCell", {}), ("GRUCell", {}), ("RNNCell", {"nonlinearity": "relu"}), ("RNNCell", {"bias": False}),
], ids=["lstm", "gru", "rnn_relu", "rnn_nobias"])
def test_torch_cell_classes_equal_torchs(kind, extra):
    torch.manual_seed(0)
    ref, ours = pair(kind, I, H, dtype=F64, **extra)
    assert isinstance(ours, CELLS[kind][0]) and repr(ours) == repr(ref)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(N, I, dtype=F64, requires_grad=True)
    hx = (torch.randn(N, H, dtype=F64), torch.randn(N, H, dtype=F64)) if kind == "LSTMCell" \
        else torch.randn(N, H, dtype=F64)
    results = []
    for cell in (ref, ours):
        out = cell(x, hx)
        sum(o.square().sum() for o in as_tuple(out)).backward()
        results.append((out, x.grad.clone(), [p.grad for p in cell.parameters()]))
        x.grad = None
    assert_equal(results[1], results[0], atol=1e-12, rtol=0)
    assert_equal(ours(x[0]), ref(x[0]), atol=1e-12, rtol=0)  # unbatched, states at zero


def test_torch_layer_cell_is_a_torch_cell_with_the_layers_weights():
    torch.manual_seed(0)
    layer = celldsl.LSTM(I, H, num_layers=2, bidirectional=True, dtype=F64)
    step = layer.cell(1, direction=1)
    assert isinstance(step, celldsl.LSTMCell) and isinstance(step, nn.LSTMCell)
    assert step.weight_hh is layer.weight_hh_l1_reverse and step.bias_ih is layer.bias_ih_l1_reverse
    ref = nn.LSTMCell(2 * H, H, dtype=F64)
    ref.load_state_dict(step.state_dict())
    x = torch.randn(N, 2 * H, dtype=F64)
    assert_equal(step(x), ref(x), atol=1e-12, rtol=0)
    rnn = celldsl.RNN(I, H, nonlinearity="relu", bias=False)
    assert rnn.cell(0).nonlinearity == "relu" and rnn.cell(0).bias_ih is None


def test_a_step_is_one_fused_op_call(monkeypatch):
    """The step calls the time-loop op once, with T = 1, on the fused C kernels for CPU tensors."""
    import celldsl.nn.cells as cells

    calls = []
    real = cells.run

    def spy(key, backend, x, states, params, batch_sizes=None):
        calls.append((backend, tuple(x.shape)))
        return real(key, backend, x, states, params, batch_sizes)

    monkeypatch.setattr(cells, "run", spy)
    monkeypatch.setattr(cells._Step, "_replayed", lambda *args: None)  # the full path (the prepared one:
    # tests/test_streaming_step.py)
    step = celldsl.LSTMCell(I, H)
    h, c = step(torch.randn(N, I, requires_grad=True))
    assert calls == [("cpu", (1, N, I))]
    assert "CellSequence" in h.grad_fn.name()  # one autograd node: the op's, not one per gate
