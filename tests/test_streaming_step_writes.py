"""Writes into the parameters that torch does not count (no `_version` bump) between streaming calls
without autograd: `p.data.mul_()` (WGAN clipping, a target network's soft update, EMA), `p.data.copy_()`,
a numpy write, and the ones it does count (`p.data = new`, an in-place op under no_grad). The
prepared step (targets/c/fused.PreparedStep) reads the parameters live, so the call after the write
sees it, as torch.nn does; it used to keep packed weights and summed biases until a version bump.
States are nonzero, so a stale W_hh cannot hide behind h = 0. References: torch.nn's cells and
layers given the same write, and for the zoo's cells the full path of a fresh module loaded with the
written parameters (its op parameters made anew)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import celldsl
from celldsl.ops.function import loop_for
from celldsl.targets.c import fused
from celldsl.targets.c import gemm as cpu_gemm

I, H = 24, 21  # H: the GEMM kernels' tails (rows of w past a block of 4, k past a vector) run too
MODES = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}
TOL = {torch.float32: {"rtol": 1e-5, "atol": 1e-5}, torch.float64: {"rtol": 1e-12, "atol": 1e-12}}


def data_mul(p, new):
    p.data.mul_(0.5)


def data_copy(p, new):
    p.data.copy_(new)


def numpy_write(p, new):
    p.detach().numpy()[...] = new.numpy()


def data_assign(p, new):
    p.data = new.clone()


def no_grad_mul(p, new):
    with torch.no_grad():
        p.mul_(-0.75)


WRITES = [data_mul, data_copy, numpy_write, data_assign, no_grad_mul]
UNCOUNTED = [data_mul, data_copy, numpy_write]  # what the old prepared step missed


def flat(r):
    if isinstance(r, torch.Tensor):
        return [r]
    return [t for item in r for t in flat(item)]


class Guard:
    """While on (`with guard:`), the op's loop of these cells must not run (forward: the full path
    under autograd, infer: without): every call replays the prepared step. Off, the references'
    full paths run on the same loops."""

    def __init__(self, monkeypatch, *cells):
        self.on = False
        for cell in cells:
            loop = loop_for(cell.compiled.key, "cpu")
            if not isinstance(loop, fused.FusedCPULoop):
                pytest.fail(f"the C kernels did not build: {fused.build_library(cell.compiled)[1]}")
            for name in ("forward", "infer"):
                monkeypatch.setattr(loop, name, self._guarded(getattr(loop, name)))

    def _guarded(self, method):
        def run(*args, **kwargs):
            if self.on:
                raise AssertionError("the op's loop ran: the prepared step was not replayed")
            return method(*args, **kwargs)
        return run

    def __enter__(self):
        self.on = True

    def __exit__(self, *exc):
        self.on = False


def written(ours, ref, call, want_of, mode, dtype, guard):
    """Each write on each parameter of `ours` (and of `ref`, when given), one after the other, each
    between two replayed calls (`guard`: no call of ours runs the op): the call after it must give
    want_of()'s numbers."""
    gen = torch.Generator().manual_seed(1)
    names = [n for n, _ in ours.named_parameters()]
    with MODES[mode](), guard:
        call(ours)
        call(ours)  # the prepared step, replayed
    for write in WRITES:
        for name in names:
            p = ours.get_parameter(name)
            new = torch.randn(p.shape, generator=gen, dtype=dtype) * 0.25  # about init's scale
            write(p, new)
            if ref is not None:
                write(ref.get_parameter(name), new)
            with MODES[mode](), guard:
                got = flat(call(ours))
            want = flat(want_of())
            for g, w in zip(got, want, strict=True):
                torch.testing.assert_close(g, w, **TOL[dtype], msg=lambda m, n=name, f=write.__name__:
                                           f"{f} on {n}: {m}")


def nonzero_state(name, n, dtype, layers=None):
    lead = (n,) if layers is None else (layers, n)
    h = torch.randn(*lead, H, dtype=dtype)
    return (h, torch.randn(*lead, H, dtype=dtype)) if name.startswith("LSTM") else h


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 32])
@pytest.mark.parametrize("name", ["LSTMCell", "GRUCell", "RNNCell"])
def test_a_cell_sees_every_write_without_autograd(name, n, dtype, mode, monkeypatch):
    monkeypatch.setenv("CELLDSL_CPU_GEMM", "native")  # the native loop at any size (else measured)
    torch.manual_seed(0)
    ref, ours = getattr(nn, name)(I, H, dtype=dtype), getattr(celldsl, name)(I, H, dtype=dtype)
    ours.load_state_dict(ref.state_dict())
    x, hx = torch.randn(n, I, dtype=dtype), nonzero_state(name, n, dtype)
    with MODES[mode]():
        ours(x, hx)
    written(ours, ref, lambda m: m(x, hx), lambda: ref(x, hx), mode, dtype, Guard(monkeypatch, ours))


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 32])
@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("name", ["LSTM", "GRU", "RNN"])
def test_a_layer_on_one_step_sees_every_write_without_autograd(name, layers, n, dtype, mode, monkeypatch):
    monkeypatch.setenv("CELLDSL_CPU_GEMM", "native")
    torch.manual_seed(0)
    kw = {"num_layers": layers, "dtype": dtype}
    ref, ours = getattr(nn, name)(I, H, **kw), getattr(celldsl, name)(I, H, **kw)
    ours.load_state_dict(ref.state_dict())
    x, hx = torch.randn(1, n, I, dtype=dtype), nonzero_state(name, n, dtype, layers)
    with MODES[mode]():
        ours(x, hx)
    guard = Guard(monkeypatch, *[ours.cell(k) for k in range(layers)])
    written(ours, ref, lambda m: m(x, hx), lambda: ref(x, hx), mode, dtype, guard)


# the zoo: a step GEMM inside the step (mut1, mut3, vanilla_rnn, gru_cho: packed again at every call),
# op weights that are no views of a parameter (greff_*, slstm: blocks of several parameters;
# antisymmetric_rnn: W - Wᵀ - gamma * I; made again before every call), several step GEMMs (greff_fgr)
ZOO = ["lstm", "mut1", "mut3", "vanilla_rnn", "gru_cho", "greff_vanilla", "greff_fgr", "slstm",
       "antisymmetric_rnn", "rnn_tanh"]


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("n", [1, 32])
# slstm in float64 only: its exponential gates and normalizer, from random states, carry float32's
# rounding (the GEMMs' other order of sums) to 1e-2 relative in an element
@pytest.mark.parametrize("cell, dtype", [(c, d) for d in (torch.float32, torch.float64) for c in ZOO
                                         if not (c == "slstm" and d == torch.float32)])
def test_a_zoo_cell_sees_every_write_without_autograd(cell, dtype, n, mode, monkeypatch):
    monkeypatch.setenv("CELLDSL_CPU_GEMM", "native")
    torch.manual_seed(0)
    ours = celldsl.Cell(cell, H, H, dtype=dtype)  # I = H: mut1 reads x elementwise
    x = torch.randn(n, H, dtype=dtype)
    with MODES[mode]():
        state = ours(x)[1]
    state = [torch.randn_like(s) for s in flat(state)]  # nonzero, every carried state
    given = state[0] if len(state) == 1 else tuple(state)
    with MODES[mode]():
        ours(x, given)
    guard = Guard(monkeypatch, ours)

    def full_path():
        fresh = celldsl.Cell(cell, H, H, dtype=dtype)
        fresh.load_state_dict(ours.state_dict())
        with torch.no_grad():
            out, news = fresh._step(x, list(state), {}, prepared=False)
        return [out, *news]

    written(ours, None, lambda m: m(x, given), full_path, mode, dtype, guard)


def test_flatten_parameters_is_not_needed_after_a_write_torch_does_not_count(monkeypatch):
    """A numpy write into a weight is seen at the next call without flatten_parameters(), which
    only forgets the prepared step (the next call makes it again) and changes no number."""
    monkeypatch.setenv("CELLDSL_CPU_GEMM", "native")
    torch.manual_seed(0)
    ref, ours = nn.GRUCell(I, H), celldsl.GRUCell(I, H)
    ours.load_state_dict(ref.state_dict())
    x, h = torch.randn(3, I), torch.randn(3, H)
    with torch.no_grad():
        ours(x, h)
        before = ours(x, h)
        w = torch.randn_like(ref.weight_hh)
        ours.weight_hh.detach().numpy()[...] = w.numpy()  # no version bump
        ref.weight_hh.copy_(w)
        got = ours(x, h)
        torch.testing.assert_close(got, ref(x, h), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(got, before)
        ours.flatten_parameters()
        assert torch.equal(ours(x, h), got)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_row_major_kernel_against_torch(dtype):
    """cd_gemm_rows (targets/c/emit_gemm.py), the streaming step's GEMM on a weight as it is: every
    row count of a tile and past it, the tails (rows of w past a block of 4, k past a vector), each
    init, a second vector, strided rows (views of a larger tensor), one and two threads, several
    products in one call, against torch in float64."""
    lib, why = fused.build_gemm_library()
    if lib is None:
        pytest.fail(f"the GEMM library did not build: {why}")
    gemm = cpu_gemm.native_gemm(lib, dtype)
    gen = torch.Generator().manual_seed(0)
    tol = TOL[dtype] if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}
    for M, n, K in [(1, 1, 1), (1, 84, 24), (2, 63, 21), (3, 5, 33), (4, 8, 16), (5, 13, 100), (8, 64, 7),
                    (9, 20, 64), (1, 3, 0)]:
        a = torch.randn(M, K + 3, generator=gen, dtype=dtype)[:, 1 : K + 1]  # rows K + 3 apart
        w = torch.randn(n + 2, K + 5, generator=gen, dtype=dtype)[1 : n + 1, 2 : K + 2]
        b1, b2 = torch.randn(n, generator=gen, dtype=dtype), torch.randn(n, generator=gen, dtype=dtype)
        for init in range(4):
            for bias2 in (None, b2):
                for threads in (1, 2):
                    out = torch.randn(M, n + 4, generator=gen, dtype=dtype)[:, 2 : n + 2]
                    want = (out.clone() if init in (1, 3) else 0) + (b1 if init in (2, 3) else 0) \
                        + (0 if bias2 is None else bias2) + a @ w.t()
                    # the same product twice in one call: += twice where it adds
                    again = init in (1, 3)
                    calls = [cpu_gemm.NativeGemm.rows_call(a, w, out, init, b1, threads, bias2)] * (1 + again)
                    gemm.rows(calls)()
                    if again:
                        want = want + (b1 if init == 3 else 0) + (0 if bias2 is None else bias2) + a @ w.t()
                    torch.testing.assert_close(out, want, **tol, msg=lambda m, c=(M, n, K, init): f"{c}: {m}")


@pytest.mark.parametrize("mode", list(MODES))
def test_bias_false_unbatched_and_a_stacked_zoo_layer_see_writes(mode, monkeypatch):
    """The same writes on torch.nn.LSTMCell(bias=False) with an unbatched input, and on a
    two-layer Recurrent of the zoo's gru_cho (a step GEMM inside the step, op weights that are blocks
    of several parameters) on T = 1, float64, against the full path of a fresh layer."""
    monkeypatch.setenv("CELLDSL_CPU_GEMM", "native")
    torch.manual_seed(0)
    dtype = torch.float64
    ref = nn.LSTMCell(I, H, bias=False, dtype=dtype)
    ours = celldsl.LSTMCell(I, H, bias=False, dtype=dtype)
    ours.load_state_dict(ref.state_dict())
    x, hx = torch.randn(I, dtype=dtype), (torch.randn(H, dtype=dtype), torch.randn(H, dtype=dtype))
    with MODES[mode]():
        ours(x, hx)
    written(ours, ref, lambda m: m(x, hx), lambda: ref(x, hx), mode, dtype, Guard(monkeypatch, ours))

    layer = celldsl.Recurrent("gru_cho", H, H, num_layers=2, dtype=dtype)
    x, h0 = torch.randn(1, 5, H, dtype=dtype), torch.randn(2, 5, H, dtype=dtype)
    with MODES[mode]():
        layer(x, h0)
    guard = Guard(monkeypatch, layer.cell(0), layer.cell(1))

    def full_path():
        fresh = celldsl.Recurrent("gru_cho", H, H, num_layers=2, dtype=dtype)
        fresh.load_state_dict(layer.state_dict())
        with torch.no_grad():
            return fresh._run(x, h0, {})

    written(layer, None, lambda m: m(x, h0), full_path, mode, dtype, guard)
