"""Run by .ci/run in a fresh venv holding the built wheel, from a folder outside the checkout: the
installed package (not the checkout) finds its zoo, grammar and kernels, and a layer trains."""

import sys
from pathlib import Path

import torch

import celldsl
from celldsl.resources import GRAMMAR, KERNELS, ZOO, zoo_names

site = Path(celldsl.__file__).resolve().parent
assert Path(sys.prefix).resolve() in site.parents, f"celldsl imported from {site}, not the fresh venv"
for path in (ZOO, GRAMMAR, KERNELS):
    assert site in path.parents and path.exists(), f"{path} is not inside the installed package {site}"
expected = sorted(sys.argv[1:])  # the checkout's cells/*.cell stems, passed by .ci/run
assert expected and sorted(zoo_names()) == expected, f"installed zoo {zoo_names()} != checkout's {expected}"

torch.manual_seed(0)
for layer in (celldsl.LSTM(4, 5, num_layers=2), celldsl.Recurrent("mut1", 5, 5)):
    x = torch.randn(3, 2, layer.input_size, requires_grad=True)
    out, _ = layer(x)
    out.square().sum().backward()
    assert out.shape == (3, 2, 5) and x.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())
print(f"celldsl {celldsl.__version__} from {site}: zoo, grammar and kernels found; LSTM and mut1 forward "
      "and backward ran")
