"""Training paths that the layers must get right or refuse like torch: gradients of LSTM/GRU/RNN, their
cells and zoo cells against torch.nn's (same state_dict, float64) or the cell's equations, for the
ways a training loop meets them, on every backend (tests/every_backend.py):

- a weight that a parametrization or weight_norm computes, on a layer's one-step path and cell(k);
- a one-step Cell of a cell reading prev(x) of its input (refused, located);
- the streaming step's recorded backward (create_graph=True): writes since the forward, several
  steps sharing their input and weights (gradient penalties), inference tensors.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from every_backend import backend_fixture
from torch import nn

import celldsl

backend = backend_fixture()
DT = torch.float64


def torch_pair(kind, backend, *args, **kwargs):
    """torch.nn.<kind> and celldsl's with the same state_dict, float64."""
    torch.manual_seed(1)
    ref = getattr(nn, kind)(*args, dtype=DT, **kwargs)
    ours = getattr(celldsl, kind)(*args, dtype=DT, backend=backend, **kwargs)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def weight_normed(module, name, style):
    if style == "parametrize":
        nn.utils.parametrizations.weight_norm(module, name)
    else:
        with warnings.catch_warnings():  # torch.nn.utils.weight_norm is deprecated, still used
            warnings.simplefilter("ignore")
            nn.utils.weight_norm(module, name)


@pytest.mark.parametrize("style", ["parametrize", "weight_norm"])
@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_a_weight_normed_layer_on_one_step_matches_torch(kind, style, backend):
    """A decoder loop of a 2-layer layer whose weight_hh_l1 is weight-normed, on T = 1: the outputs
    and every gradient as torch.nn's; then, without autograd, a write into the normed weight's
    parameters between steps is seen. Before: TypeError from the one-step path (cell(k) could not
    share the computed weight)."""
    ref, ours = torch_pair(kind, backend, 5, 7, num_layers=2)
    for m in (ref, ours):
        weight_normed(m, "weight_hh_l1", style)
    torch.manual_seed(2)
    xs = torch.randn(4, 3, 5, dtype=DT)
    results = []
    for m in (ref, ours):
        state, outs = None, []
        for t in range(4):
            out, state = m(xs[t : t + 1], state)
            outs.append(out)
        loss = sum((o * (i + 1)).pow(2).sum() for i, o in enumerate(outs))
        grads = torch.autograd.grad(loss, list(m.parameters()))
        with torch.no_grad():
            state, frozen = None, []
            for t in range(4):
                out, state = m(xs[t : t + 1], state)
                frozen.append(out)
                for name, p in m.named_parameters():
                    if "weight_hh_l1" in name:
                        p.mul_(1.1)
        results.append([torch.cat(outs).detach(), *grads, torch.cat(frozen)])
    for got, want in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("style", ["parametrize", "weight_norm"])
def test_a_weight_normed_recurrent_on_one_step_matches_its_full_path(style, backend):
    """celldsl.Recurrent("gru"): a T = 1 call of a weight-normed layer gives torch.nn.GRU's output and
    gradients with the weight it computes. Before: TypeError from the one-step path."""
    torch.manual_seed(0)
    layer = celldsl.Recurrent("gru", 5, 7, num_layers=2, backend=backend, dtype=DT)
    weight_normed(layer, "weight_hh_l1", style)
    ref = nn.GRU(5, 7, num_layers=2, dtype=DT)
    ref.load_state_dict({k: v for k, v in layer.state_dict().items() if "_g" not in k and "_v" not in k
                         and "original" not in k} | {"weight_hh_l1": layer.weight_hh_l1.detach()})
    x = torch.randn(1, 3, 5, dtype=DT)
    out, h = layer(x)
    grads = torch.autograd.grad((out ** 2).sum() + h.sum(), [layer.weight_ih_l0, layer.weight_ih_l1])
    want_out, want_h = ref(x)
    want = torch.autograd.grad((want_out ** 2).sum() + want_h.sum(), [ref.weight_ih_l0, ref.weight_ih_l1])
    torch.testing.assert_close(out, want_out, rtol=1e-9, atol=1e-9)
    for g, w in zip(grads, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("stem", ["qrnn", "qrnn_f"])
def test_a_step_of_a_cell_reading_prev_of_its_input_is_refused_with_its_place(stem, backend):
    """prev(x) of an input is x of the step before; a one-step Cell carries states, not inputs, so its
    steps read zeros there: stepping it through a sequence gave other outputs and gradients than the
    layer, silently. Cell(...) and layer.cell(k) now refuse it at the first prev(x) of the text (as
    MatrixCell does); the layer itself, on T = 1 too, still runs it (zero before each sequence)."""
    line = {"qrnn": 20, "qrnn_f": 16}[stem]  # the first prev(x) of the text: z's
    with pytest.raises(celldsl.CellError, match=rf"{stem}\.cell:{line}:17: error: a one-step Cell cannot run "
                                                 r"prev\(x\)") as caught:
        celldsl.Cell(stem, 4, 4, backend=backend)
    assert "W_z1 @ prev(x)" in str(caught.value)
    torch.manual_seed(0)
    layer = celldsl.Recurrent(stem, 4, 4, backend=backend, dtype=DT)
    with pytest.raises(celldsl.CellError, match="one-step Cell cannot run prev"):
        layer.cell(0)
    x = torch.randn(1, 2, 4, dtype=DT)
    out, _ = layer(x)  # T = 1: the layer's own step, prev(x) = 0 as at the start of every sequence
    with torch.no_grad():
        p = dict(layer.named_parameters())
        z = torch.tanh(x[0] @ p["W_z2_l0"].T + p["b_z_l0"])
        f = torch.sigmoid(x[0] @ p["W_f2_l0"].T + p["b_f_l0"])
        c = (1 - f) * z
        want = c if stem == "qrnn_f" else torch.sigmoid(x[0] @ p["W_o2_l0"].T + p["b_o_l0"]) * c
    torch.testing.assert_close(out[0], want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("written", ["input", "bias"])
@pytest.mark.parametrize("kind", ["LSTMCell", "GRUCell", "LSTM"])
def test_a_write_before_a_recorded_backward_is_refused_or_harmless(kind, written, backend):
    """A step (a cell, or a layer on T = 1) whose input or bias is written in place after the forward,
    then a backward with create_graph=True (a gradient penalty): the gradients are those of the forward
    that ran (torch.nn's on the values before the write), or autograd's in-place error. Before: the
    prepared step's recorded backward ran the full path again on the written values and returned their
    gradients, silently (0.3 to 0.6 off)."""
    ref, ours = torch_pair(kind, backend, 5, 7)
    torch.manual_seed(3)
    x0 = torch.randn(*((1,) if kind == "LSTM" else ()), 3, 5, dtype=DT)

    def grads(module, write):
        base = x0.clone().requires_grad_()
        x = base * 1
        h = module(x)[0]
        if write:
            with torch.no_grad():
                if written == "input":
                    x.mul_(3)
                else:
                    for name, p in module.named_parameters():
                        if "bias" in name:
                            p.add_(1)
        return torch.autograd.grad((h ** 2).sum(), [base, *module.parameters()], create_graph=True)

    want = grads(ref, False)
    try:
        got = grads(ours, True)
    except RuntimeError as e:
        assert "modified by an inplace operation" in str(e)
        return
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kind", ["LSTMCell", "GRUCell", "LSTM", "GRU"])
def test_a_gradient_penalty_through_steps_sharing_their_input_matches_torch(kind, backend):
    """Three steps (a cell, or a layer on T = 1) reading the same input, each step's states the next
    one's, then a gradient penalty: the first-order gradients taken with create_graph=True and the
    gradients of their squared norm, as torch.nn's. Before: on the cpu backend the recorded backward
    of a step differentiated the full path with autograd.grad, whose total derivative also ran through
    the given states' history (the earlier steps, reading the same x and weights), which those steps'
    own backwards added again: first order 0.04-1.8 off, second order up to 250."""
    ref, ours = torch_pair(kind, backend, 5, 7)
    torch.manual_seed(4)
    x0 = torch.randn(*((1,) if kind in ("LSTM", "GRU") else ()), 3, 5, dtype=DT)
    results = []
    for m in (ref, ours):
        x, state = x0.clone().requires_grad_(), None
        for _ in range(3):
            state = m(x, state) if kind.endswith("Cell") else m(x, state)[1]
        h = state[0] if isinstance(state, tuple) else state
        params = list(m.parameters())
        first = torch.autograd.grad((h ** 2).sum(), [x, *params], create_graph=True)
        second = torch.autograd.grad(sum((g ** 2).sum() for g in first), [x, *params])
        results.append([*first, *second])
    for got, want in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("make", [lambda: celldsl.LSTM(3, 4, num_layers=2),
                                  lambda: celldsl.Recurrent("gru", 3, 4)], ids=["LSTM", "Recurrent"])
def test_cell_of_a_weight_normed_layer_says_why_it_cannot_share_the_weight(make):
    """layer.cell(k) shares the layer's Parameters; a computed weight is refused with its name (before:
    torch's setattr TypeError naming the cell's weight_hh, not the layer's weight_hh_l0)."""
    layer = make()
    nn.utils.parametrizations.weight_norm(layer, "weight_hh_l0")
    with pytest.raises(TypeError, match=r"cell\(\): weight_hh_l0 is a tensor computed from the layer's "
                                        r"parameters .* call the layer on a length-1 sequence instead"):
        layer.cell(0)
    if layer.num_layers > 1:
        assert layer.cell(1).weight_hh is layer.weight_hh_l1  # the other layer's weights are Parameters


def test_a_recorded_backward_of_a_step_on_an_inference_tensor_is_autograds_error(backend):
    """An input made under inference_mode has no version to check: a step's first-order backward (the
    step's own copy of it) runs, with torch.nn's gradients; a recorded one raises torch's error for
    inference tensors (torch.nn's forward raises it already), never a bare one from its version."""
    ref, ours = torch_pair("LSTMCell", backend, 5, 7)
    torch.manual_seed(5)
    x = torch.randn(3, 5, dtype=DT)
    with torch.inference_mode():
        frozen = x.clone()
    ours(frozen)[0].pow(2).sum().backward()
    ref(x)[0].pow(2).sum().backward()
    for p, q in zip(ours.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-9)
    h = ours(frozen)[0]
    try:
        got = torch.autograd.grad(h.pow(2).sum(), list(ours.parameters()), create_graph=True)
    except RuntimeError as e:
        assert "Inference tensors cannot be saved for backward" in str(e)
        return
    want = torch.autograd.grad(ref(x)[0].pow(2).sum(), list(ref.parameters()), create_graph=True)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("kind", ["GRU on T=4", "GRU on T=1", "GRUCell", "gla"])
def test_forward_mode_tangents_are_refused_not_dropped(kind, grad, backend):
    """A dual input (torch.autograd.forward_ad) gave a result without a tangent, where torch.nn's has
    one: the op has no forward-mode rule, and a custom op called without autograd drops tangents
    without a word. Now every path raises NotImplementedError, as torch does for an op without one."""
    import torch.autograd.forward_ad as fwAD

    torch.manual_seed(0)
    if kind == "gla":
        from test_matrix_deploy import I, layer_of

        module, shape = layer_of("gla", backend), (4, 2, I)
    elif kind == "GRUCell":
        module, shape = celldsl.GRUCell(6, 5, backend=backend, dtype=DT), (2, 6)
    else:
        module, shape = celldsl.GRU(6, 5, backend=backend, dtype=DT), (4 if kind.endswith("4") else 1, 2, 6)
    x = torch.randn(*shape, dtype=DT)
    module(x)  # no dual level: runs
    with fwAD.dual_level(), torch.set_grad_enabled(grad):
        dual = fwAD.make_dual(x, torch.randn_like(x))
        with pytest.raises(NotImplementedError, match="forward-mode AD"):
            module(dual)
