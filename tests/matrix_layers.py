"""The headed matrix-memory zoo cells as the tests build and check them.

test_matrix_cells, test_matrix_cpu, test_matrix_step, test_triton_matrix and test_triton_matrix_blocks
each had a copy of these sizes, of the six references bound to them and of the layer builder;
test_matrix_prev and test_matrix_zoo had a copy of the parameter layout and of the states and
gradients helpers. Here once: float64 layers where K != V != heads != I, their parameters in the
layout of tests/matrix_references.py, random initial states, and gradients of a randomly weighted loss.
"""

from __future__ import annotations

import torch
from matrix_references import ref_deltanet, ref_gated_deltanet, ref_gla, ref_hgrn2, ref_m2rnn, ref_mlstm

from celldsl.nn.matrix import MatrixRecurrent

HEADS, K, V, I, R = 3, 4, 5, 6, 2  # K != V != heads != I; R: GLA's gate rank
SIZES = {"heads": HEADS, "K": K, "V": V, "R": R}
REFERENCES = {  # the einsum references of the cells that have one, at HEADS heads
    "mlstm": lambda p, x, s: ref_mlstm(p, x, s, heads=HEADS, stabilized=True),
    "gla": lambda p, x, s: ref_gla(p, x, s, heads=HEADS),
    "deltanet": lambda p, x, s: ref_deltanet(p, x, s, heads=HEADS),
    "gated_deltanet": lambda p, x, s: ref_gated_deltanet(p, x, s, heads=HEADS),
    "hgrn2": lambda p, x, s: ref_hgrn2(p, x, s, heads=HEADS),
    "m2rnn": lambda p, x, s: ref_m2rnn(p, x, s, heads=HEADS),
}


def matrix_layer(cell, backend="torch", *, sizes=SIZES, inputs=I, seed=0, checkpoint=None, **kw):
    """A float64 MatrixRecurrent, its parameters drawn after torch.manual_seed(seed). `checkpoint`: the
    Triton loop's segment length (backend="triton" only), small so that short sequences cross one."""
    torch.manual_seed(seed)
    layer = MatrixRecurrent(cell, inputs, sizes, dtype=torch.float64, backend=backend, **kw)
    if backend == "triton" and checkpoint is not None:
        assert type(layer.loop).__name__ == "TritonMatrixLoop"
        layer.loop.checkpoint = checkpoint
    return layer


def reference_layout(ir, name, t):
    """Parameter `name` of a layer as the references take it: a matrix per head [heads, rows, cols] as
    [heads * rows, cols] (head-major), a K- or V-vector per head as [heads * K]; as stored: shared
    parameters (GLA's W_a1 [R, I]), M2RNN's W [heads, V, V], w_i : x per head [heads, I] and
    b_i : 1 per head [heads]."""
    kind = ir.kinds[name]
    if name == "W" or not kind.head:
        return t
    if kind.cols != "1":
        return t.reshape(-1, t.shape[-1])
    if kind.rows not in ("1", "x"):
        return t.reshape(-1)
    return t


def ref_params(layer):
    """A one-layer layer's (or a Cell's) parameters in the references' layout, by name."""
    return {n.removesuffix("_l0"): reference_layout(layer.ir, n.removesuffix("_l0"), t)
            for n, t in layer.named_parameters()}


def random_states(layer, n, seed=1):
    """Initial states [layers * directions, n, ...] of scale 0.5 that require grad."""
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(layer.num_layers * layer.num_directions, n,
                             *layer.ir.state_shape(s, layer.layer_sizes[0]), generator=g,
                             dtype=torch.float64).mul_(0.5).requires_grad_() for s in layer.ir.states)


def weighted_grads(out, finals, wrt, seed=2):
    """The gradients of `wrt` for a loss that weights the output and each final state randomly."""
    g = torch.Generator().manual_seed(seed)
    loss = (out * torch.randn(out.shape, generator=g, dtype=out.dtype)).sum()
    loss = loss + sum((f * torch.randn(f.shape, generator=g, dtype=f.dtype)).sum() for f in finals)
    return torch.autograd.grad(loss, wrt)


# A user cell whose product has diag() on the right (S @ diag(a) scales S's columns): no zoo cell has one
# (test_matrix_reliability.py runs it on every backend, test_triton_matrix.py compiles its kernels).
COLUMN_SCALE = """cell colscale
input x
state S : (K, V) per head
output o
param W_k : (K, x) per head
param W_v, W_a : (V, x) per head
k = W_k @ x
v = W_v @ x
a = sigmoid(W_a @ x)
S' = S @ diag(a) + k @ vᵀ
o = kᵀ @ S'
"""
