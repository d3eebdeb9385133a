"""The scratch buffers the CPU backward reuses from call to call (targets/c/scratch.py).

- a backward whose scratch holds NaN from "earlier calls" computes exactly what a backward on fresh
  buffers computes: every element it reads it wrote first (native and Python loops, padded and packed
  sequences, cells with one, two and no GEMM stages and the kitchen cell of test_cpu_fused);
- buffers taken at the same time are distinct; one given back is handed out again for the same size;
- what is kept stays within MAX_BUFFER_BYTES per buffer and MAX_BYTES in all;
- two threads running backwards of one layer at once get the results of one thread.
"""

import threading

import pytest
import torch
from test_cpu_fused import make_layer, needs_cc, run_loop
from test_cpu_native import args_for, fused_loop

from celldsl.targets.c import scratch


@pytest.fixture
def fresh_scratch():
    scratch.clear()
    yield
    scratch.clear()


def poison_kept_buffers() -> int:
    """Fill every kept buffer with NaN; -> how many there were."""
    kept = [buf for pool in scratch._free.values() for buf in pool]
    for buf in kept:
        buf.fill_(float("nan"))
    return len(kept)


@needs_cc
@pytest.mark.parametrize("backend", ["native", "mm"])
@pytest.mark.parametrize("stem", ["lstm", "gru", "mut1", "sru", "indrnn", "kitchen"])
def test_backward_reads_nothing_an_earlier_call_left_in_scratch(stem, backend, fresh_scratch):
    layer = make_layer(stem, hidden=7, tag=f"scratch {backend}")
    loop = fused_loop(layer)
    loop.gemm = backend  # "native": the native time loop; "mm": the Python loop on torch.mm
    for packed in (False, True):
        x, states, params, batch_sizes = args_for(layer, T=5, N=4, packed=packed)
        scratch.clear()
        _, fresh = run_loop(loop, x, states, params, batch_sizes)
        assert poison_kept_buffers() > 0  # the first backward gave its buffers back
        _, reused = run_loop(loop, x, states, params, batch_sizes)
        for a, b in zip(fresh, reused, strict=True):
            assert torch.equal(a, b), (stem, backend, packed)
        assert (loop.ran["backward"] == "native") == (backend == "native"), loop.ran


def test_buffers_are_distinct_while_taken_and_reused_after(fresh_scratch):
    with scratch.buffers() as take:
        a, b = take(3, 4, torch.float32), take(3, 4, torch.float32)
        assert a.data_ptr() != b.data_ptr() and a.shape == (3, 4) and a.is_contiguous()
        first = {a.data_ptr(), b.data_ptr()}
    with scratch.buffers() as take:
        again = {take(3, 4, torch.float32).data_ptr(), take(2, 6, torch.float32).data_ptr()}
        assert again == first  # the same 12 elements, viewed as [2, 6] too
        assert take(3, 4, torch.float64).dtype == torch.float64  # another dtype: a fresh buffer


def test_what_is_kept_stays_within_bounds(fresh_scratch, monkeypatch):
    monkeypatch.setattr(scratch, "MAX_BUFFER_BYTES", 1000)
    monkeypatch.setattr(scratch, "MAX_BYTES", 2000)
    with scratch.buffers() as take:
        big = take(1, 300, torch.float32)  # 1200 bytes: over the buffer bound, freed
        small = [take(1, 200, torch.float32) for _ in range(3)]  # 800 bytes each: two fit in 2000
    kept = [buf for pool in scratch._free.values() for buf in pool]
    assert scratch._kept_bytes == sum(t.numel() * t.element_size() for t in kept) == 1600
    assert big.data_ptr() not in {t.data_ptr() for t in kept}
    assert {t.data_ptr() for t in kept} <= {t.data_ptr() for t in small}


def test_buffers_are_given_back_when_the_backward_raises(fresh_scratch):
    with pytest.raises(RuntimeError), scratch.buffers() as take:
        take(2, 2, torch.float32)
        raise RuntimeError("a failing kernel")
    assert scratch._kept_bytes == 16


@needs_cc
def test_backwards_in_two_threads_at_once_each_get_their_own_buffers(fresh_scratch):
    layer = make_layer("gru", hidden=7, tag="scratch threads")
    loop = fused_loop(layer)
    args = [args_for(layer, T=6, N=4, packed=packed, seed=seed) for seed, packed in ((0, False), (1, True))]
    want = [run_loop(loop, *a)[1] for a in args]
    results: dict[int, list] = {0: [], 1: []}

    def work(k: int) -> None:
        for _ in range(8):
            results[k].append(run_loop(loop, *args[k])[1])

    threads = [threading.Thread(target=work, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k in (0, 1):
        assert len(results[k]) == 8
        for got in results[k]:
            assert all(torch.equal(a, b) for a, b in zip(want[k], got, strict=True)), k
