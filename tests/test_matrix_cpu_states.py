"""The C matrix loop's next states (targets/c/matrix_emit.py): the step writes a next state straight
into the loop's buffer, so a next state that is another state's current value (A' = B: before, the
loop copied a value the step never computed) or one value that is two states' next value (A' = B' =
X) must still come out right; against the torch target in float64, values and gradients, and
gradcheck."""

from __future__ import annotations

import warnings

import pytest
import torch

from celldsl.lang.errors import CellWarning
from celldsl.nn.matrix import MatrixRecurrent

HEAD = """cell st
input x
state A : (K, V) per head
state B : (K, V) per head
output o
param W_q, W_k : (K, x) per head
param W_v : (V, x) per head
q = W_q @ x
k = W_k @ x
v = W_v @ x
"""
BODIES = {
    "swap": "A' = B\nB' = 0.5 * A + k @ vᵀ\no = qᵀ @ (A' + B')\n",
    "shared": "X = 0.5 * A + 0.25 * B + k @ vᵀ\nA' = X\nB' = X\no = qᵀ @ X\n",
}


def layers(body, tmp_path):
    path = tmp_path / "st.cell"
    path.write_text(HEAD + body)
    sizes = {"heads": 2, "K": 3, "V": 4}
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CellWarning)
        cpu = MatrixRecurrent(str(path), 5, sizes, backend="cpu", dtype=torch.float64)
        ref = MatrixRecurrent(str(path), 5, sizes, backend="torch", dtype=torch.float64)
    ref.load_state_dict(cpu.state_dict())
    return cpu, ref


@pytest.mark.parametrize("body", sorted(BODIES))
def test_next_states_match_torch(body, tmp_path):
    cpu, ref = layers(BODIES[body], tmp_path)
    assert type(cpu.loop).__name__ == "CMatrixLoop"
    x = torch.randn(40, 2, 5, dtype=torch.float64, requires_grad=True)  # beyond one checkpoint segment
    s0 = tuple(torch.randn(1, 2, 2, 3, 4, dtype=torch.float64, requires_grad=True) for _ in range(2))
    out, fin = cpu(x, s0)
    out_t, fin_t = ref(x, s0)
    torch.testing.assert_close(out, out_t, rtol=1e-10, atol=1e-10)
    for a, b in zip(fin, fin_t, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(out)
    got = torch.autograd.grad((out * g).sum() + sum((s * s).sum() for s in fin), [x, *s0, *cpu.parameters()])
    want = torch.autograd.grad((out_t * g).sum() + sum((s * s).sum() for s in fin_t),
                               [x, *s0, *ref.parameters()])
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("body", sorted(BODIES))
def test_next_states_gradcheck(body, tmp_path):
    cpu, _ = layers(BODIES[body], tmp_path)
    x = torch.randn(3, 2, 5, dtype=torch.float64, requires_grad=True)
    s0 = [torch.randn(2, 2, 3, 4, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    params = [p.detach().clone().requires_grad_() for p in cpu.parameters()]

    def f(x, a, b, *ps):
        out, finals = cpu.loop.run(x, [a, b], list(ps), cpu.layer_sizes[0])
        return (out, *finals)

    assert torch.autograd.gradcheck(f, (x, *s0, *params))
