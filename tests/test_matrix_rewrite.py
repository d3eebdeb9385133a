"""The C target's algebraic rewrite of a matrix-memory cell's IR (targets/c/matrix_rewrite.py):
`A @ (I - c u wᵀ)` as `A - c (A u) wᵀ` (and the left form), so the delta rule's step costs
O(V K) instead of a V x K x K product; the rewritten loop against the torch target (float64 values
and gradients) and gradcheck, on the forms it rewrites and on ones it must leave alone."""

from __future__ import annotations

import warnings

import pytest
import torch

from celldsl.compiler import compile_cell
from celldsl.lang.errors import CellWarning
from celldsl.nn.matrix import MatrixRecurrent
from celldsl.targets.c.matrix_rewrite import rewrite


def square_products(ir) -> int:
    """Matrix-by-matrix products (neither side a vector): the rows x inner x cols ones."""
    def matrix(j):
        k = ir.nodes[j].kind
        return k.rows != "1" and k.cols != "1" and ir.nodes[j].op != "eye"
    return sum(1 for n in ir.nodes if n.op == "matmul" and all(matrix(j) for j in n.args))


@pytest.mark.parametrize("cell", ["deltanet", "gated_deltanet"])
def test_delta_rule_loses_its_square_product(cell):
    ir = compile_cell(cell).ir
    assert square_products(ir) == 1  # S @ (I - beta k kᵀ), as written
    assert square_products(rewrite(ir)) == 0
    assert len(rewrite(ir).nodes) <= len(ir.nodes) + 2


CELL = """cell rw
input x
state S : (K, V) per head
output o
param W_q, W_k : (K, x) per head
param W_v : (V, x) per head
param w_g : x per head
param b_g : 1 per head
q = W_q @ x
ka = W_k @ x
k = ka / sqrt(kaᵀ @ ka + 1)
v = W_v @ x
g = sigmoid(w_gᵀ @ x + b_g)
S' = {update}
o = qᵀ @ S'
"""

# (update, rewritten?): S is K x V, so I - u wᵀ is K x K on the left and V x V on the right
UPDATES = [
    ("(I - g * k @ kᵀ) @ S + g * k @ vᵀ", True),
    ("(I + k @ kᵀ * g * 2) @ S + k @ vᵀ", True),
    ("S @ (I - g * v @ vᵀ) + k @ vᵀ", True),
    ("g * S @ (I - v @ (g * vᵀ)) + k @ vᵀ", True),
    ("S @ (I - g * (v @ vᵀ) / (1 + g)) + k @ vᵀ", True),
    ("(I - g * k @ kᵀ - k @ kᵀ) @ S + k @ vᵀ", False),  # two low-rank terms: left as written
    ("(I - tanh(g * k @ kᵀ)) @ S + k @ vᵀ", False),
]


def layers(update, tmp_path, dtype=torch.float64):
    path = tmp_path / "rw.cell"
    path.write_text(CELL.format(update=update))
    sizes = {"heads": 2, "K": 3, "V": 4}
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CellWarning)
        cpu = MatrixRecurrent(str(path), 5, sizes, backend="cpu", dtype=dtype)
        ref = MatrixRecurrent(str(path), 5, sizes, backend="torch", dtype=dtype)
    ref.load_state_dict(cpu.state_dict())
    return cpu, ref


@pytest.mark.parametrize("update,rewritten", UPDATES)
def test_rewritten_loop_matches_torch(update, rewritten, tmp_path):
    cpu, ref = layers(update, tmp_path)
    assert (square_products(cpu.loop.ir) < square_products(cpu.compiled.ir)) == rewritten
    x = torch.randn(40, 2, 5, dtype=torch.float64, requires_grad=True)  # 40: beyond one checkpoint segment
    s0 = (torch.randn(1, 2, 2, 3, 4, dtype=torch.float64, requires_grad=True),)
    out, fin = cpu(x, s0)
    out_t, fin_t = ref(x, s0)
    torch.testing.assert_close(out, out_t, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(fin[0], fin_t[0], rtol=1e-10, atol=1e-10)
    g = torch.randn_like(out)
    got = torch.autograd.grad((out * g).sum() + (fin[0] ** 2).sum(), [x, *s0, *cpu.parameters()])
    want = torch.autograd.grad((out_t * g).sum() + (fin_t[0] ** 2).sum(), [x, *s0, *ref.parameters()])
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("update", [u for u, r in UPDATES if r][:3])
def test_rewritten_loop_gradcheck(update, tmp_path):
    cpu, _ = layers(update, tmp_path)
    x = torch.randn(3, 2, 5, dtype=torch.float64, requires_grad=True)
    s0 = torch.randn(2, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    params = [p.detach().clone().requires_grad_() for p in cpu.parameters()]

    def f(x, s, *ps):
        out, finals = cpu.loop.run(x, [s], list(ps), cpu.layer_sizes[0])
        return (out, *finals)

    assert torch.autograd.gradcheck(f, (x, s0, *params))
