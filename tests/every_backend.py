"""An elementwise cell's layer on each backend, for tests against a hand-written reference.

tests/test_language2.py and test_row_width.py each had a copy of this backend fixture (the cpu
backend skipped with a reason where there is no C compiler; triton on Triton's CPU interpreter) and
of the layer builder: float64, seeded, its parameters moved away from the default init so that
gains and shifts matter.
"""

import pytest
import torch

import celldsl
from celldsl.targets.c import fused as cpu_fused

BACKENDS = ["torch", "cpu", "triton"]


def backend_fixture():
    """The `backend` fixture over BACKENDS; a test file binds it: `backend = backend_fixture()`."""

    @pytest.fixture(params=BACKENDS)
    def backend(request, monkeypatch):
        if request.param == "cpu" and cpu_fused.compiler() is None:
            pytest.skip("the cpu backend needs a C compiler")
        if request.param == "triton":
            monkeypatch.setenv("TRITON_INTERPRET", "1")
        return request.param

    return backend


def perturbed_layer(cell, backend, input_size, hidden, **kwargs):
    """celldsl.Recurrent in float64 after torch.manual_seed(0), each parameter plus 0.3 * N(0, 1)."""
    torch.manual_seed(0)
    layer = celldsl.Recurrent(cell, input_size, hidden, backend=backend, dtype=torch.float64, **kwargs)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return layer
