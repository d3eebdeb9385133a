"""The streaming step (issue 27 item 6): a Cell called without autograd replays a prepared native
step (targets/c/fused.PreparedStep) while nothing changed, and makes a new one, after all the checks,
when something did. References: torch.nn's cells with the same weights, and the full path (autograd
on), whose numbers it gives up to the order of a GEMM's sums (its GEMMs are chosen for weights
packed once); repeated replays give the same numbers bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import celldsl
from celldsl.lang.errors import CellTensorError
from celldsl.ops.function import loop_for
from celldsl.targets.c import fused

I, H, N = 8, 12, 3


def pair(name: str):
    torch.manual_seed(0)
    ref, ours = getattr(nn, name)(I, H), getattr(celldsl, name)(I, H)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def state(name: str):
    return (torch.randn(N, H), torch.randn(N, H)) if name == "LSTMCell" else torch.randn(N, H)


def as_tuple(r):
    return r if isinstance(r, tuple) else (r,)


def assert_close(a, b):
    for p, q in zip(as_tuple(a), as_tuple(b), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5)


def cpu_loop(cell):
    loop = loop_for(cell.compiled.key, "cpu")
    if not isinstance(loop, fused.FusedCPULoop):
        pytest.fail(f"the C kernels did not build: {fused.build_library(cell.compiled)[1]}")
    return loop


@pytest.mark.parametrize("name", ["LSTMCell", "GRUCell", "RNNCell"])
def test_replayed_step_is_the_full_path_and_skips_the_op(name, monkeypatch):
    ref, ours = pair(name)
    x, h = torch.randn(N, I), state(name)
    out, finals = ours._step(x, list(as_tuple(h)), {}, prepared=False)  # the full path
    full = tuple(finals) if name == "LSTMCell" else out
    loop = cpu_loop(ours)
    with torch.no_grad():
        first = ours(x, h)  # makes the prepared step

        def refuse(*args, **kwargs):
            raise AssertionError("the op's loop ran: the prepared step was not replayed")

        monkeypatch.setattr(loop, "forward", refuse)
        monkeypatch.setattr(loop, "infer", refuse)  # the full path without autograd
        again = ours(x, h)
        for b, c in zip(as_tuple(first), as_tuple(again), strict=True):
            assert torch.equal(b, c)
        assert_close(first, tuple(t.detach() for t in as_tuple(full)))
        assert_close(again, ref(x, h))


@pytest.mark.parametrize("name", ["LSTMCell", "GRUCell"])
def test_a_changed_weight_is_seen(name):
    ref, ours = pair(name)
    x, h = torch.randn(N, I), state(name)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.5)
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.5)
    for _ in range(3):  # a training step between streaming calls: the optimizer's in-place writes
        with torch.no_grad():
            assert_close(ours(x, h), ref(x, h))
        for model, opt in ((ref, opt_ref), (ours, opt_ours)):
            opt.zero_grad()
            sum(t.sum() for t in as_tuple(model(x, h))).backward()
            opt.step()
    with torch.no_grad():
        ours.bias_hh.mul_(3.0)
        ref.bias_hh.mul_(3.0)
        assert_close(ours(x, h), ref(x, h))
        w = torch.randn_like(ref.weight_hh)
        ours.weight_hh.data, ref.weight_hh.data = w.clone(), w.clone()  # new storage, same shape
        assert_close(ours(x, h), ref(x, h))
        ours.weight_ih = nn.Parameter(w[:, :I].clone())  # a new parameter object
        ref.weight_ih = nn.Parameter(w[:, :I].clone())
        assert_close(ours(x, h), ref(x, h))


def test_a_wrong_shape_assigned_after_a_replay_is_refused():
    _ref, ours = pair("LSTMCell")
    x, h = torch.randn(N, I), state("LSTMCell")
    with torch.no_grad():
        ours(x, h)
        ours(x, h)
        ours.weight_hh.data = torch.randn(4 * H, H + 1)
        with pytest.raises(CellTensorError, match="size mismatch for weight_hh"):
            ours(x, h)
        with pytest.raises(CellTensorError, match="inconsistent input_size"):
            _ref, ours = pair("LSTMCell")
            ours(x, h)
            ours(torch.randn(N, I + 1), h)


def test_results_are_fresh_tensors():
    ref, ours = pair("LSTMCell")
    x, hc = torch.randn(N, I), state("LSTMCell")
    with torch.no_grad():
        h1, c1 = ours(x, hc)
        keep = h1.clone()
        h2, c2 = ours(x, (h1, c1))
        h1.zero_()  # a write into one call's result changes no other
        assert torch.equal(h2, ours(x, (keep, c1))[0])
        assert h1.data_ptr() != h2.data_ptr() and c1.data_ptr() != c2.data_ptr()
        assert_close((h2, c2), ref(x, ref(x, hc)))


def test_unbatched_without_state_and_a_changed_nonlinearity():
    ref, ours = pair("RNNCell")
    x = torch.randn(I)
    with torch.no_grad():
        assert_close(ours(x), ref(x))
        ours.nonlinearity = ref.nonlinearity = "relu"
        assert_close(ours(x), ref(x))


def test_any_cell_with_prev_states_left_out():
    step = celldsl.Cell("lstm", I, H)
    x, h, c = torch.randn(N, I), torch.randn(N, H), torch.randn(N, H)
    want = step(x, (h, c))
    with torch.no_grad():
        for _ in range(2):
            out, (h1, c1) = step(x, (h, c))
            torch.testing.assert_close(out, want[0].detach(), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(c1, want[1][1].detach(), rtol=1e-5, atol=1e-6)
        zero = step(x)
        torch.testing.assert_close(zero[0], step(x, (torch.zeros(N, H), torch.zeros(N, H)))[0])
    np.testing.assert_allclose(out.numpy(), want[0].detach().numpy(), rtol=1e-5, atol=1e-6)


# ---- under autograd: the prepared step's backward (fused.PreparedTrainStep, nn/prepared.py) ---------


def refuse_the_op(monkeypatch, cell):
    """From now on the op's loop must not run: every call replays the prepared step."""
    loop = cpu_loop(cell)

    def refuse(*args, **kwargs):
        raise AssertionError("the op's loop ran: the prepared step was not replayed")

    monkeypatch.setattr(loop, "forward", refuse)
    monkeypatch.setattr(loop, "infer", refuse)  # the full path without autograd
    monkeypatch.setattr(loop, "backward", refuse)


def pair64(name: str, n_in: int = I, hidden: int = H):
    torch.manual_seed(0)
    ref = getattr(nn, name)(n_in, hidden, dtype=torch.float64)
    ours = getattr(celldsl, name)(n_in, hidden, dtype=torch.float64)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def bptt(model, name, xs, h0, c0, weights):
    """A loss over T steps of the cell (the state carried), and its gradients by autograd."""
    s = (h0, c0) if name == "LSTMCell" else h0
    loss = 0
    for t in range(xs.shape[0]):
        s = model(xs[t], s)
        h = s[0] if isinstance(s, tuple) else s
        loss = loss + (h * weights).sum() + (s[1].cos().sum() if isinstance(s, tuple) else 0)
    return loss, torch.autograd.grad(loss, [xs, h0, *model.parameters()])


@pytest.mark.parametrize("batch", [1, N])
@pytest.mark.parametrize("name", ["LSTMCell", "GRUCell", "RNNCell"])
def test_training_steps_match_torch_and_the_full_path(name, batch, monkeypatch):
    """T steps, then one backward through all of them (each backward but the last one's restores
    its forward's values), float64: the gradients of the inputs, the initial state and every
    parameter equal torch.nn's with the same weights, and the full path's."""
    monkeypatch.setenv("CELLDSL_CPU_GEMM", "native")  # the native loop at any size (else it is measured)
    ref, ours = pair64(name)
    xs = torch.randn(4, batch, I, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(batch, H, dtype=torch.float64, requires_grad=True)
    c0, weights = torch.randn(batch, H, dtype=torch.float64), torch.randn(H, dtype=torch.float64)
    full_loss, full = bptt(ours, name, xs, h0, c0, weights)  # first calls: the full path makes the step
    refuse_the_op(monkeypatch, ours)
    loss, grads = bptt(ours, name, xs, h0, c0, weights)
    ref_loss, want = bptt(ref, name, xs, h0, c0, weights)
    torch.testing.assert_close(loss, ref_loss)
    for g, w, f in zip(grads, want, full, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(g, f, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["LSTMCell", "GRUCell"])
def test_backwards_out_of_order_and_twice(name, monkeypatch):
    """Two calls, then the first one's backward twice (retain_graph) and the second's: each
    gradient is that call's, whatever ran in between."""
    monkeypatch.setenv("CELLDSL_CPU_GEMM", "native")
    ref, ours = pair64(name)
    xs = [torch.randn(N, I, dtype=torch.float64) for _ in range(2)]
    hs = [torch.randn(N, H, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    cs = [torch.randn(N, H, dtype=torch.float64) for _ in range(2)]

    def call(model, k):
        s = (hs[k], cs[k]) if name == "LSTMCell" else hs[k]
        r = model(xs[k], s)
        return (r[0] * 2 + r[1]).sum() if isinstance(r, tuple) else r.sin().sum()

    ours(xs[0], (hs[0], cs[0]) if name == "LSTMCell" else hs[0])  # makes the step
    refuse_the_op(monkeypatch, ours)
    first, second = call(ours, 0), call(ours, 1)
    g1 = torch.autograd.grad(first, [hs[0], *ours.parameters()], retain_graph=True)
    g1_again = torch.autograd.grad(first, [hs[0], *ours.parameters()])
    g2 = torch.autograd.grad(second, [hs[1], *ours.parameters()])
    w1 = torch.autograd.grad(call(ref, 0), [hs[0], *ref.parameters()])
    w2 = torch.autograd.grad(call(ref, 1), [hs[1], *ref.parameters()])
    for got, want in ((g1, w1), (g1_again, w1), (g2, w2)):
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["LSTMCell", "GRUCell"])
def test_training_with_an_optimizer_and_load_state_dict(name, monkeypatch):
    """Step-by-step training (Adam after every few steps: in-place writes into every parameter)
    follows torch.nn's, and a load_state_dict between calls is seen, under autograd too."""
    monkeypatch.setenv("CELLDSL_CPU_GEMM", "native")
    ref, ours = pair64(name)
    opts = [torch.optim.Adam(m.parameters(), lr=0.05) for m in (ref, ours)]
    torch.manual_seed(1)
    data = torch.randn(6, 3, N, I, dtype=torch.float64)
    for k, xs in enumerate(data):
        for model, opt in zip((ref, ours), opts, strict=True):
            opt.zero_grad()
            s = None
            loss = 0
            for x in xs:
                s = model(x, s)
                loss = loss + (s[0] if isinstance(s, tuple) else s).square().mean()
            loss.backward()
            opt.step()
        for p, q in zip(ref.parameters(), ours.parameters(), strict=True):
            torch.testing.assert_close(q, p, rtol=1e-9, atol=1e-11)
        if k == 2:
            other = getattr(nn, name)(I, H, dtype=torch.float64)
            ref.load_state_dict(other.state_dict())
            ours.load_state_dict(other.state_dict())


def test_a_weight_written_between_forward_and_backward_is_refused(monkeypatch):
    """As torch.nn: autograd's own error for a saved tensor modified in place."""
    monkeypatch.setenv("CELLDSL_CPU_GEMM", "native")
    _ref, ours = pair64("LSTMCell")
    x = torch.randn(N, I, dtype=torch.float64)
    ours(x)
    h, _c = ours(x)
    with torch.no_grad():
        ours.weight_hh.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        h.sum().backward()


def test_gradcheck_and_gradgradcheck_of_the_prepared_step(monkeypatch):
    """float64: gradcheck through the prepared backward; gradgradcheck, whose backward autograd
    records, through the full path it falls back to."""
    monkeypatch.setenv("CELLDSL_CPU_GEMM", "native")
    _ref, ours = pair64("GRUCell", 3, 4)
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    h = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    names = [n for n, _ in ours.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in ours.parameters()]
    backward = cpu_loop(ours).backward
    ran = []

    def f(x, h, *ps):  # the parameters passed in (new tensors at each call: a new prepared step)
        ran.append(celldsl.nn.cells._PREPARED.get(ours, {}).get(True))
        return torch.func.functional_call(ours, dict(zip(names, ps, strict=True)), (x, h))

    def no_backward(*args, **kwargs):
        raise AssertionError("the op's backward ran: the prepared one was not")

    cpu_loop(ours).backward = no_backward
    try:
        assert torch.autograd.gradcheck(f, (x, h, *params), check_batched_grad=False)
    finally:
        cpu_loop(ours).backward = backward
    assert torch.autograd.gradgradcheck(f, (x, h, *params), check_batched_grad=False)


def test_any_cell_unbatched_and_a_frozen_weight_under_autograd(monkeypatch):
    """Cell (output and states both returned), unbatched input, and a parameter that needs no
    gradient: the same gradients as the full path's."""
    monkeypatch.setenv("CELLDSL_CPU_GEMM", "native")
    torch.manual_seed(0)
    step = celldsl.Cell("lstm", I, H, dtype=torch.float64)
    step.weight_ih.requires_grad_(False)
    x = torch.randn(I, dtype=torch.float64, requires_grad=True)
    h, c = torch.randn(H, dtype=torch.float64, requires_grad=True), torch.randn(H, dtype=torch.float64)

    def grads(prepared: bool):
        if prepared:
            out, (h1, c1) = step(x, (h, c))
        else:
            out, (h1, c1) = step._step(x, [h, c], {}, prepared=False)
        loss = (out * 3).sum() + h1.sin().sum() + c1.square().sum()
        trained = [p for p in step.parameters() if p.requires_grad]
        return [out, h1, c1, *torch.autograd.grad(loss, [x, h, *trained])]

    step(x, (h, c))
    refuse_the_op(monkeypatch, step)
    got = grads(True)
    monkeypatch.undo()
    want = grads(False)
    assert got[0].shape == (H,) and got[3].shape == (I,)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    got[0].add_(1)  # outputs are plain tensors, writable in place (as torch.nn's)


@pytest.mark.parametrize("name", ["LSTMCell", "GRUCell"])
def test_writes_torch_does_not_count_are_seen_under_autograd(name, monkeypatch):
    """Manual SGD through `.data` (no version bump) between training steps: the prepared step
    reads the weights live, so the numbers follow torch.nn's without flatten_parameters()."""
    monkeypatch.setenv("CELLDSL_CPU_GEMM", "native")
    ref, ours = pair64(name)
    x, h = torch.randn(N, I, dtype=torch.float64), torch.randn(N, H, dtype=torch.float64)
    for _ in range(4):
        for model in (ref, ours):
            model.zero_grad()
            r = model(x, (h, h) if name == "LSTMCell" else h)
            (r[0] if isinstance(r, tuple) else r).square().sum().backward()
            for p in model.parameters():
                p.data.add_(p.grad, alpha=-0.1)
        for p, q in zip(ref.parameters(), ours.parameters(), strict=True):
            torch.testing.assert_close(q, p, rtol=1e-10, atol=1e-12)


# ---- a layer on T = 1: each layer's prepared step (torch_layers._streamed) ----------------------


@pytest.mark.parametrize("layers, batch_first", [(1, False), (2, True)])
@pytest.mark.parametrize("name", ["LSTM", "GRU", "RNN"])
def test_a_layer_on_one_step_replays_its_cells_steps(name, layers, batch_first, monkeypatch):
    """T = 1, stacked or not, batch_first or not, float64, under autograd and without: torch.nn's
    outputs and gradients, with the op's loop never running after the first call."""
    monkeypatch.setenv("CELLDSL_CPU_GEMM", "native")
    torch.manual_seed(0)
    kw = {"num_layers": layers, "batch_first": batch_first, "dtype": torch.float64}
    ref, ours = getattr(nn, name)(I, H, **kw), getattr(celldsl, name)(I, H, **kw)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(*((N, 1) if batch_first else (1, N)), I, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(layers, N, H, dtype=torch.float64, requires_grad=True)
    hx = (h0, torch.randn(layers, N, H, dtype=torch.float64)) if name == "LSTM" else h0

    def run(model):
        out, s = model(x, hx)
        h = s[0] if isinstance(s, tuple) else s
        loss = out.sin().sum() + (h * 2).sum() + (s[1].cos().sum() if isinstance(s, tuple) else 0)
        with torch.no_grad():
            again = model(x, hx)[0]
        return [out, h, again, *torch.autograd.grad(loss, [x, h0, *model.parameters()])]

    run(ours)  # makes the steps
    for k in range(layers):
        refuse_the_op(monkeypatch, ours.cell(k))
    for g, w in zip(run(ours), run(ref), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_a_layer_keeps_its_messages_and_other_calls_take_the_full_path():
    """A wrong hidden state gets the layer's message (not a cell's); T = 2 and unbatched calls
    are the full path's."""
    torch.manual_seed(0)
    ref, ours = nn.LSTM(I, H), celldsl.LSTM(I, H)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(1, N, I)
    ours(x)
    bad = (torch.randn(1, N + 1, H), torch.randn(1, N, H))
    with pytest.raises(RuntimeError) as want:
        ref(x, bad)
    with pytest.raises(RuntimeError) as got:
        ours(x, bad)
    assert str(got.value).startswith(str(want.value))  # the layer's full path's message
    for inp in (torch.randn(2, N, I), torch.randn(1, I)):
        torch.testing.assert_close(ours(inp)[0], ref(inp)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layers", [1, 2])
def test_recurrent_on_one_step_replays_its_cells_steps(layers, monkeypatch):
    """celldsl.Recurrent (any cell; here the zoo's lstm) on T = 1: the full path's outputs, final
    states and gradients (float64), with the op's loop never running after the first call; a
    one-tensor state for a two-state cell gets the full path's error."""
    monkeypatch.setenv("CELLDSL_CPU_GEMM", "native")
    torch.manual_seed(0)
    layer = celldsl.Recurrent("lstm", I, H, num_layers=layers, dtype=torch.float64)
    x = torch.randn(1, N, I, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(layers, N, H, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(layers, N, H, dtype=torch.float64)

    def run(model, streamed: bool):
        out, (h, c) = model(x, (h0, c0)) if streamed else model._run(x, (h0, c0), {})
        loss = out.sin().sum() + (h * 2).sum() + c.cos().sum()
        return [out, h, c, *torch.autograd.grad(loss, [x, h0, *model.parameters()])]

    run(layer, True)  # makes the steps
    want = run(layer, False)
    for k in range(layers):
        refuse_the_op(monkeypatch, layer.cell(k))
    for g, w in zip(run(layer, True), want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    monkeypatch.undo()
    with pytest.raises(CellTensorError, match="give them as a tuple"):
        layer(x, h0)


# ---- the fixed cost's shortcuts (nn/prepared.Layout.plan, shaped results, the layer's steps) ---------


def trained_params_grads(model, name, x, h, loss_of=None):
    r = model(x, h)
    loss = (loss_of or (lambda r: sum((t * (k + 1)).sin().sum() for k, t in enumerate(as_tuple(r)))))(r)
    return torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])


@pytest.mark.parametrize("name", ["LSTMCell", "GRUCell", "RNNCell"])
def test_parameter_gradients_by_the_plan_and_the_general_way(name, monkeypatch):
    """Each parameter's gradient made by Layout's plan (one GEMM per weight, column sums per bias,
    from the step's bound buffers) equals the general way's (PreparedTrainStep.gradients) and
    torch.nn's, float64; and only the needed ones are made (a frozen bias gets none)."""
    monkeypatch.setenv("CELLDSL_CPU_GEMM", "native")
    ref, ours = pair64(name)
    x = torch.randn(N, I, dtype=torch.float64)
    h = tuple(torch.randn(N, H, dtype=torch.float64) for _ in range(2 if name == "LSTMCell" else 1))
    h = h if name == "LSTMCell" else h[0]
    ours(x, h)
    refuse_the_op(monkeypatch, ours)
    layout = celldsl.nn.cells._PREPARED[ours][True][1][1]
    assert all(p is not None for p in layout.plan)  # the plan covers torch's cells' parameters
    planned = trained_params_grads(ours, name, x, h)
    plan, layout.plan = layout.plan, [None] * len(layout.plan)
    general = trained_params_grads(ours, name, x, h)
    layout.plan = plan
    want = trained_params_grads(ref, name, x, h)
    for a, b, w in zip(planned, general, want, strict=True):
        torch.testing.assert_close(a, w, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(b, w, rtol=1e-10, atol=1e-12)
    ours.bias_hh.requires_grad_(False)
    ref.bias_hh.requires_grad_(False)
    ours(x, h)  # a new step (which parameters need a gradient is part of its key)
    got = trained_params_grads(ours, name, x, h)
    assert len(got) == 3
    for a, w in zip(got, trained_params_grads(ref, name, x, h), strict=True):
        torch.testing.assert_close(a, w, rtol=1e-10, atol=1e-12)
    for model in (ref, ours):  # a new parameter object: a new step, whose call passes the new one
        model.weight_hh = nn.Parameter(model.weight_hh.detach() * 0.5)
    ours(x, h)
    for model in (ref, ours):
        r = model(x, h)
        (r[0] if isinstance(r, tuple) else r).sum().backward()
    torch.testing.assert_close(ours.weight_hh.grad, ref.weight_hh.grad, rtol=1e-10, atol=1e-12)


def test_backwards_of_steps_of_two_batch_sizes_out_of_order(monkeypatch):
    """A call at N = 1, one at N = 3 (a new prepared step, new buffers), then their backwards in
    reverse order, .grad accumulating: each call's gradients come from its own step's buffers."""
    monkeypatch.setenv("CELLDSL_CPU_GEMM", "native")
    ref, ours = pair64("GRUCell")
    xs = [torch.randn(n, I, dtype=torch.float64) for n in (1, N)]
    hs = [torch.randn(n, H, dtype=torch.float64, requires_grad=True) for n in (1, N)]
    for model in (ours, ours):  # the first pass makes the steps
        model.zero_grad()
        first, second = (model(x, h).sin().sum() for x, h in zip(xs, hs, strict=True))
        second.backward()
        first.backward()
    got = [p.grad.clone() for p in ours.parameters()]
    ref.zero_grad()
    for x, h in zip(xs, hs, strict=True):
        ref(x, h).sin().sum().backward()
    for g, p in zip(got, ref.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("layers, batch_first", [(1, False), (1, True), (2, True)])
def test_gradcheck_and_gradgradcheck_of_a_layer_on_one_step(layers, batch_first, monkeypatch):
    """float64, a layer on T = 1 (its steps take x [1, N, I] or [N, 1, I] and give [1, N, H] states
    with no reshape for autograd to record): gradcheck through the prepared backward (gradcheck's
    perturbations of the parameters are in-place writes: the step reads them live), gradgradcheck
    through the full path it falls back to (called with the same shapes)."""
    monkeypatch.setenv("CELLDSL_CPU_GEMM", "native")
    torch.manual_seed(0)
    layer = celldsl.GRU(3, 4, num_layers=layers, batch_first=batch_first, dtype=torch.float64)
    x = torch.randn(*((2, 1) if batch_first else (1, 2)), 3, dtype=torch.float64, requires_grad=True)
    h = torch.randn(layers, 2, 4, dtype=torch.float64, requires_grad=True)
    params = list(layer.parameters())

    def f(x, h, *ps):  # ps: the layer's own parameters
        return layer(x, h)

    f(x, h, *params)
    loop = cpu_loop(layer.cell(0))
    backward = loop.backward

    def no_backward(*args, **kwargs):
        raise AssertionError("the op's backward ran: the prepared one was not")

    loop.backward = no_backward
    try:
        assert torch.autograd.gradcheck(f, (x, h, *params), check_batched_grad=False)
    finally:
        loop.backward = backward
    assert torch.autograd.gradgradcheck(f, (x, h, *params), check_batched_grad=False)


@pytest.mark.parametrize("grad", [False, True])
def test_a_layers_output_and_final_state_are_tensors_of_their_own(grad, monkeypatch):
    """One layer on T = 1: output [1, N, H] ([N, 1, H] batch_first) and h_n [1, N, H] are plain
    tensors sharing no memory (a write into one changes no other), as torch.nn's."""
    monkeypatch.setenv("CELLDSL_CPU_GEMM", "native")
    for batch_first in (False, True):
        torch.manual_seed(0)
        ref = nn.GRU(I, H, batch_first=batch_first, dtype=torch.float64)
        ours = celldsl.GRU(I, H, batch_first=batch_first, dtype=torch.float64)
        ours.load_state_dict(ref.state_dict())
        x = torch.randn(*((N, 1) if batch_first else (1, N)), I, dtype=torch.float64)
        h0 = torch.randn(1, N, H, dtype=torch.float64)
        with torch.set_grad_enabled(grad):
            ours(x, h0)
            refuse_the_op(monkeypatch, ours.cell(0))
            out, h = ours(x, h0)
            want_out, want_h = ref(x, h0)
        monkeypatch.undo()
        assert out.shape == want_out.shape and h.shape == want_h.shape
        assert out._base is None and h._base is None
        assert out.untyped_storage().data_ptr() != h.untyped_storage().data_ptr()
        torch.testing.assert_close(out, want_out, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(h, want_h, rtol=1e-10, atol=1e-12)
        with torch.no_grad():
            out.add_(1)
        torch.testing.assert_close(h, want_h, rtol=1e-10, atol=1e-12)


def test_a_layer_on_one_step_follows_writes_dtype_and_requires_grad_changes(monkeypatch):
    """Step-by-step training of a GRU layer on T = 1 against torch.nn's: optimizer steps (in-place
    writes), `.data` writes (no version bump), a bias frozen then trained again, a new parameter
    object, train/eval, then `.double()`: every output and gradient follows torch.nn's."""
    monkeypatch.setenv("CELLDSL_CPU_GEMM", "native")
    torch.manual_seed(0)
    ref, ours = nn.GRU(I, H), celldsl.GRU(I, H)
    ours.load_state_dict(ref.state_dict())
    x, h0 = torch.randn(1, N, I), torch.randn(1, N, H)

    def step(model, opt, change):
        opt.zero_grad()
        out, h = model(x, h0)
        (out.sin().sum() + h.square().sum()).backward()
        opt.step()
        change(model)
        return out, h, [p.grad for p in model.parameters()]

    def data_write(m):
        m.weight_hh_l0.data.mul_(0.9)

    def freeze(m):
        m.bias_ih_l0.requires_grad_(False)

    def thaw(m):
        m.bias_ih_l0.requires_grad_(True)

    def new_parameter(m):
        m.weight_ih_l0 = nn.Parameter(m.weight_ih_l0.detach() * 1.1)

    def evaluate(m):
        m.eval()

    changes = [data_write, freeze, thaw, new_parameter, evaluate]
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (ref, ours)]
    ours(x, h0)
    refuse_the_op(monkeypatch, ours.cell(0))  # every call below is a prepared step's
    for change in changes:
        got, want = step(ours, opts[1], change), step(ref, opts[0], change)
        opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (ref, ours)]  # a new parameter object
        for g, w in zip([*got[:2], *got[2]], [*want[:2], *want[2]], strict=True):
            assert (g is None) == (w is None)
            if g is not None:
                torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    ours.load_state_dict(ref.state_dict())  # the same weights: float32 training drifted them apart
    ref.double()
    ours.double()
    x, h0 = x.double(), h0.double()
    for g, w in zip(ours(x, h0), ref(x, h0), strict=True):
        assert g.dtype == torch.float64
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_functional_call_of_a_layer_on_one_step():
    """torch.func.functional_call swaps plain tensors in for a layer's parameters: a T = 1 call runs
    the full path (a cell shares nn.Parameters only) with those tensors, as torch.nn's (it raised
    a TypeError from making the layer's cells); the layer's own steps run again afterwards."""
    torch.manual_seed(0)
    ref, ours = nn.GRU(I, H, num_layers=2), celldsl.GRU(I, H, num_layers=2)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(1, N, I)
    ours(x)
    swapped = {n: (p.detach() * 0.5).requires_grad_() for n, p in ref.named_parameters()}
    for got, want in zip(torch.func.functional_call(ours, swapped, (x,)),
                         torch.func.functional_call(ref, swapped, (x,)), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for got, want in zip(ours(x), ref(x), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def _biases_at(module, order):
    """`module` with its parameters moved into one buffer, in `order` (names): their addresses then
    follow that order (the values stay)."""
    params = dict(module.named_parameters())
    buf = torch.empty(sum(p.numel() for p in params.values()), dtype=next(iter(params.values())).dtype)
    at = 0
    for name in order:
        p = params[name]
        view = buf[at : at + p.numel()].view_as(p)
        view.copy_(p.detach())
        p.data = view
        at += p.numel()
    return module


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("name", ["LSTMCell", "GRUCell", "LSTM", "GRU"])
def test_the_numbers_do_not_depend_on_where_the_parameters_lie(name, grad):
    """The prepared step adds a GEMM's bias vectors in the order of the cell's vectors. It used to take
    the order of their addresses (the first as the GEMM's bias, the others after it), so two modules
    with the same weights gave numbers a rounding apart, for ~half of the modules made in a process."""
    torch.manual_seed(0)
    layer = name in ("LSTM", "GRU")
    make = getattr(celldsl, name)
    first = make(16, 16, dtype=torch.float64)
    x = torch.randn(1, 5, 16, dtype=torch.float64) if layer else torch.randn(5, 16, dtype=torch.float64)
    names = [n for n, _ in first.named_parameters()]
    results = []
    for order in (names, names[::-1], names[1:] + names[:1]):
        module = make(16, 16, dtype=torch.float64)
        module.load_state_dict(first.state_dict())
        _biases_at(module, order)
        for _ in range(2):  # the first call makes the prepared step, the second replays it
            with torch.set_grad_enabled(grad):
                xi = x.clone().requires_grad_(grad)
                out = module(xi)[0]
                got = [out.detach()]
                if grad:
                    got += list(torch.autograd.grad((out * out).sum(), [xi, *module.parameters()]))
            results.append(got)
    for got in results[1:]:
        for a, b in zip(got, results[0], strict=True):
            assert torch.equal(a, b)
