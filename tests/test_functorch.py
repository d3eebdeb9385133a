"""torch.func and higher derivatives through celldsl's layers (ops/batching.py, ops/autograd.py).

- vmap of a layer equals a Python loop over the vmapped dim: padded and packed input, batched
  states only, batched parameters (an ensemble).
- Per-sample gradients, vmap(grad(loss)), equal a loop of torch.autograd.grad, and torch.nn.LSTM's.
- is_grads_batched, functorch's vmap over autograd.grad and gradcheck(check_batched_grad=True)
  equal the unbatched results (the backward's batching rules).
- gradgradcheck in float64 for every zoo cell, on the torch and cpu backends (fast mode: a random
  projection of the second-derivative Jacobian, 46 checks at T=2, N=1, H=2), and with full
  Jacobians and batched checks for LSTM/GRU layers; torch.func.jacrev against
  torch.autograd.functional.jacobian.
"""

import pytest
import torch
from torch.func import functional_call, grad, jacrev, stack_module_state, vmap
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence
from zoo import GENERIC

import celldsl
from celldsl import compile_cell

F64 = torch.float64
BACKENDS = ["torch", "cpu"]


def as_tuple(state):
    return state if isinstance(state, tuple) else (state,)


def flat(out, state):
    return (out.data if isinstance(out, PackedSequence) else out, *as_tuple(state))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kwargs", [{}, {"num_layers": 2, "bidirectional": True, "batch_first": True}],
                         ids=["1layer", "2layer_bidir_batch_first"])
def test_vmap_of_a_layer_equals_a_loop(backend, kwargs):
    torch.manual_seed(0)
    layer = celldsl.Recurrent("slstm", 3, 4, backend=backend, dtype=F64, **kwargs)
    x = torch.randn(5, 2, 3, 3, dtype=F64)  # 5 samples of [T=2, N=3, I=3] (or [N, T, I])
    got = vmap(lambda xi: flat(*layer(xi)))(x)
    want = [flat(*layer(x[b])) for b in range(5)]
    for i, g in enumerate(got):
        torch.testing.assert_close(g, torch.stack([w[i] for w in want]), atol=1e-12, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_vmap_of_a_packed_batch_equals_a_loop(backend):
    """The vmapped dim folds into a packed batch too (batch_sizes * B, samples innermost)."""
    torch.manual_seed(0)
    layer = celldsl.GRU(3, 4, bidirectional=True, backend=backend, dtype=F64)
    lengths = torch.tensor([2, 4, 1])
    packed = pack_padded_sequence(torch.randn(4, 3, 3, dtype=F64), lengths, enforce_sorted=False)
    data = torch.randn(6, *packed.data.shape, dtype=F64)  # 6 samples of packed rows

    def run(d):
        return flat(*layer(packed._replace(data=d)))

    got, want = vmap(run)(data), [run(data[b]) for b in range(6)]
    for i, g in enumerate(got):
        torch.testing.assert_close(g, torch.stack([w[i] for w in want]), atol=1e-12, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_vmap_over_states_only_and_over_parameters(backend):
    """Initial states batched, input shared (the input expands into the fold); then an ensemble:
    stacked parameters, one call per member."""
    torch.manual_seed(0)
    layer = celldsl.LSTM(3, 4, backend=backend, dtype=F64)
    x = torch.randn(2, 3, 3, dtype=F64)
    h0, c0 = torch.randn(5, 1, 3, 4, dtype=F64), torch.randn(5, 1, 3, 4, dtype=F64)
    got = vmap(lambda h, c: flat(*layer(x, (h, c))))(h0, c0)
    for b in range(5):
        for g, w in zip(got, flat(*layer(x, (h0[b], c0[b]))), strict=True):
            torch.testing.assert_close(g[b], w, atol=1e-12, rtol=0)
    members = [celldsl.LSTM(3, 4, backend=backend, dtype=F64) for _ in range(3)]
    params, buffers = stack_module_state(members)
    got = vmap(lambda p, b: flat(*functional_call(layer, (p, b), (x,))))(params, buffers)
    for m, member in enumerate(members):
        for g, w in zip(got, flat(*member(x)), strict=True):
            torch.testing.assert_close(g[m], w, atol=1e-12, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_sample_gradients_match_a_loop_and_torch_nn(backend):
    """vmap(grad(loss)) gives each sample's own parameter gradient (not their sum), equal to a loop
    of torch.autograd.grad and to torch.nn.LSTM's."""
    torch.manual_seed(0)
    ref = torch.nn.LSTM(3, 4, num_layers=2, bidirectional=True, dtype=F64)
    layer = celldsl.LSTM(3, 4, num_layers=2, bidirectional=True, backend=backend, dtype=F64)
    layer.load_state_dict(ref.state_dict())
    params = {k: v.detach() for k, v in layer.named_parameters()}
    xs, ys = torch.randn(6, 5, 3, dtype=F64), torch.randn(6, 5, 8, dtype=F64)  # samples of [T, I] (unbatched)

    def loss(module, p, x, y):
        out, (h, c) = functional_call(module, p, (x,))
        return ((out - y) ** 2).sum() + c.sum()

    per_sample = vmap(grad(lambda p, x, y: loss(layer, p, x, y)), in_dims=(None, 0, 0))(params, xs, ys)
    for b in range(6):
        mine, torch_nn = (torch.autograd.grad(loss(m, dict(m.named_parameters()), xs[b], ys[b]),
                                              m.parameters()) for m in (layer, ref))
        for (name, g), m, t in zip(per_sample.items(), mine, torch_nn, strict=True):
            torch.testing.assert_close(g[b], m, atol=1e-10, rtol=0, msg=name)
            torch.testing.assert_close(g[b], t, atol=1e-10, rtol=0, msg=name)


def _graph(backend):
    torch.manual_seed(0)
    layer = celldsl.Recurrent("gru", 3, 4, num_layers=2, backend=backend, dtype=F64)
    x = torch.randn(3, 2, 3, dtype=F64, requires_grad=True)
    out, h = layer(x)
    return layer, x, out, h


@pytest.mark.parametrize("backend", BACKENDS)
def test_is_grads_batched_equals_a_loop(backend):
    layer, x, out, h = _graph(backend)
    v = torch.randn(4, *out.shape, dtype=F64)
    inputs = [x, *layer.parameters()]
    batched = torch.autograd.grad(out, inputs, v, retain_graph=True, is_grads_batched=True)
    for b in range(4):
        for g, w in zip(batched, torch.autograd.grad(out, inputs, v[b], retain_graph=True), strict=True):
            torch.testing.assert_close(g[b], w, atol=1e-12, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_functorch_vmap_of_autograd_grad_equals_a_loop(backend):
    """torch.func.vmap over torch.autograd.grad: the backward op's own batching rule, per sample."""
    layer, x, out, h = _graph(backend)
    v, u = torch.randn(4, *out.shape, dtype=F64), torch.randn(4, *h.shape, dtype=F64)
    inputs = (x, *layer.parameters())
    batched = vmap(lambda a, b: torch.autograd.grad((out, h), inputs, (a, b), retain_graph=True))(v, u)
    for b in range(4):
        for g, w in zip(batched, torch.autograd.grad((out, h), inputs, (v[b], u[b]), retain_graph=True),
                        strict=True):
            torch.testing.assert_close(g[b], w, atol=1e-12, rtol=0)


def _checkable(layer, x, n_states):
    names = [n for n, _ in layer.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in layer.parameters()]
    L = layer.num_layers * layer.num_directions
    gen = torch.Generator().manual_seed(3)
    batch = x.shape[0] if layer.batch_first else x.shape[1]
    states = [(0.5 * torch.randn(L, batch, layer.hidden_size, generator=gen, dtype=F64)).requires_grad_()
              for _ in range(n_states)]

    def f(x, *rest):
        st, ps = rest[:n_states], rest[n_states:]
        return flat(*functional_call(layer, dict(zip(names, ps, strict=True)), (x, tuple(st))))

    return f, (x, *states, *params)


@pytest.mark.parametrize("kind, backend, bidirectional", [("LSTM", "cpu", True), ("GRU", "torch", False)])
def test_gradcheck_and_gradgradcheck_with_batched_grads(kind, backend, bidirectional):
    """Full Jacobians, and the batched checks: gradient columns computed under vmap."""
    torch.manual_seed(0)
    layer = getattr(celldsl, kind)(2, 2, bidirectional=bidirectional, backend=backend, dtype=F64)
    x = torch.randn(2, 1, 2, dtype=F64, requires_grad=True)
    f, inputs = _checkable(layer, x, 2 if kind == "LSTM" else 1)
    assert torch.autograd.gradcheck(f, inputs, check_batched_grad=True)
    assert torch.autograd.gradgradcheck(f, inputs, check_batched_grad=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("stem", GENERIC)  # the others: tests/test_language2.py
def test_gradgradcheck_zoo_cell(stem, backend):
    """Every zoo cell's second derivatives against finite differences of its first (float64)."""
    cell = compile_cell(stem)
    h_size = 2
    i_size = h_size if cell.ir.needs_hidden_size else 3
    torch.manual_seed(0)
    layer = celldsl.Recurrent(stem, i_size, h_size, backend=backend, dtype=F64)
    x = torch.randn(2, 1, i_size, dtype=F64, requires_grad=True)
    f, inputs = _checkable(layer, x, len(cell.states))
    assert torch.autograd.gradgradcheck(f, inputs, fast_mode=True)


def test_jacrev_equals_autograd_jacobian():
    """torch.func.jacrev (functorch's reverse mode, through CellSequence) against
    torch.autograd.functional.jacobian (plain autograd), and jacrev twice (a Hessian) against
    jacobian twice."""
    torch.manual_seed(0)
    layer = celldsl.Recurrent("mut2", 2, 2, dtype=F64)
    x = torch.randn(2, 1, 2, dtype=F64)

    def f(x):
        return layer(x)[0].tanh().sum(-1)

    torch.testing.assert_close(jacrev(f)(x), torch.autograd.functional.jacobian(f, x), atol=1e-12, rtol=0)

    def g(x):
        return f(x).sum()

    hessian = torch.autograd.functional.hessian(g, x)
    torch.testing.assert_close(jacrev(jacrev(g))(x), hessian, atol=1e-10, rtol=0)
