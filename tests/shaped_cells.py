"""The low-rank cell (an ordinary cell with a rank-R bottleneck: the matrix path as one head) as the
tests build it. tests/test_lowrank_cells.py and test_script_arity.py each had its text and the same
seeded float64 celldsl.Recurrent builder at the same sizes."""

import torch

import celldsl

LOWRANK = """cell lowrank
input x
state h
param W_a1 : (R, x)
param W_a2 : (h, R)
param U : (h, h)
param b : h
h' = tanh(W_a2 @ (W_a1 @ x) + U @ h + b)
"""
I, H = 3, 4


def shaped_layer(text, sizes, backend="torch", seed=0, **kw):
    """celldsl.Recurrent(text, I, H) in float64, its parameters drawn after torch.manual_seed(seed)."""
    torch.manual_seed(seed)
    return celldsl.Recurrent(text, I, H, sizes=sizes, backend=backend, dtype=torch.float64, **kw)
