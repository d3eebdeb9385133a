"""torch.export and torch.jit.trace of matrix-path cells: the torch loop exports (unrolled over the
example's steps); the cpu loop and tracing are refused with the reason and what works, never a deep
tracer error (they were: "Cannot access data pointer of Tensor", "unordered_map::at")."""

import pytest
import torch

import celldsl

SIZES = {"heads": 2, "K": 4, "V": 3, "R": 4}


class Wrap(torch.nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)[0]


def layer(backend):
    torch.manual_seed(0)
    return celldsl.Recurrent("gla", 5, 6, sizes=SIZES, backend=backend, dtype=torch.float64)


def test_the_torch_loop_exports_and_gives_the_eager_numbers():
    model = Wrap(layer("torch"))
    x = torch.randn(4, 2, 5, dtype=torch.float64)
    program = torch.export.export(model, (x,))
    torch.testing.assert_close(program.module()(x), model(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["cpu", "auto"])
def test_export_of_the_cpu_loop_is_refused_with_what_works(backend):
    x = torch.randn(4, 2, 5, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="torch.export: cell 'gla' .* backend='torch'"):
        torch.export.export(Wrap(layer(backend)), (x,))


def test_export_of_a_matrix_cell_step_is_refused():
    step = celldsl.Cell("gla", 5, 6, sizes=SIZES, dtype=torch.float64)

    class One(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.step = step

        def forward(self, x):
            return self.step(x)[0]

    with pytest.raises(RuntimeError, match="torch.export: cell 'gla'"):
        torch.export.export(One(), (torch.randn(2, 5, dtype=torch.float64),))


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_trace_is_refused_with_the_reason(backend):
    x = torch.randn(4, 2, 5, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="torch.jit.trace: cell 'gla' runs on the matrix path"):
        torch.jit.trace(Wrap(layer(backend)), (x,))


def test_eager_calls_are_unaffected():
    x = torch.randn(4, 2, 5, dtype=torch.float64)
    torch.testing.assert_close(layer("cpu")(x)[0], layer("torch")(x)[0], rtol=1e-10, atol=1e-12)
