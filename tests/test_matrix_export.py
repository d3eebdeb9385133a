"""torch.export and torch.jit.trace of matrix-path cells: every backend exports and traces through the
op celldsl::matrix_sequence (one call per layer and direction, not the loop unrolled over the example's
steps), so the program holds at other sequence lengths. These were refused before (and earlier a deep
tracer error: "Cannot access data pointer of Tensor", "unordered_map::at"). tests/test_matrix_deploy.py
covers every cell, TorchScript and fresh-process loads."""

import pytest
import torch
from torch.export import Dim

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


@pytest.mark.parametrize("backend", ["torch", "cpu", "auto"])
def test_every_backend_exports_one_op_call_that_holds_at_other_lengths(backend):
    model = Wrap(layer(backend))
    x = torch.randn(4, 2, 5, dtype=torch.float64)
    program = torch.export.export(model, (x,), dynamic_shapes=({0: Dim("T")},))
    calls = [n.target for n in program.graph.nodes if n.op == "call_function" and "celldsl" in str(n.target)]
    assert calls == [torch.ops.celldsl.matrix_sequence.default]
    x7 = torch.randn(7, 2, 5, dtype=torch.float64)
    torch.testing.assert_close(program.module()(x7), model(x7), rtol=1e-12, atol=1e-12)


def test_a_matrix_cell_step_exports():
    step = celldsl.Cell("gla", 5, 6, sizes=SIZES, dtype=torch.float64)

    class One(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.step = step

        def forward(self, x):
            return self.step(x)[0]

    x = torch.randn(2, 5, dtype=torch.float64)
    program = torch.export.export(One(), (x,))
    torch.testing.assert_close(program.module()(x), One()(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_trace_gives_the_eager_numbers(backend):
    model = Wrap(layer(backend))
    x = torch.randn(4, 2, 5, dtype=torch.float64)
    traced = torch.jit.trace(model, (x,))  # the default check_trace runs it again and compares
    torch.testing.assert_close(traced(x), model(x), rtol=1e-12, atol=1e-12)


def test_eager_calls_are_unaffected():
    x = torch.randn(4, 2, 5, dtype=torch.float64)
    torch.testing.assert_close(layer("cpu")(x)[0], layer("torch")(x)[0], rtol=1e-10, atol=1e-12)
