"""TorchScript: torch.jit.trace of models holding celldsl layers (issue 27, item 3).

trace failed its own check ("Graphs differed across invocations"): with parameters that need
gradients the layers called the op through an autograd.Function, which the tracer records
differently from one invocation to the next. Traced, the layers now call the registered op itself
(its own autograd). The traced model runs other sizes, gives torch.nn's numbers and gradients with
the same weights, and saves and loads with torch.jit.save/load.
"""

import io

import pytest
import torch
from torch import nn

import celldsl


class Model(nn.Module):
    def __init__(self, mod):
        super().__init__()
        self.rnn = mod.LSTM(4, 5, num_layers=2, bidirectional=True, batch_first=True)
        self.gru = mod.GRU(10, 3)
        self.cell = mod.GRUCell(3, 3)

    def forward(self, x):
        out, (h, c) = self.rnn(x)
        y, g = self.gru(out.transpose(0, 1))
        return out, h, c, y, g, self.cell(y[-1], g[0])


def _pair():
    torch.manual_seed(0)
    ref, ours = Model(nn), Model(celldsl)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_trace_passes_its_check_and_matches_torch_nn():
    ref, ours = _pair()
    traced = torch.jit.trace(ours, (torch.randn(3, 6, 4),))  # check_trace=True: the default
    for shape in [(3, 6, 4), (5, 8, 4)]:  # other batch and sequence sizes than the traced ones
        x = torch.randn(shape)
        grads = []
        for module in (ref, traced):
            module.zero_grad()
            xs = x.clone().requires_grad_()
            results = module(xs)
            sum((r * r).sum() for r in results).backward()
            grads.append([r.detach() for r in results] + [xs.grad] + [p.grad for p in module.parameters()])
        for a, b in zip(*grads, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_traced_model_saves_and_loads():
    ref, ours = _pair()
    x = torch.randn(3, 6, 4)
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.trace(ours, (x,)), buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    for a, b in zip(ref(x), loaded(x), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
