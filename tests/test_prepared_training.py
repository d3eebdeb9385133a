"""A small layer's training call (T > 1 or bidirectional, under autograd, CPU) replays each layer's and
direction's prepared sequence (targets/c/fused.PreparedTrainSequence through nn/prepared.PreparedCall):
its forward and backward bound once, the parameters read live. References: torch.nn's layers with
the same weights (float64), the layer's own full path, and gradcheck/gradgradcheck; a guard fails a
test if the op's loop runs where the prepared sequence should."""

from __future__ import annotations

import pytest
import torch
from test_streaming_step_writes import Guard
from torch import nn
from zoo import GENERIC, LAYER_ARGS

import celldsl
from celldsl.nn import stack
from celldsl.targets.c import fused

I, H, T = 6, 7, 5
TOL = {"rtol": 1e-10, "atol": 1e-12}


@pytest.fixture(autouse=True)
def native_loops(monkeypatch):
    """The native loop at every size (otherwise cpu_gemm's measurements choose, per machine)."""
    monkeypatch.setenv("CELLDSL_CPU_GEMM", "native")
    if fused.compiler() is None:
        pytest.skip("no C compiler: the cpu backend's kernels cannot be built")


class LoopGuard(Guard):
    """Guard, and the loop's backward too: a training call runs neither the op's forward nor its
    backward while on."""

    def __init__(self, monkeypatch, *cells):
        super().__init__(monkeypatch, *cells)
        for cell in cells:
            loop = stack.loop_for(cell.compiled.key, "cpu")
            monkeypatch.setattr(loop, "backward", self._guarded(loop.backward))


def pair(name, dtype=torch.float64, **kw):
    torch.manual_seed(0)
    ref, ours = getattr(nn, name)(I, H, dtype=dtype, **kw), getattr(celldsl, name)(I, H, dtype=dtype, **kw)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def states_of(name, lead, dtype=torch.float64):
    torch.manual_seed(2)
    h = torch.randn(*lead, H, dtype=dtype)
    return (h, torch.randn(*lead, H, dtype=dtype)) if name == "LSTM" else h


def as_list(s):
    return list(s) if isinstance(s, tuple) else [s]


def grads_of(model, x, hx, seed=1):
    """(out, finals..., d x, d states..., d parameters...) of a random weighting of every result."""
    x = x.clone().requires_grad_()
    hx = None if hx is None else tuple(t.clone().requires_grad_() for t in as_list(hx))
    out, finals = model(x, hx if hx is None or len(hx) > 1 else hx[0])
    finals = as_list(finals)
    gen = torch.Generator().manual_seed(seed)
    loss = sum((t * torch.randn(t.shape, generator=gen, dtype=t.dtype)).sum() for t in [out, *finals])
    inputs = [x, *(hx or []), *[p for p in model.parameters() if p.requires_grad]]
    return [out, *finals, *torch.autograd.grad(loss, inputs)]


def replayed_training(module) -> bool:
    """Whether the module's last call under autograd had prepared training sequences."""
    entry = stack._SEQUENCES.get(module)
    return entry is not None and any(key[6] and value is not None for key, value in entry[1].items())


@pytest.mark.parametrize("given", [False, True])
@pytest.mark.parametrize("n", [1, 5])
@pytest.mark.parametrize(("layers", "bidirectional"), [(1, False), (2, False), (1, True), (2, True)])
@pytest.mark.parametrize("name", ["LSTM", "GRU", "RNN"])
def test_a_training_call_matches_torch_nn_and_skips_the_op(name, layers, bidirectional, n, given,
                                                           monkeypatch):
    """Outputs, final states and the gradients of x, the given states and every parameter equal
    torch.nn's (float64), with no call of the op's loop, forward or backward."""
    ref, ours = pair(name, num_layers=layers, bidirectional=bidirectional)
    x = torch.randn(T, n, I, dtype=torch.float64)
    hx = states_of(name, (layers * (1 + bidirectional), n)) if given else None
    grads_of(ours, x, hx)  # builds the kernels
    guard = LoopGuard(monkeypatch, ours)
    with guard:
        got = grads_of(ours, x, hx)
    assert replayed_training(ours)
    for g, w in zip(got, grads_of(ref, x, hx), strict=True):
        torch.testing.assert_close(g, w, **TOL)


@pytest.mark.parametrize(("t", "batch_first", "bias"), [(1, False, True), (3, True, True), (4, False, False)])
@pytest.mark.parametrize("name", ["LSTM", "GRU"])
def test_batch_first_one_step_bidirectional_and_no_bias(name, t, batch_first, bias, monkeypatch):
    """batch_first input, a bidirectional layer on one step (its step goes through the sequences),
    bias=False: torch.nn's numbers, the op not run."""
    ref, ours = pair(name, num_layers=2, bidirectional=True, batch_first=batch_first, bias=bias)
    x = torch.randn(*((3, t) if batch_first else (t, 3)), I, dtype=torch.float64)
    hx = states_of(name, (4, 3))
    grads_of(ours, x, hx)
    with LoopGuard(monkeypatch, ours):
        got = grads_of(ours, x, hx)
    for g, w in zip(got, grads_of(ref, x, hx), strict=True):
        torch.testing.assert_close(g, w, **TOL)


def test_float32_matches_torch_nn(monkeypatch):
    ref, ours = pair("LSTM", dtype=torch.float32, num_layers=2)
    x, hx = torch.randn(T, 4, I), states_of("LSTM", (2, 4), torch.float32)
    grads_of(ours, x, hx)
    with LoopGuard(monkeypatch, ours):
        got = grads_of(ours, x, hx)
    for g, w in zip(got, grads_of(ref, x, hx), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["LSTM", "GRU"])
def test_backwards_out_of_order_twice_and_after_other_calls(name, monkeypatch):
    """Two calls, then the second's backward, the first's twice (retain_graph: its values were copied
    into its record when the second call overwrote the buffers, and copied back), each gradient
    that call's; then a call of another batch size in between."""
    ref, ours = pair(name, num_layers=2, bidirectional=True)
    xs = [torch.randn(T, n, I, dtype=torch.float64) for n in (3, 3, 2)]

    def loss_of(model, k):
        out, finals = model(xs[k])
        return (out.sin() * (k + 1)).sum() + sum(f.square().sum() for f in as_list(finals))

    loss_of(ours, 0)
    with LoopGuard(monkeypatch, ours):
        first, second = loss_of(ours, 0), loss_of(ours, 1)
        got2 = torch.autograd.grad(second, list(ours.parameters()))
        got1 = torch.autograd.grad(first, list(ours.parameters()), retain_graph=True)
        third = loss_of(ours, 2)
        got1_again = torch.autograd.grad(first, list(ours.parameters()))
        got3 = torch.autograd.grad(third, list(ours.parameters()))
    for got, k in ((got1, 0), (got1_again, 0), (got2, 1), (got3, 2)):
        want = torch.autograd.grad(loss_of(ref, k), list(ref.parameters()))
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, **TOL)


@pytest.mark.parametrize("name", ["LSTM", "GRU"])
def test_training_with_an_optimizer_follows_torch_nn(name, monkeypatch):
    """Adam steps (in-place writes into every parameter between calls) and a load_state_dict: the
    parameters stay torch.nn's."""
    ref, ours = pair(name, num_layers=2, batch_first=True)
    opts = [torch.optim.Adam(m.parameters(), lr=0.05) for m in (ref, ours)]
    torch.manual_seed(1)
    data = torch.randn(6, 4, T, I, dtype=torch.float64)
    for k, x in enumerate(data):
        for model, opt in zip((ref, ours), opts, strict=True):
            opt.zero_grad()
            out, _ = model(x)
            out.square().mean().backward()
            opt.step()
        assert replayed_training(ours)
        for p, q in zip(ref.parameters(), ours.parameters(), strict=True):
            torch.testing.assert_close(q, p, rtol=1e-9, atol=1e-11)
        if k == 2:
            other = getattr(nn, name)(I, H, num_layers=2, batch_first=True, dtype=torch.float64)
            ref.load_state_dict(other.state_dict())
            ours.load_state_dict(other.state_dict())


def test_writes_torch_does_not_count_are_seen(monkeypatch):
    """p.data.mul_() between calls (no version bump): the next call's forward and backward read the
    written weights, as torch.nn's."""
    ref, ours = pair("LSTM", bidirectional=True)
    x = torch.randn(T, 3, I, dtype=torch.float64)
    grads_of(ours, x, None)
    with LoopGuard(monkeypatch, ours):
        for (name, p), q in zip(ours.named_parameters(), ref.parameters(), strict=True):
            p.data.mul_(0.5)
            q.data.mul_(0.5)
            for g, w in zip(grads_of(ours, x, None), grads_of(ref, x, None), strict=True):
                torch.testing.assert_close(g, w, **TOL, msg=lambda m, name=name: f"after {name}: {m}")


def test_a_weight_written_in_place_between_forward_and_backward_is_refused():
    """As torch.nn: autograd's error for a saved tensor modified in place."""
    _ref, ours = pair("GRU", num_layers=2)
    x = torch.randn(T, 3, I, dtype=torch.float64)
    out, _ = ours(x)
    assert replayed_training(ours)
    with torch.no_grad():
        ours.weight_hh_l1.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_frozen_parameters_and_an_input_without_gradient(monkeypatch):
    """A frozen layer 0 and an input that needs no gradient: the trainable parameters' gradients
    are torch.nn's, the frozen ones get none."""
    ref, ours = pair("LSTM", num_layers=2, bidirectional=True)
    for m in (ref, ours):
        for name, p in m.named_parameters():
            p.requires_grad_("_l0" not in name)
    x = torch.randn(T, 3, I, dtype=torch.float64)
    ours(x)[0].sum().backward()
    ours.zero_grad()
    with LoopGuard(monkeypatch, ours):
        ours(x)[0].square().sum().backward()
    ref(x)[0].square().sum().backward()
    for (name, p), q in zip(ours.named_parameters(), ref.parameters(), strict=True):
        if "_l0" in name:
            assert p.grad is None
        else:
            torch.testing.assert_close(p.grad, q.grad, **TOL)


def test_gradcheck_and_gradgradcheck():
    """float64 gradcheck of x and the initial states through the prepared backward, and
    gradgradcheck, whose backward autograd records, through the full path it falls back to."""
    _ref, ours = pair("LSTM", num_layers=2, bidirectional=True)
    x = torch.randn(3, 2, I, dtype=torch.float64, requires_grad=True)
    h0, c0 = (s.requires_grad_() for s in states_of("LSTM", (4, 2)))

    def f(x, h0, c0):
        out, (h, c) = ours(x, (h0, c0))
        assert replayed_training(ours)
        return out, h, c

    assert torch.autograd.gradcheck(f, (x, h0, c0))
    assert torch.autograd.gradgradcheck(f, (x, h0, c0))


@pytest.mark.parametrize("cell", GENERIC)
def test_every_zoo_cell_trains_as_its_full_path(cell, monkeypatch):
    """celldsl.Recurrent over each zoo cell, two layers, bidirectional (unidirectional where the cell
    needs input_size == hidden_size): the same results and gradients as its full path (the op's
    loop); the prepared sequences ran where the cell allows them (asserted for the classic cells)."""
    torch.manual_seed(0)
    both = not celldsl.compile_cell(cell).ir.needs_hidden_size
    layer = celldsl.Recurrent(cell, H, H, num_layers=2, bidirectional=both, dtype=torch.float64,
                              **LAYER_ARGS.get(cell, {}))
    xs = torch.randn(2, T, 3, H, dtype=torch.float64)
    got = [grads_of(layer, x, None, seed=k) for k, x in enumerate(xs)]  # the second call: buffers reused
    used = replayed_training(layer)
    if cell in ("lstm", "gru", "rnn_tanh", "rnn_relu", "indrnn", "mingru", "greff_vanilla", "slstm"):
        assert used
    with monkeypatch.context() as m:
        m.setattr(stack.RecurrentStack, "_sequenced", lambda self, input, given: None)
        want = [grads_of(layer, x, None, seed=k) for k, x in enumerate(xs)]
    for g, w in zip(sum(got, []), sum(want, []), strict=True):
        torch.testing.assert_close(g, w, **TOL)


def test_dropout_and_projections_take_the_full_path(monkeypatch):
    """Dropout between layers while training and proj_size are not prepared: the op runs."""
    calls = []
    for kw in ({"num_layers": 2, "dropout": 0.5}, {"proj_size": 3}):
        layer = celldsl.LSTM(I, H, **kw)
        loop = stack.loop_for(layer.compiled.key, "cpu")
        monkeypatch.setattr(loop, "forward", lambda *a, _f=loop.forward, **k: calls.append(1) or _f(*a, **k))
        layer(torch.randn(T, 2, I))[0].sum().backward()
        assert not replayed_training(layer)
    assert len(calls) >= 2


@pytest.mark.parametrize("cell", ["greff_vanilla", "mingru"])
def test_a_cell_stored_in_blocks_sees_every_write(cell, monkeypatch):
    """A cell whose GEMM weight is a copy of parameters stored apart (W_z, W_i, ...: made again
    before every call): after a write torch does not count (p.data.mul_) into each parameter in
    turn, and after Adam steps, the gradients are the full path's on a copy given the same writes."""
    import copy

    torch.manual_seed(0)
    ours = celldsl.Recurrent(cell, I, H, num_layers=2, bidirectional=True, dtype=torch.float64)
    ref = copy.deepcopy(ours)
    x = torch.randn(T, 3, I, dtype=torch.float64)

    def full(model):
        with monkeypatch.context() as m:
            m.setattr(stack.RecurrentStack, "_sequenced", lambda self, input, given: None)
            return grads_of(model, x, None)

    grads_of(ours, x, None)
    guard = LoopGuard(monkeypatch, ours)
    for (name, p), q in zip(ours.named_parameters(), ref.parameters(), strict=True):
        p.data.mul_(0.5)
        q.data.mul_(0.5)
        with guard:
            got = grads_of(ours, x, None)
        for g, w in zip(got, full(ref), strict=True):
            torch.testing.assert_close(g, w, **TOL, msg=lambda m, name=name: f"after {name}: {m}")
    opts = [torch.optim.Adam(m.parameters(), lr=0.05) for m in (ours, ref)]
    for _ in range(3):
        for model, opt in zip((ours, ref), opts, strict=True):
            opt.zero_grad()
            if model is ours:
                with guard:
                    model(x)[0].square().mean().backward()
            else:
                with monkeypatch.context() as m:
                    m.setattr(stack.RecurrentStack, "_sequenced", lambda self, input, given: None)
                    model(x)[0].square().mean().backward()
            opt.step()
    for p, q in zip(ours.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, **TOL)


@pytest.mark.parametrize("cell", ["greff_vanilla", "mingru"])
def test_a_step_of_a_cell_stored_in_blocks_trains_as_its_full_path(cell, monkeypatch):
    """celldsl.Cell over a cell whose GEMM weight is a copy of parameters stored apart, stepped under
    autograd (the streaming step, nn/cells.py): four steps and one backward through them, then a
    write torch does not count and again: the full path's gradients, with the op's loop refused."""
    import copy

    from celldsl.nn import cells

    torch.manual_seed(0)
    ours = celldsl.Cell(cell, I, H, dtype=torch.float64)
    ref = copy.deepcopy(ours)
    xs = torch.randn(4, 3, I, dtype=torch.float64)

    def bptt(model):
        x = xs.clone().requires_grad_()
        state, loss = None, 0
        for t in range(x.shape[0]):
            out, state = model(x[t], state)
            loss = loss + (out * (t + 1)).sin().sum()
        return [loss, *torch.autograd.grad(loss, [x, *model.parameters()])]

    def full(model):
        with monkeypatch.context() as m:
            m.setattr(cells._Step, "_replayed", lambda self, *a, **k: None)
            return bptt(model)

    bptt(ours)
    guard = LoopGuard(monkeypatch, ours)
    for write in (None, *[name for name, _ in ours.named_parameters()]):
        if write is not None:
            ours.get_parameter(write).data.mul_(0.5)
            ref.get_parameter(write).data.mul_(0.5)
        with guard:
            got = bptt(ours)
        assert cells._PREPARED[ours][True][1] is not None  # the prepared step ran
        for g, w in zip(got, full(ref), strict=True):
            torch.testing.assert_close(g, w, **TOL)


@pytest.mark.parametrize("cell", ["mingru", "minlstm"])
def test_a_cell_without_step_products_replays_its_step(cell, monkeypatch):
    """minGRU and minLSTM have no GEMM on a state: their prepared step had nothing to skip and failed
    to build (a TypeError caught as "not prepared"), so every step took the full path. Without
    autograd the replayed step gives the full path's numbers, with the op's loop refused."""
    from celldsl.nn import cells

    torch.manual_seed(0)
    step = celldsl.Cell(cell, I, H, dtype=torch.float64)
    x, h = torch.randn(3, I, dtype=torch.float64), torch.randn(3, H, dtype=torch.float64)
    with torch.no_grad():
        step(x, h)
        with LoopGuard(monkeypatch, step):
            got = step(x, h)
        assert cells._PREPARED[step][False][1] is not None
        with monkeypatch.context() as m:
            m.setattr(cells._Step, "_replayed", lambda self, *a, **k: None)
            want = step(x, h)
    for g, w in zip(as_list(got[1]) + [got[0]], as_list(want[1]) + [want[0]], strict=True):
        torch.testing.assert_close(g, w, **TOL)


@pytest.mark.parametrize("module", ["layer", "cell"])
@pytest.mark.parametrize(("cell", "vector"), [("indrnn", "u"), ("greff_vanilla", "p_i")])
def test_a_vector_the_backward_reads_written_in_place_is_refused(cell, vector, module):
    """indrnn's u or a peephole, written in place between forward and backward: the backward's
    kernels read it, so it is autograd's error, as on the full path (was: the old forward mixed with
    the new vector, the gradient of neither)."""
    torch.manual_seed(0)
    layer = module == "layer"
    m = (celldsl.Recurrent if layer else celldsl.Cell)(cell, I, H, dtype=torch.float64)
    x = torch.randn(*((T, 3) if layer else (3,)), I, dtype=torch.float64)
    name = f"{vector}_l0" if layer else vector
    m(x)[0].sum().backward()  # the second call replays
    out = m(x)[0]
    with torch.no_grad():
        getattr(m, name).mul_(3.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.square().sum().backward()


def test_unfreezing_a_parameter_prepares_again(tmp_path, monkeypatch):
    """A cell reading W plainly and inside W - Wᵀ: prepared while W is frozen, the combination needs no
    gradient; after W.requires_grad_(True) the call must not reuse that Layout (was: W's gradient
    without the combination's share). The full path is the reference."""
    path = tmp_path / "mixed.cell"
    path.write_text("cell mixed\ninput x\nstate h\noutput h\nparam W, V, b\n"
                    "h' = tanh(W @ h + V @ x + b) + 0.1 * tanh((W - Wᵀ) @ h)\n")
    torch.manual_seed(0)
    layer = celldsl.Recurrent(str(path), I, H, dtype=torch.float64)
    x = torch.randn(T, 3, I, dtype=torch.float64)
    layer.W_l0.requires_grad_(False)
    layer(x)[0].sum().backward()
    assert replayed_training(layer)
    layer.W_l0.requires_grad_(True)
    got = grads_of(layer, x, None)
    with monkeypatch.context() as m:
        m.setattr(stack.RecurrentStack, "_sequenced", lambda self, input, given: None)
        want = grads_of(layer, x, None)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, **TOL)


def test_a_kept_loss_keeps_no_copy_of_the_buffers():
    """A loop that keeps each step's loss after its backward (logging): autograd has freed that call's
    saved tensors, so the next call copies nothing into its record (was: one copy of every step's
    values per kept loss, ~0.6 MB an iteration here)."""
    import gc

    _ref, ours = pair("LSTM", dtype=torch.float32, num_layers=2, bidirectional=True)
    opt = torch.optim.SGD(ours.parameters(), lr=1e-3)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = ours(torch.randn(T, 4, I))[0].square().mean()
        loss.backward()
        opt.step()
        losses.append(loss)
    assert replayed_training(ours)
    assert not [r for r in gc.get_objects() if type(r) is fused.Record and r.values is not None]


@pytest.mark.parametrize("write", [False, True])
@pytest.mark.parametrize("module", ["LSTM", "LSTMCell"])
def test_checkpoint_and_a_pack_hook_give_torch_nn_gradients(module, write):
    """torch.utils.checkpoint (non-reentrant) and a saved_tensors_hooks pack hook that copies, with
    and without a weight write between forward and backward: autograd keeps what the hook made, so
    the call takes the full path (a prepared backward read its record and the live weights: after a
    write, the gradient of neither; before that, a TypeError), and gives torch.nn's gradients."""
    from torch.utils.checkpoint import checkpoint

    kw = {} if module == "LSTMCell" else {"num_layers": 2}
    ref, ours = pair(module, **kw)
    x = torch.randn(*((3,) if module == "LSTMCell" else (T, 3)), I, dtype=torch.float64)

    def loss(m, x):
        return m(x)[0].sin().sum()

    def two_checkpoints(m):
        return checkpoint(loss, m, x, use_reentrant=False) + checkpoint(loss, m, 2 * x, use_reentrant=False)

    def two_calls_hooked(m):
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t):
            return loss(m, x) + loss(m, 2 * x)

    loss(ours, x).backward()
    for make in (two_checkpoints, two_calls_hooked):
        got, want = make(ours), make(ref)
        if write:  # torch counts no version under these hooks: no error, for either
            for m in (ours, ref):
                next(m.parameters()).data.mul_(0.5)
        for g, w in zip(torch.autograd.grad(got, list(ours.parameters())),
                        torch.autograd.grad(want, list(ref.parameters())), strict=True):
            torch.testing.assert_close(g, w, **TOL)


@pytest.mark.parametrize("module", ["layer", "cell"])
def test_a_block_stored_weight_is_the_forwards_in_its_backward(module, monkeypatch):
    """greff_vanilla (its GEMM weight a copy of W_z, W_i, ...): call A, a write torch does not count,
    call B (which refills the copy), then A's backward: A's weights, as the full path's saved copy
    (was: B's weights, every gradient off)."""
    import copy

    from celldsl.nn import cells

    torch.manual_seed(0)
    layer = module == "layer"
    base = (celldsl.Recurrent if layer else celldsl.Cell)("greff_vanilla", I, H, dtype=torch.float64)
    xs = torch.randn(2, *((T, 3) if layer else (3,)), I, dtype=torch.float64)

    def scenario(m):
        x = xs[0].clone().requires_grad_()
        out = m(x)[0]
        for p in m.parameters():
            if p.dim() == 2:
                p.data.mul_(0.5)
        m(xs[1].clone().requires_grad_())  # the same signature as A's: the same prepared call
        return torch.autograd.grad(out.sin().sum(), [x, *m.parameters()])

    ours, ref = copy.deepcopy(base), copy.deepcopy(base)
    ours(xs[0])[0].sum().backward()
    with LoopGuard(monkeypatch, ours):
        got = scenario(ours)
    with monkeypatch.context() as m:
        m.setattr(stack.RecurrentStack, "_sequenced", lambda self, input, given: None)
        m.setattr(cells._Step, "_replayed", lambda self, *a, **k: None)
        want = scenario(ref)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, **TOL)
