"""One module called from two Python threads at once, as an inference server's thread pool does with a
torch.nn model: every call gives the numbers it gives alone (outputs, and gradients under autograd).

The streaming step (a Cell, a layer on T=1) replays a prepared step that owns buffers; its native call
lets go of the GIL, so before, two threads in the same step wrote each other's inputs (wrong numbers
in a few calls of a hundred) or lost each other's saved values (a TypeError in the backward). Now a
call holds the step while it uses it, and a call that finds it held takes the full path.
"""

import threading

import pytest
import torch

import celldsl
from celldsl.nn.matrix import MatrixRecurrent

CASES = {
    "LSTMCell": (lambda: celldsl.LSTMCell(32, 32), (8, 32), 400),
    "GRUCell": (lambda: celldsl.GRUCell(32, 32), (8, 32), 400),
    "LSTM on T=1": (lambda: celldsl.LSTM(32, 32, num_layers=2), (1, 8, 32), 300),
    "GRU on T=1, unbatched": (lambda: celldsl.GRU(32, 32), (1, 32), 300),
    "mut1 Cell": (lambda: celldsl.Cell("mut1", 16, 16), (4, 16), 300),
    "LSTM on T=20": (lambda: celldsl.LSTM(32, 32), (20, 8, 32), 60),
    "gla on T=1": (lambda: MatrixRecurrent("cells/gla.cell", 8, {"heads": 2, "K": 3, "V": 4, "R": 2}),
                   (1, 4, 8), 100),
}


def call(module, x, grad):
    """The output (and with grad, d sum(output) / d x and the first parameter's gradient) as one tensor."""
    if not grad:
        with torch.no_grad():
            return module(x)[0].clone()
    x = x.clone().requires_grad_()
    out = module(x)[0]
    weight = next(module.parameters())
    dx, dw = torch.autograd.grad((out * out).sum(), [x, weight])
    return torch.cat([out.detach().flatten(), dx.flatten(), dw.flatten()])


def same(a, b):
    """Equal up to the order of sums: a call that finds the prepared step busy takes the full path,
    whose GEMMs sum in another order (1e-16 apart in float64); another thread's numbers are O(1) off."""
    return torch.allclose(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("case", list(CASES))
def test_two_threads_in_one_module_get_their_own_numbers(case, grad):
    make, shape, calls = CASES[case]
    torch.manual_seed(0)
    module = make().double()
    xs = [torch.randn(shape, dtype=torch.float64) for _ in range(2)]
    want = [call(module, x, grad) for x in xs]
    for x, w in zip(xs, want, strict=True):  # alone, twice: the same numbers (a replayed step too)
        assert same(call(module, x, grad), w)
    wrong, errors = [0, 0], []

    def work(i):
        try:
            for _ in range(calls):
                wrong[i] += not same(call(module, xs[i], grad), want[i])
        except Exception as err:  # noqa: BLE001 - reported below, with the thread's traceback lost
            errors.append(repr(err))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert wrong == [0, 0], f"calls with another thread's numbers: {wrong} of {calls} each"
