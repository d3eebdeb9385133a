"""Every zoo cell, run by celldsl.Recurrent, against its hand-written reference (reference_cells.py).

Both sides see the same weights: the reference reads `layer.cell_parameter(name, layer, direction)`,
views of the layer's parameters, so autograd through the reference gives the gradients of the
layer's own parameters. Compared: outputs, final states, and the gradients of the input, the initial
states and every parameter, in float64. Multi-layer, bidirectional and PackedSequence runs are
composed here from the one-layer reference (per sequence, over its own length; the reverse direction
reads each sequence backwards), so the reference knows nothing of packing.
"""

import pytest
import torch
from reference_cells import REFERENCES
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from zoo import GENERIC

from celldsl import Recurrent, compile_cell

T, N, I, H = 5, 3, 4, 6
ATOL = 1e-10
# plus 1e-10 relative: sLSTM's exponential gates give gradients of ~1e4 after two layers, where the C
# kernels' different summation order alone moves the last digits (measured: 3e-13 relative at most)
RTOL = 1e-10
LENGTHS = [3, 5, 2]
CONFIGS = {  # cells that need input_size == hidden_size (MUT1, MUT2, SRU) cannot take a bidirectional
    # layer's 2H outputs as input: they run the packed bidirectional case with one layer
    "1layer": dict(num_layers=1, bidirectional=False, packed=False),
    "2layer_bidir_packed": dict(num_layers=2, bidirectional=True, packed=True),
}


def reference_stack(stem, layer, x, states, lengths):
    """The layer's forward composed from the one-layer reference, one sequence at a time.

    x [T, N, I]; states: tuple of [L*D, N, H]; lengths: per sequence. -> (out [T, N, D*H], zero past each
    sequence's end; final states, tuple of [L*D, N, H]).
    """
    D = 2 if layer.bidirectional else 1
    finals = [[None] * (layer.num_layers * D) for _ in states]
    inp = x
    for lay in range(layer.num_layers):
        outs = []
        for d in range(D):
            p = {name: layer.cell_parameter(name, lay, d) for name in layer.compiled.ir.params}
            idx = lay * D + d
            columns, last = [], []
            for n, length in enumerate(lengths):
                seq = inp[:length, n : n + 1]
                state = tuple(s[idx, n : n + 1] for s in states)
                out, fin = REFERENCES[stem](p, seq.flip(0) if d else seq, state)
                out = out.flip(0) if d else out
                columns.append(torch.cat([out, out.new_zeros(T - length, 1, out.shape[-1])]))
                last.append(fin)
            outs.append(torch.cat(columns, dim=1))
            for i in range(len(states)):
                finals[i][idx] = torch.cat([fin[i] for fin in last])
        inp = torch.cat(outs, dim=-1)
    return inp, tuple(torch.stack(f) for f in finals)


def run_layer(layer, x, states, packed):
    if packed:
        seq = pack_padded_sequence(x, torch.tensor(LENGTHS), enforce_sorted=False)
        out, final = layer(seq, states)
        out = pad_packed_sequence(out, total_length=T)[0]
    else:
        out, final = layer(x, states[0] if len(states) == 1 else states)
    return out, final if isinstance(final, tuple) else (final,)


def random_loss(out, finals):
    gen = torch.Generator().manual_seed(2)
    loss = (out * torch.randn(out.shape, generator=gen, dtype=out.dtype)).sum()
    for s in finals:
        loss = loss + (s * torch.randn(s.shape, generator=gen, dtype=s.dtype)).sum()
    return loss


@pytest.mark.parametrize("backend", ["torch", "cpu"])  # generated torch code; fused C kernels
@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("stem", GENERIC)  # the others: tests/test_language2.py
def test_zoo_cell_matches_reference(stem, config, backend):
    cfg = CONFIGS[config]
    cell = compile_cell(stem)
    i_size = H if cell.ir.needs_hidden_size else I
    num_layers = 1 if cell.ir.needs_hidden_size and cfg["bidirectional"] else cfg["num_layers"]
    torch.manual_seed(0)
    layer = Recurrent(stem, i_size, H, num_layers=num_layers, bidirectional=cfg["bidirectional"],
                      backend=backend, dtype=torch.float64)
    L = num_layers * (2 if cfg["bidirectional"] else 1)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(T, N, i_size, generator=gen, dtype=torch.float64, requires_grad=True)
    states = tuple((torch.randn(L, N, H, generator=gen, dtype=torch.float64) * 0.5).requires_grad_()
                   for _ in cell.states)
    params = list(layer.parameters())

    out, final = run_layer(layer, x, states, cfg["packed"])
    grads = torch.autograd.grad(random_loss(out, final), [x, *states, *params])
    lengths = LENGTHS if cfg["packed"] else [T] * N
    ref_out, ref_final = reference_stack(stem, layer, x, states, lengths)
    ref_grads = torch.autograd.grad(random_loss(ref_out, ref_final), [x, *states, *params])

    torch.testing.assert_close(out, ref_out, atol=ATOL, rtol=0)
    assert len(final) == len(ref_final) == len(cell.states)
    for a, b in zip(final, ref_final, strict=True):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    names = ["x", *cell.states, *(n for n, _ in layer.named_parameters())]
    for name, a, b in zip(names, grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL, msg=f"gradient of {name}")
