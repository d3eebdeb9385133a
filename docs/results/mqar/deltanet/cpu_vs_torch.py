import copy

import torch

from celldsl.nn.matrix import MatrixRecurrent

torch.manual_seed(0)
for cell in ["deltanet", "gla"]:
    a = MatrixRecurrent(f"cells/{cell}.cell", 32, {"heads": 1, "K": 8, "V": 32, "R": 32}, backend="cpu", num_layers=2)
    b = copy.deepcopy(a); b_backend = MatrixRecurrent(f"cells/{cell}.cell", 32, {"heads": 1, "K": 8, "V": 32, "R": 32}, backend="torch", num_layers=2)
    b_backend.load_state_dict(a.state_dict())
    x = torch.randn(64, 64, 32, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    oa = a(x)[0]; ob = b_backend(x2)[0]
    g = torch.randn_like(oa)
    oa.backward(g); ob.backward(g)
    print(cell, "out", (oa-ob).abs().max().item(), "dx", (x.grad-x2.grad).abs().max().item(),
          "dparams", max((p.grad-q.grad).abs().max().item() for p, q in zip(a.parameters(), b_backend.parameters())),
          "|out|", oa.abs().max().item())
