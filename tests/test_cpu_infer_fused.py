"""The inference forward's fused LSTM steps (cd_fused_gemm in targets/c/emit_loop.py: the input
projection and the step product of a step in one tile per rows and panel, cd_fused_tiles_T) give
the saving forward's numbers bit for bit, and torch.nn's up to rounding.

A step fuses unless its rows would meet cd_tile_narrow_T in the two GEMMs (cd_fuses): the last
b % 12 rows of a step when that is 1 or 2, the last M % 12 of all M rows when that is 1 or 2. The
batches below mix both kinds of steps: N = 13, 14, 37 (never fused), 32, 33, 64 (fused), packed
sequences whose batches shrink through both kinds, and a last tile of 1 or 2 rows over all rows.
"""

import pytest
import torch
from test_cpu_fused import make_layer
from test_cpu_infer import same
from test_cpu_native import args_for, fused_loop
from torch.nn.utils.rnn import pack_padded_sequence

import celldsl
from celldsl.targets.c import fused as cpu_fused
from celldsl.targets.c.fused import FusedCPULoop

pytestmark = pytest.mark.skipif(cpu_fused.compiler() is None, reason="needs a C compiler for the kernels")


def fuses(loop, dtype) -> bool:
    """Whether the GEMM library has the fused tiles (AVX-512 builds only): otherwise the chunks run
    their two GEMMs, and every test here still checks the numbers."""
    return loop.native(dtype).fused_tiles is not None


def infer_and_forward(loop, layer, T, N, packed, seed=0):
    x, states, params, batch_sizes = args_for(layer, T=T, N=N, packed=packed, seed=seed)
    with torch.no_grad():
        out, finals, _saved = loop.forward(x, states, *params, batch_sizes)
        inferred = loop.infer(x, states, *params, batch_sizes)
    return [out, *finals], [inferred[0], *inferred[1]]


@pytest.mark.parametrize("ring_bytes", [3 * 4 * 37 * 8 * 5, FusedCPULoop.ring_bytes])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_steps_equal_forward_bit_for_bit(dtype, ring_bytes, monkeypatch):
    monkeypatch.setattr(FusedCPULoop, "ring_bytes", ring_bytes)
    layer = make_layer("lstm", dtype=dtype, hidden=37, tag=f"fused {dtype}")  # H = 37: a narrow last panel
    loop = fused_loop(layer)
    loop.gemm = "native"
    for N in (1, 2, 3, 13, 14, 32, 33, 37, 64):
        for T, packed in ((7, False), (11, True)):
            want, got = infer_and_forward(loop, layer, T, N, packed, seed=N + T)
            assert loop.ran["fused"] == fuses(loop, dtype)
            assert same(want, got), (N, T, packed)


def test_fused_steps_off_gives_the_same_numbers(monkeypatch):
    """fused_steps = False (the chunks' two GEMMs) and True agree with each other and with forward."""
    layer = make_layer("lstm", dtype=torch.float32, hidden=40, tag="fused off")
    loop = fused_loop(layer)
    loop.gemm = "native"
    results = []
    for on in (False, True):
        monkeypatch.setattr(FusedCPULoop, "fused_steps", on)
        want, got = infer_and_forward(loop, layer, T=9, N=32, packed=False)
        assert loop.ran["fused"] == (on and fuses(loop, torch.float32)) and same(want, got)
        results.append(got)
    assert same(*results)


def test_gru_does_not_fuse():
    """The GRU's step product has rows of its own (r * (W_hn h + b_hn)): nothing to fuse with."""
    layer = make_layer("gru", dtype=torch.float32, hidden=37, tag="fused gru")
    loop = fused_loop(layer)
    loop.gemm = "native"
    want, got = infer_and_forward(loop, layer, T=6, N=32, packed=False)
    assert not loop.ran["fused"] and same(want, got)


def test_fused_steps_two_threads(monkeypatch):
    """Each thread runs the fused tiles of its own units."""
    from celldsl.targets.c import native as cpu_native

    monkeypatch.setattr(cpu_native, "MIN_STEP_WORK", 0)
    layer = make_layer("lstm", dtype=torch.float32, hidden=70, tag="fused threads")
    loop = fused_loop(layer)
    loop.gemm = "native"
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        for N, packed in ((32, False), (33, True), (13, False)):
            want, got = infer_and_forward(loop, layer, T=9, N=N, packed=packed, seed=N)
            assert loop.ran["fused"] == fuses(loop, torch.float32) and same(want, got), (N, packed)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_lstm_matches_torch_nn(dtype, packed, monkeypatch):
    """At the benchmark's width (H = 256, two layers), with a short last chunk, against torch.nn; the
    packed batches shrink through fused (32, 31, 24, 16) and unfused (25, 14, 13, 2, 1) steps, and
    the last tile of all rows has 2 rows (M = 482 = 40 * 12 + 2), one of step 28 and step 29's."""
    monkeypatch.setenv("CELLDSL_CPU_GEMM", "native")  # the chunks need the native hoisted GEMM
    calls = []
    run = FusedCPULoop._run_chunked
    monkeypatch.setattr(FusedCPULoop, "_run_chunked", lambda self, *a: calls.append(self) or run(self, *a))
    torch.manual_seed(4)
    ref = torch.nn.LSTM(24, 256, num_layers=2, dtype=dtype)
    mine = celldsl.LSTM(24, 256, num_layers=2, dtype=dtype)
    mine.load_state_dict(ref.state_dict())
    lengths = [30] * 1 + [29] * 1 + [27] * 11 + [25] * 1 + [10] * 2 + [8] * 8 + [4] * 1 + [2] * 6 + [1]
    assert sum(lengths) % 12 == 2 and len(lengths) == 32
    x = torch.randn(30, 32, 24, dtype=dtype)
    if packed:
        x = pack_padded_sequence(x, torch.tensor(lengths))
    with torch.no_grad():
        (a, (ha, ca)), (b, (hb, cb)) = ref(x), mine(x)
    assert len(calls) == 2 and all(loop.ran["fused"] == fuses(loop, dtype) for loop in calls)  # one per layer
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    if packed:
        a, b = a.data, b.data
    for u, v in ((a, b), (ha, hb), (ca, cb)):
        torch.testing.assert_close(u, v, **tol)


def test_fused_tiles_exactly_on_avx512():
    """The GEMM library (-march=native) has the fused tiles where the CPU has AVX-512, so the tests
    above run the fused steps there, and only there."""
    from celldsl.targets.c.flags import cpu_fingerprint

    layer = make_layer("lstm", dtype=torch.float32, hidden=8, tag="fused isa")
    loop = fused_loop(layer)
    assert fuses(loop, torch.float32) == ("avx512f" in cpu_fingerprint().split())
