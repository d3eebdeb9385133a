"""In-place writes on celldsl layers' outputs and final states, as on torch.nn's (issue 27, item 4).

PyG's AttentiveFP writes `GRUCell(...).relu_()`; other code zeroes `out[-1]` or rescales a final
state in place. The op's results used to be views of one buffer, which autograd refuses to modify in
place ("... a function that returns multiple views"); and the backward read `out` itself. Each case
runs on celldsl and on torch.nn with the same weights: the loss and every gradient (input, initial
states, weights) must agree. torch.nn's results are cloned before the write (the same arithmetic:
torch.nn.LSTM on the CPU keeps its output for the backward and refuses the write itself).
Writing into the input after the call is refused by both with torch's version-counter error.
"""

import pytest
import torch

import celldsl

T, N, I, H = 5, 3, 4, 6
DT = torch.float64


def _states(state):
    return list(state) if isinstance(state, tuple) else [state]


def _write(out, state, clone: bool):
    """The in-place writes under test; clone=True applies them to copies (the reference)."""
    out = out.clone() if clone else out
    states = [s.clone() if clone else s for s in _states(state)]
    out[-1].zero_()
    out.mul_(1.5)
    states[0].relu_()
    if len(states) > 1:
        states[1][0].mul_(2.0)
    return out, states


def _grads(module, tensors):
    return [t.grad.clone() for t in tensors] + [p.grad.clone() for p in module.parameters()]


LAYERS = {"lstm": (torch.nn.LSTM, celldsl.LSTM, {}), "gru": (torch.nn.GRU, celldsl.GRU, {}),
          "rnn": (torch.nn.RNN, celldsl.RNN, {"nonlinearity": "tanh"})}
CONFIGS = {"1layer": {}, "2layer_bidir": {"num_layers": 2, "bidirectional": True},
           "batch_first": {"batch_first": True}, "unbatched": {}}


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_layer_outputs_take_inplace_writes(kind, config, backend):
    torch_cls, ours_cls, extra = LAYERS[kind]
    torch.manual_seed(0)
    ref = torch_cls(I, H, **extra, **CONFIGS[config], dtype=DT)
    ours = ours_cls(I, H, **extra, **CONFIGS[config], dtype=DT, backend=backend)
    ours.load_state_dict(ref.state_dict())
    L = ref.num_layers * (2 if ref.bidirectional else 1)
    shape = (T, I) if config == "unbatched" else (N, T, I) if ref.batch_first else (T, N, I)
    x = torch.randn(shape, dtype=DT)
    h_shape = (L, H) if config == "unbatched" else (L, N, H)
    h0 = [torch.randn(h_shape, dtype=DT) for _ in range(2 if kind == "lstm" else 1)]
    results = []
    for module, clone in ((ref, True), (ours, False)):
        xs = x.clone().requires_grad_()
        hs = [h.clone().requires_grad_() for h in h0]
        out, state = module(xs, tuple(hs) if kind == "lstm" else hs[0])
        out, states = _write(out, state, clone)
        loss = (out * out).sum() + sum((s * s).sum() for s in states)
        loss.backward()
        results.append([loss.detach(), *_grads(module, [xs, *hs])])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-10)


CELLS = {"lstm": (torch.nn.LSTMCell, celldsl.LSTMCell, {}), "gru": (torch.nn.GRUCell, celldsl.GRUCell, {}),
         "rnn": (torch.nn.RNNCell, celldsl.RNNCell, {"nonlinearity": "relu"})}


@pytest.mark.parametrize("unbatched", [False, True])
@pytest.mark.parametrize("kind", CELLS)
def test_cell_outputs_take_inplace_writes(kind, unbatched):
    """`cell(x).relu_()` (AttentiveFP), and writes into both of LSTMCell's states. torch.nn's results
    are cloned first: torch.nn.RNNCell's tanh/relu keeps its output for the backward and refuses."""
    torch_cls, ours_cls, extra = CELLS[kind]
    torch.manual_seed(1)
    ref = torch_cls(I, H, **extra, dtype=DT)
    ours = ours_cls(I, H, **extra, dtype=DT)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn((I,) if unbatched else (N, I), dtype=DT)
    results = []
    for module in (ref, ours):
        xs = x.clone().requires_grad_()
        y = module(xs)
        if module is ref:
            y = tuple(t.clone() for t in y) if isinstance(y, tuple) else y.clone()
        if isinstance(y, tuple):
            h, c = y
            h.relu_()
            c.mul_(3.0)
            loss = (h * c).sum() + h.sum()
        else:
            loss = y.relu_().pow(2).sum()
        loss.backward()
        results.append([loss.detach(), *_grads(module, [xs])])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-10)


def test_attentive_fp_pattern_in_a_loop():
    """AttentiveFP's readout: h = GRUCell(context, h).relu_() repeated, trained end to end."""
    torch.manual_seed(2)
    ref, ours = torch.nn.GRUCell(I, I, dtype=DT), celldsl.GRUCell(I, I, dtype=DT)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(N, I, dtype=DT)
    results = []
    for module in (ref, ours):
        h = x.clone().requires_grad_()
        out = h
        for _ in range(3):
            out = module(torch.tanh(out), out).relu_()
        out.sum().backward()
        results.append([out.detach(), *_grads(module, [h])])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-10)


def test_writing_into_the_input_after_the_call_is_torchs_error():
    """Both GRU layers keep the input for the backward: a write into it before backward is refused,
    with torch's own error. (celldsl's cells copy the input into the op's [1, N, I] sequence, so
    there the write is harmless, and the gradient is the one of the values the cell read.)"""
    for cls in (torch.nn.GRU, celldsl.GRU):
        torch.manual_seed(0)
        module = cls(I, H, dtype=DT)
        xs = torch.randn(T, N, I, dtype=DT, requires_grad=True) * 1.0
        out, _ = module(xs)
        xs.add_(1.0)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out.sum().backward()


def test_cell_input_written_after_the_call_keeps_its_gradient():
    torch.manual_seed(0)
    ref, ours = torch.nn.GRUCell(I, H, dtype=DT), celldsl.GRUCell(I, H, dtype=DT)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(N, I, dtype=DT)
    ref(x).pow(2).sum().backward()
    xs = x.clone()
    out = ours(xs)
    xs.add_(1.0)
    out.pow(2).sum().backward()
    for a, b in zip(ref.parameters(), ours.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-9, atol=1e-10)
