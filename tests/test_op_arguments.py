"""The elementwise op called directly (torch.ops.celldsl.cell_sequence, celldsl.ops.run) with tensors of
the wrong shapes: every backend refuses them with a ValueError that names what was expected.

The layers check their parameters before they call the op, but the op is public (torch.ops), and the
torch loop would broadcast a [1] bias or a [1, H] state into numbers: silently wrong. The reference
for the good case is the layer itself (whose numbers are tested against torch.nn elsewhere).
"""

import pytest
import torch
from every_backend import backend_fixture

import celldsl
from celldsl.ops import run

backend = backend_fixture()  # torch, cpu and triton (its interpreter)


def op_arguments(backend):
    torch.manual_seed(0)
    layer = celldsl.GRU(3, 4, backend=backend).double()
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    h0 = torch.randn(2, 4, dtype=torch.float64)
    return layer, x, h0, layer._weights(0, 0)


def bad_cases(x, h0, params):
    """(what is wrong, x, states, params), each one tensor of a wrong shape that torch would broadcast
    or that a native loop would read out of bounds."""
    def with_param(i, t):
        p = list(params)
        p[i] = t
        return p

    return [
        ("a [1] bias", x, [h0], with_param(len(params) - 1, params[-1][:1])),
        ("a bias one too long", x, [h0], with_param(2, torch.cat([params[2], params[2][:1]]))),
        ("a [1, H] state for 2 sequences", x, [h0[:1]], params),
        ("a [N, 1] state", x, [h0[:, :1]], params),
        ("a step weight with too few rows", x, [h0], with_param(1, params[1][:8])),
        ("a step weight with too few columns", x, [h0], with_param(1, params[1][:, :3])),
        ("a missing parameter", x, [h0], params[:-1]),
        ("a second state", x, [h0, h0], params),
    ]


def test_the_op_with_its_layers_arguments_gives_the_layers_numbers(backend):
    layer, x, h0, params = op_arguments(backend)
    out, finals = run(layer.compiled.key, backend, x, [h0], params)
    ref, h_n = layer(x, h0[None])
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(finals[0], h_n[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("grad", [False, True], ids=["infer", "grad"])
def test_the_op_refuses_arguments_of_the_wrong_shapes(backend, grad):
    layer, x, h0, params = op_arguments(backend)
    for what, xi, states, ps in bad_cases(x, h0, params):
        xi = xi.clone().requires_grad_(grad)
        with pytest.raises(ValueError, match="must|takes") as err:
            run(layer.compiled.key, backend, xi, states, ps)
        assert "got" in str(err.value), (what, str(err.value))


def test_the_registered_op_refuses_them_through_the_dispatcher():
    """torch.ops.celldsl.cell_sequence as a user would call it (the dispatcher's path)."""
    layer, x, h0, params = op_arguments("torch")
    bad = list(params)
    bad[-1] = bad[-1][:1]
    with pytest.raises(ValueError, match=r"vector 'b_hn' must have shape \(4,\), got \(1,\)"):
        torch.ops.celldsl.cell_sequence(layer.compiled.key, "torch", x, [h0], bad, None)
    out = torch.ops.celldsl.cell_sequence(layer.compiled.key, "torch", x, [h0], params, None)[0]
    torch.testing.assert_close(out, layer(x, h0[None])[0], rtol=1e-12, atol=1e-12)
