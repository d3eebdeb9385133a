"""celldsl.LSTM on the native CPU loop equals torch.nn.LSTM at the batch and width edges of its step GEMM.

The native forward (targets/c/emit_loop.py) asks for the next step's output rows while a step's
tiles run, a share per tile, this thread's units only, and asks for the next tile's rows only for a
batch of 8 rows or more (CD_FEW_ROWS); a product added onto its hoisted rows (the LSTM's) of at most
36 rows runs 12 rows of the operand at a time through every panel (CD_STEP_ROWS), a larger one all
its rows through each panel. These tests
run it where those change: batches of 1, 7, 8, 33 (three passes: 12, 12 and 9 rows) and 40 rows (one
pass), hidden sizes 37 (a partial last panel of the 32-wide panels) and 256, packed sequences whose
batch shrinks from 10 rows to 1 (steps on either side of 8), and 2 threads (each owning its own
units); against torch.nn.LSTM, outputs and final states, in float64 and float32. The loop that ran
must be the native one.
Its hoisted product, from CD_STREAM_BYTES (targets/c/emit_gemm.py) on, is written with streaming
stores: T = 70 to 222 steps of 32 rows put it there, in both float types and with a partial panel.
"""

import re

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import celldsl
from celldsl.ops.function import cell_for
from celldsl.targets.c import fused as cpu_fused
from celldsl.targets.c import native as cpu_native
from celldsl.targets.c.emit_gemm import ISA
from celldsl.targets.c.fused import FusedCPULoop

pytestmark = pytest.mark.skipif(cpu_fused.compiler() is None,
                                reason="needs a C compiler ($CC, cc or gcc) for the kernels")

TOL = {torch.float64: 1e-12, torch.float32: 2e-5}


def layers(I, H, dtype):
    torch.manual_seed(0)
    ref = torch.nn.LSTM(I, H).to(dtype)
    ours = celldsl.LSTM(I, H).to(dtype)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


@pytest.fixture
def native_loop(monkeypatch):
    """The CPU loop celldsl.LSTM runs, forced onto the native loop (restored afterwards)."""
    loop = cell_for(celldsl.LSTM(2, 3).compiled.key).loop("cpu")
    assert isinstance(loop, FusedCPULoop) and loop.lib is not None, "the native GEMM library did not build"
    monkeypatch.setattr(loop, "gemm", "native")
    return loop


def check(ref, ours, x, dtype, loop, lengths=None):
    with torch.no_grad():
        if lengths is None:
            want, (h_want, c_want) = ref(x)
            got, (h_got, c_got) = ours(x)
        else:
            packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
            want, (h_want, c_want) = ref(packed)
            got, (h_got, c_got) = ours(packed)
            want, got = want.data, got.data
    assert loop.ran["forward"] == "native", loop.ran
    tol = TOL[dtype]
    for a, b in ((got, want), (h_got, h_want), (c_got, c_want)):
        assert a.shape == b.shape
        assert float((a - b).abs().max()) <= tol * max(1.0, float(b.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("N", "H"), [(1, 37), (7, 37), (8, 37), (33, 37), (33, 256), (40, 37)])
def test_padded_batches_equal_torch_nn(native_loop, dtype, N, H):
    ref, ours = layers(5, H, dtype)
    x = torch.randn(6, N, 5, dtype=dtype, generator=torch.Generator().manual_seed(1))
    check(ref, ours, x, dtype, native_loop)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_packed_batch_shrinking_past_8_rows_equals_torch_nn(native_loop, dtype):
    ref, ours = layers(5, 37, dtype)
    lengths = torch.tensor([9, 9, 8, 7, 5, 4, 3, 2, 2, 1])  # 10 rows at the first step, 1 at the last
    x = torch.randn(9, 10, 5, dtype=dtype, generator=torch.Generator().manual_seed(2))
    check(ref, ours, x, dtype, native_loop, lengths)


@pytest.mark.parametrize(("N", "H"), [(1, 37), (33, 70)])
def test_two_threads_equal_torch_nn(native_loop, monkeypatch, N, H):
    monkeypatch.setattr(cpu_native, "MIN_STEP_WORK", 0)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        ref, ours = layers(5, H, torch.float64)
        x = torch.randn(6, N, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
        check(ref, ours, x, torch.float64, native_loop)
        assert native_loop.native(torch.float64).threads(N, H, 1, 6 * N) == \
            (2 if native_loop.native(torch.float64).openmp else 1)
    finally:
        torch.set_num_threads(threads)


_MATCH = re.search(r"#define CD_STREAM_BYTES \((\d+) << (\d+)\)", ISA)
STREAM_BYTES = int(_MATCH[1]) << int(_MATCH[2])  # the output size from which cd_gemm streams


@pytest.mark.parametrize(("dtype", "T", "H"), [(torch.float32, 130, 64), (torch.float64, 70, 64),
                                              (torch.float32, 222, 37)])
def test_hoisted_product_written_past_the_caches_equals_torch_nn(native_loop, dtype, T, H):
    """A hoisted product of CD_STREAM_BYTES or more (up to twice that) is written with streaming
    stores; with H = 37 its last panel is partial (those columns go through a buffer, not streamed)."""
    size = T * 32 * 4 * H * (8 if dtype == torch.float64 else 4)
    assert STREAM_BYTES <= size < 2 * STREAM_BYTES
    ref, ours = layers(5, H, dtype)
    x = torch.randn(T, 32, 5, dtype=dtype, generator=torch.Generator().manual_seed(4))
    check(ref, ours, x, dtype, native_loop)
