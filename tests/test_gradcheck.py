"""torch.autograd.gradcheck in float64 of every zoo cell's layer: the loop's SymPy-derived backward
against finite differences, for the input, every initial state and every parameter.

Plus the paths that only packed or stacked layers take (prefix rows per step, per-sequence reversal,
the pass-through of finished rows' state gradients) for cells with several states, prev(...) states
and intermediate GEMM operands.
"""

import pytest
import torch
from torch.func import functional_call
from torch.nn.utils.rnn import pack_padded_sequence
from zoo import GENERIC

from celldsl import Recurrent, compile_cell

T, N, H = 3, 2, 3


def gradcheck_layer(layer, x, n_states, packed_lengths=None, fast_mode=False):
    names = [n for n, _ in layer.named_parameters()]
    params = [p.detach().clone().requires_grad_() for _, p in layer.named_parameters()]
    L = layer.num_layers * layer.num_directions
    gen = torch.Generator().manual_seed(3)
    states = [(torch.randn(L, x.shape[1], H, generator=gen, dtype=torch.float64) * 0.5).requires_grad_()
              for _ in range(n_states)]

    def f(x, *rest):
        st, ps = rest[:n_states], rest[n_states:]
        inp = x if packed_lengths is None else pack_padded_sequence(x, packed_lengths, enforce_sorted=False)
        out, final = functional_call(layer, dict(zip(names, ps, strict=True)), (inp, st))
        out = out if packed_lengths is None else out.data
        return (out, *(final if isinstance(final, tuple) else (final,)))

    assert torch.autograd.gradcheck(f, (x, *states, *params), fast_mode=fast_mode)


@pytest.mark.parametrize("backend", ["torch", "cpu"])  # generated torch code; fused C kernels
@pytest.mark.parametrize("stem", GENERIC)  # the others: tests/test_language2.py
def test_gradcheck_zoo_cell(stem, backend):
    cell = compile_cell(stem)
    i_size = H if cell.ir.needs_hidden_size else 2
    torch.manual_seed(0)
    layer = Recurrent(stem, i_size, H, backend=backend, dtype=torch.float64)
    x = torch.randn(T, N, i_size, dtype=torch.float64, requires_grad=True)
    gradcheck_layer(layer, x, len(cell.states))


@pytest.mark.parametrize("stem", ["slstm", "greff_fgr", "mut3"])
def test_gradcheck_packed_bidirectional_two_layers(stem):
    cell = compile_cell(stem)
    torch.manual_seed(0)
    layer = Recurrent(stem, 2, H, num_layers=2, bidirectional=True, backend="torch", dtype=torch.float64)
    x = torch.randn(4, 3, 2, dtype=torch.float64, requires_grad=True)
    # fast mode (random projections v^T J u instead of the full Jacobian): ~600 inputs and ~200 outputs
    gradcheck_layer(layer, x, len(cell.states), packed_lengths=torch.tensor([2, 4, 1]), fast_mode=True)
