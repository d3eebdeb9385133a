"""The cpu backend against the torch backend at the MQAR lab's sizes: outputs, dx and parameter gradients."""
import torch

from celldsl.nn.matrix import MatrixRecurrent

torch.manual_seed(0)
SIZES = {"heads": 1, "K": 8, "V": 32, "R": 32}
for cell in ["deltanet", "gla"]:
    a = MatrixRecurrent(f"cells/{cell}.cell", 32, SIZES, backend="cpu", num_layers=2)
    b = MatrixRecurrent(f"cells/{cell}.cell", 32, SIZES, backend="torch", num_layers=2)
    b.load_state_dict(a.state_dict())
    x = torch.randn(64, 64, 32, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    oa, ob = a(x)[0], b(x2)[0]
    g = torch.randn_like(oa)
    oa.backward(g)
    ob.backward(g)
    dparams = max((p.grad - q.grad).abs().max().item()
                  for p, q in zip(a.parameters(), b.parameters(), strict=True))
    print(cell, "out", (oa - ob).abs().max().item(), "dx", (x.grad - x2.grad).abs().max().item(),
          "dparams", dparams, "|out|", oa.abs().max().item())
