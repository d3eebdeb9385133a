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
    full = ours(x, h)  # autograd on: the full path
    loop = cpu_loop(ours)
    with torch.no_grad():
        first = ours(x, h)  # makes the prepared step

        def refuse(*args, **kwargs):
            raise AssertionError("the op's loop ran: the prepared step was not replayed")

        monkeypatch.setattr(loop, "forward", refuse)
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


def test_flatten_parameters_after_a_write_torch_does_not_count():
    ref, ours = pair("GRUCell")
    x, h = torch.randn(N, I), state("GRUCell")
    with torch.no_grad():
        ours(x, h)
        w = torch.randn_like(ref.weight_hh)
        ours.weight_hh.detach().numpy()[...] = w.numpy()  # no version bump
        ref.weight_hh.copy_(w)
        ours.flatten_parameters()
        assert_close(ours(x, h), ref(x, h))


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
