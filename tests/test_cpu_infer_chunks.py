"""The inference forward's hoisted product computed a few steps at a time inside the native loop
(FusedCPULoop._run_chunked, cd_hoist_chunk in targets/c/emit_loop.py) gives the saving forward's
numbers bit for bit, and torch.nn's up to rounding.

The chunks are forced small (ring_bytes) so that a sequence has many of them: one step a chunk,
chunks that end inside a step's rows' tiles, float32 and float64, odd sizes (H = 37), batches of
1, 7 and 33 rows (33 and 7 * T rows leave 1 or 2 rows past the last whole tile of the hoisted GEMM,
which it runs through another kernel; a chunk of 1 or 2 rows would too), packed sequences with
shrinking batches, and 2 threads.
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


@pytest.fixture
def chunks(monkeypatch):
    """Counts the chunked runs; returns a setter of ring_bytes."""
    calls = []
    run = FusedCPULoop._run_chunked
    monkeypatch.setattr(FusedCPULoop, "_run_chunked", lambda self, *a: calls.append(1) or run(self, *a))

    def ring(nbytes):
        monkeypatch.setattr(FusedCPULoop, "ring_bytes", nbytes)
        return calls

    return ring


@pytest.mark.parametrize("ring_bytes", [1, 3 * 4 * 37 * 8, 1 << 19])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("stem", ["lstm", "gru", "slstm"])
def test_chunks_equal_forward_bit_for_bit(stem, dtype, ring_bytes, chunks):
    calls = chunks(ring_bytes)
    for hidden, N, T, packed in ((37, 1, 9, False), (37, 7, 11, False), (37, 7, 11, True), (37, 33, 5, False),
                                 (37, 33, 7, True), (16, 2, 13, True)):
        torch.manual_seed(hidden + N + T)
        layer = make_layer(stem, dtype=dtype, hidden=hidden, tag=f"chunks {dtype}")
        loop = fused_loop(layer)
        loop.gemm = "native"
        x, states, params, batch_sizes = args_for(layer, T=T, N=N, packed=packed, seed=hidden + T)
        before = len(calls)
        with torch.no_grad():
            out, finals, _saved = loop.forward(x, states, *params, batch_sizes)
            inferred = loop.infer(x, states, *params, batch_sizes)
        assert len(calls) == before + 1  # infer ran the chunks, forward did not
        assert same([out, *finals], [inferred[0], *inferred[1]]), (hidden, N, T, packed)


@pytest.mark.parametrize("stem", ["lstm", "gru"])
def test_chunks_two_threads_equal_forward(stem, chunks, monkeypatch):
    """Each thread computes the hoisted columns of its own units; one rebases the arguments."""
    from celldsl.targets.c import native as cpu_native

    monkeypatch.setattr(cpu_native, "MIN_STEP_WORK", 0)
    calls = chunks(1)
    layer = make_layer(stem, hidden=37, tag="chunks threads")
    loop = fused_loop(layer)
    loop.gemm = "native"
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        for N, packed in ((7, True), (33, False)):
            x, states, params, batch_sizes = args_for(layer, T=9, N=N, packed=packed)
            with torch.no_grad():
                out, finals, _ = loop.forward(x, states, *params, batch_sizes)
                inferred = loop.infer(x, states, *params, batch_sizes)
            assert same([out, *finals], [inferred[0], *inferred[1]]), (N, packed)
    finally:
        torch.set_num_threads(before)
    assert len(calls) == 2


@pytest.mark.parametrize("ring_bytes", [1, 1 << 19])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lstm_chunks_match_torch_nn(dtype, packed, ring_bytes, chunks, monkeypatch):
    from celldsl.targets.c import fused as cpu_fused

    monkeypatch.setenv("CELLDSL_CPU_GEMM", "native")  # the chunks need the native hoisted GEMM
    # the op's infer, not the prepared sequence a call this small replays (tests/test_prepared_sequence.py)
    monkeypatch.setattr(cpu_fused, "SEQUENCE_ELEMENTS", 0)
    calls = chunks(ring_bytes)
    torch.manual_seed(2)
    ref = torch.nn.LSTM(13, 37, num_layers=2, dtype=dtype)
    mine = celldsl.LSTM(13, 37, num_layers=2, dtype=dtype)
    mine.load_state_dict(ref.state_dict())
    x = torch.randn(12, 33, 13, dtype=dtype)
    if packed:
        x = pack_padded_sequence(x, torch.tensor([12] * 3 + [11] * 10 + [6] * 10 + [2] * 9 + [1]))
    with torch.no_grad():
        (a, (ha, ca)), (b, (hb, cb)) = ref(x), mine(x)
    assert len(calls) == 2  # one per layer
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    if packed:
        a, b = a.data, b.data
    for u, v in ((a, b), (ha, hb), (ca, cb)):
        torch.testing.assert_close(u, v, **tol)


def test_no_chunks_when_ring_bytes_is_zero(chunks):
    calls = chunks(0)
    layer = make_layer("lstm", hidden=5, tag="chunks off")
    loop = fused_loop(layer)
    loop.gemm = "native"
    x, states, params, batch_sizes = args_for(layer, T=4, N=3, packed=False)
    with torch.no_grad():
        out, finals, _ = loop.forward(x, states, *params, batch_sizes)
        inferred = loop.infer(x, states, *params, batch_sizes)
    assert not calls and same([out, *finals], [inferred[0], *inferred[1]])


def test_default_ring_at_benchmark_width_equals_no_chunks(chunks, monkeypatch):
    """The default ring_bytes (tuned at LSTM N=32 H=256) at that width: several chunks, the last one
    partial, give the unchunked numbers bit for bit, and torch.nn's up to rounding."""
    monkeypatch.setenv("CELLDSL_CPU_GEMM", "native")
    T, N, H = 30, 32, 256
    steps = FusedCPULoop.ring_bytes // (N * 4 * H * 4)
    assert 1 < steps < T and T % steps  # several chunks, the last one shorter
    torch.manual_seed(3)
    ref = torch.nn.LSTM(16, H)
    mine = celldsl.LSTM(16, H)
    mine.load_state_dict(ref.state_dict())
    x = torch.randn(T, N, 16)
    with torch.no_grad():
        expected = ref(x)
        calls = chunks(FusedCPULoop.ring_bytes)
        chunked = mine(x)
        chunks(0)
        whole = mine(x)
    assert len(calls) == 1
    assert same([chunked[0], *chunked[1]], [whole[0], *whole[1]])
    for u, v in ((expected[0], chunked[0]), (expected[1][0], chunked[1][0]), (expected[1][1], chunked[1][1])):
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-5)
